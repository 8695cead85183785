"""Small helpers every corpus parser shares."""

from __future__ import annotations

import os
from pathlib import Path

from processors.audio import audio_duration
from processors.datasets import DatasetError, Entry


def entry(dataset: str, uid: str, path: str | os.PathLike, singer: str, **extra: str) -> Entry:
    """One utterance; the duration comes from the file header."""
    return {"Dataset": dataset, "Uid": uid, "Path": str(path), "Duration": round(audio_duration(path), 6),
            "Singer": singer, **extra}


def require_found(entries: list[Entry], root: Path, layout: str) -> list[Entry]:
    if not entries:
        raise DatasetError(f"{root}: no utterances found; expected {layout}")
    return entries


def split_by(entries: list[Entry], is_test) -> tuple[list[Entry], list[Entry]]:
    train = [e for e in entries if not is_test(e)]
    test = [e for e in entries if is_test(e)]
    return train, test


def sorted_files(folder: Path, pattern: str) -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if p.is_file())
