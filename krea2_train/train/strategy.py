"""How the work is split across processes: one object, so the trainer has no FSDP-vs-DDP branches.

    strategy = make_strategy(cfg, accelerator)      # DataParallel (one process or DDP) or FullySharded (FSDP2)
    strategy.check(cfg, memory_settings)             # before any model is loaded
    transformer = strategy.build(build_model)        # build_model(device, mesh) -> LoRA-injected transformer
    model, optimizer, scheduler = strategy.prepare(transformer, optimizer, scheduler)
"""

from __future__ import annotations

from dataclasses import replace

import torch

from krea2_train.runtime import sharding
from krea2_train.runtime.distributed import node_layout
from krea2_train.runtime.memory import apply_memory_settings


class DataParallel:
    """A whole model per process; accelerate's DDP wrapper when there are several."""

    fsdp = False
    # Which processes sample previews and gather the adapter: only the main one here.
    every_process_samples = False

    def __init__(self, accelerator):
        self.acc = accelerator

    def check(self, cfg, mem) -> None:
        """Combinations this strategy cannot train, refused before the model is loaded."""

    def load_device(self, mem) -> torch.device:
        # A base that gets quantised or offloaded may not fit the GPU in bf16: it stays on the CPU until
        # apply_memory_settings quantises and places it.
        return torch.device("cpu") if mem.quantize != "none" or mem.offload_blocks else self.acc.device

    def build(self, build_model):
        """`build_model(device, mesh)`: the transformer with the LoRA injected (mesh None: unsharded)."""
        return load_in_turns(self.acc, lambda: build_model(self.load_device, None))

    def finish(self, transformer, mem, compute_dtype, mesh=None):
        """Quantised base, checkpointing, offload, fast attention, fused q/k/v, compile (runtime/memory.py)."""
        return apply_memory_settings(transformer, mem, self.acc.device, compute_dtype=compute_dtype)

    def prepare(self, transformer, optimizer, scheduler):
        # apply_memory_settings already placed the model (offloaded blocks stay on the CPU): no device move here
        return self.acc.prepare(transformer, optimizer, scheduler, device_placement=[False, None, None])

    def clip_grad_norm(self, params, max_norm: float):
        return self.acc.clip_grad_norm_(params, max_norm)

    def checkpoint_parts(self, transformer, optimizer, scheduler):
        """The sharded parts the Checkpointer saves one shard per process (None: every process holds the same
        optimiser, the main process saves it)."""
        return None


class FullySharded(DataParallel):
    """torch FSDP2 `fully_shard` over all processes (runtime/sharding.py says why not accelerate's FSDP)."""

    fsdp = True
    # each block's forward is a collective: every process samples previews and joins the adapter gather
    every_process_samples = True

    def check(self, cfg, mem) -> None:
        sharding.check_fsdp_settings(cfg, mem)

    def load_device(self, mem) -> torch.device:
        return torch.device("cpu")  # fully_shard moves this process's shard to the GPU

    def build(self, build_model):
        # each process loads the whole base, keeps its shard and frees the rest before the next on its machine starts
        mesh = sharding.make_mesh(self.acc.device)
        return load_in_turns(self.acc, lambda: build_model(self.load_device, mesh))

    def finish(self, transformer, mem, compute_dtype, mesh=None):
        import logging

        # q/k/v fusion makes weights views of one tensor, which sharding would split apart. Compile is off too:
        # diffusers' regional compile looks blocks up by class name, which fully_shard changes, and FSDP + compile is
        # untested here (no GPU); the 48gb/80gb presets turn it on, so say so rather than fail.
        if mem.fuse_qkv or mem.compile:
            logging.getLogger(__name__).info("FSDP: memory.fuse_qkv and memory.compile are not used (sharded blocks)")
        transformer = apply_memory_settings(transformer, replace(mem, fuse_qkv=False, compile=False),
                                            torch.device("cpu"), compute_dtype=compute_dtype)
        return sharding.shard_transformer(transformer, mesh, reshard_after_forward=sharding.reshard_after_forward())

    def prepare(self, transformer, optimizer, scheduler):
        return transformer, optimizer, scheduler  # already sharded; the Checkpointer saves optimiser shards itself

    def clip_grad_norm(self, params, max_norm: float):
        return sharding.clip_grad_norm(params, max_norm)

    def checkpoint_parts(self, transformer, optimizer, scheduler):
        return (transformer, optimizer, scheduler)


def load_in_turns(acc, load, local_processes: int | None = None):
    """`load()` on one process per machine at a time: the local ranks take turns, every machine at once (the whole
    bf16 base passes through CPU memory, 26 GB at full size: N copies at once would not fit a machine with N GPUs).
    Turns follow the local rank, not the global one, so a job on M machines takes as long as one on one machine."""
    turns = local_processes or node_layout()[1]
    result = None
    for turn in range(turns if acc.num_processes > 1 else 1):
        if acc.local_process_index == turn:
            result = load()
        acc.wait_for_everyone()
    return result


def make_strategy(cfg, accelerator) -> DataParallel:
    return FullySharded(accelerator) if sharding.fsdp_requested(cfg, accelerator) else DataParallel(accelerator)


def check_multiprocess_lora(cfg, num_processes: int) -> None:
    """LoKr's dropout drops whole modules with each process's own random numbers, so processes disagree on which
    gradients exist and the gradient reduction fails (DDP) or aborts (FSDP)."""
    from krea2_train.errors import UserError

    if num_processes > 1 and cfg.lora.type == "lokr" and cfg.lora.dropout > 0:
        raise UserError(f"lora.type=lokr with lora.dropout={cfg.lora.dropout} cannot train on {num_processes} "
                        "processes (LoKr drops whole modules per process); set lora.dropout: 0, or train on one GPU")
