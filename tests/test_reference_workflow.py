"""The ComfyUI workflow of an edit LoRA: the reference nodes as ComfyUI's source declares them (nodes.py LoadImage,
ImageScale, VAEEncode; comfy_extras ReferenceLatent, FluxKontextMultiReferenceLatentMethod), wired so the KSampler's
positive carries every reference in order and the trained method; written by the export from the run's metadata."""

from krea2_train.lora.workflow import reference_nodes, workflow_graph

# inputs (name -> wired type, or the allowed widget values / a Python type), outputs: from ComfyUI's source
NODES = {
    "LoadImage": ({"image": str}, ["IMAGE", "MASK"]),
    "ImageScale": ({"image": "IMAGE", "upscale_method": ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"],
                    "width": int, "height": int, "crop": ["disabled", "center"]}, ["IMAGE"]),
    "VAEEncode": ({"pixels": "IMAGE", "vae": "VAE"}, ["LATENT"]),
    "ReferenceLatent": ({"conditioning": "CONDITIONING", "latent": "LATENT"}, ["CONDITIONING"]),
    "FluxKontextMultiReferenceLatentMethod": ({"conditioning": "CONDITIONING", "reference_latents_method": [
        "offset", "index", "uxo/uno", "index_timestep_zero"]}, ["CONDITIONING"]),
}
OUT = {"VAELoader": ["VAE"], "CLIPTextEncode": ["CONDITIONING"], **{k: v[1] for k, v in NODES.items()}}


def test_edit_graph_nodes_and_wiring():
    g = workflow_graph("edit.safetensors", prompt="make it red", width=768, height=512,
                       references=["a.png", "b.png"], reference_method="index_timestep_zero")
    api = g["prompt"]
    for nid, node in api.items():
        if node["class_type"] not in NODES:
            continue
        spec, _ = NODES[node["class_type"]]
        assert set(node["inputs"]) == set(spec), node
        for name, want in spec.items():
            v = node["inputs"][name]
            if isinstance(want, str):  # a wire of that type
                assert OUT[api[v[0]]["class_type"]][v[1]] == want, (nid, name)
            elif isinstance(want, list):
                assert v in want, (nid, name, v)
            else:
                assert isinstance(v, want)

    def up(nid, name):
        return api[nid]["inputs"][name][0]

    ks = next(k for k, n in api.items() if n["class_type"] == "KSampler")
    method = up(ks, "positive")
    assert api[method]["class_type"] == "FluxKontextMultiReferenceLatentMethod"
    assert api[method]["inputs"]["reference_latents_method"] == "index_timestep_zero"
    ref2 = up(method, "conditioning")
    ref1 = up(ref2, "conditioning")
    assert api[up(ref1, "conditioning")]["class_type"] == "CLIPTextEncode"
    images = [api[up(up(up(r, "latent"), "pixels"), "image")]["inputs"]["image"] for r in (ref1, ref2)]
    assert images == ["a.png", "b.png"]  # reference 1, 2 in order (RoPE index 1, 2)
    scale = api[up(up(ref1, "latent"), "pixels")]["inputs"]
    assert (scale["width"], scale["height"], scale["crop"]) == (768, 512, "center")
    zero = up(ks, "negative")
    assert up(zero, "conditioning") == method
    # UI form: nodes in dependency order; LoadImage keeps its upload widget value
    order = {str(n["id"]): n["order"] for n in g["workflow"]["nodes"]}
    for nid, node in api.items():
        for v in node["inputs"].values():
            if isinstance(v, list):
                assert order[v[0]] < order[nid]
    load = next(n for n in g["workflow"]["nodes"] if n["type"] == "LoadImage")
    assert load["widgets_values"] == ["a.png", "image"]


def test_text_to_image_graph_unchanged_and_metadata():
    assert workflow_graph("x.safetensors") == workflow_graph("x.safetensors", references=[])
    assert reference_nodes({"steps": 3}) == {}
    assert reference_nodes({"reference_method": "index", "reference_count": 2}) == {
        "references": ["reference_1.png", "reference_2.png"], "reference_method": "index"}


def test_export_metadata_of_an_edit_run(tmp_path):
    from krea2_train.config import load_config
    from krea2_train.pipeline import export_settings

    cfg = load_config(None, ["model.transformer=a", "model.text_encoder=b", "model.vae=c",
                             f"data.datasets=[{{path: {tmp_path}}}]", "data.reference=true",
                             "data.reference_folders=[reference_1,reference_2]", "data.flip=false",
                             "train.reference_method=index_timestep_zero",
                             "train.stages=[{resolution: 128, steps: 2}, {resolution: 64, steps: 2}]"])
    _, meta = export_settings(cfg)
    assert meta["resolution"] == 128  # the largest trained: the exported graph's size
    assert reference_nodes(meta) == {"references": ["reference_1.png", "reference_2.png"],
                                     "reference_method": "index_timestep_zero"}
