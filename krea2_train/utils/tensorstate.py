"""Training state as safetensors + JSON, never pickle: a checkpoint someone sent you cannot run code when resumed.

`torch.save`/`torch.load(weights_only=False)` (what accelerate's optimizer.bin, scheduler.bin and random_states_*.pkl
are) unpickle arbitrary objects. Here an optimiser's state dict is split into its tensors (one safetensors file) and
everything else (param groups, step counters, floats) as JSON in that file's header; RNG states are tensors too.
Values round-trip exactly (JSON floats are repr-exact), so a resumed run stays bit-identical.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from krea2_train.errors import UserError
from krea2_train.utils.io import save_safetensors_atomic

_JSON_KEY = "krea2_state"  # the header field that holds the non-tensor part


def _check_json(value, where: str):
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise UserError(f"cannot checkpoint {where} without pickle: {type(value).__name__} is neither a tensor nor "
                        f"JSON ({exc}); use another optimizer.name") from exc
    return value


def _split(value, name: str, tensors: dict):
    """`value` with every tensor (however deeply nested: bitsandbytes keeps a dict of them per parameter) moved into
    `tensors` and replaced by {"__tensor__": its name}; the rest must be plain JSON."""
    if isinstance(value, torch.Tensor):
        tensors[name] = value
        return {"__tensor__": name}
    if isinstance(value, dict):
        return {str(k): _split(v, f"{name}/{k}", tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return {"__list__": [_split(v, f"{name}/{i}", tensors) for i, v in enumerate(value)],
                "tuple": isinstance(value, tuple)}
    return _check_json(value, f"optimiser state `{name}`")


def _join(value, tensors: dict):
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__list__" in value:
            items = [_join(v, tensors) for v in value["__list__"]]
            return tuple(items) if value["tuple"] else items
        return {k: _join(v, tensors) for k, v in value.items()}
    return value


def save_optimizer_state(state: dict, path, extra: dict | None = None) -> Path:
    """An optimiser `state_dict()` (tensors may already be the local parts of sharded ones) to `path`.
    `extra`: more JSON kept beside it (e.g. how sharded tensors are rebuilt)."""
    tensors: dict = {}
    meta = {"state": _split({str(pid): st for pid, st in state["state"].items()}, "state", tensors),
            "param_groups": _split(state["param_groups"], "param_groups", tensors), "extra": extra or {}}
    seen = set()
    for name, t in tensors.items():  # safetensors refuses tensors sharing storage (one quantisation map for all)
        if t.device.type != "meta" and t.numel() and t.untyped_storage().data_ptr() in seen:
            tensors[name] = t.clone()
        elif t.numel():
            seen.add(t.untyped_storage().data_ptr())
    return save_safetensors_atomic(tensors, path, metadata={_JSON_KEY: json.dumps(meta)})


def load_optimizer_state(path) -> tuple[dict, dict]:
    """(state_dict for `optimizer.load_state_dict`, extra) from `save_optimizer_state`'s file (tensors on the CPU:
    load_state_dict moves each to its parameter's device). Tuples (betas) come back as tuples."""
    tensors, meta = read_tensors(path)
    state = {int(pid): st for pid, st in _join(meta["state"], tensors).items()}
    return {"state": state, "param_groups": _join(meta["param_groups"], tensors)}, meta.get("extra", {})


def read_tensors(path) -> tuple[dict, dict]:
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(_JSON_KEY, "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def save_rng_state(path) -> Path:
    """This process's Python, NumPy, torch CPU and CUDA generator states (what accelerate's random_states_N.pkl
    holds), as tensors plus their few scalars in JSON."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"python": torch.tensor(mt, dtype=torch.int64), "numpy": torch.from_numpy(keys.astype(np.int64)),
               "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{i}"] = s
    meta = {"python": [version, gauss], "numpy": [name, int(pos), int(has_gauss), float(cached)]}
    return save_safetensors_atomic(tensors, path, metadata={_JSON_KEY: json.dumps(meta)})


def load_rng_state(path) -> None:
    tensors, meta = read_tensors(path)
    version, gauss = meta["python"]
    random.setstate((version, tuple(int(x) for x in tensors["python"].tolist()), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda/")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def save_json_state(obj: dict, path) -> Path:
    """A scheduler's or grad scaler's state_dict (plain numbers and lists) as JSON."""
    from krea2_train.utils.io import write_json_atomic

    return write_json_atomic(path, _check_json(obj, Path(path).stem))
