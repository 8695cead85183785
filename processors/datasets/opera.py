"""Chinese and Western opera (monophonic part), emotional performances.

Reads `<root>/{chinese,western}/<singer>/<song>.<audio>` where `<root>` is `monophonic/` or the
download root above it; non-audio files are ignored, and so is a copy of a song in another format
(the .wav is cut). Each recording is cut at silences (RMS slicer, -30 dB, up to 3 s of silence kept)
into `<work_dir>/clips/<lang>/<singer>/<song>/<NNNN>.wav`
(the language is in the clip path so same-named singers never overwrite each other's clips).
Uid `<singer>#<song>#<NNNN>` (`fem_01#neg_1#0000`); Singer = singer folder. A singer folder present
in both languages would give clashing Uids, which is reported as an error.
Test: every clip of (fem_01, neg_1), (fem_12, pos_3), (male_02, neg_1), (male_11, pos_2).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from processors.datasets.clips import cut_clips
from processors.datasets.common import audio_in, descend, entry, one_per_stem, require_found, split_by, subdirs
from processors.datasets.slicer import slice_spans

TEST = {"fem_01#neg_1#", "fem_12#pos_3#", "male_02#neg_1#", "male_11#pos_2#"}
SLICE = partial(slice_spans, threshold_db=-30, max_sil_kept_ms=3000)


def parse(root: Path, dataset: str, work_dir: Path) -> tuple[list[dict], list[dict]]:
    mono = descend(root, "monophonic")
    entries = []
    for lang in ("chinese", "western"):
        for singer in subdirs(mono / lang):
            for song in one_per_stem(audio_in(singer), ".wav"):
                clips = cut_clips(song, work_dir / "clips" / lang / singer.name / song.stem, SLICE)
                uid = f"{singer.name}#{song.stem}#"
                entries += [entry(dataset, uid + clip.stem, clip, singer.name) for clip in clips]
    require_found(entries, mono, "<root>/monophonic/{chinese,western}/<singer>/<song>.wav (or <root> = monophonic/)")
    return split_by(entries, lambda e: e["Uid"][: e["Uid"].rindex("#") + 1] in TEST)
