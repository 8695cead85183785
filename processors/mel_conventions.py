"""The mel contract an experiment was trained on, and converters from other toolkits' mel conventions.

Mels written elsewhere usually differ from ours in the log base or a normalisation, which a
diffusion vocoder turns into noise without complaint. Stage 2 records the contract beside the
checkpoints; stage 3 checks every mel file against it, warns when the values look like another
convention, converts the ones the user names back to our natural-log mel, and refuses values that
no audio in [-1, 1] gives (noise out, exit 0, otherwise).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np
import torch

from processors.mel import LOG_FLOOR, max_log_mel, mel_settings
from utils.config import ConfigError
from utils.io import load_npy

log = logging.getLogger(__name__)
CONVENTIONS = ("ln", "log10", "db", "db_normalized", "meanvar", "linear")
LN10 = math.log(10.0)
DB_FLOOR = 20.0 * math.log10(LOG_FLOOR)  # -100 dB: librosa's amplitude_to_db (amin 1e-5) and power_to_db (amin 1e-10)
CEILING_MARGIN = 1.0  # nats beyond the largest ln mel of full-scale audio still accepted (other filterbanks' rounding)
LOWEST_FLOOR = math.log(1e-10)  # the smallest clamp floor in use (ParallelWaveGAN's log10 mels); ours is 1e-5
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
    if convention == "db":
        return x / 20.0 * LN10
    if convention == "linear":
        return torch.log(x.clamp(min=LOG_FLOOR))
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
    if convention == "db":
        return (20.0 * x / LN10).float()
    if convention == "linear":
        return torch.exp(x).float()
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
    log10 ones (floor -5) spread 2.3 times less and dB ones (floor -100) 8.7 times more. Linear
    ones are never negative, and never 0 where clamped, and pile up near 0: their mean is 2% to 19%
    of their maximum on LJSpeech-like and synthetic voices at 8 to 22 kHz and any level, while lmnt's
    dB-normalised ones, also in [0, 1], have a mean of 36% of the maximum or more unless some bins
    are clipped to exactly 0. Mean-variance normalised ones centre on 0 with unit spread.
    """
    x = mel.double()
    low, high, mean, std = float(x.min()), float(x.max()), float(x.mean()), float(x.std()) if x.numel() > 1 else 0.0
    stats = ", ".join(f"{k} {v:.2f}" if abs(v) < 1e6 else f"{k} {v:.3g}"
                      for k, v in (("min", low), ("max", high), ("mean", mean), ("std", std)))
    if low >= 0.0:
        if high > 1.0 or (low > 0.0 and mean < 0.25 * high):
            return "linear", stats
        return "db_normalized", stats
    if abs(mean) < 0.75 and 0.5 < std < 1.6:
        return "meanvar", stats
    floor10 = math.log10(LOG_FLOOR)
    if (low >= floor10 - 1e-3 and high < 3.0 and std < 1.2) or (-6.0 < mean < -0.5 and std < 0.9):
        return "log10", stats
    if low >= DB_FLOOR - 0.5 and std > 6.0:
        return "db", stats
    if low >= math.log(LOG_FLOOR) - 0.01 and high < 8.0:
        return "ln", stats
    return None, stats


HOW = {name: f"convert with --infer_mel_convention {name} (config inference.mel_convention)" for name in CONVENTIONS}
HOW["linear"] += ", or save ln(max(m, 1e-5)) instead"
UNKNOWN = ("a dB mel (--infer_mel_convention db)? a linear one (linear)? else scaled or integer-coded: save "
           "ln(max(m, 1e-5)) of the mel magnitude")


class MelConverter:
    """Checks a mel against the experiment's contract and converts it to our natural-log mel."""

    def __init__(self, contract: dict, convention: str = "ln", stats_path: str | os.PathLike | None = None) -> None:
        self.contract = contract
        self.chain = parse_convention(convention)
        self.convention = "+".join(self.chain)
        self.n_mel = int(contract["n_mel"])
        self.floor = math.log(float(contract.get("clamp_floor", LOG_FLOOR)))
        self.full_scale = max_log_mel(contract)
        self.stats = None
        if stats_path and "meanvar" not in self.chain:  # else a wrong statistics file goes unnoticed
            raise ConfigError(f"--infer_mel_stats (inference.mel_stats) applies only with a meanvar convention, "
                              f"not '{self.convention}'")
        if "meanvar" in self.chain:
            if not stats_path:
                raise ConfigError("mel convention 'meanvar' needs a statistics file: --infer_mel_stats (inference.mel_stats)")
            self.stats = load_stats(stats_path, self.n_mel)

    def __call__(self, mel: torch.Tensor, source: str) -> torch.Tensor:
        """`mel` is (n_mel, frames); a wrong bin count or values no audio gives raise, a suspicious convention warns."""
        if mel.shape[0] != self.n_mel:
            raise ValueError(f"{source}: mel has {mel.shape[0]} bins, the experiment's mel contract has n_mel={self.n_mel}")
        guess, stats = guess_convention(mel)
        x = mel
        for convention in self.chain if self.chain != ("ln",) else ():
            x = to_natural_log(x, convention, self.stats)
        beyond = self.beyond(x)
        if beyond:
            hint = f"it looks like a {guess} mel: {HOW[guess]}" if self.fits(mel, guess) else UNKNOWN
            read = "" if self.chain == ("ln",) else f" read as {self.convention}"
            raise ValueError(f"{source}: values ({stats}){read} reach {beyond}; {hint}")
        if guess is None:
            log.warning("%s: values (%s) fit no known mel convention; expected a natural-log mel clamped at %g; %s",
                        source, stats, math.exp(self.floor), UNKNOWN)
        elif guess != self.chain[0]:
            log.warning("%s: values (%s) look like a %s mel, not %s; if so, %s", source, stats, guess, self.convention,
                        HOW[guess])
        return mel if self.chain == ("ln",) else x.clamp(min=self.floor).float()

    def beyond(self, x: torch.Tensor) -> str:
        """How a natural-log mel `x` goes beyond what audio in [-1, 1] gives ('' where it does not)."""
        top, bottom = float(x.max()), float(x.min())
        if top > self.full_scale + CEILING_MARGIN:
            return f"{top:.3g} as a natural-log mel, above the {self.full_scale:.2f} that full-scale audio gives here"
        if bottom < LOWEST_FLOOR - CEILING_MARGIN:
            return f"{bottom:.3g} as a natural-log mel, below ln(1e-10), the lowest floor log mels are clamped at"
        return ""

    def fits(self, mel: torch.Tensor, guess: str | None) -> bool:
        """Whether `mel` read as `guess` would be a mel of audio in [-1, 1] (the hint is then worth giving)."""
        if guess is None or guess == self.chain[0] or guess == "meanvar":  # meanvar: no statistics to check with
            return guess == "meanvar"
        return not self.beyond(to_natural_log(mel, guess))


def mel_converter(contract: dict, cfg: Any, convention: str | None = None,
                  stats_path: str | os.PathLike | None = None) -> MelConverter:
    """The converter stage 3 applies to `infer_from_feature` mels: flags first, then `inference.*`; a convention
    given as a flag takes the config's stats only when it uses them (meanvar), so a flag can leave the config's
    meanvar setup."""
    infer = cfg.get("inference", {}) or {}
    chosen = convention or infer.get("mel_convention") or "ln"
    if stats_path is None and (convention is None or "meanvar" in parse_convention(convention)):
        stats_path = infer.get("mel_stats")
    return MelConverter(contract, chosen, stats_path)
