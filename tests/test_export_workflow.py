"""The ComfyUI workflow written beside every export, checked against node specs transcribed from ComfyUI's nodes.py
and Comfy-Org's Krea 2 Turbo template (tests/data/comfyui_krea2_t2i_nodes.json), in both forms, and as PNG chunks."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from krea2_train.lora.workflow import ComfyModels, embed_png_chunks, workflow_graph, workflow_png_chunks

SPEC = json.loads((Path(__file__).parent / "data" / "comfyui_krea2_t2i_nodes.json").read_text())["nodes"]
WIDGET_TYPES = {"INT": int, "FLOAT": (int, float), "STRING": str, "COMBO": str}


def _widget_names(ntype):
    return [n for n, t in SPEC[ntype]["inputs"] if t in WIDGET_TYPES]


def check_api(api: dict) -> None:
    """What ComfyUI's /prompt validation needs: known node types, every input named as nodes.py names it, widget
    values of the widget's type, wires pointing at an existing node's output of the input's type."""
    for nid, node in api.items():
        spec = SPEC[node["class_type"]]
        inputs = dict(spec["inputs"])
        assert set(node["inputs"]) == set(inputs), (nid, node["class_type"])
        for name, value in node["inputs"].items():
            if inputs[name] in WIDGET_TYPES:
                assert isinstance(value, WIDGET_TYPES[inputs[name]]), (nid, name, value)
            else:
                src, slot = value
                assert SPEC[api[src]["class_type"]]["outputs"][slot] == inputs[name], (nid, name)


def check_ui(ui: dict, api: dict) -> None:
    """The UI form is the same graph: same nodes, widgets_values in nodes.py order (with the UI-only control value
    after KSampler's seed), links [id, from, slot, to, slot, type] agreeing with the API wires and node slots."""
    nodes = {str(n["id"]): n for n in ui["nodes"]}
    assert set(nodes) == set(api)
    links = {lk[0]: lk for lk in ui["links"]}
    for nid, n in nodes.items():
        ntype = n["type"]
        assert ntype == api[nid]["class_type"]
        expected = []
        for w in _widget_names(ntype):
            expected.append(api[nid]["inputs"][w])
            if w in SPEC[ntype].get("control_after_generate", []):
                expected.append("fixed")
        assert n["widgets_values"] == expected, nid
        assert len(n["widgets_values"]) == len(SPEC[ntype]["template_widgets"]), ntype  # same shape as the template
        wired = [(name, t) for name, t in SPEC[ntype]["inputs"] if t not in WIDGET_TYPES]
        assert [(i["name"], i["type"]) for i in n["inputs"]] == wired
        for slot, i in enumerate(n["inputs"]):
            lk = links[i["link"]]
            assert lk[3:5] == [int(nid), slot] and [str(lk[1]), lk[2]] == api[nid]["inputs"][i["name"]]
            assert lk[5] == i["type"]
        assert [o["type"] for o in n["outputs"]] == SPEC[ntype]["outputs"]
        for slot, o in enumerate(n["outputs"]):
            assert all(links[x][1:3] == [int(nid), slot] for x in o["links"])
    assert ui["last_link_id"] == max(links) and ui["last_node_id"] == max(int(k) for k in nodes)


def _by_type(api):
    return {n["class_type"]: n["inputs"] for n in api.values()}


def test_graph_matches_comfyui_specs_and_the_template():
    graph = workflow_graph("zq_style.safetensors", strength=1.25, prompt="a red fox in snow", trigger_words=["zq"],
                           seed=7)
    api, ui = graph["prompt"], graph["workflow"]
    check_api(api)
    check_ui(ui, api)
    nodes = _by_type(api)
    assert set(nodes) == set(SPEC)  # exactly the node list, once each
    t = {k: v["template_widgets"] for k, v in SPEC.items()}
    # The Turbo settings and model files are the template's.
    ks = nodes["KSampler"]
    assert [ks["steps"], ks["cfg"], ks["sampler_name"], ks["scheduler"], ks["denoise"]] == t["KSampler"][2:]
    assert [nodes["EmptyLatentImage"][k] for k in ("width", "height", "batch_size")] == t["EmptyLatentImage"]
    assert nodes["UNETLoader"]["unet_name"] == t["UNETLoader"][0]
    assert [nodes["CLIPLoader"][k] for k in ("clip_name", "type")] == t["CLIPLoader"][:2]
    assert nodes["VAELoader"]["vae_name"] == t["VAELoader"][0]
    # This LoRA at the suggested strength; the trigger word leads the prompt; the negative is the zeroed positive.
    assert nodes["LoraLoaderModelOnly"] == {"model": ["1", 0], "lora_name": "zq_style.safetensors",
                                            "strength_model": 1.25}
    assert nodes["CLIPTextEncode"]["text"] == "zq, a red fox in snow" and ks["seed"] == 7
    pos = ks["positive"]
    assert api[ks["negative"][0]]["class_type"] == "ConditioningZeroOut"
    assert api[ks["negative"][0]]["inputs"]["conditioning"] == pos
    assert api[ks["model"][0]]["class_type"] == "LoraLoaderModelOnly"


def test_model_names_are_configurable():
    m = ComfyModels(unet="krea2_turbo_bf16.safetensors", text_encoder="qwen3vl_4b_bf16.safetensors", vae="v.safetensors")
    nodes = _by_type(workflow_graph("l.safetensors", models=m)["prompt"])
    assert (nodes["UNETLoader"]["unet_name"], nodes["CLIPLoader"]["clip_name"], nodes["VAELoader"]["vae_name"]) == (
        m.unet, m.text_encoder, m.vae)


def test_png_chunks_read_back_as_comfyui_reads_them():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 16), (10, 200, 30)).save(buf, format="PNG")
    chunks = workflow_png_chunks("l.safetensors", strength=0.8, prompt="x", trigger_words="zq")
    png = embed_png_chunks(buf.getvalue(), chunks)
    img = Image.open(io.BytesIO(png))
    assert img.size == (32, 16) and img.getpixel((3, 3)) == (10, 200, 30)
    api, ui = json.loads(img.text["prompt"]), json.loads(img.text["workflow"])  # what the ComfyUI frontend parses
    check_api(api)
    check_ui(ui, api)
    assert _by_type(api)["LoraLoaderModelOnly"]["strength_model"] == 0.8


@pytest.mark.parametrize("formats,lora_name", [(("diffusers", "comfyui", "civitai"), "w.safetensors"),
                                               (("diffusers",), "w_diffusers/pytorch_lora_weights.safetensors")])
def test_export_writes_the_workflow(tiny_dir, tmp_path, formats, lora_name):
    from test_export_helpers import trained_adapter

    from krea2_train.export.export import export_lora

    adapter = trained_adapter(tiny_dir, r=4, alpha=8)
    export_lora(adapter, tmp_path, formats, {"trigger_words": ["zq"], "turbo_strength": 1.4,
                                             "sample_prompt": "a cat"}, name="w")
    ui = json.loads((tmp_path / "w_workflow.json").read_text())
    api = json.loads((tmp_path / "w_workflow_api.json").read_text())
    check_api(api)
    check_ui(ui, api)
    lora = _by_type(api)["LoraLoaderModelOnly"]
    assert lora["lora_name"] == lora_name and (tmp_path / lora_name).exists() and lora["strength_model"] == 1.4
    assert _by_type(api)["CLIPTextEncode"]["text"] == "zq, a cat"
    manifest = json.loads((tmp_path / "export.json").read_text())
    assert manifest["comfyui_workflow"]["ui"] == "w_workflow.json"


def test_exported_workflow_runs_at_the_training_resolution(tiny_dir, tmp_path):
    """The exported graph's size (and an edit graph's reference fit) is the training resolution in the metadata;
    1024 without one."""
    from test_export_helpers import trained_adapter

    from krea2_train.export.export import export_lora

    adapter = trained_adapter(tiny_dir, r=4, alpha=8)
    sizes = {}
    for res in (128, None):
        out = tmp_path / str(res)
        meta = {"reference_method": "index", "reference_count": 1} | ({"resolution": res} if res else {})
        export_lora(adapter, out, ["comfyui"], meta, name="w")
        api = json.loads((out / "w_workflow_api.json").read_text())
        nodes = _by_type(api)
        sizes[res] = [(nodes[t]["width"], nodes[t]["height"]) for t in ("EmptyLatentImage", "ImageScale")]
    assert sizes == {128: [(128, 128)] * 2, None: [(1024, 1024)] * 2}


@pytest.mark.parametrize("formats", [["diffusers", "comfyui", "civitai"], ["comfyui"], ["musubi", "diffusers"],
                                     ["diffusers"]])
def test_run_lora_name_is_the_file_the_export_writes(tmp_path, formats):
    from types import SimpleNamespace

    from krea2_train.export.export import export_path
    from krea2_train.lora.workflow import comfyui_lora_name, run_lora_name

    cfg = SimpleNamespace(run_name="run", export=SimpleNamespace(name="mystyle", formats=formats))
    written = {f: export_path(tmp_path, "mystyle", f) for f in formats}
    assert run_lora_name(cfg) == comfyui_lora_name(written, tmp_path)
