"""KiSing: one Mandarin female singer, one folder of clips per song.

Reads `<root>/<song>/*.wav` where `<root>` is the download's `clean/` folder or the download
root itself (then `clean/` is used). Uid `<song>_<stem>` (`421_0040`); Singer `female1`.
Test: every clip of songs 421, 424, 431.
"""

from __future__ import annotations

from pathlib import Path

from processors.datasets.common import descend, entry, list_unused, require_found, sorted_files, split_by, subdirs

TEST_SONGS = {"421", "424", "431"}


def parse(root: Path, dataset: str, work_dir: Path) -> tuple[list[dict], list[dict]]:
    songs = descend(root, "clean")
    entries = [entry(dataset, f"{song.name}_{wav.stem}", wav, "female1", Song=song.name)
               for song in subdirs(songs) for wav in sorted_files(song, "*.wav")]
    require_found(entries, songs, "<root>/clean/<song>/*.wav (or <root> = clean/)")
    list_unused(subdirs(songs), entries, "not a .wav; not used")
    return split_by(entries, lambda e: e["Song"] in TEST_SONGS)
