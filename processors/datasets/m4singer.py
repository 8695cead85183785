"""M4Singer: twenty singers named by voice part (Alto-1 ... Tenor-7).

Reads `<root>/meta.json` (a list; only `item_name` = `<Singer>#<Song>#<NNNN>` is used) and the
matching `<root>/<Singer>#<Song>/<NNNN>.wav`. Uid `<Singer>_<Song>_<NNNN>`; Singer = voice part;
Song = title, kept as written (spaces included: the original drops those songs). Items whose wav
is missing, and wavs meta.json does not list, are left out (listed in skipped.txt).
Test: (Alto-1, 美错), (Bass-1, 十年), (Soprano-2, 同桌的你), (Tenor-5, 爱笑的眼睛); their singers also sing in train.
"""

from __future__ import annotations

from pathlib import Path

from processors.datasets import DatasetError, left_out
from processors.datasets.common import entry, list_unused, require_found, split_by, subdirs
from utils.io import load_json

TEST = {("Alto-1", "美错"), ("Bass-1", "十年"), ("Soprano-2", "同桌的你"), ("Tenor-5", "爱笑的眼睛")}
LAYOUT = "<root>/meta.json and <root>/<Singer>#<Song>/<NNNN>.wav"


def item_names(meta: Path) -> list[str]:
    """The sorted distinct `item_name`s; an entry without one is left out, a file of another shape is an error."""
    listed = load_json(meta)
    if not isinstance(listed, list):
        raise DatasetError(f"{meta}: expected a list of items with an item_name, found a {type(listed).__name__}")
    names = set()
    for number, item in enumerate(listed):
        name = item.get("item_name") if isinstance(item, dict) else None
        if isinstance(name, str):
            names.add(name)
        else:
            left_out(meta, f"entry {number} has no item_name string; left out")
    return sorted(names)


def parse(root: Path, dataset: str, work_dir: Path) -> tuple[list[dict], list[dict]]:
    meta = root / "meta.json"
    entries = []
    items = item_names(meta) if meta.is_file() else []
    for name in items:
        if name.count("#") < 2:
            left_out(meta, f"item_name '{name}' is not <Singer>#<Song>#<NNNN>")
            continue
        singer, *title, number = name.split("#")
        song = "#".join(title)
        wav = root / f"{singer}#{song}" / f"{number}.wav"
        if wav.is_file():
            entries.append(entry(dataset, f"{singer}_{song}_{number}", wav, singer, Song=song))
        else:
            left_out(wav, f"listed in meta.json as '{name}' but missing")
    require_found(entries, root, LAYOUT)
    list_unused([d for d in subdirs(root) if "#" in d.name], entries, "not listed in meta.json; not used")
    return split_by(entries, lambda e: (e["Singer"], e["Song"]) in TEST)
