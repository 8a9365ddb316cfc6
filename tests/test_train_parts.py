"""Unit tests of the training parts: LoRA target presets and variants, optimisers and LR schedule, timestep
sampling and the flow-matching loss, on the tiny transformer."""

import math

import pytest
import torch

from krea2_train.config import LoraSection, OptimizerSection, StageSection, TimestepSection
from krea2_train.schedule import raw_mu, time_shift
from krea2_train.train import lora as lora_mod
from krea2_train.train.optim import build_optimizer, build_scheduler, lr_factor
from krea2_train.train.timesteps import loss_weights, sample_sigmas


@pytest.fixture
def tiny_transformer():
    from krea2_train.models.tiny import build_tiny_transformer

    return build_tiny_transformer().float().requires_grad_(False)


def adapted(model):
    return sorted({n.rsplit(".lora_", 1)[0] for n, p in model.named_parameters() if p.requires_grad})


def test_target_presets(tiny_transformer):
    from krea2_train.models.tiny import build_tiny_transformer

    m = tiny_transformer
    lora_mod.add_lora(m, LoraSection(rank=2, targets="attention"))
    names = adapted(m)
    assert len(names) == 2 * 5  # 2 blocks x q, k, v, out, gate
    assert all(n.startswith("transformer_blocks.") and ".attn." in n for n in names)

    m = build_tiny_transformer().float().requires_grad_(False)
    lora_mod.add_lora(m, LoraSection(rank=2, targets="attention_mlp", blocks=[1]))
    names = adapted(m)
    assert len(names) == 8 and all(n.startswith("transformer_blocks.1.") for n in names)

    m = build_tiny_transformer().float().requires_grad_(False)
    linear = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
    lora_mod.add_lora(m, LoraSection(rank=2, targets="all_linear"))
    names = adapted(m)
    assert len(names) == len(linear)
    assert any(n.startswith("text_fusion.") for n in names) and "txt_in.linear_1" in "".join(names)
    assert any(n.startswith("final_layer") for n in names) and any(n.startswith("img_in") for n in names)

    m = build_tiny_transformer().float().requires_grad_(False)
    lora_mod.add_lora(m, LoraSection(rank=2, targets="custom", pattern=r"transformer_blocks\.\d+\.attn\.to_(q|v)"))
    assert len(adapted(m)) == 4


def test_targets_matching_nothing_is_a_clear_error(tiny_transformer):
    from krea2_train.errors import UserError

    with pytest.raises(UserError, match="match no Linear layer"):
        lora_mod.add_lora(tiny_transformer, LoraSection(targets="custom", pattern="nothing_here"))
    with pytest.raises(UserError, match="lora.blocks"):
        lora_mod.add_lora(tiny_transformer, LoraSection(targets="attention", blocks=[0, 7]))


@pytest.mark.parametrize("kind", [dict(type="lora"), dict(type="dora"), dict(type="lora", use_rslora=True),
                                  dict(type="lokr"), dict(type="lora", init="gaussian")])
def test_lora_variants_train_and_round_trip(tiny_transformer, tmp_path, kind):
    from krea2_train.models.tiny import build_tiny_transformer

    cfg = LoraSection(rank=4, alpha=8, **kind)
    m = tiny_transformer
    peft_config = lora_mod.add_lora(m, cfg, seed=3)
    params = lora_mod.trainable_parameters(m)
    assert params and all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, text = torch.randn(1, 16, 64), torch.randn(1, 3, 12, 32)
    from krea2_train.schedule import position_ids

    for _ in range(2):
        out = m(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([0.5]),
                position_ids=position_ids(3, 4, 4), return_dict=False)[0]
        out.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    lora_mod.save_adapter(m, peft_config, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "adapter_config.json").exists()
    other = build_tiny_transformer().float().requires_grad_(False)
    lora_mod.add_lora(other, cfg, seed=99)  # different init, then load the trained weights
    lora_mod.load_adapter_weights(other, tmp_path)
    a, b = lora_mod.adapter_state_dict(m), lora_mod.adapter_state_dict(other)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    if kind.get("use_rslora"):
        assert peft_config.use_rslora


def test_saved_adapter_reads_as_diffusers_layout(tiny_transformer, tmp_path):
    import json

    from safetensors import safe_open

    peft_config = lora_mod.add_lora(tiny_transformer, LoraSection(rank=4, alpha=2))
    lora_mod.save_adapter(tiny_transformer, peft_config, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        header = json.loads(f.metadata()["lora_adapter_metadata"])
    assert "transformer_blocks.0.attn.to_q.lora_A.weight" in keys and not any(k.endswith(".alpha") for k in keys)
    assert header["r"] == 4 and header["lora_alpha"] == 2


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "prodigy"])
def test_optimisers_step(name):
    p = torch.nn.Parameter(torch.ones(64, 64))
    opt = build_optimizer([p], OptimizerSection(name=name, lr=1.0 if name == "prodigy" else 1e-2))
    p.grad = torch.ones_like(p)
    opt.step()
    assert float(p.detach().mean()) < 1.0


def test_optimizer_without_parameters_is_a_user_error():
    from krea2_train.errors import UserError

    with pytest.raises(UserError, match="no trainable parameters"):
        build_optimizer([], OptimizerSection())


def test_lr_schedule_warmup_decay_and_stage_factor():
    stages = [StageSection(steps=10), StageSection(steps=10, lr_factor=0.5)]
    cfg = OptimizerSection(scheduler="cosine", warmup_steps=4, min_lr_factor=0.1)
    f = [lr_factor(s, cfg, stages) for s in range(20)]
    assert f[0] == pytest.approx(0.25) and f[3] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[4:9], f[5:10]))  # decays
    assert f[10] == pytest.approx(0.5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 6 / 16))))
    assert f[19] >= 0.5 * 0.1 - 1e-9
    lin = OptimizerSection(scheduler="linear")
    assert lr_factor(0, lin, stages) == 1.0 and lr_factor(19, lin, stages) == pytest.approx(0.5 * 1 / 20)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = build_scheduler(opt, cfg, stages)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)


def test_timestep_sampling_follows_raw_shift():
    g = torch.Generator().manual_seed(0)
    cfg = TimestepSection()
    low = sample_sigmas(cfg, 20000, 256, g)  # 256 px
    high = sample_sigmas(cfg, 20000, 4096, g)  # 1024 px: mu ~0.91 shifts towards noise
    assert 0 < low.min() and high.max() < 1
    assert high.median() > low.median() + 0.05
    # the shift is exactly Raw's inference shift applied to the logit-normal draw
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    u = torch.sigmoid(torch.randn(8, generator=g2)).clamp(1e-4, 1 - 1e-4)
    torch.testing.assert_close(sample_sigmas(cfg, 8, 4096, g1), time_shift(raw_mu(4096), u.double()).float())
    none = TimestepSection(sampling="uniform", shift="none")
    s = sample_sigmas(none, 20000, 4096, g)
    assert abs(float(s.mean()) - 0.5) < 0.02
    fixed = TimestepSection(shift="fixed", mu=1.15)
    assert sample_sigmas(fixed, 20000, 256, g).median() > 0.7


def test_loss_weights():
    s = torch.tensor([0.1, 0.5, 0.9])
    assert torch.equal(loss_weights(TimestepSection(), s), torch.ones(3))
    w = loss_weights(TimestepSection(weighting="cosmap"), s)
    assert w[1] > w[0] and w[1] > w[2]
    w = loss_weights(TimestepSection(weighting="sigma_sqrt"), s)
    assert w[0] > w[1] > w[2]


def test_flow_matching_target(tiny_dir, tmp_path):
    """The trainer's loss is the MSE between the model output and noise - x0 at x_t = (1 - s) x0 + s noise."""
    from krea2_train.config import load_config
    from krea2_train.schedule import pack_latents, position_ids
    from krea2_train.train.batches import SyntheticData
    from krea2_train.train.trainer import Trainer

    cfg = load_config(None, [f"model.transformer={tiny_dir}/transformer_raw.safetensors", "model.text_encoder=x",
                             "model.vae=x", "model.dtype=float32", "train.mixed_precision=no",
                             f"output_dir={tmp_path}", "logging.progress=none", "logging.tensorboard=false",
                             "train.stages=[{resolution: 64, steps: 1}]"])
    t = Trainer(cfg, source=SyntheticData())
    t.setup()
    batch = SyntheticData.collate(torch.randn(1, 16, 8, 8), [torch.randn(5, 12, 32)])
    noise = torch.randn(1, 16, 64)
    sig = torch.tensor([0.3])
    got = t.loss_on(batch, sigmas=sig, noise=noise)
    x0 = pack_latents(batch["latents"])
    with torch.no_grad():
        pred = t.transformer(hidden_states=0.7 * x0 + 0.3 * noise, encoder_hidden_states=batch["text"],
                             timestep=sig, position_ids=position_ids(5, 4, 4), return_dict=False)[0]
    torch.testing.assert_close(got, ((pred - (noise - x0)) ** 2).mean(dim=(1, 2)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("progress", ["rich", "tqdm", "none"])
def test_tracker_progress_metrics_and_loss_curve(tmp_path, progress, capsys):
    import json

    from accelerate import Accelerator

    from krea2_train.config import load_config
    from krea2_train.train.checkpoint import TrainState
    from krea2_train.train.tracking import Tracker

    cfg = load_config(None, ["model.transformer=a", "model.text_encoder=b", "model.vae=c",
                             f"logging.progress={progress}", "logging.tensorboard=false", f"output_dir={tmp_path}"])
    tr = Tracker(Accelerator(cpu=True), cfg, tmp_path, total_steps=10, start_step=0)
    for step in range(1, 11):
        tr.log(step, {"loss": 1.0 / step, "lr": 1e-4})
    tr.log(10, {"val_loss": 0.1234})
    tr.close(TrainState(step=10, history=[[s, 1.0 / s] for s in range(1, 11)], val_history=[[10, 0.1234]]))
    captured = capsys.readouterr()
    assert "step 10: validation loss 0.1234" in captured.out + captured.err  # shown, not only in metrics.jsonl
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 11 and {"loss", "lr", "s_per_step", "eta_s"} <= set(rows[0])
    assert rows[-2]["eta_s"] == 0
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_resumed_tracker_drops_rows_logged_after_the_checkpoint(tmp_path):
    """kill -9 at step 7 after a checkpoint at step 4: the resumed run logs 5..7 again, once."""
    import json

    from accelerate import Accelerator

    from krea2_train.config import load_config
    from krea2_train.train.tracking import Tracker

    cfg = load_config(None, ["model.transformer=a", "model.text_encoder=b", "model.vae=c", "logging.progress=none",
                             "logging.tensorboard=false", f"output_dir={tmp_path}"])
    rows = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8))
    (tmp_path / "metrics.jsonl").write_text(rows + '{"step": 8, "lo')  # a half line: killed mid-write
    tr = Tracker(Accelerator(cpu=True), cfg, tmp_path, total_steps=10, start_step=4)
    for step in range(5, 11):
        tr.log(step, {"loss": 0.5, "lr": 1e-4})
    tr.metrics.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))


def test_loss_curve_shows_validation_and_stage_starts():
    import matplotlib.pyplot as plt

    from krea2_train.train.tracking import loss_figure

    fig = loss_figure([[s, 1.0 / s] for s in range(1, 21)], val_history=[[10, 0.2], [20, 0.1]], boundaries=[12])
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    plt.close(fig)
    assert "validation" in labels and "stage start" in labels
