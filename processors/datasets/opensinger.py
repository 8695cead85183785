"""OpenSinger: many Mandarin male and female singers.

Reads `<root>/{ManRaw,WomanRaw}/<id>_<song>/<id>_<song>_<n>.wav` (.lab/.txt not read). Singer
`<Gender>_<id>` (`Man_0`; ids are per gender); Song = everything after the first `_` of the folder,
so titles containing `_` are kept (the original aborts on them); Uid `<Singer>_<song>_<n>`
(`Man_0_大鱼_10`). Clips over 30 s are left out, logged and listed in stage 1's skipped.txt.
Test: every clip of (Man_0, 大鱼), (Man_21, 丑八怪), (Woman_39, mojito), (Woman_40, 易燃易爆炸).
"""

from __future__ import annotations

import logging
from pathlib import Path

from processors.datasets import left_out
from processors.datasets.common import entry, list_unused, require_found, sorted_files, split_by, subdirs

log = logging.getLogger(__name__)
TEST = {("Man_0", "大鱼"), ("Man_21", "丑八怪"), ("Woman_39", "mojito"), ("Woman_40", "易燃易爆炸")}
MAX_SECONDS = 30.0
LAYOUT = "<root>/{ManRaw,WomanRaw}/<id>_<song>/<id>_<song>_<n>.wav"


def parse(root: Path, dataset: str, work_dir: Path) -> tuple[list[dict], list[dict]]:
    entries, too_long = [], []
    for gender in ("Man", "Woman"):
        for folder in (f for f in subdirs(root / f"{gender}Raw") if "_" in f.name):
            singer_id, song = folder.name.split("_", 1)
            singer = f"{gender}_{singer_id}"
            for wav in (w for w in sorted_files(folder, "*.wav") if w.stem.startswith(f"{folder.name}_")):
                item = entry(dataset, f"{singer}_{song}_{wav.stem.rsplit('_', 1)[1]}", wav, singer, Song=song)
                if item["Duration"] > MAX_SECONDS:
                    left_out(wav, f"{item['Duration']:.1f} s is over {MAX_SECONDS:.0f} s")
                    too_long.append(item)
                else:
                    entries.append(item)
    require_found(entries, root, LAYOUT)
    list_unused([f for g in ("Man", "Woman") for f in subdirs(root / f"{g}Raw")], entries + too_long,
                f"not named as {LAYOUT}; not used")
    return split_by(entries, lambda e: (e["Singer"], e["Song"]) in TEST)
