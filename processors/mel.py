"""The one mel function, shared by preprocessing, inference from audio, training eval and metrics."""

from __future__ import annotations

import logging
import math
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from utils.text import plural

LOG_FLOOR = 1e-5
log = logging.getLogger(__name__)


# Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz, so 15 mels at 1 kHz), logarithmic above (27 mels per
# factor 6.4)
_SLANEY_HZ_PER_MEL, _SLANEY_LOG_STEP = 200.0 / 3, math.log(6.4) / 27.0


def _hz_to_slaney(hz: np.ndarray) -> np.ndarray:
    logarithmic = 15.0 + np.log(np.maximum(hz, 1000.0) / 1000.0) / _SLANEY_LOG_STEP
    return np.where(hz >= 1000.0, logarithmic, hz / _SLANEY_HZ_PER_MEL)


def _slaney_to_hz(mel: np.ndarray) -> np.ndarray:
    return np.where(mel >= 15.0, 1000.0 * np.exp(_SLANEY_LOG_STEP * (mel - 15.0)), mel * _SLANEY_HZ_PER_MEL)


@lru_cache(maxsize=16)
def _mel_basis(sample_rate: int, n_fft: int, n_mel: int, fmin: float, fmax: float | None) -> torch.Tensor:
    """(n_mel, n_fft // 2 + 1) triangles evenly spaced on Slaney's scale, each of unit area (Slaney's norm), as
    librosa's default filter bank builds them; here, because importing librosa took 1.7 s of every process's start."""
    top = sample_rate / 2 if fmax is None else float(fmax)
    edges = _slaney_to_hz(np.linspace(_hz_to_slaney(np.float64(fmin)), _hz_to_slaney(np.float64(top)), n_mel + 2))
    bins = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    widths = np.diff(edges)
    to_edge = edges[:, None] - bins[None, :]
    rising = -to_edge[:-2] / widths[:-1, None]
    falling = to_edge[2:] / widths[1:, None]
    basis = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    empty = int((basis.max(axis=1) == 0).sum())
    if empty:
        log.warning("%s of %d fall between the %d FFT bins of n_fft %d at %d Hz and stay at the log floor: use fewer mels "
                    "or a larger n_fft", plural(empty, "mel filter"), n_mel, n_fft // 2 + 1, n_fft, sample_rate)
    return torch.from_numpy(basis).float()


@lru_cache(maxsize=16)
def _window(win_size: int) -> torch.Tensor:
    return torch.hann_window(win_size)


def mel_settings(pre: Any) -> tuple[int, int, int, int, int, float, float | None]:
    """(sample_rate, n_fft, hop, win, n_mel, fmin, fmax) from a `preprocess` config section."""
    return (
        int(pre["sample_rate"]), int(pre["n_fft"]), int(pre["hop_size"]), int(pre["win_size"]),
        int(pre["n_mel"]), float(pre.get("fmin", 0)), pre.get("fmax"),
    )


def mel_spectrogram(audio: np.ndarray | torch.Tensor, pre: Any) -> torch.Tensor:
    """Natural-log Slaney mel magnitude, `(..., n_mel, len // hop)`.

    Reflect-padding by (n_fft - hop) / 2 with center=False gives exactly len // hop frames,
    the contract every other toolkit with the same settings follows.
    """
    sample_rate, n_fft, hop, win, n_mel, fmin, fmax = mel_settings(pre)
    x = torch.as_tensor(audio, dtype=torch.float32)
    squeeze = x.dim() == 1
    x = x.reshape(-1, x.shape[-1])
    num_samples = x.shape[-1]
    pad = (n_fft - hop) // 2
    if num_samples <= pad:
        raise ValueError(f"audio of {plural(x.shape[-1], 'sample')} is too short for a mel frame (needs > {pad})")
    x = torch.nn.functional.pad(x.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    spec = torch.stft(
        x, n_fft, hop_length=hop, win_length=win, window=_window(win).to(x.device),
        center=False, normalized=False, onesided=True, return_complex=True,
    )
    magnitude = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)
    mel = torch.matmul(_mel_basis(sample_rate, n_fft, n_mel, fmin, fmax).to(x.device), magnitude)
    mel = torch.log(torch.clamp(mel, min=LOG_FLOOR))
    mel = mel[..., : num_samples // hop]
    return mel[0] if squeeze else mel


def min_samples(pre: Any) -> int:
    """The shortest audio that gives one mel frame (and survives the reflect padding)."""
    _, n_fft, hop, *_ = mel_settings(pre)
    return max(hop, (n_fft - hop) // 2 + 1)


def max_log_mel(pre: Any) -> float:
    """The largest value `mel_spectrogram` can give for audio in [-1, 1]: no STFT bin exceeds the window's sum, so
    no filter exceeds its weights' sum times that (full-scale square waves come within about 0.9 of it)."""
    sample_rate, n_fft, _hop, win, n_mel, fmin, fmax = mel_settings(pre)
    filters = float(_mel_basis(sample_rate, n_fft, n_mel, fmin, fmax).sum(dim=1).max())
    return math.log(filters * float(_window(win).sum()))
