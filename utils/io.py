"""Atomic writes: finished work is either complete on disk or absent, never half-written."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import math
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
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


def walk_files(root: str | os.PathLike, skip: Iterable[str | os.PathLike] = ()) -> Iterator[str]:
    """Every file path below `root`, folder by folder in sorted order, symlinked folders followed.

    Each real folder is visited once (so a link loop ends), and the folders in `skip` not at all.
    """
    seen = set()
    for folder in skip:
        with contextlib.suppress(OSError):
            seen.add((os.stat(folder).st_dev, os.stat(folder).st_ino))
    for folder, dirs, files in os.walk(root, followlinks=True):
        try:
            info = os.stat(folder)
        except OSError:
            dirs[:] = []
            continue
        if (info.st_dev, info.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        dirs.sort()
        yield from (os.path.join(folder, name) for name in sorted(files))


MAX_NAME_BYTES = 180  # leaves room under the 255-byte file name limit for a suffix, `.npy` and a temp name


def safe_name(name: str) -> str:
    """A file stem that cannot leave its folder: separators become `_`, no leading dots, and at most
    MAX_NAME_BYTES of UTF-8 (a longer one is cut and ends in `-<8 hex>` of the whole name, so it stays distinct).
    """
    cleaned = re.sub(r"[\\/\x00]+", "_", str(name)).strip()
    cleaned = re.sub(r"^\.+", "_", cleaned) or "_"
    encoded = cleaned.encode("utf-8", "surrogatepass")
    if len(encoded) <= MAX_NAME_BYTES:
        return cleaned
    head = encoded[: MAX_NAME_BYTES - 9].decode("utf-8", "ignore")
    return f"{head}-{hashlib.sha1(encoded).hexdigest()[:8]}"


def unique_names(wanted: list[tuple[str, str]]) -> list[str]:
    """The one output-naming rule: `safe_name(stem)` for each (stem, identity), distinct even on a
    case-insensitive filesystem.

    The first input to claim a name keeps it; a later one whose name collides gets
    `<name>-<8 hex of its identity>` (its full source path, say), so the same inputs get the same
    names on every run and no input overwrites another's output.
    """
    taken: set[str] = set()
    names = []
    for stem, identity in wanted:
        name = safe_name(stem)
        if name.casefold() in taken:
            digest = hashlib.sha1(identity.encode("utf-8", "surrogatepass")).hexdigest()
            name = next(f"{name}-{digest[i:i + 8]}" for i in range(0, 33)
                        if f"{name}-{digest[i:i + 8]}".casefold() not in taken)
        taken.add(name.casefold())
        names.append(name)
    return names


def _umask() -> int:
    """The process umask (reading it means setting it: put it straight back)."""
    current = os.umask(0o022)
    os.umask(current)
    return current


def file_mode() -> int:
    """The mode a plain open() gives a new file (0o666 less the umask), for writers that ignore the umask."""
    return 0o666 & ~_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write through `write(fileobj)` into a temporary sibling, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would honour the umask
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def probe_writable(folder: str | os.PathLike) -> None:
    """Create `folder` and a file in it (removed at once); OSError where it cannot be written, so a stage can
    refuse before its work rather than at its first write."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=folder).close()


EARLIER = "earlier"  # where a rerun moves what an earlier run finished and this run replaces or no longer writes


def new_folder(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... where it exists: created, never one that was there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, 1000):
        folder = path if k == 1 else path.with_name(f"{path.name}-{k}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: a thousand folders of that name exist already")


def move_aside(root: str | os.PathLike, paths: list[Path]) -> Path | None:
    """Move `paths` (files or folders below `root`) to a new `root/earlier/<date-time>/`, each at its place below
    `root`: a rerun never deletes what an earlier run finished, and no rerun's folder overwrites another's."""
    if not paths:
        return None
    root = Path(root)
    aside = new_folder(root / EARLIER / time.strftime("%Y%m%d-%H%M%S"))
    for path in paths:
        target = aside / Path(path).relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    return aside


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


def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    """`audio` as a 16-bit PCM WAV file's bytes."""
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.asarray(audio, dtype=np.float32), sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def save_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int) -> None:
    atomic_write_bytes(path, wav_bytes(audio, sample_rate))


def regular_file_size(path: str | os.PathLike) -> int:
    """The size of an input that is safe to open, else ValueError naming it.

    The one gate every reader passes first: `os.stat` never blocks, whereas opening a FIFO
    waits for a writer forever and a device can stream without end.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        what = "a dangling link (its target does not exist)" if os.path.islink(path) else "file does not exist"
        raise ValueError(f"{path}: {what}") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot read ({err.strerror or err})") from None
    if not stat.S_ISREG(info.st_mode):
        kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
                 stat.S_ISSOCK: "a socket", stat.S_ISDIR: "a folder"}
        kind = next((name for test, name in kinds.items() if test(info.st_mode)), "a special file")
        raise ValueError(f"{path}: not a regular file ({kind}); not opened")
    return info.st_size


_NPY_MAGIC = b"\x93NUMPY"
_PLAIN_NPY_HEADER = re.compile(r"\{'descr': '([<>|][a-z]\d+)', 'fortran_order': (?:True|False), "
                               r"'shape': \(((?:\d+, )*\d+,?|)\), \} *\n")


@functools.lru_cache(maxsize=64)
def _dtype(descr: str) -> np.dtype:
    return np.dtype(descr)


def _plain_npy_header(head: bytes) -> tuple[tuple[int, ...], np.dtype, int] | None:
    """(shape, dtype, data offset) of a header exactly as numpy writes it, parsed directly (numpy's own parser
    costs most of the rerun's "done" check); None for anything else, which numpy's parser then reads."""
    if head[:6] != _NPY_MAGIC or head[6] not in (1, 2, 3):
        return None
    start = 10 if head[6] == 1 else 12
    offset = start + int.from_bytes(head[8:start], "little")
    match = _PLAIN_NPY_HEADER.fullmatch(head[start:offset].decode("latin-1")) if offset <= len(head) else None
    if match is None:
        return None
    return tuple(int(n) for n in match[2].split(",") if n.strip()), _dtype(match[1]), offset


def _npy_header(path: str | os.PathLike, size: int) -> tuple[tuple[int, ...], np.dtype]:
    """Check the header's shape and dtype against the bytes on disk before numpy allocates anything."""
    fd = os.open(path, os.O_RDONLY)
    try:
        head = os.read(fd, 512)
    finally:
        os.close(fd)
    if head[:4] == b"PK\x03\x04":
        raise ValueError("an .npz archive, expected a single .npy array")
    parsed = _plain_npy_header(head)
    if parsed is None:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            parsed = tuple(shape), dtype, handle.tell()
    shape, dtype, offset = parsed
    if dtype.hasobject or not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        raise ValueError(f"dtype {dtype} is not numeric")
    claimed = math.prod(shape) * dtype.itemsize
    if offset + claimed != size:
        raise ValueError(f"header claims shape {tuple(shape)} of {dtype} ({claimed} bytes), the file holds "
                         f"{size - offset} bytes of data")
    return shape, dtype


def npy_shape(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of a complete .npy, from its header alone; None when missing, special, truncated or not one.

    Cheap enough to tell finished features from damaged ones on every rerun.
    """
    try:
        return _npy_header(path, regular_file_size(path))
    except (ValueError, OSError, EOFError):
        return None


MAP_ABOVE_BYTES = 2 << 20  # below this, reading a whole file is cheaper than mapping it (benchmarks.crops)


def load_npy(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    """Load a feature array after checking it is a regular file whose header matches its size.

    Pickled (object) arrays are refused before anything is unpickled, and a header claiming
    more data than the file holds is refused before anything is allocated. With `mmap` a file
    over MAP_ABOVE_BYTES is mapped read-only, so a reader that slices it pays only for the slice.
    """
    size = regular_file_size(path)
    try:
        _npy_header(path, size)
        array = np.load(path, allow_pickle=False, mmap_mode="r" if mmap and size > MAP_ABOVE_BYTES else None)
    except (ValueError, EOFError) as err:
        raise ValueError(f"{path}: not a plain numeric .npy array ({err or 'empty file'})") from None
    return array


def load_json(path: str | os.PathLike) -> Any:
    """The parsed file; ValueError naming it when it is not valid UTF-8 JSON (truncated, say)."""
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError alike
            raise ValueError(f"{path}: not valid JSON ({err})") from None
