"""Opencpop: one Mandarin female singer, 100 songs, pre-cut segments with an official split.

Reads `<root>/segments/{train,test}.txt` ("|"-separated; field 1 = utterance id) and
`<root>/segments/wavs/<id>.wav`; the full songs in `<root>/wavs/` are not used. Any dataset name
starting with `opencpo` comes here and becomes the `Dataset` field. Uid = the id (`2001000001`);
Singer `female1`. Test: the official segments/test.txt. Listed ids without a wav, and wavs in no list, are left out
(listed in skipped.txt).
"""

from __future__ import annotations

import logging
from pathlib import Path

from processors.datasets import left_out
from processors.datasets.common import entry, list_unused, require_found, sorted_files

log = logging.getLogger(__name__)


def _split(segments: Path, dataset: str, name: str, wavs: dict[str, Path]) -> list[dict]:
    listing = segments / f"{name}.txt"
    # only the id field is read: lyrics re-saved in GBK stopped stage 1 with a decode error naming no file
    lines = listing.read_text(encoding="utf-8-sig", errors="replace").splitlines() if listing.is_file() else []
    entries = []
    for uid in (line.split("|")[0].strip() for line in lines if line.strip()):
        wav = wavs.get(f"{uid}.wav".lower())
        if wav is not None:
            entries.append(entry(dataset, uid, wav, "female1"))
        else:
            left_out(segments / "wavs" / f"{uid}.wav", f"listed in {listing} but missing")
    return entries


def parse(root: Path, dataset: str, work_dir: Path) -> tuple[list[dict], list[dict]]:
    segments = root / "segments"
    wavs = {p.name.lower(): p for p in sorted_files(segments / "wavs", "*.wav")}
    train, test = (_split(segments, dataset, name, wavs) for name in ("train", "test"))
    require_found(train + test, root, "<root>/segments/{train,test}.txt and <root>/segments/wavs/<id>.wav")
    list_unused([segments / "wavs"], train + test, "listed in neither segments/train.txt nor test.txt; not used")
    return train, test
