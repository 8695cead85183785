"""Exact denoising of any length within a memory budget: time windows with the receptive halo.

An output sample depends on the input within `receptive_halo` samples and on the mel frames
within `MEL_MARGIN` frames of it, so each window is extended by a frame-aligned halo that covers
both and only its centre is kept: the result equals the full-length pass. The window length comes
from the memory budget and a per-sample estimate of the engine's working set. The upsampled mel
of each window is kept across denoising steps while it fits in what the windows leave of the budget;
where one window holds the whole batch and there is room, every layer's projection of it is kept instead.

`GraphedDenoiser` captures one denoising step as a CUDA graph and replays it at every step, so
the dozens of kernel launches per step cost one launch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from models.vocoders.diffusion.chunked import MEL_MARGIN
from models.vocoders.diffusion.diffwave.diffwave import DiffWave
from models.vocoders.diffusion.fused import FusedDiffWave, mel_row, projected_row
from utils.config import ConfigError
from utils.text import byte_size

ENGINES = ("auto", "fused", "tiled", "plain")
SAFETY = 1.5  # allocator rounding and the temporaries the estimates leave out


def bytes_per_sample(model: DiffWave, engine: str, dtype: torch.dtype | None) -> int:
    """Working set of one window sample of one utterance (activations, not weights)."""
    layers = list(model.residual_layers)
    channels, n_mel = layers[0].dilated_conv.in_channels, layers[0].conditioner_projection.in_channels
    size = torch.finfo(dtype).bits // 8 if dtype is not None else 4
    if engine == "fused":  # x twice (ping-pong), fp32 skip, the window's conditioner, upsampler or tail temporaries
        return int(SAFETY * (2 * channels * size + 4 * channels + mel_row(n_mel) * size + max(12 * n_mel, 8 * channels) + 32))
    # the plain forward holds every layer's conditioner projection and a layer's temporaries at once
    return int(SAFETY * ((len(layers) + 8) * 2 * channels * 4 + 12 * n_mel + 32))


def window_halo(model: DiffWave) -> int:
    """Samples each side of a window that its centre depends on (audio and mel), in whole frames."""
    return math.ceil((model.receptive_halo + MEL_MARGIN * model.hop_size) / model.hop_size) * model.hop_size


def shortest_window(model: DiffWave) -> int:
    """Samples of the shortest window worth its halo: twice the halo and two frames."""
    return 2 * window_halo(model) + 2 * model.hop_size


def window_sample_bytes(model: DiffWave, batch: int, engine: str, dtype: torch.dtype | None, graphed: bool) -> int:
    """Budget one window sample of the batch takes (twice under a graph: see WindowedDenoiser)."""
    return batch * bytes_per_sample(model, engine, dtype) * (2 if graphed else 1)


def least_window_bytes(model: DiffWave, batch: int, total: int, engine: str, dtype: torch.dtype | None,
                       graphed: bool = False) -> int:
    """The smallest budget WindowedDenoiser takes for a batch of `total` samples: one window of the whole input,
    or the shortest window, whichever is shorter (the fused engine leaves half of its budget to the conditioner)."""
    shortest = min(shortest_window(model), math.ceil(total / model.hop_size) * model.hop_size)
    return shortest * window_sample_bytes(model, batch, engine, dtype, graphed) * (2 if engine == "fused" else 1)


def offset_limit(batch: int, row: int) -> int:
    """The most samples a window may have: the fused kernel's offsets into a (batch, samples, row) tensor are
    32-bit."""
    return (2**31 - 1) // (batch * row)


class WindowedDenoiser:
    """`denoise(x, step)` for ddpm.sample over halo windows, through `fused` when given, else `forward`
    (the model, or its compiled form) under autocast to `dtype`. `graphed`: the step will be captured as a CUDA
    graph, whose private pool allocates the working set again beside the blocks the eager first step left cached,
    so the windows are sized for both."""

    def __init__(self, model: DiffWave, mel: Tensor, lengths: Tensor | None, dtype: torch.dtype | None,
                 budget_bytes: int, fused: FusedDiffWave | None = None, forward: Callable | None = None,
                 graphed: bool = False) -> None:
        engine = "fused" if fused is not None else "plain"
        self.model, self.mel, self.lengths, self.dtype, self.fused = model, mel, lengths, dtype, fused
        self.forward = model if forward is None else forward  # not `or`: a compiled module proxies len() to DiffWave
        self.hop = model.hop_size
        self.total = mel.shape[-1] * self.hop
        batch = mel.shape[0]
        self.halo = window_halo(model)
        per_sample = window_sample_bytes(model, batch, engine, dtype, graphed)
        window_budget = budget_bytes // 2 if engine == "fused" else budget_bytes
        window = window_budget // per_sample // self.hop * self.hop
        if engine == "fused":
            widest = max(model.residual_layers[0].dilated_conv.in_channels, mel_row(mel.shape[1]))  # padded rows
            window = min(window, offset_limit(batch, widest) // self.hop * self.hop)
        if window < shortest_window(model) and window < self.total:
            need = least_window_bytes(model, batch, self.total, engine, dtype, graphed)
            raise ConfigError(f"inference memory budget {byte_size(budget_bytes)} (what the sampler's buffers leave of "
                              f"it) is too small for batch {batch}: a window needs at least {byte_size(need)} (raise "
                              "inference.gpu_memory_gib or lower the batch size)")
        count = 1 if window >= self.total else math.ceil(self.total / (window - 2 * self.halo - self.hop))
        frames = mel.shape[-1]
        edges = [round(i * frames / count) * self.hop for i in range(count + 1)]
        self.windows = list(itertools.pairwise(edges))
        self.cache_left = budget_bytes - window_budget if engine == "fused" else 0
        self.cond: dict[int, Tensor] = {}
        # One window for the batch, and room for every layer's conditioner projection: the kernel skips its mel dots
        # (its rows are wider than the mel's: within the kernel's offsets too)
        self.projected = (count == 1 and fused is not None and fused.projected_bytes(batch * self.total) <= self.cache_left
                          and self.total <= offset_limit(batch, projected_row(fused.channels)))
        if fused is not None and count == 1:  # queued now: the device upsamples while the host draws the first noise
            self._conditioner(0, 0, frames, None if lengths is None else lengths // self.hop)

    def _conditioner(self, index: int, f0: int, f1: int, frames: Tensor | None) -> Tensor:
        if index in self.cond:
            return self.cond[index]
        cond = self.fused.conditioner(self.mel[..., f0:f1], frames)
        if self.projected:
            cond = self.fused.projected(cond)
        if cond.numel() * cond.element_size() <= self.cache_left:
            self.cache_left -= cond.numel() * cond.element_size()
            self.cond[index] = cond
        return cond

    def _autocast(self) -> Any:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.mel.device.type, dtype=self.dtype)

    @torch.no_grad()
    def __call__(self, audio: Tensor, diffusion_step: Tensor) -> Tensor:
        if len(self.windows) == 1:
            return self._window(0, 0, self.total, audio, diffusion_step)
        out = torch.empty_like(audio)
        for index, (a, b) in enumerate(self.windows):
            lo, hi = max(0, a - self.halo), min(self.total, b + self.halo)
            out[:, a:b] = self._window(index, lo, hi, audio, diffusion_step)[:, a - lo : b - lo]
        return out

    def _window(self, index: int, lo: int, hi: int, audio: Tensor, diffusion_step: Tensor) -> Tensor:
        lengths = None if self.lengths is None else (self.lengths - lo).clamp(0, hi - lo)
        frames = None if lengths is None else lengths // self.hop
        f0, f1 = lo // self.hop, hi // self.hop
        if self.fused is not None:
            cond = self._conditioner(index, f0, f1, frames)
            return self.fused(audio[:, lo:hi], diffusion_step, cond, lengths)
        with self._autocast():
            return self.forward(audio[:, lo:hi].contiguous(), diffusion_step, self.mel[..., f0:f1], lengths).float()


class GraphedDenoiser:
    """Replays one captured denoising step. The first call runs eagerly on a side stream (Triton tuning,
    the conditioner cache) and is returned as it is; the second captures the graph, the rest replay it."""

    def __init__(self, denoise: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.denoise = denoise
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warm = False

    def __call__(self, audio: Tensor, diffusion_step: Tensor) -> Tensor:
        if not self.warm:
            self.warm = True
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = self.denoise(audio, diffusion_step)
            torch.cuda.current_stream().wait_stream(stream)
            return out
        if self.graph is None:
            self.audio, self.step = audio.clone(), diffusion_step.clone()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.denoise(self.audio, self.step)
        self.audio.copy_(audio)
        self.step.copy_(diffusion_step)
        self.graph.replay()
        return self.out.clone()
