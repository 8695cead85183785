"""CSD (Children's Song Dataset): one Korean female singer, 50 English + 50 Korean songs in two keys.

Reads `<root>/{english,korean}/wav/<lang><NNN><key>.wav` with its `txt/` (one lyric line per
utterance, whitespace-separated syllables) and `csv/` (one row per note: start, end, pitch,
syllable). Each lyric line covers as many consecutive notes as it has syllables; its clip runs
from the first note's start - 0.1 s (clamped at 0) to the last note's end + 0.1 s and is written to
`<work_dir>/clips/<lang><song>/<NNNN>.wav`. A song whose labels are unreadable, or from the first line
whose syllables disagree with the notes, is left out (listed in skipped.txt).
Uid `<lang>_<song>_<NNNN>` (`en_001a_0000`); Singer `Female1` for both languages (one person).
Test: every clip of en004a, en042b, kr013a, kr045b (the other key of those songs stays in train).
"""

from __future__ import annotations

import csv
from pathlib import Path

from processors.datasets import left_out
from processors.datasets.clips import Spans, cut_clips
from processors.datasets.common import entry, require_found, sorted_files, split_by, subdirs

TEST_SONGS = {"en004a", "en042b", "kr013a", "kr045b"}
PAD = 0.1
LAYOUT = "<root>/english|korean/{wav,txt,csv}/<lang><NNN><key>.{wav,txt,csv}"


def read_notes(notes_csv: Path) -> list[tuple[float, float, str]]:
    """(start, end, syllable) of every note; ValueError naming the file when it is not such a table."""
    try:
        with notes_csv.open(encoding="utf-8-sig", newline="") as handle:
            return [(float(r["start"]), float(r["end"]), r["syllable"]) for r in csv.DictReader(handle)]
    except (ValueError, KeyError, TypeError, csv.Error) as err:
        raise ValueError(f"{notes_csv}: not a start,end,syllable note table ({type(err).__name__}: {err})") from None


def line_times(txt: Path, notes_csv: Path) -> list[tuple[float, float]]:
    """(start, end) in seconds of each lyric line; stops at the first line whose syllables disagree."""
    notes = read_notes(notes_csv)
    try:
        lines = txt.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{txt}: not UTF-8 text ({err})") from None
    times, at = [], 0
    for number, line in enumerate(lines, 1):
        tokens = line.split()
        if not tokens:
            continue
        rows = notes[at:at + len(tokens)]
        at += len(tokens)
        if len(rows) < len(tokens) or (rows[0][2], rows[-1][2]) != (tokens[0], tokens[-1]):
            left_out(txt, f"line {number}: syllables do not match {notes_csv.name}; the rest of the song is left out")
            break
        times.append((max(0.0, rows[0][0] - PAD), rows[-1][1] + PAD))
    return times


def _spans(times: list[tuple[float, float]]) -> Spans:
    return lambda audio, sr: [(round(a * sr), min(len(audio), round(b * sr))) for a, b in times]


def parse(root: Path, dataset: str, work_dir: Path) -> tuple[list[dict], list[dict]]:
    entries = []
    for lang_dir in (d for d in subdirs(root) if d.name in ("english", "korean")):
        for wav in sorted_files(lang_dir / "wav", "*.wav"):
            txt, notes = lang_dir / "txt" / f"{wav.stem}.txt", lang_dir / "csv" / f"{wav.stem}.csv"
            absent = [f"{p.parent.name}/{p.name}" for p in (txt, notes) if not p.is_file()]
            if absent:  # name the one missing: "no a.txt or a.csv" sent the user looking for both
                left_out(wav, f"{' and '.join(absent)} missing; not cut into clips")
                continue
            try:
                times = line_times(txt, notes)
            except (ValueError, OSError) as err:
                left_out(wav, f"not cut into clips ({err})")
                continue
            clips = cut_clips(wav, work_dir / "clips" / wav.stem, _spans(times), labels=(txt, notes))
            lang, song = wav.stem[:2], wav.stem[2:]
            entries += [entry(dataset, f"{lang}_{song}_{c.stem}", c, "Female1") for c in clips]
    require_found(entries, root, LAYOUT)
    return split_by(entries, lambda e: Path(e["Path"]).parent.name in TEST_SONGS)
