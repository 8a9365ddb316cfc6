"""Where training batches come from. The trainer asks a source for the batches of one stage from a given
micro-step on; every batch is a pure function of (seed, stage, micro-step, process), which is what makes a
resumed run identical to an uninterrupted one.

A batch is a dict:
    latents    (B, 16, h, w) normalised VAE latents (h, w = pixel size / 8)
    text       (B, L, 12, D) tapped text-encoder hidden states, padded to the batch's longest caption
    text_mask  (B, L) bool, True on real tokens

`CachedData` reads the on-disk caches through the data package's loader; `SyntheticData` makes fixed random
samples of the right shapes (tests, benchmarks).
"""

from __future__ import annotations

from typing import Iterator

import torch


class SyntheticData:
    """`num_samples` fixed random (latent, caption) pairs, so a model can fit them and the loss must go down.

    `nan_at`: global micro-step indices whose batch is poisoned with NaN (tests of the NaN guard).
    """

    def __init__(self, num_samples: int = 8, text_dim: int = 32, text_layers: int = 12, seed: int = 0,
                 text_len: tuple[int, int] = (3, 7), nan_at: set[int] | None = None, validation_samples: int = 2):
        self.num_samples, self.text_dim, self.text_layers, self.seed = num_samples, text_dim, text_layers, seed
        self.text_len, self.nan_at = text_len, set(nan_at or ())
        self.validation_samples = validation_samples
        self._cache: dict = {}

    def _samples(self, resolution: int, offset: int = 0):
        key = (resolution, offset)
        if key not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 7919 + resolution + offset)
            n = self.num_samples if offset == 0 else self.validation_samples
            side = resolution // 8
            lat = torch.randn(n, 16, side, side, generator=g)
            lens = torch.randint(self.text_len[0], self.text_len[1] + 1, (n,), generator=g)
            text = [torch.randn(int(t), self.text_layers, self.text_dim, generator=g) for t in lens]
            self._cache[key] = (lat, text)
        return self._cache[key]

    @staticmethod
    def collate(latents, texts) -> dict:
        text, mask = pad_text(texts)
        return {"latents": latents, "text": text, "text_mask": mask}

    def stage_batches(self, stage_index: int, stage, start: int, seed: int, process_index: int = 0,
                      num_processes: int = 1, global_offset: int = 0) -> Iterator[dict]:
        lat, text = self._samples(stage.resolution)
        i = start
        while True:
            g = torch.Generator().manual_seed(hash((seed, stage_index, i, process_index)) % (2**63))
            idx = torch.randint(0, len(text), (stage.batch_size,), generator=g).tolist()
            batch = self.collate(lat[idx], [text[j] for j in idx])
            if global_offset + i in self.nan_at:
                batch["latents"] = torch.full_like(batch["latents"], float("nan"))
            yield batch
            i += 1

    def validation_batches(self, stage) -> list[dict]:
        lat, text = self._samples(stage.resolution, offset=1)
        return [self.collate(lat[i : i + 1], [text[i]]) for i in range(len(text))]


def pad_text(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid-token embeddings (L_i, layers, D) -> (B, max L, layers, D) right-padded with zeros and the (B, max L)
    bool mask (the text encoder's layout)."""
    length = max(e.shape[0] for e in embeds)
    out = torch.zeros(len(embeds), length, *embeds[0].shape[1:])
    mask = torch.zeros(len(embeds), length, dtype=torch.bool)
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = True
    return out, mask
