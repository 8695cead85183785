"""PJS: one Japanese male singer, 100 songs (singing and speech; only singing is used).

Reads every `pjs*_song.wav` (any case, symlinked folders followed) below `<root>` (the parent of
`PJS_corpus_ver1.1/`, or that folder).
Each song's leading and trailing silence is trimmed with an energy gate, then the song (length L)
is cut in 3 clips, clip k covering [k*L//3, k*L//3 + L//3 + 1 s) clipped to L, so neighbours
overlap by 1 s; clips go to `<work_dir>/clips/<stem>_<k>.wav`.
Uid `pjsNNN_song_<k>`; Singer `male1`. Test: the 9 clips of pjs001, pjs002, pjs003.
"""

from __future__ import annotations

import os
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np

from processors.datasets.clips import cut_clips
from processors.datasets.common import entry, require_found, split_by, usable
from processors.datasets.slicer import trim_span
from utils.io import safe_name, walk_files

TEST_SONGS = {"pjs001", "pjs002", "pjs003"}
PARTS, OVERLAP_S = 3, 1.0


def thirds(audio: np.ndarray, sr: int) -> list[tuple[int, int]]:
    start, end = trim_span(audio, sr)
    size = (end - start) // PARTS
    return [(start + k * size, min(end, start + k * size + size + round(OVERLAP_S * sr))) for k in range(PARTS)]


def parse(root: Path, dataset: str, work_dir: Path) -> tuple[list[dict], list[dict]]:
    songs = usable(Path(p) for p in walk_files(root) if fnmatchcase(os.path.basename(p).lower(), "pjs*_song.wav"))
    entries = [entry(dataset, clip.stem, clip, "male1")
               for song in songs for clip in cut_clips(song, work_dir / "clips", thirds, f"{safe_name(song.stem)}_{{i}}")]
    require_found(entries, root, "<root>/PJS_corpus_ver1.1/pjsNNN/pjsNNN_song.wav")
    # songs are found in any case, so the test songs are too (`PJS001_song.wav` went to train)
    return split_by(entries, lambda e: e["Uid"].split("_")[0].lower() in TEST_SONGS)
