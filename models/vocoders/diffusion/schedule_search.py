"""Search an N-step noise schedule for a trained model: a coarse grid, then coordinate refinement.

WaveGrad (Chen et al., 2021) and FastDiff (Huang et al., 2022) pick few-step schedules by
searching monotone beta sequences against a spectral distance on held-out audio; the
hand-written 6-step schedule is rarely the best one for a given model. Candidates run through
the ordinary fast sampler (betas mapped to fractional training steps), so a searched schedule
needs nothing new at synthesis time: the experiment keeps it (`Experiment.save_schedule`) and stage 3
reads it back with `--infer_sampler searched`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from evaluation.metrics import MSTFT_SHORTEST, SILENCE_PEAK, mel_l1, mstft
from models.vocoders.diffusion.diffusion_vocoder_inference import Vocoder
from models.vocoders.diffusion.experiment import is_valid
from processors.feature_store import first_by_name, load_entries, load_items
from utils.config import ConfigError
from utils.text import plural

log = logging.getLogger(__name__)
# The coarse grid: geometric-like sequences from FIRSTS to LASTS, bent by POWERS.
FIRSTS = (1e-5, 1e-4, 1e-3, 1e-2)
LASTS = (0.1, 0.2, 0.35, 0.5, 0.7, 0.9)
POWERS = (0.6, 1.0, 1.6)


def validation_utterances(cfg: Any, count: int, seconds: float) -> list[tuple[str, torch.Tensor, np.ndarray]]:
    """The first `count` validation utterances (sorted by name), cut to `seconds`: (name, mel, audio)."""
    pre = cfg.preprocess
    frames = max(1, int(seconds * int(pre.sample_rate) / int(pre.hop_size)))
    entries = first_by_name(load_entries(cfg, "valid"), count)
    if not entries:
        raise FileNotFoundError(f"{pre.processed_dir}: no validation utterances with features to search a schedule on")
    return load_items(cfg, "valid", entries=entries, max_frames=frames)


def scorable(items: list[tuple[str, torch.Tensor, np.ndarray]], seconds: float,
             rate: int) -> list[tuple[str, torch.Tensor, np.ndarray]]:
    """The utterances both scores are defined on; ConfigError where none is. A silent reference, or one under the
    M-STFT's shortest, scores NaN, and a NaN mean ranked every candidate alike: the grid's first was saved as the
    searched schedule, with NaN scores."""
    short = {name for name, _, audio in items if len(audio) < MSTFT_SHORTEST}
    silent = {name for name, _, audio in items if np.abs(audio).max(initial=0.0) < SILENCE_PEAK}
    kept = [item for item in items if item[0] not in short | silent]
    need = f"{MSTFT_SHORTEST} samples ({MSTFT_SHORTEST / rate:.3f} s) of sound"
    if not kept:
        raise ConfigError(f"none of the {plural(len(items), 'validation utterance')} can score a schedule: each needs "
                          f"{need}{'; raise --seconds (' + format(seconds, 'g') + ')' if short else ''}")
    if short | silent:
        log.warning("left out of the schedule search, silent or shorter than %s: %s", need, ", ".join(sorted(short | silent)))
    return kept


class ScheduleScorer:
    """Vocodes the utterances with one schedule under a fixed seed; lower scores are better."""

    def __init__(self, cfg: Any, model: torch.nn.Module, items: list[tuple[str, torch.Tensor, np.ndarray]],
                 seed: int = 1234, device: str | None = None) -> None:
        self.cfg, self.model, self.items, self.seed, self.device = cfg, model, items, seed, device
        self.evaluations = 0
        self.precision: str | None = None  # the config's, or fp32 once an automatic half precision overflowed
        self._cache: dict[tuple[str, tuple[float, ...]], dict[str, float]] = {}

    def __call__(self, sampler: str = "searched", betas: Sequence[float] | None = None) -> dict[str, float]:
        key = (sampler, tuple(round(float(b), 12) for b in betas or ()))
        if key not in self._cache:
            vocoder = Vocoder(self.cfg, self.model, sampler=sampler, betas=betas, batch_size=len(self.items),
                              seed=self.seed, device=self.device, precision=self.precision)
            preds = vocoder([m for _, m, _ in self.items], [n for n, _, _ in self.items])
            self.precision = "fp32" if vocoder.overflowed else self.precision
            rate = int(self.cfg.preprocess.sample_rate)
            pairs = [(truth, pred) for (_, _, truth), pred in zip(self.items, preds, strict=True)]
            mel = float(np.mean([mel_l1(t, p, rate, self.cfg.preprocess) for t, p in pairs]))
            stft = float(np.mean([mstft(t, p, rate) for t, p in pairs]))
            self._cache[key] = {"mel_l1": mel, "mstft": stft, "score": mel + stft, "steps": vocoder.plan.steps}
            self.evaluations += 1
        return self._cache[key]


def shaped(first: float, last: float, power: float, steps: int) -> list[float]:
    """`steps` betas rising from `first` to `last` in log space, bent by `power`."""
    if steps == 1:
        return [last]
    span = math.log(last) - math.log(first)
    return [math.exp(math.log(first) + span * (i / (steps - 1)) ** power) for i in range(steps)]


def coarse_grid(steps: int, default: Sequence[float] | None = None) -> list[list[float]]:
    """The grid's distinct valid candidates, plus the configured schedule when it has `steps` betas."""
    grid = [shaped(f, last, p, steps) for f in FIRSTS for last in LASTS for p in POWERS]
    if default is not None and len(default) == steps:
        grid.insert(0, [float(b) for b in default])
    unique: dict[tuple[float, ...], list[float]] = {}
    for betas in grid:
        if is_valid(betas):
            unique.setdefault(tuple(round(b, 12) for b in betas), betas)
    return list(unique.values())


def refine(score: ScheduleScorer, betas: list[float], rounds: int) -> list[float]:
    """Coordinate descent in log-beta, halving the step (x2, x1.41, x1.19, ...) each round."""
    best, best_score = list(betas), score(betas=betas)["score"]
    for r in range(rounds):
        factor = 2.0 ** (0.5**r)
        for i in range(len(best)):
            for move in (factor, 1.0 / factor):
                candidate = [b * move if j == i else b for j, b in enumerate(best)]
                if not is_valid(candidate):
                    continue
                value = score(betas=candidate)["score"]
                if value < best_score:
                    best, best_score = candidate, value
                    break
        log.info("refine round %d (x%.3f): score %.4f after %s", r + 1, factor, best_score,
                 plural(score.evaluations, "evaluation"))
    return best


def search_schedule(cfg: Any, model: torch.nn.Module, steps: int, utterances: int = 4, seconds: float = 1.0,
                    rounds: int = 3, seed: int = 1234, device: str | None = None) -> dict:
    """The best `steps`-step schedule on a few validation utterances, with reference scores.

    `check` repeats the comparison under another seed, so a schedule that only suits one noise
    draw shows up.
    """
    if steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    items = scorable(validation_utterances(cfg, utterances, seconds), seconds, int(cfg.preprocess.sample_rate))
    score = ScheduleScorer(cfg, model, items, seed, device)
    default = cfg.model.diffwave.get("inference_noise_schedule")
    grid = coarse_grid(steps, default)
    ranked = sorted(tqdm(grid, desc=f"coarse {steps}-step grid", unit="schedule", dynamic_ncols=True),
                    key=lambda b: score(betas=b)["score"])
    log.info("coarse grid: %s, best score %.4f", plural(len(grid), "schedule"), score(betas=ranked[0])["score"])
    best = refine(score, ranked[0], rounds)
    check = ScheduleScorer(cfg, model, items, seed + 1, device)
    return {
        "steps": steps,
        "betas": best,
        "scores": score(betas=best),
        "reference": {"fast": score("fast"), "full": score("full")},
        "check": {"seed": seed + 1, "searched": check(betas=best), "fast": check("fast"), "full": check("full")},
        "utterances": [name for name, _, _ in items],
        "seconds": seconds,
        "seed": seed,
        "evaluations": score.evaluations,
    }
