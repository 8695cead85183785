"""Small helpers every corpus parser shares."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from processors.audio import AUDIO_EXTENSIONS, audio_duration, is_apple_double
from processors.datasets import DatasetError, Entry, left_out
from utils.text import plural


def entry(dataset: str, uid: str, path: str | os.PathLike, singer: str, **extra: str) -> Entry:
    """One utterance; the duration comes from the file header."""
    return {"Dataset": dataset, "Uid": uid, "Path": str(path), "Duration": round(audio_duration(path), 6),
            "Singer": singer, **extra}


def require_found(entries: list[Entry], root: Path, layout: str) -> list[Entry]:
    """Fail loudly on an empty corpus (usually a wrong `dataset_path`) or on clashing Uids."""
    if not entries:
        raise DatasetError(f"{root}: no utterances found; expected {layout}")
    clashes = [uid for uid, n in Counter(e["Uid"] for e in entries).items() if n > 1]
    if clashes:
        files = " and ".join(e["Path"] for e in entries if e["Uid"] == clashes[0])
        raise DatasetError(f"{root}: {plural(len(clashes), 'Uid names', 'Uids name')} several files (e.g. "
                           f"'{clashes[0]}': {files})")
    return entries


def split_by(entries: list[Entry], is_test: Callable[[Entry], bool]) -> tuple[list[Entry], list[Entry]]:
    train = [e for e in entries if not is_test(e)]
    test = [e for e in entries if is_test(e)]
    return train, test


def any_case(pattern: str) -> str:
    """A glob pattern matching names in any case (`*.wav` finds `A.WAV` too)."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in pattern)


def usable(paths: Iterable[Path]) -> list[Path]:
    """The regular files among `paths`, sorted; dangling links and special files are left out with the reason.

    Folders are not files, nor are macOS `._` companions (they sort first: they took VCTK's test places, shifted
    LJSpeech's 5% and clashed in PopCS); both are passed over silently, as a .DS_Store is.
    """
    found = []
    for path in sorted(paths):
        if is_apple_double(path):
            continue
        if path.is_file():
            found.append(path)
        elif path.is_symlink() and not path.exists():
            left_out(path, "not a readable file (a dangling link)")
        elif not path.is_dir():
            left_out(path, "not a regular file (a FIFO, socket or device); not opened")
    return found


def sorted_files(folder: Path, pattern: str) -> list[Path]:
    """The files in `folder` whose names match `pattern` in any case, sorted (see `usable`)."""
    return usable(folder.glob(any_case(pattern)))


def audio_in(folder: Path) -> list[Path]:
    """The audio files directly inside `folder`, sorted (other files such as labels are ignored)."""
    return usable(p for p in folder.glob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)


def list_unused(folders: Iterable[Path], entries: list[Entry], why: str) -> None:
    """Left out with `why`: the audio files in `folders` that no entry reads (named otherwise than the layout says,
    or not in the corpus's own list), so a file the parser passes over is listed in skipped.txt, never just dropped."""
    read = {Path(e["Path"]) for e in entries}
    for folder in folders:
        for path in audio_in(folder):
            if path not in read:
                left_out(path, why)


def one_per_stem(paths: list[Path], prefer: str) -> list[Path]:
    """One file per recording: where a folder holds a stem in several formats (a converted copy beside the original),
    the `prefer` format, else the first sorted; the others are left out, named, instead of two utterances sharing one
    Uid, which stopped the whole corpus."""
    by_stem: dict[str, list[Path]] = {}
    for path in paths:
        by_stem.setdefault(path.stem, []).append(path)
    kept = []
    for copies in by_stem.values():
        best = min(copies, key=lambda c: c.suffix.lower() != prefer)
        kept.append(best)
        for other in copies:
            if other != best:
                left_out(other, f"another copy of {best.name}, which is used")
    return sorted(kept)


def subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*") if p.is_dir())


def descend(root: Path, inner: str) -> Path:
    """Accept both the documented download root and the folder below it that holds the data."""
    return root / inner if (root / inner).is_dir() else root
