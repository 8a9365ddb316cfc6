"""ComfyUI's own Krea 2 prompt path up to the token ids the text encoder keeps, run from a ComfyUI git checkout (not
vendored: ComfyUI is GPL-3.0): comfy/text_encoders/krea2.py (Krea2Tokenizer: template, no think block; Krea2TEModel
.encode_token_weights: the prefix it strips), its bases from comfy/text_encoders/qwen3vl.py (Qwen3VLTokenizer,
Qwen3VLSDTokenizer with the bundled qwen25_tokenizer folder) and comfy/sd1_clip.py (SDTokenizer, SD1Tokenizer and
the prompt-weight parsing helpers), taken by name. Only the text encoder model under Krea2TEModel is a stand-in: it
returns each token's position, so ComfyUI's stripping shows which tokens it keeps.
`load(workdir)` returns None without the checkout (tests skip).
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

from _comfy_source import COMFYUI_GIT, source, take

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")


def copy_tokenizer_folder(dest: Path) -> Path:
    """ComfyUI's comfy/text_encoders/qwen25_tokenizer, copied out of the checkout into dest/qwen25_tokenizer."""
    folder = Path(dest) / "qwen25_tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        data = subprocess.run(["git", "-C", COMFYUI_GIT, "show", f"HEAD:comfy/text_encoders/qwen25_tokenizer/{f}"],
                              capture_output=True, check=True).stdout
        (folder / f).write_bytes(data)
    return folder


def load(workdir: Path):
    """Namespace(kept_ids(prompt) -> the ids Krea2TEModel keeps, template, taps), or None."""
    import logging
    import numbers
    import re

    import torch
    from transformers import CLIPTokenizer, Qwen2Tokenizer

    if not os.path.isdir(COMFYUI_GIT):
        return None
    saved = {k: v for k, v in sys.modules.items() if k == "comfy" or k.startswith("comfy.")}
    try:
        root = Path(workdir) / "comfy" / "text_encoders"
        copy_tokenizer_folder(root)
        sd1 = {"torch": torch, "os": os, "re": re, "logging": logging, "numbers": numbers,
               "CLIPTokenizer": CLIPTokenizer}
        take("comfy/sd1_clip.py", {"parse_parentheses", "token_weights", "escape_important", "unescape_important",
                                    "load_embed", "safe_load_embed_zip", "expand_directory_list", "bundled_embed",
                                    "SDTokenizer", "SD1Tokenizer"}, sd1)

        take("comfy/sd1_clip.py", {"process_tokens"}, sd1, inside=("SDClipModel",))  # its token -> attention mask

        class SD1ClipModel:  # stand-in for the Qwen3-VL model: "hidden states" = each token's position
            def __init__(self, *a, **kw):
                pass

            def encode_token_weights(self, token_weight_pairs):
                n = len(token_weight_pairs["qwen3vl_4b"][0])
                out = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1).expand(1, 12, n, 1)
                return out, None, {"attention_mask": torch.ones(1, n)}

        sd1_clip = types.SimpleNamespace(**{k: sd1[k] for k in ("SDTokenizer", "SD1Tokenizer")},
                                         SD1ClipModel=SD1ClipModel, SDClipModel=object)
        qwen = {"os": os, "torch": torch, "Qwen2Tokenizer": Qwen2Tokenizer, "sd1_clip": sd1_clip,
                "__file__": str(root / "qwen3vl.py")}
        take("comfy/text_encoders/qwen3vl.py", {"Qwen3VLSDTokenizer", "Qwen3VLTokenizer"}, qwen)
        qwen3vl = types.SimpleNamespace(Qwen3VLTokenizer=qwen["Qwen3VLTokenizer"], Qwen3VLClipModel=object)
        comfy = types.ModuleType("comfy")
        comfy.__path__ = []
        comfy.sd1_clip = sd1_clip
        te = types.ModuleType("comfy.text_encoders")
        te.__path__ = []
        te.qwen3vl = qwen3vl
        comfy.text_encoders = te
        sys.modules.update({"comfy": comfy, "comfy.text_encoders": te, "comfy.text_encoders.qwen3vl": qwen3vl,
                            "comfy.sd1_clip": sd1_clip})
        krea2 = types.ModuleType("comfy_krea2_te")
        exec(compile(source("comfy/text_encoders/krea2.py"), "comfy/text_encoders/krea2.py", "exec"), krea2.__dict__)
    except (OSError, subprocess.CalledProcessError, SyntaxError, ImportError, AssertionError):
        return None
    finally:
        for k in [k for k in sys.modules if k == "comfy" or k.startswith("comfy.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    tokenizers = {}
    model = krea2.Krea2TEModel.__new__(krea2.Krea2TEModel)
    clip = sd1["SDClipModel"]()  # Qwen3VLClipModel's special tokens; embeddings are not looked at
    clip.special_tokens = {"pad": 151643}
    clip.transformer = types.SimpleNamespace(get_input_embeddings=lambda: (
        lambda t, out_dtype=None: torch.zeros(*t.shape, 1)))

    def kept_mask(prompt: str, embedding_directory=None) -> list[int]:
        """ComfyUI's attention mask (SDClipModel.process_tokens) over the tokens kept_ids returns."""
        if embedding_directory not in tokenizers:
            tokenizers[embedding_directory] = krea2.Krea2Tokenizer(embedding_directory=embedding_directory)
        tokens = tokenizers[embedding_directory].tokenize_with_weights(prompt)
        ids = [t for t, _ in tokens["qwen3vl_4b"][0]]
        _, mask, _, _ = clip.process_tokens([ids], "cpu")
        out, _, _ = model.encode_token_weights(tokens)
        return [int(mask[0, int(p)]) for p in out[0, :, 0].tolist()]

    def kept_ids(prompt: str, embedding_directory=None) -> list[int]:
        """The token ids of `prompt` whose hidden states ComfyUI's Krea 2 text encoder returns (CLIPTextEncode).
        ComfyUI passes its embeddings folder as `embedding_directory`."""
        if embedding_directory not in tokenizers:
            tokenizers[embedding_directory] = krea2.Krea2Tokenizer(embedding_directory=embedding_directory)
        tokens = tokenizers[embedding_directory].tokenize_with_weights(prompt)
        ids = [t for t, _ in tokens["qwen3vl_4b"][0]]
        out, _, _ = model.encode_token_weights(tokens)  # (1, seq, 12) positions after ComfyUI's stripping
        return [ids[int(p)] for p in out[0, :, 0].tolist()]

    return types.SimpleNamespace(kept_ids=kept_ids, kept_mask=kept_mask, template=krea2.KREA2_TEMPLATE,
                                 taps=krea2.KREA2_TAP_LAYERS)
