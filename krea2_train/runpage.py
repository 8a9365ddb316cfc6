"""RUN/index.html: one static page of a run that opens from disk with no server.

It shows what the run folder holds, each part only when its file exists: the settings (config.yaml, runtime.json),
the loss curve with the validation loss and stage starts (loss.png) and the validation losses from metrics.jsonl,
the previews over steps (previews/step-*.png), the data report (data_report.json, written by the pipeline's
check-data), the Turbo verification (export/verify.json), the Raw -> Turbo transfer report with its grid, and links
to the exported files. Every link and image is relative, so the folder can be copied or zipped whole.

    write_run_page("runs/demo")        # the pipeline does this at the end; `krea2-train page RUN` on its own
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from krea2_train.utils.io import write_text_atomic

PAGE = "index.html"
DATA_REPORT = "data_report.json"

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;padding:0 1rem;color:#222}
h1{margin-bottom:.2rem} h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse} td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:left;font-size:.9rem}
pre{background:#f6f6f6;padding:.8rem;overflow:auto;max-height:24rem;font-size:.8rem}
figure{display:inline-block;margin:.4rem;vertical-align:top} figcaption{font-size:.85rem;color:#555}
img{max-width:100%;border:1px solid #ddd} .ok{color:#17692c;font-weight:600} .bad{color:#b00020;font-weight:600}
.img-missing{display:inline-block;padding:1rem;border:1px dashed #b00020;color:#b00020}
"""
# An image that does not load (a file removed after the page was written) says so instead of a broken icon.
_SCRIPT = """
document.querySelectorAll('img').forEach(function (im) {
  function missing() {
    var s = document.createElement('span'); s.className = 'img-missing';
    s.textContent = 'missing image: ' + im.getAttribute('src'); im.replaceWith(s);
  }
  if (im.complete && im.naturalWidth === 0) { missing(); } else { im.addEventListener('error', missing); }
});
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _rel(run: Path, path: Path) -> str:
    return _e(path.relative_to(run).as_posix())


def _table(rows, head=None) -> str:
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    return "".join(out) + "</table>"


def _metrics(run: Path) -> list[dict]:
    rows = []
    path = run / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a half line from a killed run
    return rows


def _settings(run: Path) -> list[str]:
    parts = []
    runtime = _read_json(run / "runtime.json")
    if runtime:
        parts.append(_table([[_e(k), _e(json.dumps(v) if isinstance(v, (dict, list)) else v)]
                             for k, v in sorted(runtime.items())], head=["runtime", "value"]))
    if (run / "config.yaml").exists():
        parts.append(f"<details><summary>config.yaml</summary><pre>{_e((run / 'config.yaml').read_text())}</pre>"
                     "</details>")
    return parts


def _curves(run: Path) -> list[str]:
    parts = []
    if (run / "loss.png").exists():
        parts.append('<img src="loss.png" alt="loss curve">')
    rows = _metrics(run)
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        parts.append(_table([[_e(s), f"{v:.5f}"] for s, v in val], head=["step", "validation loss"]))
    losses = [r for r in rows if "loss" in r]
    if losses:
        last = losses[-1]
        parts.append(f"<p>last logged step {_e(last['step'])}: loss {last['loss']:.5f}, lr {last.get('lr', 0):.3g}"
                     "</p>")
    return parts


def _previews(run: Path) -> list[str]:
    files = sorted((run / "previews").glob("step-*.png")) if (run / "previews").is_dir() else []
    return [f'<figure><img src="{_rel(run, p)}" alt="{_e(p.stem)}"><figcaption>{_e(p.stem)}</figcaption></figure>'
            for p in files]


def _data(run: Path) -> list[str]:
    report = _read_json(run / DATA_REPORT)
    if not report:
        return []
    parts = [f"<p>{_e(report.get('summary', ''))}</p>"]
    problems = report.get("problems", [])
    if problems:
        parts.append(_table([[_e(p["severity"]), _e(p["kind"]), _e(p["message"])] for p in problems],
                            head=["severity", "kind", "message"]))
    return parts


def _verification(run: Path) -> list[str]:
    report = _read_json(run / "export" / "verify.json")
    if not report:
        return []
    rows = []
    for fmt, r in sorted(report.items()):
        ok = '<span class="ok">ok</span>' if r.get("ok") else '<span class="bad">FAILED</span>'
        err = r.get("max_delta_error")
        rows.append([_e(fmt), ok, _e(Path(str(r.get("path", ""))).name), _e(r.get("strength", "")),
                     "" if err is None else f"{err:.2e}", _e("; ".join(r.get("problems", [])))])
    return [_table(rows, head=["format", "result", "file", "strength", "max delta error", "problems"])]


def _transfer(run: Path) -> list[str]:
    report = _read_json(run / "export" / "transfer_report.json")
    if not report:
        return []
    reading = str(report.get("reading", ""))
    if report.get("references") and "style" in report:  # an edit report written before edit_style_distance
        reading = (reading.split("; on pictures, Turbo matches")[0] + "; the style check does not apply to an edit "
                   "LoRA (this report predates that note: run `krea2-train transfer RUN` again for it)")
    parts = [f"<p>{_e(reading)}</p>"]
    grid = run / "export" / str(report.get("grid") or "transfer_grid.png")
    if grid.exists():
        parts.append(f'<img src="{_rel(run, grid)}" alt="Raw vs Turbo grid">')
    return parts


def _exports(run: Path) -> list[str]:
    folder = run / "export"
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.rglob("*.safetensors") if p.is_file())
    return [_table([[f'<a href="{_rel(run, p)}">{_rel(run, p)}</a>', f"{p.stat().st_size / 1e6:.1f} MB"]
                    for p in files], head=["file", "size"])] if files else []


def write_run_page(run_dir) -> Path:
    """Write RUN/index.html from what the run folder holds now (atomically; safe to call again at any time)."""
    run = Path(run_dir)
    sections = [("Settings", _settings(run)), ("Loss", _curves(run)), ("Previews over steps", _previews(run)),
                ("Data", _data(run)), ("Verification on Turbo", _verification(run)),
                ("Raw to Turbo transfer", _transfer(run)), ("Exported files", _exports(run))]
    body = [f"<h1>{_e(run.name)}</h1><p>krea2-train run folder <code>{_e(run)}</code></p>"]
    for title, parts in sections:
        body.append(f"<h2>{_e(title)}</h2>" + ("".join(parts) if parts else "<p><em>not there yet</em></p>"))
    page = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>"
            f"{_e(run.name)} - krea2-train</title><style>{_STYLE}</style></head><body>{''.join(body)}"
            f"<script>{_SCRIPT}</script></body></html>\n")
    return write_text_atomic(run / PAGE, page)


def write_data_report(run_dir, scan) -> Path:
    """RUN/data_report.json: check-data's summary and every problem, for the run page."""
    from krea2_train.utils.io import write_json_atomic

    return write_json_atomic(Path(run_dir) / DATA_REPORT, {
        "summary": scan.summary(), "problems": [
            {"severity": p.severity, "kind": p.kind, "file": p.file, "message": p.message} for p in scan.problems]})
