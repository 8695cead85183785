"""Atomic writes: finished work is either complete on disk or absent, never half-written."""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete temporary files left in `folder` by writers that were killed; returns how many.

    The writer's pid is part of each temporary name, so a temp of a live process is kept.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for entry in os.scandir(folder):
        match = _TEMP_NAME.match(entry.name)
        if match and entry.is_file(follow_symlinks=False) and not _alive(int(match.group(1))):
            Path(entry.path).unlink(missing_ok=True)
            removed += 1
    return removed


def safe_name(name: str) -> str:
    """A file stem that cannot leave its folder: separators become `_`, no leading dots."""
    cleaned = re.sub(r"[\\/\x00]+", "_", str(name)).strip()
    cleaned = re.sub(r"^\.+", "_", cleaned)
    return cleaned or "_"


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write through `write(fileobj)` into a temporary sibling, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=4, ensure_ascii=False))


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def save_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int) -> None:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.asarray(audio, dtype=np.float32), sample_rate, format="WAV", subtype="PCM_16")
    atomic_write_bytes(path, buffer.getvalue())


def load_npy(path: str | os.PathLike) -> np.ndarray:
    """Load a feature array; pickled (object) arrays are refused before anything is unpickled."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as err:
        raise ValueError(f"{path}: not a plain numeric .npy array ({err or 'empty file'})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        raise ValueError(f"{path}: an .npz archive, expected a single .npy array")
    return array


def load_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
