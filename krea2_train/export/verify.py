"""Verify an exported LoRA on Turbo: it loads through the same code `sample` uses, every tensor lands, every module
gets exactly the delta the trained adapter implies, and Turbo's output moves as that delta predicts. Layouts
diffusers reads are also loaded through diffusers' own `Krea2Pipeline.load_lora_weights` and must agree.

An edit LoRA (data.reference) is verified on the forward it runs with: the probe carries clean reference latents
(`references`, a run's held-out pair from its cache) and every velocity goes through the reference forward
(models/reference.py) with the run's train.reference_method; the probe's target then has the reference's size.
Without references the probe and every check are the text-to-image ones, unchanged.

Tolerances are relative Frobenius errors. The weight check compares against the trained adapter in float32, so it
is set by the file's dtype (bf16 rounding is ~0.4% per factor). The output check compares Turbo + LoRA (PEFT,
unmerged) against Turbo with the trained adapter's branch added by forward hooks, relative to the size of the
LoRA's effect.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from krea2_train.errors import UserError
from krea2_train.lora.formats import LoraFile, TrainedAdapter, read_lora_file

log = logging.getLogger(__name__)

# Relative Frobenius error of a module's delta, by the dtype the file stores.
DELTA_TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# Relative error of the LoRA's effect on the output (vs the merged reference), by the transformer's compute dtype.
OUTPUT_TOL = {torch.float32: 1e-3, torch.float16: 0.03, torch.bfloat16: 0.1}
# In half precision two equivalent forwards differ by rounding alone, about eps * |v|; errors below this many
# epsilons of |v_base| are noise, not a wrong LoRA (the per-module weight check stays exact either way).
NOISE_EPS = {torch.float32: 0.0, torch.float16: 4 * 2**-11, torch.bfloat16: 4 * 2**-8}


class LoraVerifyError(UserError):
    """The exported LoRA does not do on Turbo what the trained adapter does. The message is the full report."""


@dataclass
class VerifyReport:
    path: str
    layout: str
    modules: int
    strength: float
    delta_tolerance: float
    output_tolerance: float
    max_delta_error: float = 0.0
    worst_module: str = ""
    output_change: float = 0.0  # |v_lora - v_base| / |v_base|
    output_error: float = 0.0  # |v_lora - v_reference| / |v_reference - v_base|
    output_noise_floor: float = 0.0  # rounding noise of the compute dtype, in the same units as output_error
    diffusers: str = "not checked"
    diffusers_delta_error: float | None = None
    diffusers_output_error: float | None = None
    comfyui: str = "not checked"
    comfyui_delta_error: float | None = None
    comfyui_strength_ratio: list | None = None  # [min, max] over modules of ComfyUI's scale / the trained scale
    # {consumer: "valid" | "not read: ..." | "WRONG: ..." | "not checked"} for krea2-train, diffusers, comfyui
    consumers: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    # edit LoRAs: what the probe's reference latents were and the method run (None: text-to-image)
    references: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def valid_for(self) -> list[str]:
        """The programs that apply exactly the trained delta (at `strength`) when they load this file."""
        return [c for c, v in self.consumers.items() if v == "valid"]

    def to_dict(self) -> dict:
        out = {**asdict(self), "ok": self.ok, "valid_for": self.valid_for}
        if out["references"] is None:  # a text-to-image report reads as it always has
            del out["references"]
        return out

    def summary(self) -> str:
        lines = [
            f"LoRA verification on Turbo: {self.path}",
            f"  layout {self.layout}, {self.modules} modules, strength {self.strength}",
            *([f"  probe with references: {self.references}"] if self.references else []),
            f"  weight deltas: max relative error {self.max_delta_error:.2e} (tolerance {self.delta_tolerance:.0e})"
            + (f" at {self.worst_module}" if self.worst_module else ""),
            f"  output: LoRA changes Turbo's velocity by {self.output_change:.2e} (relative); matches the expected "
            f"change to {self.output_error:.2e} (tolerance {self.output_tolerance:.0e}"
            + (f" + rounding noise {self.output_noise_floor:.1e})" if self.output_noise_floor else ")"),
            f"  diffusers Krea2Pipeline.load_lora_weights: {self.diffusers}",
            f"  ComfyUI key rules (LoraLoaderModelOnly, header ignored): {self.comfyui}",
            f"  valid for: {', '.join(self.valid_for) or 'nothing'}",
        ]
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  FAILED: {p}" for p in self.problems]
        lines.append("  result: " + ("OK" if self.ok else "FAILED"))
        return "\n".join(lines)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (absolute when b is zero)."""
    num = (a.float() - b.float()).norm().item()
    den = b.float().norm().item()
    return num / den if den > 0 else num


def probe_inputs(transformer, seed: int = 0, grid: int = 4, text_len: int = 8,
                 sigmas=(0.9, 0.6, 0.3), references=None, reference_method: str = "index") -> tuple:
    """Deterministic random transformer inputs (packed latents, sigmas, text embeds) sized from its config.

    `references` (edit LoRAs): clean reference latents [(1, 16, h, w), ...]; the probe's target then has the first
    one's size (h/2 x w/2 tokens, as a reference put in its target's bucket) and every `velocity` runs the reference
    forward with `reference_method`. Without them the inputs are exactly the text-to-image probe."""
    cfg = transformer.config
    gen = torch.Generator().manual_seed(seed)
    b = len(sigmas)
    if references:
        from krea2_train import facts
        from krea2_train.models.reference import check_method

        check_method(reference_method)
        shape = tuple(references[0].shape)
        if len(shape) != 4 or shape[0] != 1 or shape[2] % facts.PATCH or shape[3] % facts.PATCH:
            raise ValueError(f"a probe reference is a (1, C, h, w) latent with even sides, got {shape}")
        rows, cols = shape[2] // facts.PATCH, shape[3] // facts.PATCH
    else:
        rows = cols = grid
    packed = torch.randn(b, rows * cols, cfg.in_channels, generator=gen)
    embeds = torch.randn(b, text_len, cfg.num_text_layers, cfg.text_hidden_dim, generator=gen)
    out = (packed, torch.tensor(sigmas, dtype=torch.float32), embeds, (rows, cols))
    if references:
        out += ([r.float().cpu() for r in references], reference_method)
    return out


@torch.no_grad()
def velocity(transformer, inputs) -> torch.Tensor:
    """One forward through the inference core's `predict_velocity`, in float32 on the CPU (with the probe's
    references, the reference forward)."""
    from krea2_train.inference import predict_velocity

    device = next(transformer.parameters()).device
    packed, sigma, embeds, grid, *refs = inputs
    if refs:
        references, method = refs
        return predict_velocity(transformer, packed.to(device), sigma.to(device), embeds.to(device), None, grid,
                                references=[r.to(device) for r in references], reference_method=method).float().cpu()
    return predict_velocity(transformer, packed.to(device), sigma.to(device), embeds.to(device), None, grid).float().cpu()


@torch.no_grad()
def reference_velocity(transformer, adapter: TrainedAdapter, strength: float, inputs) -> torch.Tensor:
    """Turbo plus the trained adapter's low-rank branch, added by forward hooks (no PEFT, no file): the reference.

    y = W x + strength * scale * B (A x), computed in float32 from the trained factors. Hooks rather than merged
    weights: rounding W + delta to bfloat16 would blur a small LoRA effect on the real model.
    """
    modules = dict(transformer.named_modules())
    handles = []

    def hook_for(m):
        a, b, s = adapter.down[m].float(), adapter.up[m].float(), strength * adapter.scale(m)

        def hook(module, args, out):
            x = args[0]
            branch = (x.float() @ a.to(x.device).T) @ b.to(x.device).T
            return out + (s * branch).to(out.dtype)

        return hook

    try:
        for m in adapter.modules:
            # After a LoRA was loaded and deleted, PEFT leaves a wrapper: the real Linear sits in `base_layer`.
            linear = getattr(modules[m], "base_layer", modules[m])
            handles.append(linear.register_forward_hook(hook_for(m)))
        return velocity(transformer, inputs)
    finally:
        for h in handles:
            h.remove()


def check_fits(adapter: TrainedAdapter, transformer, source: str) -> None:
    """Every adapted module exists in the transformer as a Linear of the right shape (else: wrong model)."""
    modules = dict(transformer.named_modules())
    missing, wrong = [], []
    for m in adapter.modules:
        mod = modules.get(m)
        mod = getattr(mod, "base_layer", mod)
        if not isinstance(mod, torch.nn.Linear):
            missing.append(m)
            continue
        a, b = adapter.down[m], adapter.up[m]
        if a.shape[1] != mod.in_features or b.shape[0] != mod.out_features:
            wrong.append(f"{m}: LoRA maps {a.shape[1]} -> {b.shape[0]}, the model's layer {mod.in_features} -> "
                         f"{mod.out_features}")
    if missing:
        raise LoraVerifyError(f"{source}: modules {missing[:5]} do not exist in the Turbo transformer; the LoRA is for "
                              "another architecture.")
    if wrong:
        raise LoraVerifyError(f"{source}: mismatched shapes, the LoRA was trained on a different model size than this "
                              f"Turbo checkpoint: {'; '.join(wrong[:3])}. Check --turbo (full vs tiny model).")


def _loaded_factors(transformer, adapter_name: str) -> dict[str, tuple]:
    """{module: (A, B, scaling)} of the LoRA layers PEFT created for `adapter_name` (references, no copies)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in transformer.named_modules():
        if isinstance(mod, LoraLayer) and adapter_name in mod.lora_A:
            out[name] = (mod.lora_A[adapter_name].weight, mod.lora_B[adapter_name].weight,
                         float(mod.scaling[adapter_name]))
    return out


def lowrank_rel_error(a1, b1, s1, a2, b2, s2) -> float:
    """|s1 B1 A1 - s2 B2 A2|_F / |s2 B2 A2|_F without forming the (out, in) matrices.

    |U V|_F^2 = trace((U^T U)(V V^T)) with U = [s1 B1, -s2 B2], V = [A1; A2]: only rank-sized Gram matrices, so
    checking a 6144 x 16384 layer costs no more memory than its factors. float64 keeps the cancellation exact enough.
    """
    dev = a2.device
    a1, b1 = a1.to(dev, torch.float64), b1.to(dev, torch.float64)
    a2, b2 = a2.to(dev, torch.float64), b2.to(dev, torch.float64)
    u = torch.cat([s1 * b1, -s2 * b2], 1)
    v = torch.cat([a1, a2], 0)
    diff2 = torch.trace((u.T @ u) @ (v @ v.T)).clamp(min=0).item()
    ref2 = torch.trace(((s2 * b2).T @ (s2 * b2)) @ (a2 @ a2.T)).clamp(min=0).item()
    return (diff2 / ref2) ** 0.5 if ref2 > 0 else diff2**0.5


def _compare_deltas(expected: TrainedAdapter, loaded: dict, strength: float, report: VerifyReport, what: str):
    """Worst relative error of the loaded deltas, whose scalings already include the strength they were set at
    (PEFT's set_adapters multiplies `scaling` by it), against the trained deltas at `strength`."""
    missing = [m for m in expected.modules if m not in loaded]
    extra = sorted(set(loaded) - set(expected.modules))
    if missing:
        report.problems.append(f"{what}: {len(missing)} trained modules got no LoRA, e.g. {missing[:3]}")
    if extra:
        report.problems.append(f"{what}: LoRA landed on modules that were not trained: {extra[:3]}")
    worst, worst_m = 0.0, ""
    for m in expected.modules:
        if m in loaded:
            a, b, s = loaded[m]
            err = lowrank_rel_error(a, b, s, expected.down[m], expected.up[m], expected.scale(m) * strength)
            if err > worst:
                worst, worst_m = err, m
    return worst, worst_m


def auto_dtype(checkpoint) -> str:
    """float32 for small checkpoints (tiny test models: tightest tolerances), bfloat16 for the real 12.9B one."""
    path = Path(checkpoint)
    size = sum(f.stat().st_size for f in path.rglob("*.safetensors")) if path.is_dir() else path.stat().st_size
    return "float32" if size < 2 * 2**30 else "bfloat16"


def default_device(device=None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def verify_lora_file(path, turbo_path=None, adapter: TrainedAdapter | None = None, *, transformer=None,
                     dtype="auto", device=None, strength: float = 1.0, check_diffusers: bool = True,
                     seed: int = 0, delta_tol: float | None = None, output_tol: float | None = None,
                     raise_on_failure: bool = True, references=None, reference_method: str = "index",
                     reference_source: str = "") -> VerifyReport:
    """Load `path` onto Turbo through the inference core and check it against `adapter` (the trained one; default:
    the file's own contents). Pass an already loaded Turbo `transformer` to verify several files with one load; it
    is left without adapters. Raises LoraVerifyError with the full report unless every check passes.

    `references` (an edit LoRA): clean reference latents [(1, 16, h, w), ...] in ComfyUI's order; every output check
    then runs the reference forward with `reference_method` (the run's train.reference_method). `reference_source`
    says where they came from, for the report.
    """
    from krea2_train.inference import apply_lora
    from krea2_train.models.loading import load_transformer

    if not strength:
        raise UserError(f"verify {path} at strength {strength}: a LoRA at strength 0 applies nothing, so nothing can "
                        "be checked; pass the strength you deploy it at (--strength, default 1.0)")
    lora: LoraFile = read_lora_file(path)
    expected = adapter if adapter is not None else lora.adapter
    if transformer is None:
        if turbo_path is None:
            raise UserError("verify needs the Turbo transformer: pass --turbo PATH (the Krea 2 Turbo checkpoint)")
        if dtype == "auto":
            dtype = auto_dtype(turbo_path)
        transformer = load_transformer(turbo_path, dtype=dtype, device=default_device(device))
        if getattr(transformer, "krea2_variant", None) == "raw":
            log.warning("%s looks like Raw, not Turbo; verifying on it anyway", turbo_path)
    compute = transformer.img_in.weight.dtype
    report = VerifyReport(
        path=str(path), layout=lora.layout, modules=len(lora.adapter.modules), strength=strength,
        delta_tolerance=delta_tol or max(DELTA_TOL.get(lora.adapter.dtype, 2e-2), DELTA_TOL.get(compute, 2e-2)),
        output_tolerance=output_tol or max(OUTPUT_TOL.get(compute, 0.25), DELTA_TOL.get(lora.adapter.dtype, 2e-2)),
        warnings=list(lora.warnings),
    )
    check_fits(lora.adapter, transformer, str(path))
    if adapter is not None:
        check_fits(adapter, transformer, "the trained adapter")
        absent = [m for m in adapter.modules if m not in lora.adapter.down]
        extra = [m for m in lora.adapter.modules if m not in adapter.down]
        if absent:
            report.problems.append(f"{len(absent)} trained modules are missing from the file, e.g. {absent[:3]}")
        if extra:
            report.problems.append(f"the file adapts modules that were not trained: {extra[:3]}")

    inputs = probe_inputs(transformer, seed, references=references, reference_method=reference_method)
    if references:
        sizes = ", ".join("x".join(str(d) for d in r.shape[2:]) for r in references)
        report.references = (f"{len(references)} reference latent(s) {sizes}"
                             + (f" from {reference_source}" if reference_source else "")
                             + f", method {reference_method}")
    v_base = velocity(transformer, inputs)
    v_ref = reference_velocity(transformer, expected, strength, inputs)
    expected_change = (v_ref - v_base).norm().item()

    name = apply_lora(transformer, str(path), strength=strength, adapter_name="krea2_verify")
    try:
        loaded = _loaded_factors(transformer, name)
        report.max_delta_error, report.worst_module = _compare_deltas(expected, loaded, strength, report,
                                                                      "our loader")
        v_lora = velocity(transformer, inputs)
    finally:
        transformer.delete_adapters([name])
    report.output_change = (v_lora - v_base).norm().item() / max(v_base.norm().item(), 1e-12)
    report.output_error = (v_lora - v_ref).norm().item() / max(expected_change, 1e-12)
    if report.max_delta_error > report.delta_tolerance:
        report.problems.append(f"weight delta of {report.worst_module} differs from the trained adapter by "
                               f"{report.max_delta_error:.2e} (relative), above {report.delta_tolerance:.0e}: the "
                               "scale (alpha) was lost or doubled, or the weights were altered")
    report.output_noise_floor = NOISE_EPS.get(compute, 0.0) * v_base.norm().item() / max(expected_change, 1e-12)
    if report.output_noise_floor > 0.5:
        report.warnings.append(f"in {str(compute).replace('torch.', '')} the LoRA's effect on the probe is close to "
                               "rounding noise; the output check is weak (the per-module weight check still holds). "
                               "Verify with --dtype float32 for a strict check.")
    if expected_change > 0 and report.output_change == 0:
        report.problems.append("Turbo's output is identical with and without the LoRA: nothing was applied")
    elif report.output_error > report.output_tolerance + report.output_noise_floor:
        report.problems.append(f"Turbo's output with the LoRA differs from the expected one by "
                               f"{report.output_error:.2e} of the LoRA's effect (tolerance {report.output_tolerance:.0e})")

    report.consumers["krea2-train"] = "valid" if not report.problems else "WRONG: " + report.problems[0]
    if check_diffusers:
        _check_with_diffusers(path, lora, expected, transformer, strength, inputs, v_lora, report)
    else:
        report.consumers["diffusers"] = "not checked"
    _check_with_comfyui(lora, expected, report)
    if report.problems and raise_on_failure:
        raise LoraVerifyError(report.summary())
    return report


def _check_with_diffusers(path, lora, expected, transformer, strength, inputs, v_lora, report):
    """The same file through diffusers' own `Krea2Pipeline.load_lora_weights`, where diffusers reads the layout."""
    problem = lora.diffusers_problem
    if problem is not None:
        report.diffusers = f"skipped: diffusers does not read this layout ({problem.split(';')[0]})"
        report.consumers["diffusers"] = f"not read: {problem}"
        return
    before = len(report.problems)
    from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline

    pipe = Krea2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                         transformer=transformer)
    try:
        pipe.load_lora_weights(str(path), adapter_name="krea2_verify_diffusers")
    except Exception as exc:  # diffusers' errors are ValueErrors/KeyErrors with its own wording
        report.diffusers = f"FAILED to load: {exc}"
        report.problems.append(f"diffusers' Krea2Pipeline.load_lora_weights rejects the file: {exc}")
        report.consumers["diffusers"] = f"WRONG: rejects the file ({exc})"
        return
    try:
        pipe.set_adapters(["krea2_verify_diffusers"], adapter_weights=[strength])
        loaded = _loaded_factors(transformer, "krea2_verify_diffusers")
        err, where = _compare_deltas(expected, loaded, strength, report, "diffusers")
        v_diff = velocity(transformer, inputs)
    finally:
        transformer.delete_adapters(["krea2_verify_diffusers"])
    report.diffusers_delta_error = err
    report.diffusers_output_error = _rel(v_diff, v_lora)
    report.diffusers = (f"loaded; max delta error {err:.2e}, output differs from our loader's by "
                        f"{report.diffusers_output_error:.2e}")
    if err > report.delta_tolerance:
        report.problems.append(f"through diffusers, {where} gets a delta off by {err:.2e}: diffusers reads the scale "
                               "differently from our loader")
    if report.diffusers_output_error > max(1e-4, report.output_tolerance * 0.1):
        report.problems.append(f"diffusers and our loader give different outputs ({report.diffusers_output_error:.2e})")
    new = report.problems[before:]
    report.consumers["diffusers"] = "valid" if not new else "WRONG: " + new[0]


def _check_with_comfyui(lora: LoraFile, expected: TrainedAdapter, report: VerifyReport) -> None:
    """The file's tensors as ComfyUI's LoRA loader reads them (lora/consumers.py): keys it maps, `.alpha` / rank or
    scale 1, header ignored. A file ComfyUI loads at another strength, or only in part, fails: it would load there
    with no error. A file whose keys ComfyUI maps not at all is only "not read" (ComfyUI warns on every key)."""
    from krea2_train.lora.consumers import comfyui_reading, comfyui_strength_ratios
    from krea2_train.models.loading import open_safetensors

    handle, keys = open_safetensors(Path(lora.source))
    reading = comfyui_reading({k: handle.get_tensor(k) for k in keys})
    fix = (f"re-export it with `krea2-train convert {lora.source} OUT --format comfyui` (or --format diffusers, "
           "which bakes the scale)")
    if reading.unreadable:
        report.comfyui = f"not checked: it has weights this check does not model, e.g. {reading.unreadable[:2]}"
        report.consumers["comfyui"] = "not checked"
        return
    if reading.adapter is None:
        report.comfyui = (f"not read: no key maps to a Krea 2 weight in ComfyUI (e.g. {reading.unloaded[:2]}); it "
                          f"would log 'lora key not loaded' and apply nothing; {fix}")
        report.consumers["comfyui"] = "not read: " + report.comfyui[len("not read: "):]
        return
    problems = []
    missing = [m for m in expected.modules if m not in reading.adapter.down]
    if missing:
        problems.append(f"ComfyUI would patch no weight for {len(missing)} trained modules, e.g. {missing[:3]}")
    if reading.unloaded:
        problems.append(f"ComfyUI would leave {len(reading.unloaded)} tensors unloaded, e.g. {reading.unloaded[:3]}")
    worst, worst_m = 0.0, ""
    for m in expected.modules:
        if m in reading.adapter.down:
            err = lowrank_rel_error(reading.adapter.down[m], reading.adapter.up[m], reading.adapter.scale(m),
                                    expected.down[m], expected.up[m], expected.scale(m))
            if err > worst:
                worst, worst_m = err, m
    ratios = list(comfyui_strength_ratios(reading, expected).values())
    report.comfyui_delta_error = worst
    report.comfyui_strength_ratio = [min(ratios), max(ratios)] if ratios else None
    if worst > report.delta_tolerance:
        span = (f"x{min(ratios):.3g}" + (f" to x{max(ratios):.3g}" if max(ratios) - min(ratios) > 1e-3 else "")
                if ratios else "a different delta")
        problems.append(f"ComfyUI would apply {worst_m} at {span} of the trained strength (delta error "
                        f"{worst:.2e}): it reads the scale from `.alpha` tensors or takes 1, never from the header; "
                        f"{fix}")
    report.problems.extend(problems)
    report.comfyui = ("loaded; max delta error " + f"{worst:.2e}" if not problems else "WRONG: " + problems[0])
    report.consumers["comfyui"] = "valid" if not problems else "WRONG: " + problems[0]


def write_report(report: VerifyReport, path) -> Path:
    from krea2_train.utils.io import write_json_atomic

    return write_json_atomic(path, report.to_dict())
