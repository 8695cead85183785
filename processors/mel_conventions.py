"""The mel contract an experiment was trained on, and converters from other toolkits' mel conventions.

Mels written elsewhere usually differ from ours in the log base or a normalisation, which a
diffusion vocoder turns into noise without complaint. Stage 2 records the contract beside the
checkpoints; stage 3 checks every mel file against it, warns when the values look like another
convention, and converts the ones the user names back to our natural-log mel.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np
import torch

from processors.mel import LOG_FLOOR, mel_settings
from utils.config import ConfigError
from utils.io import load_npy

log = logging.getLogger(__name__)
CONVENTIONS = ("ln", "log10", "db_normalized", "meanvar")
LN10 = math.log(10.0)
# lmnt's DiffWave: (20 * log10(max(m, 1e-5)) - REF_DB - MIN_DB) / -MIN_DB, clipped to [0, 1]
REF_DB, MIN_DB = 20.0, -100.0


def mel_contract(pre: Any) -> dict:
    """Everything that defines our mel, from a `preprocess` config section."""
    sample_rate, n_fft, hop, win, n_mel, fmin, fmax = mel_settings(pre)
    return {
        "sample_rate": sample_rate, "n_fft": n_fft, "hop_size": hop, "win_size": win, "n_mel": n_mel,
        "fmin": fmin, "fmax": None if fmax is None else float(fmax),
        "window": "hann", "center": False, "padding": "reflect, (n_fft - hop_size) / 2 each side",
        "mel_filters": "slaney (librosa)", "magnitude": "sqrt(re^2 + im^2 + 1e-9)",
        "log_base": "e", "clamp_floor": LOG_FLOOR, "normalisation": "none",
    }


def parse_convention(text: str) -> tuple[str, ...]:
    """'log10' or a chain undone left to right, e.g. 'meanvar+log10' for normalised log10 mels."""
    chain = tuple(part.strip() for part in str(text).split("+"))
    for part in chain:
        if part not in CONVENTIONS:
            raise ConfigError(f"unknown mel convention '{part}': choose {', '.join(CONVENTIONS)} (chain with '+')")
    if len(chain) > 1 and "ln" in chain:
        raise ConfigError(f"mel convention '{text}': 'ln' is the identity and cannot be chained")
    return chain


def load_stats(path: str | os.PathLike, n_mel: int) -> np.ndarray:
    """A (2, n_mel) float64 array: row 0 the per-bin mean, row 1 the per-bin scale."""
    stats = load_npy(path)
    if stats.ndim != 2 or stats.shape != (2, n_mel):
        raise ConfigError(f"{path}: mel statistics must have shape (2, {n_mel}) (mean row, scale row), got {stats.shape}")
    stats = stats.astype(np.float64)
    if not np.all(np.isfinite(stats)) or np.any(stats[1] <= 0):
        raise ConfigError(f"{path}: mel statistics must be finite with positive scales")
    return stats


def to_natural_log(mel: torch.Tensor, convention: str, stats: np.ndarray | None = None) -> torch.Tensor:
    """Undo one convention: the natural-log mel magnitude it was computed from."""
    x = mel.double()
    if convention == "log10":
        return x * LN10
    if convention == "db_normalized":
        return (x.clamp(0.0, 1.0) * -MIN_DB + MIN_DB + REF_DB) / 20.0 * LN10
    if convention == "meanvar":
        if stats is None:
            raise ConfigError("mel convention 'meanvar' needs the statistics file (--infer_mel_stats)")
        return x * torch.from_numpy(stats[1])[:, None] + torch.from_numpy(stats[0])[:, None]
    return x


def from_natural_log(mel: torch.Tensor, convention: str, stats: np.ndarray | None = None) -> torch.Tensor:
    """Our mel written in another convention: what those toolkits produce (tests and docs)."""
    x = mel.double()
    if convention == "log10":
        return (x / LN10).float()
    if convention == "db_normalized":
        db = 20.0 * torch.clamp(x, min=math.log(LOG_FLOOR)) / LN10 - REF_DB
        return ((db - MIN_DB) / -MIN_DB).clamp(0.0, 1.0).float()
    if convention == "meanvar":
        if stats is None:
            raise ConfigError("mel convention 'meanvar' needs statistics")
        return ((x - torch.from_numpy(stats[0])[:, None]) / torch.from_numpy(stats[1])[:, None]).float()
    return mel


def guess_convention(mel: torch.Tensor) -> tuple[str | None, str]:
    """The convention the values look like, and the statistics that say so (None: none fits).

    Natural-log mels of sound spread widely below zero, usually reaching under -5 in quiet bins;
    log10 ones (floor -5) spread 2.3 times less; lmnt's dB-normalised ones lie in [0, 1];
    mean-variance normalised ones centre on 0 with unit spread.
    """
    x = mel.double()
    low, high, mean, std = float(x.min()), float(x.max()), float(x.mean()), float(x.std()) if x.numel() > 1 else 0.0
    stats = f"min {low:.2f}, max {high:.2f}, mean {mean:.2f}, std {std:.2f}"
    if low >= 0.0 and high <= 1.0:
        return "db_normalized", stats
    if abs(mean) < 0.75 and 0.5 < std < 1.6:
        return "meanvar", stats
    floor10 = math.log10(LOG_FLOOR)
    if (low >= floor10 - 1e-3 and high < 3.0 and std < 1.2) or (-6.0 < mean < -0.5 and std < 0.9):
        return "log10", stats
    if low >= math.log(LOG_FLOOR) - 0.01 and high < 8.0:
        return "ln", stats
    return None, stats


class MelConverter:
    """Checks a mel against the experiment's contract and converts it to our natural-log mel."""

    def __init__(self, contract: dict, convention: str = "ln", stats_path: str | os.PathLike | None = None) -> None:
        self.contract = contract
        self.chain = parse_convention(convention)
        self.convention = "+".join(self.chain)
        self.n_mel = int(contract["n_mel"])
        self.floor = math.log(float(contract.get("clamp_floor", LOG_FLOOR)))
        self.stats = None
        if "meanvar" in self.chain:
            if not stats_path:
                raise ConfigError("mel convention 'meanvar' needs a statistics file: --infer_mel_stats (inference.mel_stats)")
            self.stats = load_stats(stats_path, self.n_mel)

    def __call__(self, mel: torch.Tensor, source: str) -> torch.Tensor:
        """`mel` is (n_mel, frames); a wrong bin count raises, a suspicious convention warns."""
        if mel.shape[0] != self.n_mel:
            raise ValueError(f"{source}: mel has {mel.shape[0]} bins, the experiment's mel contract has n_mel={self.n_mel}")
        guess, stats = guess_convention(mel)
        if guess is None:
            log.warning("%s: values (%s) fit no known mel convention; expected a natural-log mel clamped at %g",
                        source, stats, math.exp(self.floor))
        elif guess != self.chain[0]:
            log.warning("%s: values (%s) look like a %s mel, not %s; if so, convert with --infer_mel_convention %s "
                        "(config inference.mel_convention)", source, stats, guess, self.convention, guess)
        if self.chain == ("ln",):
            return mel
        x = mel
        for convention in self.chain:
            x = to_natural_log(x, convention, self.stats)
        return x.clamp(min=self.floor).float()


def mel_converter(contract: dict, cfg: Any, convention: str | None = None,
                  stats_path: str | os.PathLike | None = None) -> MelConverter:
    """The converter stage 3 applies to `infer_from_feature` mels: flags first, then `inference.*`."""
    infer = cfg.get("inference", {}) or {}
    return MelConverter(contract, convention or infer.get("mel_convention") or "ln",
                        stats_path or infer.get("mel_stats"))
