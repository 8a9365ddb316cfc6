"""Atomic writes: a killed process never leaves a half-written cache entry, checkpoint or exported LoRA.

Everything is written to a temporary sibling and renamed into place (rename is atomic on POSIX filesystems).
Every result is published 0644 (folders 0755): users hand these files to other programs (ComfyUI, a web UI, a
shared model folder) that may run as another user, while mkstemp and safetensors' writer both create 0600 files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

FILE_MODE, DIR_MODE = 0o644, 0o755


def _tmp_sibling(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(name, FILE_MODE)  # mkstemp makes 0600; results are ordinary user files
    return Path(name)


def _make_parents(path: Path) -> None:
    """Create `path`'s missing parent folders DIR_MODE (mkdir follows the umask, which may be 077)."""
    missing = [p for p in path.parents if not p.exists()]
    for p in reversed(missing):
        p.mkdir(exist_ok=True)
        os.chmod(p, DIR_MODE)


def publish_modes(root) -> None:
    """Give every file under `root` (or `root` itself) FILE_MODE and every folder DIR_MODE, keeping execute bits of
    files that have them: libraries writing into our folders (safetensors, save_pretrained) leave 0600 files."""
    root = Path(root)
    if root.is_file():
        os.chmod(root, FILE_MODE | (os.stat(root).st_mode & 0o111))
        return
    os.chmod(root, DIR_MODE)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), DIR_MODE)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, FILE_MODE | (os.stat(p).st_mode & 0o111))


def save_safetensors_atomic(tensors: dict, path, metadata: dict | None = None) -> Path:
    path = Path(path)
    _make_parents(path)
    tmp = _tmp_sibling(path)
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
        save_file(tensors, str(tmp), metadata=meta or None)
        os.chmod(tmp, FILE_MODE)  # safetensors recreates the file 0600 whatever the temporary's mode was
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes_atomic(path, data: bytes) -> Path:
    path = Path(path)
    _make_parents(path)
    tmp = _tmp_sibling(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary directory that replaces `path` only when the block finishes without error."""
    path = Path(path)
    _make_parents(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, DIR_MODE)
    try:
        yield tmp
        publish_modes(tmp)  # what the block wrote (e.g. save_pretrained's safetensors files) is 0600 otherwise
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
