"""The header metadata Civitai, A1111-style web UIs and kohya tools read from a LoRA file.

    modelspec.*     Stability's model spec 1.0 (architecture "Krea-2/lora" in the "<arch>/<adapter>" form kohya's
                    sd-scripts write; "Krea-2" is the name other Krea 2 trainers use), title, trigger phrase, usage
                    hint with the suggested Turbo strength, resolution, thumbnail (data: URL).
    ss_*            kohya's training fields: network module/dim/alpha, base model, resolution, steps, epochs, image
                    count, `ss_dataset_dirs` ({folder: {"n_repeats", "img_count"}}) and `ss_tag_frequency`
                    ({folder: {tag: count}}, tags = a caption split on commas), both JSON strings.
    sshs_model_hash SHA-256 of the tensor data (the bytes after the 8-byte length and the JSON header): what kohya's
                    `precalculate_safetensors_hashes` stores, A1111's additional-networks extension shows, and
                    Civitai's AutoV3 hash is. Metadata does not change it.
    sshs_legacy_hash  kohya's legacy hash: the first 8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB of
                    the file serialised with only its `ss_*` metadata.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
from collections import Counter

from krea2_train.lora.formats import TrainedAdapter, _num

MODELSPEC_ARCHITECTURE = "Krea-2/lora"
MODELSPEC_IMPLEMENTATION = "https://github.com/krea-ai/krea-2"


def tag_frequency(captions) -> dict[str, int]:
    """{tag: count} with kohya's rule (train_util's set_tag_frequency): a caption's tags are its comma-separated
    parts, stripped and lower-cased, empty parts dropped; every occurrence counts."""
    counts: Counter = Counter()
    for caption in captions:
        counts.update(t.strip().lower() for t in str(caption or "").split(",") if t.strip())
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def tensor_data_hash(tensors: dict) -> str:
    """sshs_model_hash of a file holding `tensors`: SHA-256 of the data section as safetensors serialises it (the
    layout depends on the tensors only, not on the metadata)."""
    from safetensors.torch import save

    blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    n = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + n:]).hexdigest()


def legacy_hash(tensors: dict, header: dict) -> str:
    from safetensors.torch import save

    ss = {k: v for k, v in header.items() if k.startswith("ss_")}
    blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=ss or None)
    return hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]


def _small_png(png: bytes, side: int = 256) -> bytes:
    """The preview shrunk to at most `side` px (a header thumbnail, not a gallery image)."""
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(png))
    if max(img.size) <= side:
        return png
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def civitai_header(adapter: TrainedAdapter, info: dict, preview_png: bytes | None = None) -> dict:
    """Model-spec 1.0 (`modelspec.*`) and kohya (`ss_*`) keys that Civitai and model-spec readers show.

    `adapter` is the adapter as written: ss_network_alpha equals its `.alpha` tensors (scale = alpha / dim).
    `info` (training information, all optional): name, trigger_words, resolution, steps, epochs, dataset_size,
    datasets ({folder: image count}), tag_frequency ({folder: {tag: count}}), turbo_strength, description, author,
    license, tags, base_model_name, date. The sshs_* hashes are added by the writer, over the final tensors.
    """
    ranks = Counter(adapter.rank(m) for m in adapter.modules).most_common(1)[0][0]
    alphas = Counter(round(a, 6) for a in adapter.kohya_alphas().values()).most_common(1)[0][0]
    name = str(info.get("name") or "krea2-lora")
    triggers = info.get("trigger_words") or []
    if isinstance(triggers, str):
        triggers = [triggers]
    res = info.get("resolution")
    res_str = f"{res}x{res}" if isinstance(res, int) else (str(res) if res else "1024x1024")
    turbo = info.get("turbo_strength")
    usage = info.get("usage_hint") or (
        "Trained on Krea 2 Raw. Use on Krea 2 Turbo (8 steps, CFG 1, euler/simple)"
        + (f" at strength {float(turbo):.2f}" if turbo else "") + "; on Raw at strength 1.0."
        + (f" Trigger: {', '.join(map(str, triggers))}." if triggers else ""))
    datasets = info.get("datasets") or {}
    tags = info.get("tag_frequency") or ({"trigger": {t: 1 for t in triggers}} if triggers else {})
    header = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE,
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
        "modelspec.title": name,
        "modelspec.description": str(info.get("description") or f"Krea 2 LoRA {name}"),
        "modelspec.author": str(info.get("author") or ""),
        "modelspec.license": str(info.get("license") or ""),
        "modelspec.date": str(info.get("date") or datetime.date.today().isoformat()),
        "modelspec.resolution": res_str,
        "modelspec.prediction_type": "flow",
        "modelspec.trigger_phrase": ", ".join(map(str, triggers)),
        "modelspec.tags": ", ".join(map(str, info.get("tags") or [])),
        "modelspec.usage_hint": usage,
        "ss_base_model_version": "krea2_raw",
        "ss_sd_model_name": str(info.get("base_model_name") or "Krea 2 Raw"),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks),
        "ss_network_alpha": str(_num(alphas)),
        "ss_resolution": f"({res_str.replace('x', ', ')})",
        "ss_max_train_steps": str(info.get("steps") or ""),
        "ss_num_epochs": str(info.get("epochs") or ""),
        "ss_num_train_images": str(info.get("dataset_size") or sum(datasets.values()) or ""),
        "ss_dataset_dirs": json.dumps({d: {"n_repeats": 1, "img_count": int(n)} for d, n in datasets.items()})
        if datasets else "",
        "ss_output_name": name,
        "ss_tag_frequency": json.dumps(tags),
        "ss_training_comment": usage,
        "ss_recommended_turbo_strength": str(turbo or ""),
    }
    if preview_png:
        header["modelspec.thumbnail"] = "data:image/png;base64," + base64.b64encode(_small_png(preview_png)).decode()
    return {k: v for k, v in header.items() if v != ""}


def add_hashes(tensors: dict, header: dict) -> dict:
    """`header` plus sshs_model_hash / sshs_legacy_hash of a file holding `tensors` with that header."""
    return {**header, "sshs_model_hash": tensor_data_hash(tensors), "sshs_legacy_hash": legacy_hash(tensors, header)}
