"""LJSpeech 1.1: `<root>/wavs/LJxxx-xxxx.wav`; the last 5% of the sorted listing is test."""

from __future__ import annotations

from pathlib import Path

from processors.datasets.common import entry, require_found, sorted_files


def parse(root: Path, dataset: str, work_dir: Path) -> tuple[list[dict], list[dict]]:
    wavs = sorted_files(root / "wavs", "*.wav")
    entries = require_found(
        [entry(dataset, p.stem, p, "female1") for p in wavs], root / "wavs", "LJSpeech-1.1 layout: <root>/wavs/*.wav"
    )
    entries = [e for e in entries if e["Duration"] > 0]
    n_test = len(entries) // 20
    cut = len(entries) - n_test
    return entries[:cut], entries[cut:]
