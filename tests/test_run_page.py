"""RUN/index.html: every part of a run on one static page, checked as written and in a real headless browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
from PIL import Image

from krea2_train.runpage import write_run_page
from krea2_train.train.tracking import write_loss_curve


@pytest.fixture
def run_folder(tmp_path):
    """A run folder with each file a finished run leaves (small stand-ins)."""
    run = tmp_path / "runs" / "mystyle"
    (run / "previews").mkdir(parents=True)
    (run / "export" / "mystyle_diffusers").mkdir(parents=True)
    (run / "config.yaml").write_text("run_name: mystyle\nlora:\n  rank: 8\n")
    (run / "runtime.json").write_text(json.dumps({"strategy": "single", "optimizer": "adamw", "processes": 1}))
    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-4} for s in range(1, 11)] + [{"step": 10, "val_loss": 0.25}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_loss_curve([[s, 1.0 / s] for s in range(1, 11)], run / "loss.png", val_history=[[10, 0.25]],
                     boundaries=[6])
    for step, colour in ((5, (200, 40, 40)), (10, (40, 40, 200))):
        Image.new("RGB", (96, 32), colour).save(run / "previews" / f"step-{step:06d}.png")
    Image.new("RGB", (128, 32), (40, 160, 40)).save(run / "export" / "transfer_grid.png")
    (run / "export" / "transfer_report.json").write_text(json.dumps(
        {"reading": "the LoRA acts with similar strength on Turbo (0.99x)", "grid": "transfer_grid.png"}))
    (run / "export" / "verify.json").write_text(json.dumps({
        "civitai": {"ok": True, "path": str(run / "export" / "mystyle.safetensors"), "strength": 1.0,
                    "max_delta_error": 1.3e-3, "problems": []}}))
    (run / "export" / "mystyle.safetensors").write_bytes(b"x" * 1000)
    (run / "export" / "mystyle_diffusers" / "pytorch_lora_weights.safetensors").write_bytes(b"x" * 1000)
    (run / "data_report.json").write_text(json.dumps({"summary": "3 usable images; 1 skipped", "problems": [
        {"severity": "error", "kind": "truncated", "file": "a.jpg", "message": "a.jpg: truncated image"}]}))
    return run


def test_page_shows_every_part_with_relative_links(run_folder):
    page = write_run_page(run_folder).read_text()
    for title in ("Settings", "Loss", "Previews over steps", "Data", "Verification on Turbo", "Raw to Turbo transfer",
                  "Exported files"):
        assert f"<h2>{title}</h2>" in page
    assert "not there yet" not in page  # every part found its file
    assert "0.25000" in page and "a.jpg: truncated image" in page and "similar strength on Turbo" in page
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert "previews/step-000005.png" in refs and "export/mystyle_diffusers/pytorch_lora_weights.safetensors" in refs
    for ref in refs:  # relative, and each one is there: the page opens from disk, the folder can be moved
        assert not ref.startswith(("/", "http")) and (run_folder / ref).exists(), ref


def test_an_edit_reports_style_sentence_is_not_shown_as_a_style_result(run_folder):
    """An edit run's report written before edit_style_distance (a `style` section and its sentence): the page drops
    the sentence and says the style check does not apply; the new reports' reading is shown as written."""
    path = run_folder / "export" / "transfer_report.json"
    old = ("the LoRA acts with similar strength on Turbo (0.99x); on pictures, Turbo matches Raw + LoRA's style at "
           "strength 0.00; at the suggested strength the LoRA closes -6% of Turbo's gap to the training images")
    path.write_text(json.dumps({"reading": old, "references": {"count": 1}, "style": {"matched_strength": 0.0}}))
    page = write_run_page(run_folder).read_text()
    assert "similar strength on Turbo" in page and "matches Raw" not in page and "closes -6%" not in page
    assert "style check does not apply to an edit" in page
    path.write_text(json.dumps({"reading": old, "style": {"matched_strength": 0.0}}))  # text-to-image: as written
    assert "closes -6%" in write_run_page(run_folder).read_text()


def test_page_of_an_empty_run_says_what_is_missing(tmp_path):
    page = write_run_page(tmp_path).read_text()
    assert page.count("not there yet") == 7


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI") == "true":  # .ci/run installs it: CI must never skip the browser test
            pytest.fail("chromium not found; .ci/run installs it with apt-get install chromium")
        pytest.skip("no chromium: `apt-get install chromium` (Debian) to run the headless browser test")
    return found


def _browse(url: str, *flags: str) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=5000", "--window-size=1200,2400", *flags, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_page_in_headless_chromium(run_folder, tmp_path):
    url = write_run_page(run_folder).as_uri()
    dom = _browse(url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console  # no script errors, no console output at all
    assert "<h2>Previews over steps</h2>" in dom.stdout
    assert '<span class="img-missing">' not in dom.stdout  # every image decoded (the page marks those that fail)

    shot = tmp_path / "page.png"
    done = _browse(url, f"--screenshot={shot}")
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    im = Image.open(shot).convert("RGB")
    assert im.size == (1200, 2400)
    colours = {c for _, c in im.getcolors(maxcolors=1 << 20)}
    # the previews' pure colours are on screen: the images were drawn, not just laid out
    assert {(200, 40, 40), (40, 40, 200), (40, 160, 40)} <= colours

    # the check can fail: a preview deleted after the page was written shows as missing
    (run_folder / "previews" / "step-000005.png").unlink()
    dom = _browse(url, "--dump-dom")
    assert '<span class="img-missing">missing image: previews/step-000005.png</span>' in dom.stdout
