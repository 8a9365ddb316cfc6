"""Captions from the Qwen3-VL the user already has: `krea2-train caption DIR|CONFIG` and `data.auto_caption`.

Krea 2's text encoder is Qwen3-VL-4B-Instruct; its Hugging Face folder (`model.text_encoder`) also holds the vision
tower, so `Qwen3VLForConditionalGeneration` loaded from it captions the training images with no extra download.

    captioner = Captioner.from_path(folder, dtype="auto", device="cuda")   # model + processor, bf16 on GPU
    report = caption_datasets(cfg)                                          # .txt beside every image lacking one

Per image: the chat [user: <image> + instruction] goes through the Qwen3-VL processor and `model.generate` (greedy,
`max_new_tokens`), the answer is decoded, made one line, given the trigger word where the preset puts it, and cut at
a sentence or word end to fit the text encoder's caption budget (checks.CAPTION_TOKENS = 507 tokens, counted with
that folder's tokenizer). Each caption is written atomically as soon as its batch is done, so Ctrl-C loses at most
one batch and a re-run continues with the images still lacking a caption. Under `accelerate launch` each process
captions a disjoint share (round robin over the sorted to-do list).

Caption cache: every generated caption is also stored under `<cache_dir>/captions/<k[:2]>/<k>.json`, keyed by the
image bytes and the captioner settings (model files, instruction, trigger, max_new_tokens, max_pixels, dtype). A
re-caption with changed settings regenerates only what those settings change; the text-embedding cache keys hash
the caption text, so only the captions that changed are re-encoded afterwards.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from krea2_train.config.data import CAPTION_PRESETS
from krea2_train.errors import UserError
from krea2_train.utils.io import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

CAPTION_VERSION = 1

# Instructions that match how LoRAs are trained. `{trigger}` is the trigger word; `trigger` says where it goes when
# the model's answer lacks it: "prefix" ("k2style, a red cup ..."); "subject" instructions ask the model to name the
# subject by it, and it is prefixed only when the answer does not.
PRESETS = {
    "style": dict(
        instruction="Describe the content of this image in one paragraph: the subjects, what they do, their colours, "
                    "shapes and positions, the setting and the background. Do not mention the artistic style, "
                    "medium, technique, brushwork or mood; describe only what is depicted.",
        trigger="prefix"),
    "character": dict(
        instruction="Describe this image in one paragraph: the person's pose, expression, clothes and accessories, "
                    "what they are doing, the setting and the background. Refer to the person only as {trigger}; do "
                    "not describe their face, hair or body shape, which stay the same in every image.",
        instruction_no_trigger="Describe this image in one paragraph: the person's pose, expression, clothes and "
                               "accessories, what they are doing, the setting and the background. Refer to the "
                               "person as \"the person\"; do not describe their face, hair or body shape.",
        trigger="subject"),
    "object": dict(
        instruction="Describe this image in one paragraph: where the object is, its angle, its surroundings, the "
                    "lighting and the background. Refer to the object only as {trigger}; do not describe its own "
                    "shape, colours or markings, which stay the same in every image.",
        instruction_no_trigger="Describe this image in one paragraph: where the main object is, its angle, its "
                               "surroundings, the lighting and the background. Refer to it as \"the object\".",
        trigger="subject"),
    "general": dict(
        instruction="Describe this image in one detailed paragraph: the subjects, their colours, shapes, sizes, "
                    "textures and positions, any text, the setting, the background, the lighting and the style.",
        trigger="prefix"),
}
PRESETS["product"] = PRESETS["object"]
PRESET_NAMES = CAPTION_PRESETS
assert set(PRESETS) == set(CAPTION_PRESETS)  # config/data.py lists the names the config accepts


class CaptionError(UserError):
    pass


def instruction_for(preset: str, instruction: Optional[str] = None, trigger: Optional[str] = None) -> str:
    """The instruction sent with each image: a free `instruction` (its `{trigger}` filled in) or the preset's."""
    if preset not in PRESETS:
        raise CaptionError(f"caption preset {preset!r} is not one of {', '.join(PRESET_NAMES)}")
    if instruction:
        text = instruction
    else:
        p = PRESETS[preset]
        text = p["instruction"] if trigger or "instruction_no_trigger" not in p else p["instruction_no_trigger"]
    if "{trigger}" in text and not trigger:
        raise CaptionError(f"the instruction refers to {{trigger}} but no trigger word is set: {text!r}. Give "
                           "--trigger WORD (data.datasets[i].trigger_word), or an instruction without {trigger}.")
    return text.replace("{trigger}", trigger or "")


@dataclass(frozen=True)
class CaptionSettings:
    """Everything besides the image that shapes a caption (part of the caption cache key)."""
    preset: str = "general"
    instruction: Optional[str] = None   # free instruction; replaces the preset's
    trigger: Optional[str] = None
    max_new_tokens: int = 200
    max_pixels: int = 1024 * 1024       # images are resized by the processor to at most this many pixels
    batch_size: int = 4
    dtype: str = "auto"                 # auto: bfloat16 on GPU, float32 on CPU

    @property
    def text(self) -> str:
        return instruction_for(self.preset, self.instruction, self.trigger)

    @property
    def trigger_rule(self) -> str:
        return "prefix" if self.instruction else PRESETS[self.preset]["trigger"]


def resolve_dtype(name: str, device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, name)


# ------------------------------------------------------------------------------------------------ the model
def _processor_class():
    """Qwen3VLProcessor without its video half. transformers' Qwen3VLProcessor requires its video processor, and
    that requires torchvision, which CPU machines here lack; captioning never sends video, so this subclass keeps
    the processor's own image and text code (chat template, image-token expansion, padding) and drops the video
    attribute. Built lazily so importing this module does not import transformers."""
    from transformers import Qwen3VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class Qwen3VLImageTextProcessor(Qwen3VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
            # the token attributes Qwen3VLProcessor.__init__ sets, read the same way
            for name, default in (("image_token", "<|image_pad|>"), ("video_token", "<|video_pad|>"),
                                  ("vision_start_token", "<|vision_start|>"),
                                  ("vision_end_token", "<|vision_end|>")):
                token = getattr(tokenizer, name, None) or default
                setattr(self, name, token)
                setattr(self, f"{name}_id", getattr(tokenizer, f"{name}_id", None)
                        or tokenizer.convert_tokens_to_ids(token))

    return Qwen3VLImageTextProcessor


def read_chat_template(folder: Path, tokenizer) -> Optional[str]:
    """chat_template.jinja or chat_template.json (the processor's files), else the tokenizer's own."""
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").exists():
        return json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    return getattr(tokenizer, "chat_template", None)


def check_caption_folder(path, config_key: str = "model.text_encoder") -> Path:
    """The folder can caption: a Hugging Face Qwen3-VL folder with a vision tower, its image processor config and a
    chat template. Raises CaptionError naming the file and what is missing otherwise."""
    path = Path(str(path)).expanduser()
    if path.is_file():
        raise CaptionError(
            f"{path}: a single-file text encoder (ComfyUI's qwen3vl_4b_*.safetensors) holds only the language model, "
            "no vision tower, so it cannot caption. Point `caption --model` (or `model.text_encoder` for captioning) "
            "at the Hugging Face Qwen3-VL-4B-Instruct folder (config.json, weights with the `visual.` tower, "
            "tokenizer, preprocessor_config.json, chat_template.json), or write the .txt captions yourself.")
    if not (path / "config.json").exists():
        raise CaptionError(f"{path} is not a Hugging Face model folder (no config.json). Point `{config_key}` at the "
                           "Qwen3-VL-4B-Instruct folder.")
    config = json.loads((path / "config.json").read_text())
    if not str(config.get("model_type", "")).startswith("qwen3_vl") or not config.get("vision_config"):
        vision = "set" if config.get("vision_config") else "missing"
        raise CaptionError(f"{path}/config.json is not a Qwen3-VL model with a vision tower (model_type "
                           f"{config.get('model_type')!r}, vision_config {vision}); captioning needs "
                           "Qwen3-VL-4B-Instruct's folder.")
    missing = [name for name in ("preprocessor_config.json", "tokenizer_config.json") if not (path / name).exists()]
    if not any((path / n).exists() for n in ("chat_template.json", "chat_template.jinja")):
        tok_cfg = path / "tokenizer_config.json"
        if not (tok_cfg.exists() and "chat_template" in json.loads(tok_cfg.read_text())):
            missing.append("chat_template.json (or chat_template.jinja)")
    if missing:
        from krea2_train.models.micro import WEIGHTS_DIR

        hint = ("These files come with Qwen3-VL-4B-Instruct on Hugging Face; copy them from there into the folder (a "
                "folder written by `krea2-train make-tiny` has them).")
        if path.resolve().is_relative_to(Path(WEIGHTS_DIR).resolve()):
            hint = ("The shipped micro model's text encoder does not caption yet: `python -c \"from "
                    "krea2_train.models.tiny import enable_captioning as e; e('SRC', 'DST')\"` with SRC this folder "
                    "writes a copy DST that does; set data.caption.model (or `caption --model`) to DST.")
        raise CaptionError(f"{path} cannot caption: missing {', '.join(missing)}. {hint}")
    return path


class Captioner:
    """Qwen3VLForConditionalGeneration + its processor. `generate` returns the new token ids per image (eos and
    padding removed); `decode` turns them into text."""

    def __init__(self, model, processor, source: str = "", max_pixels: int = 1024 * 1024):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.source = source
        self.max_pixels = max_pixels
        tok = self.tokenizer
        # the turn ends at <|im_end|>; <|endoftext|> as well (Qwen3-VL's generation_config lists both)
        self.eos_ids = sorted({i for i in (tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id)
                               if i is not None and i != tok.unk_token_id} or {tok.eos_token_id})
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_ids[0]

    @classmethod
    def from_path(cls, path, dtype: str = "auto", device="cpu", max_pixels: int = 1024 * 1024,
                  config_key: str = "model.text_encoder") -> "Captioner":
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLForConditionalGeneration

        from krea2_train.models.text_encoder import files_fingerprint

        path = check_caption_folder(path, config_key)
        tokenizer = AutoTokenizer.from_pretrained(path)
        # the folder's pixel range, capped at max_pixels (Qwen3-VL-4B's own cap is 16.7 M pixels: ~16k image tokens)
        size = json.loads((path / "preprocessor_config.json").read_text()).get("size", {})
        longest = min(int(size.get("longest_edge") or max_pixels), max_pixels)
        size = {"shortest_edge": min(int(size.get("shortest_edge") or 56 * 56), longest), "longest_edge": longest}
        image_processor = AutoImageProcessor.from_pretrained(path, size=size)
        processor = _processor_class()(image_processor, tokenizer, chat_template=read_chat_template(path, tokenizer))
        for token in (processor.image_token, processor.vision_start_token, processor.vision_end_token):
            if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
                raise CaptionError(f"{path}: the tokenizer has no {token} token, so images cannot be sent to the "
                                   "model; use Qwen3-VL-4B-Instruct's tokenizer files.")
        config = json.loads((path / "config.json").read_text())
        image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
        if config.get("image_token_id") != image_id:
            raise CaptionError(f"{path}/config.json has image_token_id={config.get('image_token_id')} but the "
                               f"tokenizer's {processor.image_token} is {image_id}: the tokenizer files are not this "
                               "model's. Use the tokenizer that came with the checkpoint.")
        torch_dtype = resolve_dtype(dtype, device)
        model, info = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch_dtype,
                                                                      output_loading_info=True)
        missing = [k for k in info.get("missing_keys", []) if "visual" in k or "lm_head" in k]
        if missing:
            raise CaptionError(f"{path}: the weights lack {len(missing)} tensors of the vision tower or the output "
                               f"head (e.g. {missing[0]}); this checkpoint cannot caption. Use the full "
                               "Qwen3-VL-4B-Instruct folder.")
        model = model.to(device).eval().requires_grad_(False)
        return cls(model, processor, source=files_fingerprint(path), max_pixels=max_pixels)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def chat_text(self, instruction: str) -> str:
        """The prompt for one image: the user turn [image, instruction], then the assistant's turn opened."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def generate(self, images: list, instruction: str, max_new_tokens: int = 200) -> list[list[int]]:
        """New token ids per image (greedy). The batch is left-padded, as generation needs, and each answer is cut at
        its first eos."""
        text = self.chat_text(instruction)
        inputs = self.processor(text=[text] * len(images), images=list(images), padding=True, padding_side="left",
                                return_tensors="pt").to(self.device)
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                  eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        new = out[:, inputs["input_ids"].shape[1]:].tolist()
        answers = []
        for ids in new:
            end = next((n for n, t in enumerate(ids) if t in self.eos_ids), len(ids))
            answers.append(ids[:end])
        return answers

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def count_tokens(self, text: str) -> int:
        """Caption length as the text encoder reads it (same tokenizer, no special tokens)."""
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)


# ------------------------------------------------------------------------------------------------ one caption
def _has_word(text: str, word: str) -> bool:
    return bool(re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text))


def fit_tokens(text: str, count: Callable[[str], int], limit: int) -> str:
    """`text` cut to at most `limit` tokens, at the last sentence end that fits, else the last word end."""
    if count(text) <= limit:
        return text
    lo, hi = 0, len(text)  # the longest prefix (in characters) within the limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(text[:mid]) <= limit:
            lo = mid
        else:
            hi = mid - 1
    head = text[:lo]
    cut = max(head.rfind(". "), head.rfind("! "), head.rfind("? "))
    if cut > len(head) // 2:
        return head[:cut + 1]
    cut = head.rfind(" ")
    return (head[:cut] if cut > 0 else head).rstrip(" ,;:")


def finish_caption(text: str, trigger: Optional[str], rule: str, count: Callable[[str], int],
                   limit: int) -> str:
    """One line, the trigger word where `rule` puts it (prefix, unless the answer names it already), within
    `limit` tokens including the trigger."""
    text = " ".join(text.split()).strip()
    if not trigger or _has_word(text, trigger):
        return fit_tokens(text, count, limit)
    prefix = f"{trigger}, "
    body = fit_tokens(text, count, max(1, limit - count(prefix)))
    out = prefix + body if body else trigger
    while count(out) > limit and body:  # token merges across the join can add one
        body = fit_tokens(body, count, count(body) - 1)
        out = prefix + body if body else trigger
    return out


# ------------------------------------------------------------------------------------------------ folders
@dataclass
class Job:
    image: Path
    caption_file: Path
    trigger: Optional[str]
    sha256: str = ""


@dataclass
class CaptionReport:
    written: list = field(default_factory=list)     # [(caption file, caption)]
    kept: list = field(default_factory=list)        # caption files that already existed
    failed: list = field(default_factory=list)      # [(image, why)]
    cached: int = 0                                 # of `written`, taken from the caption cache
    dry_run: bool = False
    seconds: float = 0.0
    generated_tokens: int = 0
    max_tokens: int = 0                             # longest caption, text-encoder tokens

    def to_json(self) -> dict:
        return {"written": [{"file": str(f), "caption": c} for f, c in self.written],
                "kept": [str(f) for f in self.kept], "failed": [{"image": str(i), "why": w} for i, w in self.failed],
                "cached": self.cached, "dry_run": self.dry_run, "seconds": round(self.seconds, 2),
                "generated_tokens": self.generated_tokens, "max_tokens": self.max_tokens}

    def merge(self, other: "CaptionReport") -> None:
        self.written += other.written
        self.kept += other.kept
        self.failed += other.failed
        self.cached += other.cached
        self.generated_tokens += other.generated_tokens
        self.max_tokens = max(self.max_tokens, other.max_tokens)

    def summary(self) -> str:
        verb = "would write" if self.dry_run else "wrote"
        rate = f", {len(self.written) / self.seconds:.2f} img/s" if self.seconds and self.written else ""
        lines = [f"captions: {verb} {len(self.written)} ({self.cached} from the caption cache), kept "
                 f"{len(self.kept)} existing, {len(self.failed)} failed{rate}; longest {self.max_tokens} tokens"]
        for f, c in self.written[: 5 if self.dry_run else 0]:
            lines.append(f"  {f}: {c}")
        # the reason usually names the file already (ImageProblem messages start with the path)
        lines += [f"  failed: {w}" if str(w).startswith(str(i)) else f"  failed: {i}: {w}" for i, w in self.failed]
        return "\n".join(lines)


def _has_caption(path: Path) -> bool:
    """An existing caption file counts unless it is empty (whitespace only); a non-UTF-8 one is the user's."""
    try:
        return bool(path.read_bytes().strip())
    except OSError:
        return False


def folder_jobs(root, trigger: Optional[str] = None, caption_extension: str = ".txt", overwrite: bool = False,
                report: Optional[CaptionReport] = None) -> list[Job]:
    """Images under `root` (recursively, as the `folder` dataset reads them) whose caption file is missing or empty
    (every image with `overwrite`), sorted by path."""
    from krea2_train.data.images import IMAGE_EXTENSIONS

    root = Path(str(root)).expanduser()
    if not root.is_dir():
        raise CaptionError(f"{root} is not a folder of images")
    ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    jobs = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            cap = path.with_suffix(ext)
            if not overwrite and _has_caption(cap):
                if report is not None:
                    report.kept.append(cap)
                continue
            jobs.append(Job(path, cap, trigger))
    return sorted(jobs, key=lambda j: str(j.image))


def settings_key(settings: CaptionSettings, model_source: str) -> dict:
    return {"v": CAPTION_VERSION, "model": model_source, "instruction": settings.text, "trigger": settings.trigger,
            "rule": settings.trigger_rule, "max_new_tokens": settings.max_new_tokens,
            "max_pixels": settings.max_pixels, "dtype": settings.dtype, "greedy": True}


def caption_key(image_sha: str, settings: CaptionSettings, model_source: str) -> str:
    body = json.dumps({"image": image_sha, **settings_key(settings, model_source)}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:32]


def _cache_path(cache_dir, key: str) -> Path:
    return Path(cache_dir) / "captions" / key[:2] / f"{key}.json"


def _read_cached(cache_dir, key: str) -> Optional[str]:
    if cache_dir is None:
        return None
    try:
        data = json.loads(_cache_path(cache_dir, key).read_text())
        return data["caption"] if data.get("key") == key else None
    except (OSError, ValueError, KeyError):
        return None


def _state():
    from accelerate import PartialState

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        return PartialState(cpu=True)  # see data/cache._state
    return PartialState()


def caption_jobs(jobs: list[Job], model_path, settings_for: Callable[[Optional[str]], CaptionSettings],
                 cache_dir=None, dry_run: bool = False, progress: bool = True, captioner: Optional[Captioner] = None,
                 device=None, max_images: Optional[int] = None) -> CaptionReport:
    """Caption `jobs` (this process's share under accelerate launch) and write each caption file atomically.

    `settings_for(trigger)` gives the settings of a job's trigger word. The model is loaded only when some caption is
    not in the cache, and released before this returns when it was loaded here. `dry_run`: nothing is written
    (neither caption files nor the cache), at most `max_images` (default 4) are captioned. Returns this process's
    report merged with the others' (every process gets the whole report)."""
    import time

    from tqdm.auto import tqdm

    from krea2_train.data.checks import CAPTION_TOKENS
    from krea2_train.data.images import ImageProblem, open_image
    from krea2_train.models.text_encoder import files_fingerprint

    state = _state()
    device = device or state.device
    report = CaptionReport(dry_run=dry_run)
    if dry_run:
        jobs = jobs[: max_images or 4]
    elif max_images is not None:
        jobs = jobs[:max_images]
    if state.num_processes > 1:
        # rank 0's list for everyone: machines sharing a network drive can briefly see different files, and two
        # processes splitting different lists could caption one image twice or skip one
        from accelerate.utils import broadcast_object_list

        jobs = broadcast_object_list([jobs if state.is_main_process else None])[0]
    mine = jobs[state.process_index::state.num_processes]
    started = time.perf_counter()
    model_source = captioner.source if captioner is not None else files_fingerprint(Path(str(model_path)).expanduser())
    owned = False

    todo = []  # (job, key, settings) not in the cache
    for job in mine:
        try:
            job.sha256 = hashlib.sha256(job.image.read_bytes()).hexdigest()
        except OSError as exc:
            report.failed.append((job.image, f"cannot read: {exc}"))
            continue
        settings = settings_for(job.trigger)
        key = caption_key(job.sha256, settings, model_source)
        cached = _read_cached(cache_dir, key)
        if cached is not None:
            _write(job, cached, report, dry_run)
            report.cached += 1
        else:
            todo.append((job, key, settings))

    show = progress and state.is_local_main_process
    if todo:
        if captioner is None:
            captioner = Captioner.from_path(model_path, dtype=todo[0][2].dtype, device=device,
                                            max_pixels=todo[0][2].max_pixels)
            owned = True
        # one batch = one settings group (same instruction); order kept otherwise
        groups: dict = {}
        for entry in todo:
            groups.setdefault(entry[2], []).append(entry)
        with tqdm(total=len(todo), desc="captioning", unit="img", disable=not show) as bar:
            for settings, entries in groups.items():
                bs = max(1, settings.batch_size)
                for i in range(0, len(entries), bs):
                    batch, images = [], []
                    for job, key, s in entries[i:i + bs]:
                        try:
                            images.append(open_image(job.image.read_bytes(), str(job.image)))
                            batch.append((job, key, s))
                        except (ImageProblem, OSError) as exc:
                            report.failed.append((job.image, str(exc)))
                            log.warning("caption: skipping %s", exc)
                            bar.update(1)
                    if not batch:
                        continue
                    answers = captioner.generate(images, settings.text, settings.max_new_tokens)
                    for (job, key, s), ids in zip(batch, answers):
                        report.generated_tokens += len(ids)
                        text = finish_caption(captioner.decode(ids), s.trigger, s.trigger_rule,
                                              captioner.count_tokens, CAPTION_TOKENS)
                        if not text:
                            report.failed.append((job.image, "the model gave an empty caption; write it by hand"))
                            continue
                        report.max_tokens = max(report.max_tokens, captioner.count_tokens(text))
                        if not dry_run and cache_dir is not None:
                            write_json_atomic(_cache_path(cache_dir, key),
                                              {"key": key, "caption": text, "image": str(job.image),
                                               "sha256": job.sha256, "settings": settings_key(s, model_source)})
                        _write(job, text, report, dry_run)
                    bar.update(len(batch))
    if owned:
        captioner = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    report.seconds = time.perf_counter() - started
    return _gather(report, state)


def _write(job: Job, text: str, report: CaptionReport, dry_run: bool) -> None:
    if not dry_run:
        write_text_atomic(job.caption_file, text + "\n")
    report.written.append((job.caption_file, text))


def _gather(report: CaptionReport, state) -> CaptionReport:
    """Every process's report, merged (paths as strings, in process order)."""
    if state.num_processes == 1:
        return report
    import torch.distributed as dist

    parts = [None] * state.num_processes
    dist.all_gather_object(parts, report.to_json())
    merged = CaptionReport(dry_run=report.dry_run, seconds=report.seconds)
    for p in parts:
        merged.merge(CaptionReport(written=[(w["file"], w["caption"]) for w in p["written"]], kept=[],
                                   failed=[(f["image"], f["why"]) for f in p["failed"]], cached=p["cached"],
                                   generated_tokens=p["generated_tokens"], max_tokens=p["max_tokens"]))
    merged.kept = report.kept
    return merged


def caption_folder(root, model_path, settings: CaptionSettings, cache_dir=None, overwrite: bool = False,
                   dry_run: bool = False, caption_extension: str = ".txt", **kwargs) -> CaptionReport:
    """`krea2-train caption DIR`: every image under `root` lacking a caption (all with `overwrite`)."""
    kept = CaptionReport()
    jobs = folder_jobs(root, settings.trigger, caption_extension, overwrite, kept)
    report = caption_jobs(jobs, model_path, lambda trigger: _with_trigger(settings, trigger), cache_dir=cache_dir,
                          dry_run=dry_run, **kwargs)
    report.kept = kept.kept
    return report


def _with_trigger(settings: CaptionSettings, trigger: Optional[str]) -> CaptionSettings:
    from dataclasses import replace

    return replace(settings, trigger=trigger)


def settings_from_config(caption_cfg, trigger: Optional[str] = None) -> CaptionSettings:
    """config.data.CaptionConfig -> CaptionSettings."""
    return CaptionSettings(preset=caption_cfg.preset, instruction=caption_cfg.instruction, trigger=trigger,
                           max_new_tokens=caption_cfg.max_new_tokens, max_pixels=caption_cfg.max_pixels,
                           batch_size=caption_cfg.batch_size, dtype=caption_cfg.dtype)


def caption_datasets(data_cfg, model_path, cache_dir, overwrite: bool = False, dry_run: bool = False,
                     trigger: Optional[str] = None, **kwargs) -> CaptionReport:
    """Caption every `folder` dataset of a run config (each with its own trigger word, or `trigger` when given).
    Other dataset types keep their captions in a metadata file or table, which this does not rewrite: refused."""
    from krea2_train.data.sources import detect_type

    jobs, kept = [], CaptionReport()
    base = settings_from_config(data_cfg.caption)
    for i, d in enumerate(data_cfg.datasets):
        root = Path(str(d.path)).expanduser()
        kind = d.type if d.type != "auto" else (detect_type(root) if root.is_dir() else "folder")
        if kind != "folder":
            raise CaptionError(f"data.datasets[{i}] ({root}) is a `{kind}` dataset: captions live in its "
                               f"{'metadata file' if kind == 'imagefolder' else 'caption column'}, which captioning "
                               "does not rewrite. Caption a folder of images instead (images + .txt), or set "
                               "data.auto_caption: false.")
        if not root.is_dir():
            raise CaptionError(f"data.datasets[{i}].path = {root} is not a folder; point it at the folder of images "
                               "to caption")
        jobs += folder_jobs(root, trigger if trigger is not None else d.trigger_word, d.caption_extension,
                            overwrite, kept)
    report = caption_jobs(jobs, model_path, lambda t: _with_trigger(base, t), cache_dir=cache_dir, dry_run=dry_run,
                          **kwargs)
    report.kept = kept.kept
    return report





def caption_model_path(cfg, command: str = "krea2-train caption CONFIG"):
    """The folder to caption with: data.caption.model, else model.text_encoder; a clear error when neither is set."""
    path = cfg.data.caption.model or cfg.model.text_encoder
    if not path:
        raise CaptionError(f"no Qwen3-VL folder to caption with: give `{command} --model /models/Qwen3-VL-4B-Instruct`"
                           " or set data.caption.model (or model.text_encoder) in the config")
    if not cfg.data.caption.model and Path(str(path)).expanduser().is_file():
        raise CaptionError(f"model.text_encoder = {path} is a single-file text encoder (ComfyUI's): it holds no vision "
                           "tower, so it cannot caption. Set data.caption.model (or `caption --model`) to the Hugging "
                           "Face Qwen3-VL-4B-Instruct folder.")
    return path
