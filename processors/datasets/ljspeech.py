"""LJSpeech 1.1: one English female speaker, 13,100 clips, 22.05 kHz.

Reads `<root>/wavs/LJxxx-xxxx.wav` (metadata.csv is not read), where `<root>` is `LJSpeech-1.1/`
or its parent. Uid = wav stem (`LJ001-0001`); Singer `female1`. Unreadable or zero-length clips are
listed like any other and then skipped, with their reason, by the feature extraction.
Test: the last 5% (N // 20) of the **sorted** listing (the original uses raw directory order).
"""

from __future__ import annotations

from pathlib import Path

from processors.datasets.common import descend, entry, require_found, sorted_files


def parse(root: Path, dataset: str, work_dir: Path) -> tuple[list[dict], list[dict]]:
    wavs = descend(root, "LJSpeech-1.1") / "wavs"
    entries = [entry(dataset, p.stem, p, "female1") for p in sorted_files(wavs, "*.wav")]
    require_found(entries, wavs, "LJSpeech-1.1 layout: <root>/wavs/*.wav")
    cut = len(entries) - len(entries) // 20
    return entries[:cut], entries[cut:]
