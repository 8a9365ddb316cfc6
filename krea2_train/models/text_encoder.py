"""Krea 2 text encoding: Qwen3-VL hidden states from 12 tapped layers, per FACTS.md.

Contract (pinned against diffusers' `Krea2Pipeline.get_text_hidden_states` in tests):
    [system prefix | prompt | PAD ... | suffix], the prefix (34 tokens) dropped from the output,
    hidden_states[i] for i in TEXT_TAP_LAYERS stacked per token -> (B, L, 12, D),
    positions count valid tokens only (padding does not consume a position), at most 512 prompt tokens.

diffusers pads every prompt to 512 tokens. Padded tokens are masked as keys and never read back, so we return only the
valid tokens (the batch padded to its longest caption): same values, far fewer tokens for caches and training.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import torch

from krea2_train import facts
from krea2_train.errors import UserError
from krea2_train.models.loading import load_text_encoder

log = logging.getLogger(__name__)


def comfyui_prompt_problem(prompt: str) -> str | None:
    """Why ComfyUI's Krea 2 text encoder (CLIPTextEncode -> comfy/text_encoders/krea2.py) would read `prompt`
    differently from diffusers' Krea2Pipeline and this trainer, or None. Found by running ComfyUI's own tokenizer
    code (tests/test_comfy_tokenizer.py): it skips the template for text starting with `<|im_start|>`, turns `\\(` /
    `\\)` into `(` / `)` (its prompt-weight escapes, applied with weights off too), masks everything from the pad
    token `<|endoftext|>` on, and reads `embedding:NAME` as a textual-inversion embedding (dropping the word when
    there is none)."""
    if prompt.startswith("<|im_start|>"):
        return ("it starts with <|im_start|>, so ComfyUI uses it as a whole chat template instead of Krea 2's; "
                "give the prompt text only")
    if "\\(" in prompt or "\\)" in prompt:
        return ("ComfyUI reads `\\(` / `\\)` as escaped parentheses and drops the backslash, diffusers keeps it; write "
                "plain ( ) (read the same by both: Krea 2 in ComfyUI has no prompt weights)")
    if "<|endoftext|>" in prompt:
        return ("it contains <|endoftext|>, Qwen's pad token: ComfyUI masks every token from it on (the rest of the "
                "prompt and the template's end), diffusers reads them; remove it")
    if re.search(r"(^|\s)embedding:", prompt):
        return ("ComfyUI reads `embedding:NAME` as a textual-inversion embedding (and drops the word when there is "
                "none); rephrase it")
    return None


def files_fingerprint(path) -> str:
    """Identify model files cheaply: names, sizes and mtimes (hashing 8 GB of weights would take minutes)."""
    path = Path(path)
    files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file())
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(path) if path.is_dir() else p.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


class TextEncoder:
    def __init__(self, model, tokenizer, max_length: int = facts.MAX_PROMPT_TOKENS, source: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.taps = facts.TEXT_TAP_LAYERS
        self.fingerprint = hashlib.sha256(
            f"{source}|taps={self.taps}|max={max_length}|dtype={model.dtype}|{facts.PROMPT_PREFIX}".encode()
        ).hexdigest()[:16]

    @classmethod
    def from_path(cls, path, dtype="float32", device="cpu", max_length: int = facts.MAX_PROMPT_TOKENS,
                  tokenizer=None):
        """`tokenizer`: `model.tokenizer` (needed for ComfyUI's single-file text encoder, optional otherwise)."""
        model, tok = load_text_encoder(path, dtype=dtype, device=device, tokenizer=tokenizer)
        source = files_fingerprint(path) + (f"+{files_fingerprint(tokenizer)}" if tokenizer else "")
        return cls(model, tok, max_length, source=source)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def tokenize(self, prompts: list[str]):
        """Token ids and mask in the Krea 2 layout, padded to the longest prompt in this batch (not to 512).

        The ids kept after the prefix are the ones ComfyUI's Krea 2 text encoder keeps (comfy/text_encoders/krea2.py;
        tests/test_comfy_tokenizer.py), except where the two programs read a prompt differently; those prompts are
        refused (`comfyui_prompt_problem`) or, past 512 tokens, truncated as diffusers does with a warning."""
        tok = self.tokenizer
        for p in prompts:
            problem = comfyui_prompt_problem(p)
            if problem:
                raise UserError(f"prompt {p[:60]!r}: {problem}")
        limit = self.max_length + facts.PREFIX_TOKENS - facts.SUFFIX_TOKENS
        body = tok([facts.PROMPT_PREFIX + p for p in prompts], truncation=True, max_length=limit,
                   padding="longest", padding_side="right", return_tensors="pt")  # the layout needs PAD after the prompt
        prefix = self._prefix_ids()
        for i, p in enumerate(prompts):
            if body.input_ids[i, : facts.PREFIX_TOKENS].tolist() != prefix:
                raise UserError(f"prompt {p[:60]!r}: its first characters merge with the end of Krea 2's template "
                                "(`user` + line break) into one token, so diffusers drops part of the prompt with "
                                "the template and ComfyUI keeps part of the template: the two encode it "
                                "differently. Remove the leading line break(s).")
        full = body.attention_mask.sum(1) >= limit
        if bool(full.any()):
            lengths = [len(x) for x in tok([facts.PROMPT_PREFIX + prompts[i] for i in full.nonzero()[:, 0].tolist()],
                                            truncation=False).input_ids]
            for n in lengths:
                if n > limit:
                    log.warning("a prompt of %d tokens is cut to Krea 2's %d (as diffusers does); ComfyUI reads all "
                                "of it, so its encoding there differs. Shorten prompts to %d tokens.",
                                n - facts.PREFIX_TOKENS, self.max_length - facts.SUFFIX_TOKENS,
                                self.max_length - facts.SUFFIX_TOKENS)
        suffix = tok([facts.PROMPT_SUFFIX] * len(prompts), return_tensors="pt")
        ids = torch.cat([body.input_ids, suffix.input_ids], dim=1)
        mask = torch.cat([body.attention_mask, suffix.attention_mask], dim=1).bool()
        return ids, mask

    def _prefix_ids(self) -> list[int]:
        if getattr(self, "_prefix", None) is None:
            ids = self.tokenizer(facts.PROMPT_PREFIX).input_ids
            if len(ids) != facts.PREFIX_TOKENS:
                raise UserError(f"the tokenizer gives Krea 2's template prefix {len(ids)} tokens, not "
                                f"{facts.PREFIX_TOKENS}: it is not Qwen3-VL's tokenizer. Point `model.tokenizer` "
                                "(or the text encoder folder) at Qwen3-VL-4B-Instruct's or ComfyUI's qwen25_tokenizer.")
            self._prefix = ids
        return self._prefix

    @torch.no_grad()
    def encode(self, prompts: list[str] | str):
        """(embeds (B, L, 12, D) in the model dtype, mask (B, L) bool); L = valid tokens of the longest prompt."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        # Positions count valid tokens only, so the suffix after the padding keeps its true mRoPE phase.
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0).unsqueeze(0).expand(3, -1, -1)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
        hidden = torch.stack([out.hidden_states[i] for i in self.taps], dim=2)
        hidden, mask = hidden[:, facts.PREFIX_TOKENS:], mask[:, facts.PREFIX_TOKENS:]
        return hidden, mask

    def encode_one(self, prompt: str) -> torch.Tensor:
        """Valid tokens only, (L, 12, D): the form the text cache stores."""
        hidden, mask = self.encode([prompt])
        return hidden[0, mask[0]]

