"""Single-frame fast path for the Qwen-Image VAE's causal 3-D convolutions (pretraining and sampling on CPU).

For one frame (T = 1) with no temporal cache, a causal Conv3d pads the time axis with zeros in front, so only the
kernel's last temporal slice ever meets data: the result is exactly a Conv2d with `weight[:, :, -1]`. CPU Conv3d
kernels are several times slower than Conv2d ones, and the other slices' gradients are zero anyway, so this changes
speed only (tests compare both paths).
"""

from __future__ import annotations

import contextlib

import torch.nn.functional as F


@contextlib.contextmanager
def single_frame_convs():
    """Within the block, every `QwenImageCausalConv3d` call on a single uncached frame runs as a Conv2d."""
    from diffusers.models.autoencoders import autoencoder_kl_qwenimage as q

    cls = q.QwenImageCausalConv3d
    original = cls.forward

    def forward(self, x, cache_x=None):
        if cache_x is not None or x.shape[2] != 1:
            return original(self, x, cache_x)
        pad_w, pad_h = self._padding[0], self._padding[2]
        out = F.conv2d(x[:, :, 0], self.weight[:, :, -1], self.bias, stride=self.stride[1:], padding=(pad_h, pad_w))
        return out.unsqueeze(2)

    cls.forward = forward
    try:
        yield
    finally:
        cls.forward = original
