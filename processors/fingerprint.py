"""What stage 1's metadata was built from, so a changed corpus is rebuilt instead of silently reused.

`inputs.json` beside the metadata holds the corpus root, a digest of its file listing (every
regular file's relative path, size and mtime) and, per Uid, the source file's size and mtime.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from utils.io import load_json, save_json, walk_files

log = logging.getLogger(__name__)
FINGERPRINT_FILE = "inputs.json"


def file_stat(path: str | os.PathLike) -> list[int] | None:
    """[size, mtime_ns] of a regular file (links followed); None for anything else."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns] if stat.S_ISREG(info.st_mode) else None


def corpus_fingerprint(root: str | os.PathLike, skip: Iterable[str | os.PathLike] = ()) -> dict:
    """The root and a digest of every regular file below it (names, sizes, mtimes), in a fixed order.

    Symlinked folders are followed; `skip` (stage 1's own output, when it lies inside the corpus) is not read.
    """
    root = Path(root).resolve()
    digest, count = hashlib.sha1(), 0
    for path in walk_files(root, skip):
        found = file_stat(path)
        if found is not None:
            relative = os.path.relpath(path, root)
            digest.update(f"{relative}\0{found[0]}\0{found[1]}\n".encode("utf-8", "surrogateescape"))
            count += 1
    return {"root": str(root), "files": count, "listing": digest.hexdigest()}


def changes(old: dict | None, new: dict) -> str | None:
    """Why metadata built from `old` no longer describes `new`; None when it still does."""
    if not isinstance(old, dict):
        return None
    if old.get("pending"):
        return "the run that wrote it stopped before recording its inputs"
    if old.get("root") != new["root"]:
        return f"dataset_path was {old.get('root')}, now {new['root']}"
    if old.get("listing") != new["listing"]:
        return f"{old.get('files')} files then, {new['files']} now, or files changed"
    return None


def read_fingerprint(folder: Path) -> dict | None:
    """None when there is no record; {} for a damaged one (it matches nothing, so the metadata is rebuilt)."""
    path = folder / FINGERPRINT_FILE
    if not path.exists():
        return None
    try:
        found = load_json(path)
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def mark_pending(folder: Path, old: dict | None) -> None:
    """Before the metadata is rewritten: a run killed before `write_fingerprint` then rebuilds it.

    The old record's sources are kept, so the rebuild still knows which features are stale.
    """
    save_json(folder / FINGERPRINT_FILE, {**(old or {}), "pending": True})


def write_fingerprint(folder: Path, fingerprint: dict, entries: list[dict]) -> None:
    """Saved after the metadata, replacing the pending mark."""
    sources = {e["Uid"]: [e["Path"], *(file_stat(e["Path"]) or [-1, -1])] for e in entries}
    save_json(folder / FINGERPRINT_FILE, {**fingerprint, "sources": sources})


def stale_uids(old: dict | None, entries: list[dict]) -> list[str]:
    """Uids whose features were made from another file, or from this file before it changed."""
    before = (old or {}).get("sources", {})
    return [e["Uid"] for e in entries if before.get(e["Uid"]) != [e["Path"], *(file_stat(e["Path"]) or [-1, -1])]]
