"""OpenSinger: many Mandarin male and female singers.

Reads `<root>/{ManRaw,WomanRaw}/<id>_<song>/<id>_<song>_<n>.wav` (.lab/.txt not read). Singer
`<Gender>_<id>` (`Man_0`; ids are per gender); Song = everything after the first `_` of the folder,
so titles containing `_` are kept (the original aborts on them); Uid `<Singer>_<song>_<n>`
(`Man_0_大鱼_10`). Clips over 30 s are left out with a logged message.
Test: every clip of (Man_0, 大鱼), (Man_21, 丑八怪), (Woman_39, mojito), (Woman_40, 易燃易爆炸).
"""

from __future__ import annotations

import logging
from pathlib import Path

from processors.datasets.common import entry, require_found, sorted_files, split_by, subdirs
from utils.text import plural

log = logging.getLogger(__name__)
TEST = {("Man_0", "大鱼"), ("Man_21", "丑八怪"), ("Woman_39", "mojito"), ("Woman_40", "易燃易爆炸")}
MAX_SECONDS = 30.0


def parse(root: Path, dataset: str, work_dir: Path) -> tuple[list[dict], list[dict]]:
    entries, too_long = [], 0
    for gender in ("Man", "Woman"):
        for folder in (f for f in subdirs(root / f"{gender}Raw") if "_" in f.name):
            singer_id, song = folder.name.split("_", 1)
            singer = f"{gender}_{singer_id}"
            for wav in (w for w in sorted_files(folder, "*.wav") if w.stem.startswith(f"{folder.name}_")):
                item = entry(dataset, f"{singer}_{song}_{wav.stem.rsplit('_', 1)[1]}", wav, singer, Song=song)
                if item["Duration"] > MAX_SECONDS:
                    too_long += 1
                    log.info("%s: %.1f s is over %.0f s, left out", wav, item["Duration"], MAX_SECONDS)
                else:
                    entries.append(item)
    if too_long:
        log.warning("%s: %s over %.0f s left out", root, plural(too_long, "clip"), MAX_SECONDS)
    require_found(entries, root, "<root>/{ManRaw,WomanRaw}/<id>_<song>/<id>_<song>_<n>.wav")
    return split_by(entries, lambda e: (e["Singer"], e["Song"]) in TEST)
