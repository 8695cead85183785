"""Deterministic synthetic 'voices' for the demo and the tests: no downloads, same audio everywhere."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def synthetic_voice(seconds: float, sample_rate: int, seed: int) -> np.ndarray:
    """A harmonic tone with vibrato, a syllable-like envelope and a little breath noise."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    f0 = rng.uniform(110, 330) * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(4, 6) * t))
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    harmonics = sum((0.6 / k) * np.sin(k * phase + rng.uniform(0, 2 * np.pi)) for k in range(1, 9))
    syllables = 0.55 + 0.45 * np.sin(2 * np.pi * rng.uniform(1.5, 3.0) * t + rng.uniform(0, np.pi)) ** 2
    fade = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.02) if n else t
    audio = (harmonics * syllables + 0.02 * rng.standard_normal(n)) * fade
    return (0.5 * audio / max(np.abs(audio).max(), 1e-9)).astype(np.float32)


def write_corpus(root: str | os.PathLike, speakers: int = 2, per_speaker: int = 10, sample_rate: int = 24000,
                 seconds: tuple[float, float] = (0.6, 1.4), seed: int = 0) -> Path:
    """A folder corpus `<root>/<speaker>/<speaker>_<n>.wav` of synthetic voices (stage 1 Uids: `<speaker>_<n>`)."""
    import soundfile as sf

    root = Path(root)
    rng = np.random.default_rng(seed)
    for s in range(speakers):
        folder = root / f"spk{s}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_speaker):
            length = rng.uniform(*seconds)
            sf.write(folder / f"spk{s}_{i:03d}.wav", synthetic_voice(length, sample_rate, seed * 1000 + s * 100 + i),
                     sample_rate, subtype="PCM_16")
    return root
