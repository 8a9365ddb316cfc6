"""The training loop: a PEFT LoRA on the Raw transformer under Accelerate (CPU, one GPU, DDP; bf16; accumulation).

    result = train(cfg)                      # batches from the data caches
    result = train(cfg, source=SyntheticData())

Determinism: batches, noise and sigmas are pure functions of (seed, step, process), drawn on the CPU, and the LoRA is
initialised from the seed on every process; together with the checkpointed optimiser/scheduler/RNG states a run
stopped and resumed ends with the same adapter as one that ran straight through.

Flow matching (FACTS.md): x_t = (1 - s) x0 + s noise, target noise - x0, model input s; s drawn by
train/timesteps.py (logit-normal, Raw's resolution-aware shift by default).
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from krea2_train.config import RunConfig, save_resolved
from krea2_train.errors import UserError
from krea2_train.schedule import pack_latents, position_ids
from krea2_train.utils.io import write_json_atomic
from krea2_train.train import lora as lora_mod
from krea2_train.train.checkpoint import Checkpointer, TrainState, latest_checkpoint, list_checkpoints
from krea2_train.train.step import flow_matching_loss
from krea2_train.train.optim import build_optimizer, build_scheduler, stage_boundaries
from krea2_train.train.timesteps import loss_weights, sample_sigmas
from krea2_train.train.tracking import Tracker, tracker_names

log = logging.getLogger(__name__)
DONE_FILE = "train_done.json"


class NonFiniteLossError(UserError):
    """The loss was NaN/inf for `train.nan_patience` steps in a row; a checkpoint of the last good state exists."""


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    step: int
    interrupted: bool
    history: list


def make_accelerator(cfg: RunConfig, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    cpu = not torch.cuda.is_available()  # on CPU, force it so `accelerate launch`/torchrun gives gloo DDP
    mp = cfg.train.mixed_precision
    if cpu and mp == "fp16":
        log.warning("train.mixed_precision=fp16 is not available on CPU; using bf16")
        mp = "bf16"
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state.get("_mixed_precision", mp) != mp:
        # a second run in the same process (tests, notebooks) with another precision; the process group is kept
        AcceleratorState._reset_state()
    return Accelerator(cpu=cpu, mixed_precision=mp, log_with=tracker_names(cfg) or None,
                       project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
                       step_scheduler_with_optimizer=False)


def memory_settings(cfg: RunConfig):
    from dataclasses import asdict

    from krea2_train.runtime.memory import resolve_memory_settings

    return resolve_memory_settings(asdict(cfg.memory))


class Trainer:
    def __init__(self, cfg: RunConfig, source=None, transformer=None, accelerator=None):
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.source = source
        self.acc = accelerator or make_accelerator(cfg, self.run_dir)
        self._stop_requested = False
        self._transformer = transformer
        self.on_step = None  # optional callback(trainer, step) used by tests and previews
        # What the adapter is made of, taken before setup adapts the config (a memory preset may switch the
        # optimiser to 8-bit): stored in checkpoints and train_done.json, compared on resume.
        self.settings = training_settings(cfg)
        self.step_lr = None  # the learning rate the last optimiser step used (logged as `lr`)
        # Before any work: a finished run is a no-op (or an error with other settings); checkpoints written with
        # other settings are refused instead of failing deep inside the state loading.
        self._finished = training_done(cfg) and cfg.checkpoint.resume != "never"  # never: setup refuses
        if not self._finished:
            check_resume_settings(cfg)

    # ------------------------------------------------------------------------------------------------- setup
    def request_stop(self, *_):
        """Ctrl-C / SIGTERM: finish the current step, save a checkpoint, exit cleanly."""
        if not self._stop_requested:
            log.warning("stop requested: saving a checkpoint after this step (press again to abort hard)")
            self._stop_requested = True
        else:
            raise KeyboardInterrupt

    def _load_transformer(self, device):
        from krea2_train.models.loading import load_transformer

        m = self.cfg.model
        return load_transformer(m.transformer, dtype=m.dtype, device=device, architecture=m.architecture,
                                expect="raw", allow_turbo=m.allow_turbo_training)

    def _source(self):
        if self.source is None:
            from krea2_train.data.source import CachedData

            self.source = CachedData(self.cfg, self.acc)
        return self.source

    def _check_model_paths(self):
        """The model files this run will open, checked before any work (not at the first preview, steps later)."""
        from krea2_train.models.paths import check_model_paths

        cfg = self.cfg
        keys = [] if self._transformer is not None else ["model.transformer"]
        if cfg.preview.prompts:
            keys += ["model.text_encoder", "model.vae"] + (["model.turbo"] if cfg.preview.turbo else [])
        if keys:
            check_model_paths(cfg, keys)

    def setup(self):
        cfg, acc = self.cfg, self.acc
        if cfg.checkpoint.resume == "never" and list_checkpoints(self.run_dir):  # fail before loading anything
            raise UserError(f"{self.run_dir} already has checkpoints and checkpoint.resume=never. Use another "
                            "run_name, delete the folder, or set checkpoint.resume=auto to continue it.")
        check_resume_settings(cfg)  # before config.yaml is rewritten below
        self._check_model_paths()
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(cfg, self.run_dir)
        acc.wait_for_everyone()
        from accelerate.utils import set_seed

        from krea2_train.runtime import sharding

        mem = memory_settings(cfg)
        self.fsdp = sharding.fsdp_requested(cfg, acc)
        if self.fsdp:
            sharding.check_fsdp_settings(cfg, mem)  # before the model is loaded
        resume_from = resume_path(cfg)
        if resume_from is not None:  # the checkpoint's kind too: a mismatch is found now, not after loading 26 GB
            from krea2_train.train.checkpoint import check_checkpoint_kind

            check_checkpoint_kind(resume_from, self.fsdp, acc.num_processes)
        check_multiprocess_lora(cfg, acc.num_processes)

        if (acc.is_main_process or self.fsdp) and cfg.preview.prompts:
            # encode the preview prompts now, before the transformer takes the GPU; the encoder is released after
            # (under FSDP every process samples the previews together, so each needs the embeddings)
            from krea2_train.train.preview import prompt_embeddings

            prompt_embeddings(cfg)
        # after the encoder: model building draws random numbers, the training RNG must not depend on it
        set_seed(cfg.seed, device_specific=True)  # dropout masks: reproducible, different per process
        if self.fsdp:
            # One process per machine at a time holds the whole bf16 base in CPU memory (26 GB at full size): each
            # loads it, keeps its shard and frees the rest before the next one starts, instead of N copies at once.
            mesh = sharding.make_mesh(acc.device)
            for turn in range(int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))):
                if acc.local_process_index == turn:
                    transformer = self._build_model(mem, mesh)
                acc.wait_for_everyone()
        else:
            transformer = self._build_model(mem)
        if mem.optimizer_8bit and cfg.optimizer.name == "adamw":
            log.info("memory preset %s: using 8-bit AdamW states", mem.preset)
            cfg.optimizer.name = "adamw8bit"
            if acc.is_main_process:
                save_resolved(cfg, self.run_dir)  # the saved config says what actually ran
        self.transformer = transformer
        params = lora_mod.trainable_parameters(transformer)  # after sharding: fully_shard replaces the parameters
        n = sum(p.numel() for p in params)
        log.info("LoRA: %d trainable parameters in %d tensors", n, len(params))
        optimizer = build_optimizer(params, cfg.optimizer)
        scheduler = build_scheduler(optimizer, cfg.optimizer, cfg.train.stages)
        transformer.train()
        if self.fsdp:
            # sharded by sharding.shard_transformer, not by accelerate (see train/sharding.py for why); the
            # Checkpointer saves the optimiser shards and the scheduler itself
            self.model, self.optimizer, self.scheduler = transformer, optimizer, scheduler
        else:
            # apply_memory_settings already placed the model (offloaded blocks stay on the CPU): no device move here
            self.model, self.optimizer, self.scheduler = acc.prepare(transformer, optimizer, scheduler,
                                                                     device_placement=[False, None, None])
        self.params = params
        self.state = TrainState()
        self.ckpt = Checkpointer(acc, self.run_dir, cfg.checkpoint.keep_last, transformer, self.peft_config,
                                 self.state, settings=self.settings,
                                 fsdp=(transformer, optimizer, scheduler) if self.fsdp else None)
        self._resume()
        if acc.is_main_process and tracker_names(cfg):
            acc.init_trackers(cfg.logging.wandb_project,
                              config={"rank": cfg.lora.rank, "lr": cfg.optimizer.lr, "steps": cfg.total_steps,
                                      "optimizer": cfg.optimizer.name, "targets": cfg.lora.targets},
                              init_kwargs={"wandb": {"name": cfg.run_name, "dir": str(self.run_dir)}})

    def _build_model(self, mem, mesh=None):
        """The Raw transformer with the LoRA injected and the memory settings applied; sharded over `mesh` (FSDP)."""
        cfg, acc = self.cfg, self.acc
        # A base that gets quantised, offloaded or sharded may not fit the GPU in bf16: keep it on the CPU until
        # apply_memory_settings quantises and places it, or fully_shard moves this process's shard.
        staged = mem.quantize != "none" or mem.offload_blocks or mesh is not None
        device = torch.device("cpu") if staged else acc.device
        transformer = self._transformer if self._transformer is not None else self._load_transformer(device)
        if not staged and transformer.device != acc.device:
            transformer = transformer.to(acc.device)
        self.peft_config = lora_mod.add_lora(transformer, cfg.lora, seed=cfg.seed)
        # quantised base, checkpointing, offload, fast attention, fused qkv, compile (train/memory.py decides order)
        from krea2_train.runtime.memory import apply_memory_settings

        compute = torch.bfloat16 if cfg.train.mixed_precision == "bf16" else None
        if mesh is None:
            return apply_memory_settings(transformer, mem, acc.device, compute_dtype=compute)
        from dataclasses import replace

        from krea2_train.runtime import sharding

        # q/k/v fusion makes weights views of one tensor, which sharding would split apart. Compile is off too:
        # diffusers' regional compile looks blocks up by class name, which fully_shard changes, and FSDP + compile is
        # untested here (no GPU); the 48gb/80gb presets turn it on, so say so rather than fail.
        if mem.fuse_qkv or mem.compile:
            log.info("FSDP: memory.fuse_qkv and memory.compile are not used (sharded blocks)")
        transformer = apply_memory_settings(transformer, replace(mem, fuse_qkv=False, compile=False),
                                            torch.device("cpu"), compute_dtype=compute)
        return sharding.shard_transformer(transformer, mesh, reshard_after_forward=sharding.reshard_after_forward())

    def _resume(self):
        path = resume_path(self.cfg)
        if path is not None:
            check_resume_settings(self.cfg, path)
            self.ckpt.load(path)
            if self.acc.is_main_process:
                print(f"resuming {self.run_dir} from {path.name} (step {self.state.step}/{self.cfg.total_steps})")

    # ------------------------------------------------------------------------------------------------- maths
    def _noise_generator(self, micro: int) -> torch.Generator:
        seed = (self.cfg.seed * 1_000_003 + micro * 7_919 + self.acc.process_index * 104_729) % (2**63)
        return torch.Generator().manual_seed(seed)

    def loss_on(self, batch: dict, generator: torch.Generator | None = None, sigmas: torch.Tensor | None = None,
                noise: torch.Tensor | None = None, model=None) -> torch.Tensor:
        """Per-sample flow-matching loss (float32, shape (B,)) on one batch."""
        model = model or self.model
        dev = self.acc.device
        latents = batch["latents"].float()
        b, _, h, w = latents.shape
        x0 = pack_latents(latents)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator)
        if sigmas is None:
            sigmas = sample_sigmas(self.cfg.timesteps, b, x0.shape[1], generator)
        text = batch["text"].to(dev)
        mask = batch.get("text_mask")
        pos = position_ids(text.shape[1], h // 2, w // 2, device=dev)
        per = flow_matching_loss(model, x0.to(dev), noise.to(dev), sigmas.to(dev), text, pos,
                                 mask.to(dev) if mask is not None else None,
                                 dtype=self.transformer.img_in.weight.dtype, autocast=self.acc.autocast())
        return per * loss_weights(self.cfg.timesteps, sigmas).to(per.device)

    @torch.no_grad()
    def validation_loss(self, stage) -> float | None:
        """Mean loss over held-out samples at fixed sigmas and fixed noise: comparable across runs and steps."""
        get = getattr(self._source(), "validation_batches", None)
        batches = get(stage) if get else None
        if not batches:
            return None
        self.model.eval()
        total, count = 0.0, 0
        for i, batch in enumerate(batches):
            x = batch["latents"]
            b = x.shape[0]
            shape = ((x.shape[2] // 2) * (x.shape[3] // 2), x.shape[1] * 4)
            seeds = batch.get("sample_seeds")
            if seeds is not None:  # noise fixed per image: the same whatever the batch size or sample count
                noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
                    self.cfg.validation.seed * 1_000_003 + int(sd))) for sd in seeds])
            else:
                noise = torch.randn((b, *shape), generator=torch.Generator().manual_seed(self.cfg.validation.seed + i))
            for s in self.cfg.validation.sigmas:
                loss = self.loss_on(batch, sigmas=torch.full((b,), float(s)), noise=noise)
                total += float(loss.sum())
                count += b
        self.model.train()
        return total / max(count, 1)

    def _all(self, flag: bool) -> bool:
        """True on every process iff `flag` is True on every process (so all ranks take the same branch)."""
        if self.acc.num_processes == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(t, reduction="sum").item() == self.acc.num_processes)

    # ------------------------------------------------------------------------------------------------- loop
    def run(self) -> TrainResult:
        cfg = self.cfg
        if self._finished and not hasattr(self, "model"):
            # the same command again on a finished run: nothing to do (training_done already refused other settings)
            if self.acc.is_main_process:
                print(f"{self.run_dir} already finished {cfg.total_steps} steps with these settings; nothing to "
                      "train (use a new run_name, or more steps, to train again)")
            return TrainResult(self.run_dir, self.run_dir / "adapter", cfg.total_steps, False, [])
        if not hasattr(self, "model"):
            self.setup()
        acc, state = self.acc, self.state
        total = cfg.total_steps
        accum = cfg.train.gradient_accumulation
        starts = stage_boundaries(cfg.train.stages)
        tracker = Tracker(acc, cfg, self.run_dir, total, state.step)
        old_handlers = self._install_signals()
        interrupted = False
        try:
            while state.step < total and not interrupted:
                si = max(i for i, s in enumerate(starts) if s <= state.step)
                stage = cfg.train.stages[si]
                local = state.step - starts[si]
                if acc.is_main_process and local == 0:
                    log.info("stage %d: %d px, %d steps, batch %d, lr x%s", si, stage.resolution, stage.steps,
                             stage.batch_size, stage.lr_factor)
                batches = self._source().stage_batches(si, stage, local * accum, cfg.seed, acc.process_index,
                                                       acc.num_processes, global_offset=starts[si] * accum)
                for _ in range(stage.steps - local):
                    loss_value = self._optimizer_step(batches, accum)
                    state.step += 1
                    if loss_value is not None:
                        state.history.append([state.step, loss_value])
                    self._after_step(tracker, stage, loss_value)
                    if not self._all(not self._stop_requested):
                        interrupted = True
                        break
                    if state.step >= total:
                        break
                close = getattr(batches, "close", None)
                if close:
                    close()
        finally:
            self._restore_signals(old_handlers)
        if interrupted:
            self.ckpt.save("interrupted")
            if acc.is_main_process:
                print(f"stopped at step {state.step}/{total}; checkpoint saved. Run the same command again to "
                      "resume.")
        else:
            state.done = True
            if cfg.checkpoint.every_steps == 0 or state.step % cfg.checkpoint.every_steps != 0:
                self.ckpt.save("final")
        if not interrupted and cfg.preview.prompts and not (
                cfg.preview.every_steps and state.step % cfg.preview.every_steps == 0):
            self.preview(state.step, tracker)
        adapter_dir = self.run_dir / "adapter"
        # under FSDP every process joins the gather of the adapter's shards; the main process writes it
        adapter = lora_mod.adapter_state_dict(self.transformer) if not interrupted and (
            self.fsdp or acc.is_main_process) else None
        if acc.is_main_process and not interrupted:
            lora_mod.save_adapter(self.transformer, self.peft_config, adapter_dir, state=adapter,
                                  metadata={"step": state.step, "run_name": cfg.run_name})
            write_json_atomic(self.run_dir / DONE_FILE, {"step": state.step, "total_steps": total,
                                                         "skipped_steps": state.skipped_steps,
                                                         "trained_with": self.settings})
        tracker.close(state.history)
        acc.wait_for_everyone()
        for t in acc.trackers:  # not end_training(): it destroys the process group the pipeline still needs
            t.finish()
        return TrainResult(self.run_dir, adapter_dir, state.step, interrupted, state.history)

    def _optimizer_step(self, batches, accum: int) -> float | None:
        """One optimiser step over `accum` micro-batches. Returns the mean loss, or None if the step was skipped
        for a non-finite loss (on any process)."""
        acc, state, cfg = self.acc, self.state, self.cfg
        losses, ok, what = [], True, "loss"
        for k in range(accum):
            micro = state.step * accum + k
            batch = next(batches)
            if not ok:
                continue  # keep consuming batches so the data position stays step-aligned
            gen = self._noise_generator(micro)
            sync = k == accum - 1
            ctx = acc.no_sync(self.model) if not sync else _null()
            with ctx:
                loss = self.loss_on(batch, gen).mean()
                finite = self._all(bool(torch.isfinite(loss).item()))
                if not finite:
                    ok = False
                    continue
                acc.backward(loss / accum)
            losses.append(loss.detach())
        if ok and cfg.optimizer.max_grad_norm:
            if self.fsdp:
                from krea2_train.runtime.sharding import clip_grad_norm

                self.grad_norm = clip_grad_norm(self.params, cfg.optimizer.max_grad_norm)
            else:
                self.grad_norm = acc.clip_grad_norm_(self.params, cfg.optimizer.max_grad_norm)
            # fp16: the grad scaler handles overflow itself (skips the step, lowers the scale)
            if acc.scaler is None and not bool(torch.isfinite(self.grad_norm).item()):
                ok, what = False, "gradient"
        if not ok:
            self._skip_step(what)
            return None
        state.nan_streak = 0
        self.step_lr = self.optimizer.param_groups[0]["lr"]  # the lr this step uses (the scheduler moves on below)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        mean = torch.stack(losses).mean()
        if acc.num_processes > 1:
            mean = acc.reduce(mean, reduction="mean")
        return float(mean)

    def _skip_step(self, what: str) -> None:
        """NaN guard: drop this step's gradients; after `train.nan_patience` in a row, checkpoint and stop."""
        state, cfg = self.state, self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        state.nan_streak += 1
        state.skipped_steps += 1
        log.warning("non-finite %s at step %d: step skipped (%d in a row, limit train.nan_patience=%d)",
                    what, state.step + 1, state.nan_streak, cfg.train.nan_patience)
        if state.nan_streak >= cfg.train.nan_patience:
            path = self.ckpt.save("non-finite loss")
            raise NonFiniteLossError(
                f"the {what} was NaN/inf for {state.nan_streak} steps in a row (step {state.step + 1}); stopped. "
                f"The last good state is saved in {path}. Likely causes: learning rate too high "
                f"(optimizer.lr={cfg.optimizer.lr}), fp16 overflow (use train.mixed_precision=bf16) or corrupt "
                "cache entries (`krea2-train check-data`). Lower the lr and resume with the same command.")
        self.step_lr = self.optimizer.param_groups[0]["lr"]  # what the skipped step would have used
        self.scheduler.step()  # the schedule follows steps, taken or skipped, so resume stays aligned

    def _after_step(self, tracker, stage, loss_value):
        cfg, state = self.cfg, self.state
        step = state.step
        if step % cfg.train.log_every == 0 or step == cfg.total_steps:
            lr = self.step_lr if self.step_lr is not None else self.optimizer.param_groups[0]["lr"]
            values = {"lr": lr, "resolution": stage.resolution}
            if loss_value is not None:
                values["loss"] = loss_value
            gn = getattr(self, "grad_norm", None)
            if gn is not None:
                values["grad_norm"] = float(gn)
            tracker.log(step, values)
        if cfg.validation.every_steps and step % cfg.validation.every_steps == 0:
            v = self.validation_loss(stage)
            if v is not None:
                tracker.log(step, {"val_loss": v})
        # the checkpoint first: a failing preview must never lose the progress since the last save
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
            self.ckpt.save("periodic")
            if self.acc.is_main_process:  # keep the curve current during long runs
                from krea2_train.train.tracking import write_loss_curve

                write_loss_curve(state.history, self.run_dir / "loss.png")
        if cfg.preview.every_steps and cfg.preview.prompts and step % cfg.preview.every_steps == 0:
            self.preview(step, tracker)
        if self.on_step is not None:
            self.on_step(self, step)

    def preview(self, step: int, tracker=None):
        # under FSDP each block's forward is a collective: every process samples, the main one decodes and writes
        if self.acc.is_main_process or self.fsdp:
            try:
                from krea2_train.train.preview import render_previews
            except ImportError:
                return
            with torch.random.fork_rng(devices=[self.acc.device] if self.acc.device.type == "cuda" else []):
                # previews must not move the training RNG (dropout): a run with previews resumes like one without
                images = render_previews(self.cfg, self.transformer, self.run_dir, step,
                                         peft_config=self.peft_config, write=self.acc.is_main_process)
            if tracker is not None and images:
                tracker.log_images(step, images)
        self.acc.wait_for_everyone()

    # ------------------------------------------------------------------------------------------------- signals
    def _install_signals(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            return None
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            signal.signal(s, self.request_stop)
        return old

    def _restore_signals(self, old):
        for s, h in (old or {}).items():
            signal.signal(s, h)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def train(cfg: RunConfig, source=None, transformer=None) -> TrainResult:
    return Trainer(cfg, source=source, transformer=transformer).run()


def check_multiprocess_lora(cfg: RunConfig, num_processes: int) -> None:
    """LoKr's dropout drops whole modules with each process's own random numbers, so processes disagree on which
    gradients exist and the gradient reduction fails (DDP) or aborts (FSDP)."""
    if num_processes > 1 and cfg.lora.type == "lokr" and cfg.lora.dropout > 0:
        raise UserError(f"lora.type=lokr with lora.dropout={cfg.lora.dropout} cannot train on {num_processes} "
                        "processes (LoKr drops whole modules per process); set lora.dropout: 0, or train on one GPU")


def training_settings(cfg: RunConfig) -> dict:
    """The config keys that decide what the adapter is (not steps: more steps continue a finished run)."""
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    keep = {k: d[k] for k in ("model", "data", "lora", "optimizer", "timesteps", "seed")}
    # fsdp: how the work is split, not what is learnt (the checkpoint format differs; Checkpointer.load says so)
    keep["train"] = {k: v for k, v in d["train"].items() if k not in ("stages", "log_every", "fsdp")}
    keep["stages"] = [{k: v for k, v in st.items() if k != "steps"} for st in d["train"]["stages"]]
    for k in ("turbo", "allow_turbo_training"):
        keep["model"].pop(k, None)
    return keep


def _flat(d, prefix=""):
    out = {}
    for k, v in (d.items() if isinstance(d, dict) else enumerate(d)):
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flat(v, key) if isinstance(v, (dict, list)) and v else {key: v})
    return out


def different_settings_error(cfg: RunConfig, before: dict, what: str) -> UserError | None:
    """The error for re-using a run folder with other training settings (None when they match), listing the keys."""
    before, now = _flat(before or {}), _flat(training_settings(cfg))
    if not before:
        return None
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if not changed:
        return None
    return UserError(f"{cfg.run_dir} already holds {what} trained with different settings "
                     f"({', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}). Use a new run_name "
                     "(or delete that folder) to train with these settings, or restore the old values to "
                     "continue it.")


def resume_path(cfg: RunConfig) -> Path | None:
    """The checkpoint a run would continue from (checkpoint.resume: auto / never / a path)."""
    how = cfg.checkpoint.resume
    if how == "never":
        return None
    return latest_checkpoint(cfg.run_dir) if how == "auto" else Path(how)


def _checkpoint_settings(cfg: RunConfig, path: Path) -> dict | None:
    """training_settings() a checkpoint was written with: from its state.json, or (older checkpoints) from the
    run's saved config.yaml."""
    import json

    info = path / "state.json"
    if info.exists():
        try:
            saved = json.loads(info.read_text()).get("trained_with")
        except (OSError, ValueError):
            saved = None
        if saved:
            return saved
    resolved = path.parent.parent / "config.yaml"
    if resolved.exists():
        from krea2_train.config import load_config

        try:
            old = load_config(resolved, warn_paths=False)
        except Exception:  # an older schema: nothing reliable to compare
            return None
        if old.optimizer.name == "adamw8bit" and cfg.optimizer.name == "adamw":
            old.optimizer.name = "adamw"  # a memory preset's 8-bit switch, saved into config.yaml by setup
        return training_settings(old)
    return None


def check_resume_settings(cfg: RunConfig, path: Path | None = None) -> None:
    """Refuse to continue a checkpoint written with other training settings (lora.rank would otherwise fail inside
    PyTorch's state loading; an optimizer.lr change would resume silently)."""
    path = path if path is not None else resume_path(cfg)
    if path is None or not (Path(path) / "state.json").exists():
        return
    err = different_settings_error(cfg, _checkpoint_settings(cfg, Path(path)), f"checkpoints ({Path(path).name})")
    if err is not None:
        raise err


def training_done(cfg: RunConfig) -> bool:
    """The run finished all its steps and its adapter is on disk (the pipeline then skips training).

    A finished run whose training settings differ from `cfg` is an error (re-using its adapter would be wrong and
    silently retraining would overwrite it): the message lists the changed keys."""
    import json

    done = cfg.run_dir / DONE_FILE
    if not done.exists() or not (cfg.run_dir / "adapter" / lora_mod.ADAPTER_WEIGHTS).exists():
        return False
    info = json.loads(done.read_text())
    if info.get("step") != cfg.total_steps:
        return False
    err = different_settings_error(cfg, info.get("trained_with"), "a finished run")
    if err is not None:
        raise err
    return True
