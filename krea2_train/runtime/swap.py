"""Swapping the frozen base of a loaded transformer for another checkpoint's (Raw <-> Turbo), in place."""

from __future__ import annotations

import torch

from krea2_train.models.loading import ModelLoadError, iter_original_tensors, require_path
from krea2_train.runtime.sharding import is_sharded, local_part, reshard_all


@torch.no_grad()
def copy_base_weights(transformer, path) -> int:
    """Overwrite the frozen base weights of a loaded transformer, in place, with those of another checkpoint of the
    same architecture (Raw <-> Turbo), one tensor at a time. LoRA layers stay as they are.

    This is how training previews sample Turbo + the current LoRA without a second 12.9B copy in memory (the
    alternative, loading Turbo beside Raw, needs ~26 GB more). Works through PEFT wrappers (`base_layer`) and views
    (fused q/k/v); quantised bases cannot be overwritten this way and raise TypeError. Returns tensors copied.
    """
    from diffusers.loaders.single_file_utils import convert_krea2_transformer_checkpoint_to_diffusers

    path = require_path(path, "Krea 2 transformer", "model.turbo")
    reshard_all(transformer)  # FSDP: parameters are the shards from here on (no-op otherwise)
    # adapter tensors (LoRA/DoRA lora_*, LoKr lokr_*) are not base weights
    params = {n.replace(".base_layer.", "."): p for n, p in transformer.named_parameters()
              if "lora_" not in n and "lokr_" not in n}
    for p in params.values():
        if not p.dtype.is_floating_point or (type(p) is not torch.nn.Parameter and not is_sharded(p)):
            raise TypeError("the base weights are quantised; they cannot be swapped in place")
    # FSDP: each process writes its own shard (every process reads the file); the next forward gathers the new
    # weights (tests/test_train_fsdp.py checks both ways)
    if path.is_dir():
        from safetensors import safe_open

        files = sorted(path.glob("*.safetensors"))

        def tensors():
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        yield k, h.get_tensor(k)
    else:
        def tensors():
            for name, tensor in iter_original_tensors(path, params["img_in.weight"].dtype):
                yield from convert_krea2_transformer_checkpoint_to_diffusers({name: tensor}).items()

    seen = set()
    for key, tensor in tensors():
        if key not in params:
            raise ModelLoadError(f"{path}: tensor {key} has no place in the loaded model; it is not the same "
                                 "architecture as model.transformer")
        target = params[key]
        if tuple(target.shape) != tuple(tensor.shape):
            raise ModelLoadError(f"{path}: {key} has shape {tuple(tensor.shape)}, the loaded model "
                                 f"{tuple(target.shape)}; Raw and Turbo must be the same architecture")
        tensor = tensor.to(target.device, target.dtype)
        if is_sharded(target):
            target.to_local().copy_(local_part(target, tensor))
        else:
            target.data.copy_(tensor)
        seen.add(key)
    missing = sorted(set(params) - seen)
    if missing:
        raise ModelLoadError(f"{path} lacks {len(missing)} tensors of the loaded model (first: {missing[0]})")
    return len(seen)
