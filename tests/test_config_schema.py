"""The run config: shipped configs load; misspelled keys, wrong types and impossible values fail before any work,
naming the key and the closest valid one; overrides; the resolved config round-trips."""

import re
from pathlib import Path

import pytest

from krea2_train.config import ConfigError, load_config, save_resolved, to_yaml

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["model.transformer=raw.safetensors", "model.text_encoder=te", "model.vae=vae"]


def err(*overrides, path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, (PATHS if path is None else []) + list(overrides))
    return str(info.value)


@pytest.mark.parametrize("name", ["demo", "style", "character"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.total_steps > 0 and cfg.train.stages and cfg.run_name == name
    assert cfg.data.datasets, "every shipped config trains on a dataset"


def test_misspelled_keys_name_the_closest():
    msg = err("lora.rnak=8")
    assert "`lora.rnak`" in msg and "Did you mean `rank`" in msg
    msg = err("train.stages.0.resolutin=512")
    assert "resolutin" in msg and "`resolution`" in msg
    msg = err("optimiser.lr=1")
    assert "Did you mean `optimizer`" in msg


def test_misspelled_key_in_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: {transformer: a, text_encoder: b, vae: c}\nlora:\n  rank: 8\n  dropuot: 0.1\n")
    msg = err(path=p)
    assert str(p) in msg and "`lora.dropuot`" in msg and "Did you mean `dropout`" in msg
    p.write_text("model: {transformer: a, text_encoder: b, vae: c}\ncheckpoint: {evry_steps: 10}\n")
    assert "Did you mean `every_steps`" in err(path=p)
    p.write_text("model: {transformer: a, text_encoder: b, vae: c}\ndata: {datasets: [{pth: x}]}\n")
    assert "Did you mean `path`" in err(path=p)  # the data engineer's section is typed too


def test_wrong_types_name_the_key():
    assert "`lora.rank`" in err("lora.rank=abc")
    assert "`optimizer.lr`" in err("optimizer.lr=fast")
    assert "`checkpoint.keep_last`" in err("checkpoint.keep_last=[1, 2]")


@pytest.mark.parametrize("override,key,hint", [
    ("optimizer.name=adamw9bit", "optimizer.name", "adamw8bit"),
    ("lora.targets=atention", "lora.targets", "attention"),
    ("timesteps.sampling=logitnormal", "timesteps.sampling", "logit_normal"),
    ("train.stages.0.resolution=500", "train.stages[0].resolution", "multiple of 16"),
    ("train.stages.0.steps=0", "train.stages[0].steps", "at least 1"),
    ("lora.rank=0", "lora.rank", "positive"),
    ("lora.dropout=1.5", "lora.dropout", "[0, 1)"),
    ("optimizer.lr=-1", "optimizer.lr", "positive"),
    ("lora.targets=custom", "lora.pattern", "regex"),
    ("timesteps.shift=fixed", "timesteps.mu", "must be set"),
    ("export.formats=[diffusers, comfy]", "export.formats", "comfyui"),
    ("run_name=a/b", "run_name", "plain folder name"),
    ("memory.quantize=int4", "memory.quantize", "nf4"),
    ("memory.preset=12gb", "memory.preset", "16gb"),
    ("data.crop=middle", "data.crop", "center"),
    ("lora.init=pissa", "lora.init", "default, gaussian"),
    ("lora.type=lokr", "export.formats", "['comfyui', 'civitai', 'musubi']"),
    ("data.datasets=[{path: x, caption_dropout: 2}]", "data.datasets[0].caption_dropout", "[0, 1]"),
    ("data.validation_images=2.5", "data.validation_images", "whole count"),
    ("data.validation_images=-1", "data.validation_images", "whole count"),
])
def test_impossible_values(override, key, hint):
    msg = err(override)
    assert f"`{key}`" in msg and hint in msg, msg


def test_validation_images_is_a_whole_count_or_a_fraction():
    """A count stays an integer (2.0 in YAML is 2 images, printed so); a fraction stays a fraction."""
    for value, expected in (("2", 2), ("2.0", 2), ("0.25", 0.25), ("0", 0)):
        got = load_config(None, PATHS + [f"data.validation_images={value}"]).data.validation_images
        assert got == expected and type(got) is type(expected), (value, got)
    assert "validation_images: 2\n" in to_yaml(load_config(None, PATHS + ["data.validation_images=2.0"]))


def test_missing_required_and_bad_override_form(tmp_path):
    with pytest.raises(ConfigError, match="`model.transformer` is required"):
        load_config(None, [])
    assert "key=value" in err("lora.rank")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_overrides_and_resolved_config_round_trip(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        "lora.rank=4", "train.stages[1].steps=7", "preview.prompts=[a cat, a dog]", "lora.alpha=null",
        "train.mixed_precision=no"])
    assert cfg.lora.rank == 4 and cfg.train.stages[1].steps == 7 and cfg.lora.alpha is None
    assert cfg.preview.prompts == ["a cat", "a dog"] and cfg.train.mixed_precision == "no"
    path = save_resolved(cfg, tmp_path)
    again = load_config(path)
    assert to_yaml(again) == to_yaml(cfg)


def test_config_command_prints_resolved_config(capsys, tiny_dir):
    from krea2_train.cli import main

    there = [f"model.transformer={tiny_dir}/transformer_raw.safetensors",
             f"model.turbo={tiny_dir}/transformer_turbo.safetensors", f"model.text_encoder={tiny_dir}/text_encoder",
             f"model.vae={tiny_dir}/vae", f"data.datasets.0.path={ROOT / 'datasets' / 'demo'}"]
    assert main(["config", str(ROOT / "configs" / "style.yaml"), "lora.rank=8", *there]) == 0
    out = capsys.readouterr().out
    assert "rank: 8" in out and "# ok: 2000 steps in 2 stage(s)" in out
    # as shipped, style.yaml names files this machine does not have: not "ok", each missing path named
    assert main(["config", str(ROOT / "configs" / "style.yaml"), "lora.rank=8"]) == 1
    out = capsys.readouterr().out
    assert "rank: 8" in out and "# ok" not in out and "# NOT ok" in out
    assert "`model.transformer`" in out and "`data.datasets.0.path`" in out
    assert main(["config", str(ROOT / "configs" / "style.yaml"), "lora.rnak=8"]) == 2


def test_dora_and_lokr_train_without_export():
    for kind in ("dora", "lokr"):
        cfg = load_config(None, PATHS + [f"lora.type={kind}", "export.formats=[]"])
        assert cfg.lora.type == kind and cfg.export.formats == []


def test_override_into_a_missing_list_entry_says_how_many_there_are():
    msg = err("train.stages=[{resolution: 512, steps: 10}, {resolution: 768, steps: 10}]", "train.stages.5.steps=3")
    assert "`train.stages.5`" in msg and "train.stages has 2 entries (0..1)" in msg and "add a stage" in msg
    assert "StageSection" not in msg and "Invalid type" not in msg
    assert "(0..0)" in err("train.stages[1].steps=3")  # the bracket form too
    assert "index it with a number" in err("train.stages.last.steps=3")
    assert load_config(None, PATHS + ["train.stages.0.steps=7"]).train.stages[0].steps == 7


def test_model_paths_are_checked_naming_the_key(tiny_dir, tmp_path, caplog):
    from krea2_train.models.loading import ModelLoadError
    from krea2_train.models.paths import check_model_paths

    good = [f"model.transformer={tiny_dir}/transformer_raw.safetensors", f"model.text_encoder={tiny_dir}/text_encoder",
            f"model.vae={tiny_dir}/vae", f"model.turbo={tiny_dir}/transformer_turbo.safetensors"]
    check_model_paths(load_config(None, good))  # all there: fine

    # a missing path: load_config (also `krea2-train config`) only warns; the check before any work names key + fix
    with caplog.at_level("WARNING"):
        cfg = load_config(None, good + [f"model.turbo={tmp_path}/turbo_typo.safetensors"])
    assert "`model.turbo`" in caplog.text
    with pytest.raises(ModelLoadError) as info:
        check_model_paths(cfg)
    msg = str(info.value)
    assert "`model.turbo`" in msg and "turbo_typo" in msg and "Fix the path" in msg and "model.vae" not in msg

    # a file that exists but is no Krea 2 transformer (cheap header check)
    import torch
    from safetensors.torch import save_file

    vae_file = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(1)}, str(vae_file))
    with pytest.raises(ModelLoadError, match=r"`model.transformer`.*txtfusion.projector.weight"):
        check_model_paths(load_config(None, good + [f"model.transformer={vae_file}"]))
    # only the keys asked for
    check_model_paths(load_config(None, good + ["model.vae=nope"]), ["model.transformer"])


def test_paths_under_make_tiny_are_not_reported_before_it_is_written(tmp_path):
    from krea2_train.models.paths import model_path_problems

    tiny = tmp_path / "tiny"
    cfg = load_config(None, [f"make_tiny={tiny}", f"model.transformer={tiny}/transformer_raw.safetensors",
                             f"model.text_encoder={tiny}/text_encoder", f"model.vae={tiny}/vae"])
    assert model_path_problems(cfg) == []
    tiny.mkdir()  # make_tiny ran (or the folder is there): now missing files are reported
    assert len(model_path_problems(cfg)) == 3


def test_dora_with_export_formats_is_refused_before_training():
    from krea2_train.config import ConfigError, load_config

    paths = ["model.transformer=/m/raw.safetensors", "model.text_encoder=/m/te", "model.vae=/m/vae"]
    with pytest.raises(ConfigError, match=r"`export.formats` has \['original'\], which a lora.type: dora"):
        load_config(None, paths + ["lora.type=dora", "export.formats=[original]"], warn_paths=False)
    cfg = load_config(None, paths + ["lora.type=dora", "export.formats=[]"], warn_paths=False)
    assert cfg.lora.type == "dora"


def test_every_memory_setting_is_settable_from_yaml_and_checked_at_load():
    """One settings type: each MemorySettings field is a config key; bad values fail at load, naming the key."""
    import dataclasses

    from krea2_train.config import MemorySettings, resolve_memory_settings

    values = dict(preset="24gb", quantize="fp8", gradient_checkpointing=True, checkpoint_blocks=3,
                  offload_blocks=False, fuse_qkv=False, compile=False, attention_backend="math",
                  trim_text_padding=False, share_lora_input=False, optimizer_8bit=False, fp8_matmul=True)
    assert set(values) == {f.name for f in dataclasses.fields(MemorySettings)}
    cfg = load_config(None, PATHS + [f"memory.{k}={v}" for k, v in values.items()], warn_paths=False)
    resolved = resolve_memory_settings(cfg.memory)
    assert dataclasses.asdict(resolved) == values  # explicit values win over the 24gb preset's
    for key, bad, hint in (("memory.attention_backend", "fastest", "diffusers:"),
                           ("memory.quantize", "int4", "int8"), ("memory.preset", "12gb", "16gb"),
                           ("memory.checkpoint_blocks", "-1", ">= 0")):
        with pytest.raises(ConfigError, match=rf"`{re.escape(key)}`.*{re.escape(hint)}"):
            load_config(None, PATHS + [f"{key}={bad}"], warn_paths=False)


def test_export_formats_are_the_exporters_formats():
    from krea2_train.lora.formats import FORMATS

    cfg = load_config(None, PATHS + ["export.formats=[original, musubi, civitai]"], warn_paths=False)
    assert list(cfg.export.formats) == ["original", "musubi", "civitai"] and set(cfg.export.formats) <= set(FORMATS)
    with pytest.raises(ConfigError, match=r"`export.formats` has 'comfyu'.*Did you mean `comfyui`"):
        load_config(None, PATHS + ["export.formats=[comfyu]"], warn_paths=False)
