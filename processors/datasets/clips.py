"""Cutting long recordings (csd, nus48e, opera, pjs) into clips under processed_dir, never the raw corpus.

Clips are 16-bit PCM WAV at the source's native rate, mono, each written atomically. A hidden
manifest per source lists its clips once all are written, with what they were cut from (the
source's resolved path, size and mtime, and those of its label files), so a rerun neither decodes
an unchanged source again nor keeps clips of a source or labels that changed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from processors.audio import AudioError, check_openable, load_audio
from processors.datasets import left_out
from processors.fingerprint import file_stat
from utils.io import atomic_write_bytes, load_json, safe_name, save_json, wav_bytes

log = logging.getLogger(__name__)
Spans = Callable[[np.ndarray, int], list[tuple[int, int]]]
NO_CLIPS = "no clips cut from it (silent throughout, or its labels give no span)"


def read_native(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    check_openable(path)
    try:
        rate = sf.info(str(path)).samplerate
    except Exception as err:  # any header problem means an unreadable file
        raise AudioError(f"{path}: cannot read header ({err})") from None
    return load_audio(path, rate), rate


def cut_from(source: Path, labels: Sequence[Path] = ()) -> list:
    """What a source's clips depend on: each file's resolved path, size and mtime."""
    return [[str(p.resolve()), *(file_stat(p) or [-1, -1])] for p in (source, *labels)]


def clip_names(stem: str) -> re.Pattern:
    """The names `cut_clips` gives a source's clips: `stem` with its `{i...}` field as digits, then `.wav`."""
    parts = re.split(r"\{i(?::[^}]*)?\}", stem)
    return re.compile(r"\d+".join(re.escape(part.replace("{{", "{").replace("}}", "}")) for part in parts) + r"\.wav")


def _listed(manifest: Path, stem: str) -> dict:
    """The manifest's record; {} when missing, damaged, of an older format or naming anything but this source's clips
    (a tampered manifest must never make a rerun delete a folder or another source's clips)."""
    try:
        found = load_json(manifest) if manifest.is_file() else {}
    except (OSError, ValueError):
        return {}
    clips, ours = found.get("clips") if isinstance(found, dict) else None, clip_names(stem)
    plain = isinstance(clips, list) and all(isinstance(c, str) and ours.fullmatch(c) for c in clips)
    return found if plain else {}


def _write_if_changed(path: Path, data: bytes) -> None:
    """Rewrite a clip only when its bytes differ, so an unchanged clip keeps its features."""
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    atomic_write_bytes(path, data)


def cut_clips(source: Path, out_dir: Path, spans: Spans, stem: str = "{i:04d}", labels: Sequence[Path] = ()) -> list[Path]:
    """Write `source[start:end]` for each span as `out_dir/<stem.format(i=k)>.wav`; return the clip paths.

    `labels`: the files the spans are read from. An unreadable source, or one that yields no clip,
    is left out (listed in skipped.txt) and yields no clips, so one bad file never stops a corpus.
    """
    manifest = out_dir / f".{safe_name(source.name)}.clips"
    inputs, then = cut_from(source, labels), _listed(manifest, stem)
    old = then.get("clips", [])
    if then.get("inputs") == inputs and all((out_dir / name).is_file() for name in old):
        paths = [out_dir / name for name in old]
    else:
        try:
            paths = _cut(source, out_dir, spans, stem)
        except (AudioError, OSError) as err:
            paths, reason = [], f"not cut into clips ({err})"
        else:
            reason = None
        for name in set(old) - {p.name for p in paths}:
            if not (out_dir / name).is_dir():
                (out_dir / name).unlink(missing_ok=True)
        if reason:
            manifest.unlink(missing_ok=True)
            left_out(source, reason)
            return []
        save_json(manifest, {"inputs": inputs, "clips": [p.name for p in paths]})
    if not paths:
        left_out(source, NO_CLIPS)
    return paths


def _cut(source: Path, out_dir: Path, spans: Spans, stem: str) -> list[Path]:
    audio, sr = read_native(source)
    paths = []
    for k, (start, end) in enumerate(spans(audio, sr)):
        if end > start:
            paths.append(out_dir / f"{stem.format(i=k)}.wav")
            _write_if_changed(paths[-1], wav_bytes(audio[start:end], sr))
    return paths
