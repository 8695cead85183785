"""CSD (Children's Song Dataset): one Korean female singer, 50 English + 50 Korean songs in two keys.

Reads `<root>/{english,korean}/wav/<lang><NNN><key>.wav` with its `txt/` (one lyric line per
utterance, whitespace-separated syllables) and `csv/` (one row per note: start, end, pitch,
syllable). Each lyric line covers as many consecutive notes as it has syllables; its clip runs
from the first note's start - 0.1 s (clamped at 0) to the last note's end + 0.1 s and is written to
`<work_dir>/clips/<lang><song>/<NNNN>.wav`.
Uid `<lang>_<song>_<NNNN>` (`en_001a_0000`); Singer `Female1` for both languages (one person).
Test: every clip of en004a, en042b, kr013a, kr045b (the other key of those songs stays in train).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from processors.datasets import left_out
from processors.datasets.clips import Spans, cut_clips
from processors.datasets.common import entry, require_found, split_by, subdirs

log = logging.getLogger(__name__)
TEST_SONGS = {"en004a", "en042b", "kr013a", "kr045b"}
PAD = 0.1
LAYOUT = "<root>/english|korean/{wav,txt,csv}/<lang><NNN><key>.{wav,txt,csv}"


def line_times(txt: Path, notes_csv: Path) -> list[tuple[float, float]]:
    """(start, end) in seconds of each lyric line; stops at the first line whose syllables disagree."""
    with notes_csv.open(encoding="utf-8-sig", newline="") as handle:
        notes = list(csv.DictReader(handle))
    times, at = [], 0
    for number, line in enumerate(txt.read_text(encoding="utf-8-sig").splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        rows = notes[at:at + len(tokens)]
        at += len(tokens)
        if len(rows) < len(tokens) or (rows[0]["syllable"], rows[-1]["syllable"]) != (tokens[0], tokens[-1]):
            log.warning("%s line %d: syllables do not match %s; rest of the song skipped", txt, number, notes_csv)
            break
        times.append((max(0.0, float(rows[0]["start"]) - PAD), float(rows[-1]["end"]) + PAD))
    return times


def _spans(times: list[tuple[float, float]]) -> Spans:
    return lambda audio, sr: [(round(a * sr), min(len(audio), round(b * sr))) for a, b in times]


def parse(root: Path, dataset: str, work_dir: Path) -> tuple[list[dict], list[dict]]:
    entries = []
    for lang_dir in (d for d in subdirs(root) if d.name in ("english", "korean")):
        for wav in sorted((lang_dir / "wav").glob("*.wav")):
            txt, notes = lang_dir / "txt" / f"{wav.stem}.txt", lang_dir / "csv" / f"{wav.stem}.csv"
            if not (txt.is_file() and notes.is_file()):
                left_out(wav, f"no {txt.name} or {notes.name}")
                continue
            clips = cut_clips(wav, work_dir / "clips" / wav.stem, _spans(line_times(txt, notes)))
            lang, song = wav.stem[:2], wav.stem[2:]
            entries += [entry(dataset, f"{lang}_{song}_{c.stem}", c, "Female1") for c in clips]
    require_found(entries, root, LAYOUT)
    return split_by(entries, lambda e: Path(e["Path"]).parent.name in TEST_SONGS)
