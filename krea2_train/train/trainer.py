"""The training recipe: a PEFT LoRA on the Raw transformer under Accelerate (CPU, one GPU, DDP or FSDP; bf16;
gradient accumulation). `Trainer.setup()` reads as the list of what a run needs; each part is built by the module
named in it.

    result = train(cfg)                      # batches from the data caches
    result = train(cfg, source=SyntheticData())

Determinism: batches, noise and sigmas are pure functions of (seed, step, process), drawn on the CPU, and the LoRA is
initialised from the seed on every process; together with the checkpointed optimiser/scheduler/RNG states
(safetensors + JSON, train/checkpoint.py) a run stopped and resumed ends with the same adapter as one that ran
straight through.

The loss is the objective's (train/objective.py, chosen by train.mode): train/step.py's `flow_matching_loss` (also
what scripts/bench_step.py times) for a LoRA, train/slider.py's two-sign slider loss for a concept slider; sigmas
come from train/timesteps.py (logit-normal, Raw's resolution-aware shift by default).
"""

from __future__ import annotations

import logging
import signal
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from krea2_train.config import RunConfig, resolve_memory_settings, save_resolved
from krea2_train.errors import UserError
from krea2_train.models.loading import load_transformer
from krea2_train.models.paths import check_model_paths
from krea2_train.schedule import pack_latents, position_ids
from krea2_train.train import lora as lora_mod
from krea2_train.train.checkpoint import Checkpointer, TrainState, check_checkpoint_kind, list_checkpoints
from krea2_train.train.objective import make_objective
from krea2_train.train.optim import build_optimizer, build_scheduler, optimizer_name, stage_boundaries
from krea2_train.train.resume import DONE_FILE, check_resume_settings, resume_path, training_done, training_settings
from krea2_train.train.step import flow_matching_loss
from krea2_train.train.strategy import check_multiprocess_lora, make_strategy
from krea2_train.train.timesteps import loss_weights, sample_sigmas
from krea2_train.train.tracking import Tracker, gpu_memory, reset_gpu_peak, tracker_names
from krea2_train.utils.io import write_json_atomic

log = logging.getLogger(__name__)
RUNTIME_FILE = "runtime.json"  # what actually ran (resolved memory settings, optimiser, strategy), beside config.yaml


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
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    from krea2_train.runtime.distributed import collective_timeout, start_peer_watch

    cpu = not torch.cuda.is_available()  # on CPU, force it so `accelerate launch`/torchrun gives gloo DDP
    mp = cfg.train.mixed_precision
    if cpu and mp == "fp16":
        log.warning("train.mixed_precision=fp16 is not available on CPU; using bf16")
        mp = "bf16"
    if AcceleratorState._shared_state.get("_mixed_precision", mp) != mp:
        # a second run in the same process (tests, notebooks) with another precision; the process group is kept
        AcceleratorState._reset_state()
    acc = Accelerator(cpu=cpu, mixed_precision=mp, log_with=tracker_names(cfg) or None,
                      project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
                      step_scheduler_with_optimizer=False,
                      kwargs_handlers=[InitProcessGroupKwargs(timeout=collective_timeout())])
    start_peer_watch()  # a lost machine is named, not waited for (runtime/distributed.py)
    return acc


class Trainer:
    def __init__(self, cfg: RunConfig, source=None, transformer=None, accelerator=None):
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.source = source
        self.acc = accelerator or make_accelerator(cfg, self.run_dir)
        self._stop_requested = False
        self._transformer = transformer
        self.on_step = None  # optional callback(trainer, step) used by tests and previews
        # What the adapter is made of: stored in checkpoints and train_done.json, compared on resume.
        self.settings = training_settings(cfg)
        self.step_lr = None  # the learning rate the last optimiser step used (logged as `lr`)
        self.objective = make_objective(cfg)  # what a step optimises and where its batches come from
        # Before any work: a finished run is a no-op (or an error with other settings); checkpoints written with
        # other settings are refused instead of failing deep inside the state loading.
        self._finished = training_done(cfg) and cfg.checkpoint.resume != "never"  # never: setup refuses
        if not self._finished:
            check_resume_settings(cfg)

    # ------------------------------------------------------------------------------------------------- setup
    def setup(self):
        """Everything a run needs, in order; nothing heavy happens before every check has passed."""
        self._check_before_work()
        self._write_run_folder()
        self._encode_preview_prompts()
        self.objective.prepare(self)  # its own encodings (slider prompts) before the transformer takes the GPU
        self._setup_model()
        self._setup_optimizer()
        self._setup_checkpointer()
        self._resume()
        self._setup_trackers()

    def _check_before_work(self):
        """Every refusal that does not need the model: resume settings and kind, model paths, the strategy's limits."""
        cfg, acc = self.cfg, self.acc
        if cfg.checkpoint.resume == "never" and list_checkpoints(self.run_dir):
            raise UserError(f"{self.run_dir} already has checkpoints and checkpoint.resume=never. Use another "
                            "run_name, delete the folder, or set checkpoint.resume=auto to continue it.")
        check_resume_settings(cfg)
        keys = ([] if self._transformer is not None else ["model.transformer"]) + self.objective.model_keys(cfg)
        if cfg.preview.prompts:  # the files previews open, checked now (not at the first preview, steps later)
            keys += ["model.text_encoder", "model.vae"] + (["model.turbo"] if cfg.preview.turbo is True else [])
        if keys:
            check_model_paths(cfg, keys)
        if cfg.preview.prompts and not isinstance(cfg.preview.turbo, bool):
            from krea2_train.lora.turbo import preview_turbo_source

            source = preview_turbo_source(cfg)  # a Turbo checkpoint or a Turbo LoRA; anything else refused now
            if source and source[0] == "lora" and cfg.lora.type == "lokr":
                raise UserError("preview.turbo is a Turbo LoRA, which cannot be stacked on a LoKr adapter (PEFT mixes "
                                "them only in a PeftMixedModel): use lora.type lora or dora, or point preview.turbo "
                                "at the Turbo checkpoint")
        self.mem = resolve_memory_settings(cfg.memory)
        self.strategy = make_strategy(cfg, acc)
        self.strategy.check(cfg, self.mem)
        resume_from = resume_path(cfg)
        if resume_from is not None:  # the checkpoint's kind too: a mismatch is found now, not after loading 26 GB
            check_checkpoint_kind(resume_from, self.strategy.fsdp, acc.num_processes, cfg.checkpoint.allow_pickle)
        check_multiprocess_lora(cfg, acc.num_processes)
        # a memory preset's 8-bit hint picks the optimiser; the config is left as written, runtime.json says so
        self.optimizer_name = optimizer_name(cfg.optimizer, self.mem)

    def _write_run_folder(self):
        """config.yaml as written (resolved defaults) and runtime.json with what actually runs."""
        acc = self.acc
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(self.cfg, self.run_dir)
            write_json_atomic(self.run_dir / RUNTIME_FILE, {
                "memory": asdict(self.mem), "optimizer": self.optimizer_name,
                "strategy": "fsdp" if self.strategy.fsdp else ("ddp" if acc.num_processes > 1 else "single"),
                "processes": acc.num_processes, "device": str(acc.device),
                "mixed_precision": str(acc.mixed_precision)})
        acc.wait_for_everyone()

    def _encode_preview_prompts(self):
        """Encode the preview prompts before the transformer takes the GPU; the encoder is released after (every
        process needs them when every process samples)."""
        if self.cfg.preview.prompts and (self.acc.is_main_process or self.strategy.every_process_samples):
            from krea2_train.train.preview import prompt_embeddings

            prompt_embeddings(self.cfg)

    def _setup_model(self):
        from accelerate.utils import set_seed

        # after the text encoder: model building draws random numbers, the training RNG must not depend on it
        set_seed(self.cfg.seed, device_specific=True)  # dropout masks: reproducible, different per process
        # the libraries on every process at once (seconds each): only the loading itself takes turns per machine
        import peft  # noqa: F401
        from diffusers import Krea2Transformer2DModel  # noqa: F401

        self.transformer = self.strategy.build(self._build_model)
        from krea2_train.lora.turbo import check_turbo_lora_fits

        check_turbo_lora_fits(self.cfg, self.transformer)  # a Turbo LoRA's deltas fit this model: now, not at a preview

    def _build_model(self, load_device, mesh=None):
        """The Raw transformer with the LoRA injected and the memory settings applied; sharded over `mesh` (FSDP)."""
        cfg, mem = self.cfg, self.mem
        device = load_device(mem)
        transformer = self._transformer
        if transformer is None:
            m = cfg.model
            # A ComfyUI fp8 / int8 ConvRot base stays 1 byte per weight (QuantLinear, dequantised per matmul) except
            # under FSDP, which shards float parameters only: there it is dequantised on load.
            transformer = load_transformer(m.transformer, dtype=m.dtype, device=device, architecture=m.architecture,
                                           expect="raw", allow_turbo=m.allow_turbo_training,
                                           keep_quantized=not self.strategy.fsdp)
        elif device == self.acc.device and transformer.device != device:
            transformer = transformer.to(device)
        self.peft_config = lora_mod.add_lora(transformer, cfg.lora, seed=cfg.seed)
        compute = torch.bfloat16 if cfg.train.mixed_precision == "bf16" else None
        return self.strategy.finish(transformer, mem, compute, mesh)

    def _setup_optimizer(self):
        cfg = self.cfg
        params = lora_mod.trainable_parameters(self.transformer)  # after sharding: fully_shard replaces them
        log.info("LoRA: %d trainable parameters in %d tensors", sum(p.numel() for p in params), len(params))
        if self.optimizer_name != cfg.optimizer.name:
            log.info("memory preset %s: using %s optimiser states", self.mem.preset, self.optimizer_name)
        optimizer = build_optimizer(params, replace(cfg.optimizer, name=self.optimizer_name))
        scheduler = build_scheduler(optimizer, cfg.optimizer, cfg.train.stages)
        self.transformer.train()
        self.model, self.optimizer, self.scheduler = self.strategy.prepare(self.transformer, optimizer, scheduler)
        self.params = params
        self._parts = (self.transformer, optimizer, scheduler)

    def _setup_checkpointer(self):
        self.state = TrainState()
        self.ckpt = Checkpointer(self.acc, self.run_dir, self.cfg.checkpoint.keep_last, self.transformer,
                                 self.peft_config, self.state, settings=self.settings,
                                 fsdp=self.strategy.checkpoint_parts(*self._parts), optimizer=self.optimizer,
                                 scheduler=self.scheduler, allow_pickle=self.cfg.checkpoint.allow_pickle)

    def _resume(self):
        path = resume_path(self.cfg)
        if path is not None:
            check_resume_settings(self.cfg, path)
            self.ckpt.load(path)
            if self.acc.is_main_process:
                print(f"resuming {self.run_dir} from {path.name} (step {self.state.step}/{self.cfg.total_steps})")

    def _setup_trackers(self):
        cfg, acc = self.cfg, self.acc
        if acc.is_main_process and tracker_names(cfg):
            acc.init_trackers(cfg.logging.wandb_project,
                              config={"rank": cfg.lora.rank, "lr": cfg.optimizer.lr, "steps": cfg.total_steps,
                                      "optimizer": self.optimizer_name, "targets": cfg.lora.targets},
                              # TensorBoard discards what a killed run logged after the resumed checkpoint
                              init_kwargs={"wandb": {"name": cfg.run_name, "dir": str(self.run_dir)},
                                           "tensorboard": {"purge_step": self.state.step + 1} if self.state.step
                                           else {}})

    def request_stop(self, *_):
        """Ctrl-C / SIGTERM: finish the current step, save a checkpoint, exit cleanly."""
        if not self._stop_requested:
            log.warning("stop requested: saving a checkpoint after this step (press again to abort hard)")
            self._stop_requested = True
        else:
            raise KeyboardInterrupt

    def _source(self):
        if self.source is None:
            self.source = self.objective.source(self.cfg, self.acc)
        return self.source

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
        refs = batch.get("references")
        if self.cfg.data.reference and not refs:
            raise RuntimeError("data.reference is on but the batch has no reference latents (cache built without it?); "
                               "run `krea2-train cache CONFIG` again")
        use_refs = self.cfg.data.reference
        p = self.cfg.data.reference_dropout
        if use_refs and p > 0 and generator is not None:  # drawn after noise and sigmas: p = 0 changes nothing
            use_refs = bool(torch.rand((), generator=generator) >= p)
        per = flow_matching_loss(model, x0.to(dev), noise.to(dev), sigmas.to(dev), text, pos,
                                 mask.to(dev) if mask is not None else None,
                                 dtype=self.transformer.img_in.weight.dtype, autocast=self.acc.autocast(),
                                 references=refs if use_refs else None,
                                 reference_method=self.cfg.train.reference_method)
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
                if acc.is_main_process and local == 0:  # the global batch is what the lr is tuned for
                    log.info("stage %d: %d px, %d steps, batch %d%s, lr x%s", si, stage.resolution, stage.steps,
                             stage.batch_size * accum * acc.num_processes, "" if accum * acc.num_processes == 1 else
                             f" ({stage.batch_size} per process x {acc.num_processes} processes x {accum} "
                             "accumulated)", stage.lr_factor)
                reset_gpu_peak(acc.device)  # the peaks logged in metrics.jsonl are this stage's
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
            self.strategy.every_process_samples or acc.is_main_process) else None
        if acc.is_main_process and not interrupted:
            lora_mod.save_adapter(self.transformer, self.peft_config, adapter_dir, state=adapter,
                                  metadata={"step": state.step, "run_name": cfg.run_name})
            write_json_atomic(self.run_dir / DONE_FILE, {"step": state.step, "total_steps": total,
                                                         "skipped_steps": state.skipped_steps,
                                                         "trained_with": self.settings})
        tracker.close(state)
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
            loss = self.objective.step(self, batch, gen, self._part_runner(last=k == accum - 1, accum=accum))
            if loss is None:
                ok = False
                continue
            losses.append(loss)
        if ok and cfg.optimizer.max_grad_norm:
            self.grad_norm = self.strategy.clip_grad_norm(self.params, cfg.optimizer.max_grad_norm)
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

    def _part_runner(self, last: bool, accum: int):
        """The objective's `run_part` for one micro-batch (train/objective.py): gradients sync only on the last part
        of the last micro-batch of the optimiser step."""
        acc, done = self.acc, [0]

        def run_part(fn, context=None):
            sync = last and done[0] == self.objective.parts - 1
            done[0] += 1
            with acc.no_sync(self.model) if not sync else nullcontext(), context or nullcontext():
                loss = fn()
                if not self._all(bool(torch.isfinite(loss).item())):
                    return None
                acc.backward(loss / accum)
            return loss.detach()

        return run_part

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
            values.update(gpu_memory(self.acc.device))  # peak allocated/reserved GiB so far in this stage
            tracker.log(step, values)
        if cfg.validation.every_steps and step % cfg.validation.every_steps == 0:
            v = self.validation_loss(stage)
            if v is not None:
                state.val_history.append([step, v])
                tracker.log(step, {"val_loss": v})
        # the checkpoint first: a failing preview must never lose the progress since the last save
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
            self.ckpt.save("periodic")
            tracker.write_curve(state)  # keep the curve current during long runs (main process)
        if cfg.preview.every_steps and cfg.preview.prompts and step % cfg.preview.every_steps == 0:
            self.preview(step, tracker)
        if self.on_step is not None:
            self.on_step(self, step)

    def preview(self, step: int, tracker=None):
        # under FSDP each block's forward is a collective: every process samples, the main one decodes and writes
        if self.acc.is_main_process or self.strategy.every_process_samples:
            with torch.random.fork_rng(devices=[self.acc.device] if self.acc.device.type == "cuda" else []):
                # previews must not move the training RNG (dropout): a run with previews resumes like one without
                images = self.objective.render_previews(self.cfg, self.transformer, self.run_dir, step,
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


def train(cfg: RunConfig, source=None, transformer=None) -> TrainResult:
    return Trainer(cfg, source=source, transformer=transformer).run()
