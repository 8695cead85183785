"""Cutting long recordings (csd, nus48e, opera, pjs) into clips under processed_dir, never the raw corpus.

Clips are 16-bit PCM WAV at the source's native rate, mono, each written atomically. A hidden
manifest per source lists its clips once all are written, so a rerun neither decodes the source
again nor rewrites clips that are already there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from processors.audio import AudioError, load_audio
from processors.datasets import left_out
from utils.io import atomic_write_text, save_wav

log = logging.getLogger(__name__)
Spans = Callable[[np.ndarray, int], list[tuple[int, int]]]


def read_native(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        rate = sf.info(str(path)).samplerate
    except Exception as err:  # any header problem means an unreadable file
        raise AudioError(f"{path}: cannot read header ({err})") from None
    return load_audio(path, rate), rate


def cut_clips(source: Path, out_dir: Path, spans: Spans, stem: str = "{i:04d}") -> list[Path]:
    """Write `source[start:end]` for each span as `out_dir/<stem.format(i=k)>.wav`; return the clip paths.

    An unreadable source is logged and yields no clips, so one bad file never stops a corpus.
    """
    manifest = out_dir / f".{source.name}.clips"
    if manifest.is_file():
        paths = [out_dir / name for name in manifest.read_text(encoding="utf-8").splitlines() if name]
        if all(p.is_file() for p in paths):
            return paths
    try:
        audio, sr = read_native(source)
    except AudioError as err:
        left_out(source, f"not cut into clips ({err})")
        return []
    paths = []
    for k, (start, end) in enumerate(spans(audio, sr)):
        if end <= start:
            continue
        path = out_dir / f"{stem.format(i=k)}.wav"
        if not path.is_file():
            save_wav(path, audio[start:end], sr)
        paths.append(path)
    atomic_write_text(manifest, "".join(f"{p.name}\n" for p in paths))
    return paths
