"""The one mel function, shared by preprocessing, inference from audio, training eval and metrics."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from utils.text import plural

LOG_FLOOR = 1e-5


@lru_cache(maxsize=16)
def _mel_basis(sample_rate: int, n_fft: int, n_mel: int, fmin: float, fmax: float | None) -> torch.Tensor:
    import librosa

    basis = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mel, fmin=fmin, fmax=fmax)
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
