"""Fully sharded data parallel for LoRA training (torch FSDP2 `fully_shard`): the frozen base and the adapter are
split across processes, so a bf16 12.9B base that does not fit one GPU (26 GB of weights) trains on several.

Turned on by `train.fsdp: true`, or by launching with an accelerate FSDP config (configs/accelerate/fsdp.yaml).

Why the trainer calls `fully_shard` itself instead of accelerate's FSDP `prepare`:
  * accelerate's FSDP `save_state` writes the whole model into every checkpoint: the frozen 26 GB base each time.
    Here a checkpoint holds the adapter (gathered into the same PEFT file a DDP run writes), each process's
    optimiser shard as safetensors + JSON (no pickle), the scheduler and the per-process RNG states.
  * accelerate only uses FSDP on accelerators, so its path could not be tested on CI's CPU; `fully_shard` runs on a
    CPU mesh with gloo, and tests/test_train_fsdp.py checks it against DDP and across a resume.

Sharding unit: one FSDP group per transformer block (all-gathered just before the block runs, freed after), plus the
root for the embedders and final layer. Parameters are gathered in the dtypes they are stored in (bf16 base, fp32
LoRA and RMSNorm scales) and compute runs under the same autocast as DDP, so both do the same arithmetic; only the
gradient reduction differs (reduce-scatter instead of all-reduce).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from krea2_train.errors import UserError

log = logging.getLogger(__name__)


def fsdp_requested(cfg, accelerator) -> bool:
    """`train.fsdp`, or a launch with an accelerate FSDP config (`accelerate launch` exports it as
    ACCELERATE_USE_FSDP, also on a CPU-only machine, where the Accelerator itself reports MULTI_CPU)."""
    from accelerate.utils import DistributedType

    return (bool(cfg.train.fsdp) or accelerator.distributed_type == DistributedType.FSDP
            or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true")


def reshard_after_forward() -> bool:
    """The launch config's `fsdp_reshard_after_forward` (FSDP1 configs: FULL_SHARD reshards, SHARD_GRAD_OP not)."""
    value = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower()
    return value not in ("false", "0", "shard_grad_op", "no_shard", "2", "3")


def check_fsdp_settings(cfg, mem) -> None:
    """Combinations FSDP cannot train, refused before the model is loaded (each names the key to change)."""
    problems = []
    if mem.quantize != "none":
        problems.append(f"memory.quantize={mem.quantize} (a quantised base is not sharded: set memory.quantize: none, "
                        "or train with DDP, which fits a quantised base per GPU)")
    if mem.offload_blocks:
        problems.append("memory.offload_blocks=true (sharding already spreads the base; set it to false)")
    if cfg.optimizer.name == "adamw8bit" or mem.optimizer_8bit:
        problems.append("an 8-bit optimiser (optimizer.name=adamw8bit or a memory preset that picks it): bitsandbytes "
                        "states are not sharded; use optimizer.name=adamw (its states are sharded too)")
    if cfg.train.mixed_precision == "fp16":
        problems.append("train.mixed_precision=fp16 (use bf16)")
    if problems:
        raise UserError("FSDP (train.fsdp or an accelerate FSDP launch) cannot train with " + "; ".join(problems))


def make_mesh(device: torch.device):
    """The 1-D mesh of all processes on `device`'s type (a collective: every process calls it)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise UserError("FSDP needs several processes: launch with `accelerate launch --config_file "
                        "configs/accelerate/fsdp.yaml ...` (or set train.fsdp: false)")
    return init_device_mesh(device.type, (dist.get_world_size(),))


def shard_transformer(transformer: nn.Module, mesh, reshard_after_forward: bool = True) -> nn.Module:
    """Shard every block and the root over `mesh`; each process keeps its shards, moved to the mesh's device (no
    communication: processes may do this one after another). Call after the LoRA is injected and before the
    optimiser is built (fully_shard replaces the parameters with sharded ones)."""
    from torch.distributed.fsdp import fully_shard

    from krea2_train.runtime.memory import unwrap_transformer

    model = unwrap_transformer(transformer)
    # diffusers returns the prediction as a reshaped view; the loss only reads it out of place, which is safe (the
    # FSDP test compares the gradients with DDP's), so the per-step warning about in-place ops on views is noise
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for block in model.transformer_blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    n = sum(p.numel() for p in model.parameters())
    log.info("FSDP: %d parameters sharded over %d processes (%d blocks + root)", n, mesh.size(),
             len(model.transformer_blocks))
    return transformer


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every process (a collective for a shard: every process must call it, in the same order)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local_part(target: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The slice of `full` (present on every process) that this process's shard of `target` holds; no communication."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None).to_local()


def reshard_all(module: nn.Module) -> None:
    """Drop the gathered parameters FSDP keeps between uses (after a forward, with fsdp_reshard_after_forward: false)
    so the shards are the only copy: weights written into them are what the next forward gathers."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """torch's clipping over sharded gradients (the norm is reduced across processes); returns a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return full_tensor(norm)


# ---------------------------------------------------------------------------------------- optimiser checkpoints
# Each process saves its own shard of the optimiser states (the local tensors, plus how to rebuild the sharded ones),
# so a resume needs the same number of processes (the per-process RNG states need that anyway). Not DCP: its load
# needs a template from a dummy optimiser step, and Prodigy's state shapes depend on the weights' values (a scalar
# for an all-zero lora_B at the first step), so a Prodigy run could not be resumed.
OPTIMIZER_DIR = "optimizer_sharded"


def _optimizer_file(directory, rank: int):
    return Path(directory) / OPTIMIZER_DIR / f"rank_{rank}.safetensors"


def _placements_json(placements) -> list:
    from torch.distributed.tensor import Replicate, Shard

    out = []
    for p in placements:
        if isinstance(p, Shard):
            out.append(["shard", p.dim])
        elif isinstance(p, Replicate):
            out.append(["replicate"])
        else:  # FSDP2 optimiser states are Shard(0) on a 1-D mesh; anything else is not ours to guess
            raise ValueError(f"cannot checkpoint an optimiser state placed as {p!r}")
    return out


def _placements(items) -> tuple:
    from torch.distributed.tensor import Replicate, Shard

    return tuple(Shard(int(x[1])) if x[0] == "shard" else Replicate() for x in items)


def save_optimizer(optimizer, directory, rank: int) -> None:
    """This process's optimiser shard as tensors + JSON (utils/tensorstate.py): no pickle, so resuming a checkpoint
    cannot run code."""
    from krea2_train.utils.tensorstate import save_optimizer_state

    state = optimizer.state_dict()
    state["state"] = {pid: dict(st) for pid, st in state["state"].items()}  # copies: the live state stays sharded
    sharded = []
    for pid, st in state["state"].items():
        for key, value in st.items():
            if is_sharded(value):
                sharded.append([pid, key, list(value.shape), _placements_json(value.placements)])
                st[key] = value.to_local()
    # inside the checkpoint's temporary folder, renamed when all is written
    save_optimizer_state(state, _optimizer_file(directory, rank), extra={"sharded": sharded})


def legacy_optimizer_file(directory, rank: int) -> Path:
    """Where checkpoints before the pickle-free format kept this process's shard (torch.save of placements)."""
    return Path(directory) / OPTIMIZER_DIR / f"rank_{rank}.pt"


def load_optimizer(optimizer, directory, rank: int, allow_pickle: bool = False) -> None:
    from torch.distributed.tensor import DTensor

    from krea2_train.utils.tensorstate import load_optimizer_state

    new = _optimizer_file(directory, rank)
    if new.exists():
        state, extra = load_optimizer_state(new)
        sharded = {(int(pid), key): (tuple(shape), _placements(pl)) for pid, key, shape, pl in extra["sharded"]}
    elif allow_pickle:  # an older checkpoint the user chose to trust (checkpoint.allow_pickle)
        data = torch.load(legacy_optimizer_file(directory, rank), map_location="cpu", weights_only=False)
        state, sharded = data["optimizer"], data["sharded"]
    else:
        raise FileNotFoundError(new)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict numbers them in this order
    for (pid, key), (shape, placements) in sharded.items():
        p = params[pid]
        local = state["state"][pid][key].to(p.to_local().device)
        stride = torch.empty(shape, device="meta").stride()
        state["state"][pid][key] = DTensor.from_local(local, p.device_mesh, placements, run_check=False, shape=shape,
                                                      stride=stride)
    optimizer.load_state_dict(state)
