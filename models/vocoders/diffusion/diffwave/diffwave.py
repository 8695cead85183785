"""The DiffWave network (Kong et al., 2021), with the reference parameter names.

`lengths` (audio samples per item) makes a padded batch exact: every convolution input
is zeroed past its item's end, which is what the same item sees alone (zero padding).

`channels_last` runs the residual stack as one-row images (B, C, 1, T) stored channels-last, each
1-D convolution as the equal 2-D one: NHWC kernels (oneDNN's on the CPU, faster there; cuDNN's
tensor-core kernels on a GPU, without layout transposes around each convolution). The same
parameters and numbers within rounding.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.vocoders.diffusion.diffwave.geometry import upsample_factors

EMBED_DIM = 128
HIDDEN_DIM = 512


def _conv1d(*args: Any, **kwargs: Any) -> nn.Conv1d:
    layer = nn.Conv1d(*args, **kwargs)
    nn.init.kaiming_normal_(layer.weight)
    return layer


# Where the 1x1 convolutions of channels-last images run as matmuls (`pointwise_matmul`): a way to compute, varied by
# the GPU suite and the tests, not a setting (oneDNN's NHWC convolutions are faster on the CPU).
POINTWISE_MATMUL_DEVICES = {"cuda"}


def conv(layer: nn.Conv1d, x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """`layer` (or its `weight`, `bias` in its geometry) on (B, C, T), or on (B, C, 1, T) as a 2-D convolution."""
    weight = layer.weight if weight is None else weight
    bias = layer.bias if bias is None else bias
    if x.dim() == 3:
        return F.conv1d(x, weight, bias, padding=layer.padding, dilation=layer.dilation)
    if weight.shape[-1] == 1 and x.device.type in POINTWISE_MATMUL_DEVICES:
        return pointwise_matmul(x, weight, bias)
    return F.conv2d(x, weight.unsqueeze(2), bias, padding=(0, layer.padding[0]), dilation=(1, layer.dilation[0]))


def pointwise_matmul(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A 1x1 convolution of a channels-last (B, C, 1, T) image as one matmul over its (B, 1, T, C) memory. Alone,
    eager, it is no faster than cuDNN's (the GPU suite's convolution probe), but stage 2's compiled bf16 step at
    batch 32 on an H200 took 22.6 ms this way against 23.9 ms with cuDNN's 1x1 convolutions (run 8, one run each)."""
    return F.linear(x.permute(0, 2, 3, 1), weight.squeeze(-1), bias).permute(0, 3, 1, 2)


def as_image(x: Tensor) -> Tensor:
    """(B, C, T) -> (B, C, 1, T), stored channels-last."""
    return x.unsqueeze(2).contiguous(memory_format=torch.channels_last)


def length_mask(lengths: Tensor | None, size: int, device: torch.device) -> Tensor | None:
    """(B, 1, size) float mask of the valid samples, or None when nothing is padded."""
    if lengths is None:
        return None
    return (torch.arange(size, device=device)[None, :] < lengths[:, None]).unsqueeze(1).float()


class DiffusionEmbedding(nn.Module):
    """Sinusoidal step embedding; fractional steps interpolate between table rows."""

    def __init__(self, max_steps: int) -> None:
        super().__init__()
        self.register_buffer("embedding", self._table(max_steps), persistent=False)
        self.projection1 = nn.Linear(EMBED_DIM, HIDDEN_DIM)
        self.projection2 = nn.Linear(HIDDEN_DIM, HIDDEN_DIM)

    @staticmethod
    def _table(max_steps: int) -> Tensor:
        steps = torch.arange(max_steps, dtype=torch.float64).unsqueeze(1)
        dims = torch.arange(EMBED_DIM // 2, dtype=torch.float64).unsqueeze(0)
        angles = steps * 10.0 ** (dims * 4.0 / (EMBED_DIM // 2 - 1))
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()

    def lookup(self, step: Tensor) -> Tensor:
        if not torch.is_floating_point(step):
            return self.embedding[step]
        low = step.floor().long().clamp(0, len(self.embedding) - 1)
        high = (low + 1).clamp(max=len(self.embedding) - 1)
        frac = (step - low.to(step.dtype)).unsqueeze(-1).to(self.embedding.dtype)
        return self.embedding[low] + (self.embedding[high] - self.embedding[low]) * frac

    def forward(self, step: Tensor) -> Tensor:
        x = F.silu(self.projection1(self.lookup(step)))
        return F.silu(self.projection2(x))


class SpectrogramUpsampler(nn.Module):
    """Transposed 2-D convolutions that stretch mel frames to audio rate (one layer per factor).

    Each layer has one input and one output channel, so it is computed as one small matmul over
    the three neighbouring mel rows and two neighbouring frames (see `_transpose_rows`).
    """

    def __init__(self, upsample_factors: list[int]) -> None:
        super().__init__()
        self.factors = [int(f) for f in upsample_factors]
        for i, factor in enumerate(self.factors, start=1):
            conv = nn.ConvTranspose2d(1, 1, [3, 2 * factor], stride=[1, factor], padding=[1, factor // 2])
            self.add_module(f"conv{i}", conv)

    @staticmethod
    def _transpose_rows(x: Tensor, conv: nn.ConvTranspose2d) -> Tensor:
        """The layer's first `length x stride` outputs. Output block j (`stride` samples, before the padding's
        crop) reads frames j and j - 1 of three mel rows: 6 inputs through a (6, stride) slice of the kernel. The
        same numbers as the transposed convolution, within rounding, and faster on the CPU (docs/benchmarks.md); on
        a GPU it spares cuDNN's direct kernel for one-channel transposed convolutions (3 ms a 10 s utterance on an
        H200 in run 7)."""
        batch, rows, length = x.shape
        stride = conv.stride[1]
        padded = F.pad(x, (1, 1, 1, 1))  # a zero row above and below, a zero frame before and after
        # kernel row k reads input row h + 1 - k; kernel column u of block j frame j, column stride + u frame j - 1
        taps = [padded[:, r : r + rows, f : f + length + 1] for f in (1, 0) for r in (2, 1, 0)]
        weight = conv.weight.reshape(3, 2, stride).transpose(0, 1).reshape(6, stride)
        blocks = (torch.stack(taps, dim=-1) @ weight).add_(conv.bias)  # (batch, rows, length + 1, stride)
        start = conv.padding[1]
        return blocks.reshape(batch, rows, -1)[..., start : start + length * stride]

    def forward(self, mel: Tensor, frames: Tensor | None = None) -> Tensor:
        length = mel.shape[-1]
        x = mel if frames is None else mel * length_mask(frames, length, mel.device)
        for i, factor in enumerate(self.factors, start=1):
            length *= factor
            x = F.leaky_relu(self._transpose_rows(x, getattr(self, f"conv{i}")), 0.4)
            if frames is not None:
                frames = frames * factor
                x = x * length_mask(frames, length, x.device)
        return x


class ResidualBlock(nn.Module):
    def __init__(self, n_mels: int, channels: int, dilation: int) -> None:
        super().__init__()
        self.dilated_conv = _conv1d(channels, 2 * channels, 3, padding=dilation, dilation=dilation)
        self.diffusion_projection = nn.Linear(HIDDEN_DIM, channels)
        self.conditioner_projection = _conv1d(n_mels, 2 * channels, 1)
        self.output_projection = _conv1d(channels, 2 * channels, 1)

    def forward(self, x: Tensor, step: Tensor, projected: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`projected` is this layer's conditioner_projection output (see DiffWave.project_conditioner)."""
        shift = self.diffusion_projection(step)
        y = x + shift.view(*shift.shape, *[1] * (x.dim() - 2))
        if mask is not None:
            y = y * mask
        y = conv(self.dilated_conv, y) + projected
        gate, filt = torch.chunk(y, 2, dim=1)
        y = conv(self.output_projection, torch.sigmoid(gate) * torch.tanh(filt))
        residual, skip = torch.chunk(y, 2, dim=1)
        return (x + residual) / math.sqrt(2.0), skip


class DiffWave(nn.Module):
    def __init__(
        self,
        n_mels: int,
        residual_channels: int,
        residual_layers: int,
        dilation_cycle_length: int,
        num_train_steps: int,
        upsample_factors: list[int],
    ) -> None:
        super().__init__()
        self.hop_size = math.prod(upsample_factors)
        self.fuse_group = max(1, dilation_cycle_length)
        self.channels_last = False  # a way to compute, not a weight: not in checkpoints
        self.input_projection = _conv1d(1, residual_channels, 1)
        self.diffusion_embedding = DiffusionEmbedding(num_train_steps)
        self.spectrogram_upsampler = SpectrogramUpsampler(upsample_factors)
        self.residual_layers = nn.ModuleList(
            ResidualBlock(n_mels, residual_channels, 2 ** (i % dilation_cycle_length)) for i in range(residual_layers)
        )
        self.skip_projection = _conv1d(residual_channels, residual_channels, 1)
        self.output_projection = _conv1d(residual_channels, 1, 1)
        nn.init.zeros_(self.output_projection.weight)

    @property
    def receptive_halo(self) -> int:
        """Samples seen on each side of an output sample (the dilated convolutions' reach)."""
        return sum(block.dilated_conv.dilation[0] for block in self.residual_layers)

    def project_conditioner(self, conditioner: Tensor) -> list[Tensor]:
        """Every layer's conditioner projection, computed a dilation cycle at a time.

        One wide 1x1 convolution per group instead of one per layer: the same result, several
        times faster on CPU, with memory bounded by the group size.
        """
        out = []
        layers = list(self.residual_layers)
        for start in range(0, len(layers), self.fuse_group):
            group = [layer.conditioner_projection for layer in layers[start : start + self.fuse_group]]
            weight = torch.cat([layer.weight for layer in group])
            bias = torch.cat([layer.bias for layer in group])
            out += conv(group[0], conditioner, weight, bias).chunk(len(group), dim=1)
        return out

    def forward(self, audio: Tensor, diffusion_step: Tensor, spectrogram: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Predict the noise in `audio` (B, T) at `diffusion_step` (B,) given mels (B, n_mel, T // hop)."""
        frames = None if lengths is None else lengths // self.hop_size
        cond = self.spectrogram_upsampler(spectrogram, frames)
        mask = length_mask(lengths, audio.shape[-1], audio.device)
        x = F.relu(self.input_projection(audio.unsqueeze(1)))
        if self.channels_last:
            cond, x = as_image(cond), as_image(x)
            mask = None if mask is None else mask.unsqueeze(2)
        projected = self.project_conditioner(cond)
        step = self.diffusion_embedding(diffusion_step)
        skip = torch.zeros_like(x)
        for layer, layer_projected in zip(self.residual_layers, projected, strict=True):
            x, layer_skip = layer(x, step, layer_projected, mask)
            skip = skip + layer_skip
        x = F.relu(conv(self.skip_projection, skip / math.sqrt(len(self.residual_layers))))
        return conv(self.output_projection, x).flatten(1)


def build_diffwave(cfg: Any) -> DiffWave:
    """The network described by a resolved config (`cfg.model.diffwave`, `cfg.preprocess`)."""
    params = cfg.model.diffwave
    return DiffWave(
        n_mels=int(cfg.preprocess.n_mel),
        residual_channels=int(params.residual_channels),
        residual_layers=int(params.residual_layers),
        dilation_cycle_length=int(params.dilation_cycle_length),
        num_train_steps=int(params.noise_schedule_factors[2]),
        upsample_factors=upsample_factors(cfg),
    )
