"""PopCS: one Mandarin female singer, one folder per song.

Reads `<root>/popcs-<Song>/<NNNN>_wf0.wav` (phoneme/TextGrid files not read), where `<root>` is the
inner `popcs/` folder or the download root above it. Song = folder name minus the `popcs-` prefix,
so titles containing `-` are kept (the original aborts on them). Uid `<Song>_<NNNN>`
(`明天会更好_0004`); Singer `female1`. Test: every clip of 明天会更好, 欧若拉, 虫儿飞, 隐形的翅膀.
"""

from __future__ import annotations

from pathlib import Path

from processors.datasets.common import descend, entry, list_unused, require_found, sorted_files, split_by, subdirs

TEST_SONGS = {"明天会更好", "欧若拉", "虫儿飞", "隐形的翅膀"}


def parse(root: Path, dataset: str, work_dir: Path) -> tuple[list[dict], list[dict]]:
    songs = descend(root, "popcs")
    entries = []
    for folder in (f for f in subdirs(songs) if f.name.startswith("popcs-")):
        song = folder.name.removeprefix("popcs-")
        for wav in sorted_files(folder, "*_wf0.wav"):
            uid = f"{song}_{wav.stem.split('_')[0]}"
            entries.append(entry(dataset, uid, wav, "female1", Song=song))
    require_found(entries, songs, "<root>/popcs/popcs-<Song>/<NNNN>_wf0.wav (or <root> = inner popcs/)")
    list_unused(subdirs(songs), entries, "not named popcs-<Song>/<NNNN>_wf0.wav; not used")
    return split_by(entries, lambda e: e["Song"] in TEST_SONGS)
