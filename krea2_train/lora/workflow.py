"""ComfyUI's native Krea 2 Turbo text-to-image graph with one LoRA, in both of ComfyUI's forms.

The graph is the one Comfy-Org ships (workflow_templates `templates/image_krea2_turbo_t2i.json`), without its
prompt-enhancer subgraph: UNETLoader (Turbo) -> LoraLoaderModelOnly (this LoRA at the suggested Turbo strength) ->
KSampler (8 steps, CFG 1, euler, simple) <- CLIPTextEncode (trigger word + prompt; CLIPLoader type `krea2`,
Qwen3-VL) and ConditioningZeroOut of it as the negative, EmptyLatentImage (an exported LoRA's: its training
resolution, `workflow_size`; else 1024 x 1024); VAEDecode (VAELoader) ->
SaveImage. Node and input names and widget order are ComfyUI's (nodes.py); tests/test_export_workflow.py pins them.

    graph = workflow_graph("my_lora.safetensors", strength=1.2, prompt="a red fox", trigger_words=["zq style"])
    graph["workflow"]   # UI form: what the ComfyUI editor saves and opens (nodes, links, widgets_values)
    graph["prompt"]     # API form: {node id: {"class_type", "inputs"}}, what POST /prompt takes

    write_workflow(out_dir / "NAME_workflow.json", ...)     # UI form (drag onto ComfyUI), + NAME_workflow_api.json

For pictures (previews, the transfer grid):

    workflow_png_chunks(lora_name, *, strength=1.0, prompt="", trigger_words=(), models=None, seed=0, width=1024,
                        height=1024, filename_prefix=None) -> {"workflow": str, "prompt": str}
    embed_png_chunks(png: bytes, chunks: dict[str, str]) -> bytes

`workflow_png_chunks` returns the PNG tEXt chunks ComfyUI's SaveImage writes (`prompt` = the API form as JSON,
`workflow` = the UI form as JSON); `embed_png_chunks` adds them to PNG bytes. Dropping such a PNG on ComfyUI opens
the graph that makes it (with the seed given; the picture itself may come from our sampler, not ComfyUI's).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

# What ComfyUI users have in models/ (Comfy-Org/Krea-2); export.comfyui_* in the config overrides them.
DEFAULT_UNET = "krea2_turbo_fp8_scaled.safetensors"
DEFAULT_TEXT_ENCODER = "qwen3vl_4b_fp8_scaled.safetensors"
DEFAULT_VAE = "qwen_image_vae.safetensors"
TURBO_STEPS, TURBO_CFG, TURBO_SAMPLER, TURBO_SCHEDULER = 8, 1.0, "euler", "simple"
DEFAULT_PROMPT = "a photograph"
DEFAULT_SIZE = 1024  # Krea 2's native resolution: the graph's size when the training resolution is unknown


@dataclass(frozen=True)
class ComfyModels:
    """File names as ComfyUI lists them (models/diffusion_models, models/text_encoders, models/vae)."""

    unet: str = DEFAULT_UNET
    text_encoder: str = DEFAULT_TEXT_ENCODER
    vae: str = DEFAULT_VAE


# Widget inputs (those ComfyUI shows as widgets, in INPUT_TYPES order) and wired inputs of each node type, and the
# output types. KSampler's seed gets a UI-only "control after generate" value after it in widgets_values.
_SPEC = {
    "UNETLoader": (("unet_name", "weight_dtype"), (), ("MODEL",)),
    "LoraLoaderModelOnly": (("lora_name", "strength_model"), (("model", "MODEL"),), ("MODEL",)),
    "CLIPLoader": (("clip_name", "type", "device"), (), ("CLIP",)),
    "VAELoader": (("vae_name",), (), ("VAE",)),
    "CLIPTextEncode": (("text",), (("clip", "CLIP"),), ("CONDITIONING",)),
    "ConditioningZeroOut": ((), (("conditioning", "CONDITIONING"),), ("CONDITIONING",)),
    "EmptyLatentImage": (("width", "height", "batch_size"), (), ("LATENT",)),
    "KSampler": (("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"),
                 (("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")), ("LATENT",)),
    "VAEDecode": ((), (("samples", "LATENT"), ("vae", "VAE")), ("IMAGE",)),
    "SaveImage": (("filename_prefix",), (("images", "IMAGE"),), ("IMAGE",)),
    # edit LoRAs (references): comfy nodes.py LoadImage / ImageScale / VAEEncode, comfy_extras nodes_edit_model.py
    # ReferenceLatent, nodes_flux.py FluxKontextMultiReferenceLatentMethod ("Edit Model Reference Method")
    "LoadImage": (("image",), (), ("IMAGE", "MASK")),
    "ImageScale": (("upscale_method", "width", "height", "crop"), (("image", "IMAGE"),), ("IMAGE",)),
    "VAEEncode": ((), (("pixels", "IMAGE"), ("vae", "VAE")), ("LATENT",)),
    "ReferenceLatent": ((), (("conditioning", "CONDITIONING"), ("latent", "LATENT")), ("CONDITIONING",)),
    "FluxKontextMultiReferenceLatentMethod": (("reference_latents_method",), (("conditioning", "CONDITIONING"),),
                                              ("CONDITIONING",)),
}


def _prompt_text(prompt: str, trigger_words) -> str:
    triggers = [trigger_words] if isinstance(trigger_words, str) else list(trigger_words or [])
    text = (prompt or DEFAULT_PROMPT).strip()
    missing = [t for t in triggers if t and t not in text]
    return ", ".join(missing + [text])


def _nodes(lora_name, strength, prompt, trigger_words, models, seed, width, height, filename_prefix,
           references=(), reference_method="index"):
    """[(id, type, title, {widget: value}, {input: (source id, slot)}, (x, y))] in execution order.

    `references` (edit LoRAs): input image file names; each is LoadImage -> ImageScale (lanczos, centre crop to the
    output size, as training fits a reference to its target's bucket) -> VAEEncode -> ReferenceLatent chained on the
    prompt (reference 1, 2, ... in order), then the reference-method node with the method trained (without it
    ComfyUI's Krea 2 model ignores the references); the zeroed negative is taken after them."""
    m = models or ComfyModels()
    positive = (5, 0)
    extra = []
    for k, image in enumerate(references or ()):
        base, y = 20 + 4 * k, 800 + 260 * k
        extra += [
            (base, "LoadImage", f"Reference {k + 1}", {"image": image}, {}, (0, y)),
            (base + 1, "ImageScale", f"Fit reference {k + 1}", {"upscale_method": "lanczos", "width": int(width),
                                                               "height": int(height), "crop": "center"},
             {"image": (base, 0)}, (420, y)),
            (base + 2, "VAEEncode", f"Encode reference {k + 1}", {}, {"pixels": (base + 1, 0), "vae": (4, 0)},
             (420, y + 130)),
            (base + 3, "ReferenceLatent", f"Reference latent {k + 1}", {},
             {"conditioning": positive, "latent": (base + 2, 0)}, (840, y)),
        ]
        positive = (base + 3, 0)
    if extra:
        extra.append((19, "FluxKontextMultiReferenceLatentMethod", "Reference method (as trained)",
                      {"reference_latents_method": reference_method}, {"conditioning": positive}, (840, 600)))
        positive = (19, 0)
    return extra + [
        (1, "UNETLoader", "Load Krea 2 Turbo", {"unet_name": m.unet, "weight_dtype": "default"}, {}, (0, 0)),
        (2, "LoraLoaderModelOnly", "LoRA", {"lora_name": lora_name, "strength_model": round(float(strength), 4)},
         {"model": (1, 0)}, (420, 0)),
        (3, "CLIPLoader", "Load Qwen3-VL", {"clip_name": m.text_encoder, "type": "krea2", "device": "default"}, {},
         (0, 200)),
        (4, "VAELoader", "Load VAE", {"vae_name": m.vae}, {}, (0, 400)),
        (5, "CLIPTextEncode", "Prompt", {"text": _prompt_text(prompt, trigger_words)}, {"clip": (3, 0)}, (420, 200)),
        (6, "ConditioningZeroOut", "Negative (zero)", {}, {"conditioning": positive}, (420, 480)),
        (7, "EmptyLatentImage", "Size", {"width": int(width), "height": int(height), "batch_size": 1}, {},
         (420, 600)),
        (8, "KSampler", "KSampler (Turbo)", {"seed": int(seed), "steps": TURBO_STEPS, "cfg": TURBO_CFG,
                                             "sampler_name": TURBO_SAMPLER, "scheduler": TURBO_SCHEDULER,
                                             "denoise": 1.0},
         {"model": (2, 0), "positive": positive, "negative": (6, 0), "latent_image": (7, 0)}, (840, 0)),
        (9, "VAEDecode", "Decode", {}, {"samples": (8, 0), "vae": (4, 0)}, (1200, 0)),
        (10, "SaveImage", "Save", {"filename_prefix": filename_prefix or "krea2_lora"}, {"images": (9, 0)},
         (1200, 200)),
    ]


def workflow_graph(lora_name: str, *, strength: float = 1.0, prompt: str = "", trigger_words=(),
                   models: ComfyModels | None = None, seed: int = 0, width: int = 1024, height: int = 1024,
                   filename_prefix: str | None = None, references=(), reference_method: str = "index") -> dict:
    """{"workflow": UI form, "prompt": API form} of the Turbo graph with `lora_name` (a file name as ComfyUI's
    models/loras lists it) at `strength`; `references`: input image names for an edit LoRA (see `_nodes`)."""
    nodes = _nodes(lora_name, strength, prompt, trigger_words, models, seed, width, height, filename_prefix,
                   references, reference_method)
    # the UI's `order`: dependency order, each time the first node (in list order) whose inputs are all made
    done, ordered, pending = set(), [], list(nodes)
    while pending:
        n = next(n for n in pending if all(src in done for src, _ in n[4].values()))
        ordered.append(n)
        done.add(n[0])
        pending.remove(n)
    nodes = ordered
    types = {nid: t for nid, t, *_ in nodes}
    api = {}
    for nid, ntype, title, widgets, wires, _ in nodes:
        inputs = dict(widgets)
        inputs.update({name: [str(src), slot] for name, (src, slot) in wires.items()})
        api[str(nid)] = {"class_type": ntype, "inputs": inputs, "_meta": {"title": title}}

    links, ui_nodes = [], []
    out_links: dict = {}
    for nid, ntype, _, _, wires, _ in nodes:
        for slot, (name, typ) in enumerate(_SPEC[ntype][1]):
            src, src_slot = wires[name]
            link_id = len(links) + 1
            links.append([link_id, src, src_slot, nid, slot, typ])
            out_links.setdefault((src, src_slot), []).append(link_id)
    link_of = {(lk[3], lk[4]): lk[0] for lk in links}
    for order, (nid, ntype, title, widgets, _, (x, y)) in enumerate(nodes):
        widget_names, wired, outputs = _SPEC[ntype]
        values = []
        for w in widget_names:
            values.append(widgets[w])
            if ntype == "KSampler" and w == "seed":
                values.append("fixed")  # control_after_generate: keep the seed that made the picture
            if ntype == "LoadImage":
                values.append("image")  # the upload widget's value, as ComfyUI saves it
        ui_nodes.append({
            "id": nid, "type": ntype, "title": title, "pos": [x, y], "size": [380, 160], "flags": {}, "order": order,
            "mode": 0,
            "inputs": [{"name": n, "type": t, "link": link_of[(nid, i)]} for i, (n, t) in enumerate(wired)],
            "outputs": [{"name": t, "type": t, "slot_index": i, "links": out_links.get((nid, i), [])}
                        for i, t in enumerate(outputs)],
            "properties": {"Node name for S&R": ntype},
            "widgets_values": values,
        })
    ui = {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, json.dumps(api, sort_keys=True))), "revision": 0,
          "last_node_id": max(types), "last_link_id": len(links), "nodes": ui_nodes, "links": links, "groups": [],
          "config": {}, "extra": {"krea2_train": "Krea 2 Turbo + LoRA (ComfyUI native nodes)"}, "version": 0.4}
    return {"workflow": ui, "prompt": api}


def workflow_png_chunks(lora_name: str, *, strength: float = 1.0, prompt: str = "", trigger_words=(),
                        models: ComfyModels | None = None, seed: int = 0, width: int = 1024, height: int = 1024,
                        filename_prefix: str | None = None, references=(), reference_method: str = "index"
                        ) -> dict[str, str]:
    """The PNG tEXt chunks ComfyUI reads a graph from: {"workflow": UI form JSON, "prompt": API form JSON}, for
    `embed_png_chunks` (or PIL's PngInfo.add_text). Arguments as `workflow_graph`: `lora_name` as ComfyUI lists the
    file in models/loras (export/export.py's choice: `comfyui_lora_name(paths, out_dir)`), `strength` the LoRA
    strength shown, `prompt` + `trigger_words` the positive prompt, `seed`/`width`/`height` those of the picture."""
    graph = workflow_graph(lora_name, strength=strength, prompt=prompt, trigger_words=trigger_words, models=models,
                           seed=seed, width=width, height=height, filename_prefix=filename_prefix,
                           references=references, reference_method=reference_method)
    return {"workflow": json.dumps(graph["workflow"]), "prompt": json.dumps(graph["prompt"])}


def embed_png_chunks(png: bytes, chunks: dict[str, str]) -> bytes:
    """`png` re-encoded with `chunks` as tEXt (as ComfyUI's SaveImage writes them); pixels unchanged."""
    import io

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    img = Image.open(io.BytesIO(png))
    info = PngInfo()
    for key, value in (getattr(img, "text", None) or {}).items():
        if key not in chunks:
            info.add_text(key, value)
    for key, value in chunks.items():
        info.add_text(key, value)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def workflow_size(metadata: dict) -> dict:
    """`workflow_graph`'s width and height for an exported LoRA: its training resolution in the export metadata
    (pipeline.export_settings: the largest trained; `export --resolution`), else 1024. A LoRA trained at 128 px
    on the micro model is not meant to be run at 1024."""
    res = (metadata or {}).get("resolution")
    try:
        px = int(res)
    except (TypeError, ValueError):
        px = DEFAULT_SIZE
    return {"width": px, "height": px}


def reference_nodes(metadata: dict) -> dict:
    """`workflow_graph` arguments for an edit LoRA from its export metadata (pipeline.export_settings writes
    reference_method and reference_count): placeholder input names reference_1.png, ... for the user to pick."""
    method = (metadata or {}).get("reference_method")
    if not method:
        return {}
    n = int(metadata.get("reference_count") or 1)
    return {"references": [f"reference_{k + 1}.png" for k in range(n)], "reference_method": str(method)}


def write_workflow(path, lora_name: str, **kwargs) -> tuple[Path, Path]:
    """Write the UI form to `path` (NAME_workflow.json: drag it onto ComfyUI) and the API form beside it
    (NAME_workflow_api.json). Returns both paths."""
    from krea2_train.utils.io import write_json_atomic

    graph = workflow_graph(lora_name, **kwargs)
    path = Path(path)
    api_path = path.with_name(path.stem + "_api.json")
    return write_json_atomic(path, graph["workflow"]), write_json_atomic(api_path, graph["prompt"])


def comfyui_lora_name(paths: dict, out_dir) -> str | None:
    """The exported file a ComfyUI user puts in models/loras, as ComfyUI lists it (relative path): the Civitai file,
    else the ComfyUI one, else any other (ComfyUI reads them all; see lora/consumers.py)."""
    for fmt in ("civitai", "comfyui", "original", "musubi", "diffusers"):
        if fmt in paths:
            return Path(paths[fmt]).relative_to(out_dir).as_posix()
    return None


def run_models(cfg) -> ComfyModels:
    """The ComfyUI model file names the run's export section names (export.comfyui_unet / _text_encoder / _vae)."""
    e = cfg.export
    return ComfyModels(unet=e.comfyui_unet, text_encoder=e.comfyui_text_encoder, vae=e.comfyui_vae)


def run_lora_name(cfg) -> str:
    """The file of run `cfg` a ComfyUI user puts in models/loras, named as the export writes it (export/export.py's
    file names), chosen as `comfyui_lora_name` chooses among written files."""
    name = cfg.export.name or cfg.run_name
    files = {"civitai": f"{name}.safetensors", "diffusers": f"{name}_diffusers/pytorch_lora_weights.safetensors"}
    paths = {fmt: files.get(fmt, f"{name}_{fmt}.safetensors") for fmt in cfg.export.formats}
    return comfyui_lora_name(paths, ".") or f"{name}.safetensors"


def run_workflow_chunks(cfg, *, strength: float, prompt: str, width: int, height: int, seed: int = 0,
                        references=()) -> dict[str, str]:
    """The PNG chunks for a picture of run `cfg` (previews, the transfer grid): the graph that makes it in ComfyUI
    with the run's exported file, the run's trigger words and the export section's model file names; `references`
    (edit LoRAs): the input image names, with the run's train.reference_method."""
    e = cfg.export
    refs = {"references": list(references), "reference_method": cfg.train.reference_method} if references else {}
    return workflow_png_chunks(run_lora_name(cfg), strength=strength, prompt=prompt,
                               trigger_words=tuple(e.trigger_words), models=run_models(cfg), seed=seed, width=width,
                               height=height, filename_prefix=e.name or cfg.run_name, **refs)
