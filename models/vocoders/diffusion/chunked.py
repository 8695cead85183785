"""Exact, memory-bounded DiffWave denoising for inference: time chunks with the receptive halo.

`DiffWave.forward` streams every full-length activation through memory once per op; on a long
utterance that is both slow (cache misses) and unbounded in memory. Here each forward pass runs
chunk by chunk: a chunk of `chunk` output samples reads `receptive_halo` extra samples on each
side, and every layer computes only the region its successors still need, so the result equals
the full-length pass (zero padding at the true edges, `lengths` masking as in the model).
Activations are channels-last so each layer is two GEMMs (dilated taps + mel in one, output
projection in the other). The upsampled mel and its per-layer projections do not depend on the
diffusion step, so they are computed once per chunk and reused across steps while they fit in
`cache_bytes`; what does not fit is recomputed.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor
from torch.nn import functional as F

from models.vocoders.diffusion.diffwave.diffwave import DiffWave

SQRT_HALF = math.sqrt(0.5)
MEL_MARGIN = 3  # mel frames either side that reach an upsampled sample (two factor-f layers)


class ChunkedDenoiser:
    """`denoise(x, step)` for ddpm.sample, equal to `model(x, step, mel, lengths)` within float rounding."""

    def __init__(self, model: DiffWave, mel: Tensor, lengths: Tensor | None = None,
                 chunk: int = 65536, cache_bytes: int = 1 << 30, tile: int | None = 2048) -> None:
        self.model = model
        self.mel = mel
        self.lengths = lengths
        self.hop = model.hop_size
        self.total = mel.shape[-1] * self.hop
        self.frames = None if lengths is None else lengths // self.hop
        self.halo = model.receptive_halo
        count = max(1, math.ceil(self.total / max(1, int(chunk))))
        edges = [round(i * self.total / count) for i in range(count + 1)]
        self.chunks = list(itertools.pairwise(edges))
        self.cache_left = int(cache_bytes)
        self.tile = max(1, int(tile or self.total))
        self.cache: dict[tuple[int, int], Tensor] = {}
        self.upsampled: dict[int, Tensor] = {}
        self._prepare_weights()

    @torch.no_grad()
    def _prepare_weights(self) -> None:
        m = self.model
        layers = list(m.residual_layers)
        self.dilations = [layer.dilated_conv.dilation[0] for layer in layers]
        # tap k of the dilated convolution reads t + (k - 1) d; as (C_in, 2C) matrices for channels-last GEMMs
        self.w_taps = [layer.dilated_conv.weight.permute(2, 1, 0).contiguous() for layer in layers]
        self.w_cond = [layer.conditioner_projection.weight[:, :, 0].t().contiguous() for layer in layers]
        self.b_in = [layer.dilated_conv.bias + layer.conditioner_projection.bias for layer in layers]
        self.w_out = [layer.output_projection.weight[:, :, 0].t().contiguous() for layer in layers]
        self.b_out = [layer.output_projection.bias for layer in layers]
        channels = layers[0].dilated_conv.in_channels
        self.skip_bias = sum(layer.output_projection.bias[channels:] for layer in layers)
        self.w_step = torch.cat([layer.diffusion_projection.weight for layer in layers])
        self.b_step = torch.cat([layer.diffusion_projection.bias for layer in layers])
        self.w_audio = m.input_projection.weight[:, 0, 0]
        self.b_audio = m.input_projection.bias
        self.w_skip = (m.skip_projection.weight[:, :, 0].t() / math.sqrt(len(layers))).contiguous()
        self.b_skip = m.skip_projection.bias
        self.w_final = m.output_projection.weight[:, :, 0].t().contiguous()
        self.b_final = m.output_projection.bias

    def _upsample(self, index: int, lo: int, hi: int) -> Tensor:
        """Channels-last upsampled mel over audio samples [lo, hi), from a mel window with margin."""
        if index in self.upsampled:
            return self.upsampled[index]
        f0 = max(0, lo // self.hop - MEL_MARGIN)
        f1 = min(self.mel.shape[-1], -(-hi // self.hop) + MEL_MARGIN)
        frames = None if self.frames is None else (self.frames - f0).clamp(0, f1 - f0)
        up = self.model.spectrogram_upsampler(self.mel[..., f0:f1], frames)
        up = up[..., lo - f0 * self.hop : hi - f0 * self.hop].transpose(1, 2).contiguous()
        if up.numel() * up.element_size() <= self.cache_left:
            self.cache_left -= up.numel() * up.element_size()
            self.upsampled[index] = up
        return up

    @torch.no_grad()
    def __call__(self, audio: Tensor, diffusion_step: Tensor) -> Tensor:
        step = self.model.diffusion_embedding(diffusion_step)
        shifts = F.linear(step, self.w_step, self.b_step).split(self.w_out[0].shape[0], dim=1)
        out = torch.empty_like(audio)
        for index, (a, b) in enumerate(self.chunks):
            out[:, a:b] = self._chunk(index, a, b, audio, shifts)
        return out

    def _chunk(self, index: int, a: int, b: int, audio: Tensor, shifts: tuple[Tensor, ...]) -> Tensor:
        total, batch = self.total, audio.shape[0]
        lo, hi = max(0, a - self.halo), min(total, b + self.halo)
        start = lo  # where the upsampled mel and the mask begin
        up = None
        mask = None
        if self.lengths is not None:
            positions = torch.arange(lo, hi, device=audio.device)
            mask = (positions[None, :] < self.lengths[:, None]).unsqueeze(-1).to(audio.dtype)
        x = F.relu(audio[:, lo:hi, None] * self.w_audio + self.b_audio)
        channels = x.shape[2]
        # x is kept without the residual biases; `offset` carries them (scaled like x) into the next input
        offset = torch.zeros(channels, dtype=audio.dtype, device=audio.device)
        skip = torch.zeros(batch, b - a, channels, dtype=audio.dtype, device=audio.device)
        for layer, d in enumerate(self.dilations):
            new_lo = lo + d if lo > 0 else 0
            new_hi = hi - d if hi < total else total
            n = new_hi - new_lo
            pad_lo, pad_hi = (d if lo == 0 else 0), (d if hi == total else 0)
            y = torch.empty(batch, pad_lo + (hi - lo) + pad_hi, channels, dtype=audio.dtype, device=audio.device)
            y[:, :pad_lo] = 0.0
            y[:, y.shape[1] - pad_hi :] = 0.0
            inner = y[:, pad_lo : pad_lo + hi - lo]
            torch.add(x, (shifts[layer] + offset)[:, None, :], out=inner)
            if mask is not None:
                inner.mul_(mask[:, lo - start : hi - start])
            cached = self.cache.get((index, layer))
            if cached is None:
                if up is None:
                    up = self._upsample(index, start, hi)
                region = up[:, new_lo - start : new_hi - start]
                cached = self._project(region, layer, self._fits(batch, n, layer) and (index, layer))
            w = [tap.expand(batch, -1, -1) for tap in self.w_taps[layer]]
            x = x[:, new_lo - lo : new_hi - lo]
            for t0 in range(0, n, self.tile):  # row tiles keep h, z and o in the core's cache
                t1 = min(n, t0 + self.tile)
                h = torch.baddbmm(cached[:, t0:t1], y[:, t0:t1], w[0])
                h.baddbmm_(y[:, d + t0 : d + t1], w[1])
                h.baddbmm_(y[:, 2 * d + t0 : 2 * d + t1], w[2])
                z = h[..., :channels].sigmoid_().mul_(h[..., channels:].tanh_())
                o = torch.bmm(z, self.w_out[layer].expand(batch, -1, -1))
                x[:, t0:t1].add_(o[..., :channels]).mul_(SQRT_HALF)
                s0, s1 = max(t0, a - new_lo), min(t1, b - new_lo)
                if s0 < s1:
                    skip[:, s0 - (a - new_lo) : s1 - (a - new_lo)].add_(o[:, s0 - t0 : s1 - t0, channels:])
            offset = (offset + self.b_out[layer][:channels]) * SQRT_HALF
            lo, hi = new_lo, new_hi
        skip.add_(self.skip_bias)
        h = F.relu(torch.matmul(skip, self.w_skip).add_(self.b_skip))
        return torch.matmul(h, self.w_final).add_(self.b_final).squeeze(-1)

    def _fits(self, batch: int, n: int, layer: int) -> bool:
        return batch * n * self.w_cond[layer].shape[1] * 4 <= self.cache_left

    def _project(self, up: Tensor, layer: int, key: tuple[int, int] | bool) -> Tensor:
        """This layer's conditioner projection plus both input biases; kept for later steps under `key`."""
        proj = torch.matmul(up, self.w_cond[layer]).add_(self.b_in[layer])
        if key:
            self.cache_left -= proj.numel() * proj.element_size()
            self.cache[key] = proj
        return proj

