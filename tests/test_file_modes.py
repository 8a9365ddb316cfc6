"""Every file a user hands to another program (exports, merged checkpoints, the tiny model) is published 0644 and its
folders 0755, whatever the libraries that wrote it and the process umask did (ComfyUI may run as another user)."""

from __future__ import annotations

import os
import stat

import pytest
from test_export_helpers import trained_adapter


def _modes(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = stat.S_IMODE(os.stat(p).st_mode)
    return out


@pytest.fixture
def strict_umask():
    old = os.umask(0o077)  # the most private umask a user may have: our results are published anyway
    yield
    os.umask(old)


def test_make_tiny_files_are_readable_by_others(tmp_path, strict_umask):
    from krea2_train.cli import main

    assert main(["make-tiny", str(tmp_path / "tiny")]) == 0
    modes = _modes(tmp_path / "tiny")
    assert any(k.endswith(".safetensors") for k in modes) and "text_encoder" in modes
    wrong = {k: oct(v) for k, v in modes.items() if v != (0o755 if (tmp_path / "tiny" / k).is_dir() else 0o644)}
    assert not wrong


def test_merge_into_and_exports_are_readable_by_others(tiny_dir, tmp_path, strict_umask):
    from krea2_train.cli import main
    from krea2_train.export.export import export_lora
    from krea2_train.lora.writers import write_lora_file

    adapter = trained_adapter(tiny_dir, r=4, alpha=8)
    lora = write_lora_file(adapter, tmp_path / "l.safetensors", "comfyui")
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", str(lora), "--into", str(tiny_dir / "transformer_raw.safetensors"), "--out", str(merged)]) == 0
    assert stat.S_IMODE(os.stat(merged).st_mode) == 0o644 and stat.S_IMODE(os.stat(lora).st_mode) == 0o644
    export_lora(adapter, tmp_path / "exp", formats=("diffusers", "comfyui", "civitai", "original", "musubi"), name="x")
    modes = _modes(tmp_path / "exp")
    assert {k: v for k, v in modes.items() if v != (0o755 if (tmp_path / "exp" / k).is_dir() else 0o644)} == {}
