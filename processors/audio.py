"""The one audio loader: any file soundfile or librosa reads, as mono float32 at a target rate."""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np

from utils.io import regular_file_size, walk_files
from utils.text import plural

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".m4a", ".aiff", ".aif")
LOWEST_RATE = 1000  # Hz; below it a header's rate is damage, not audio (a 1 Hz header made an hour out of 2 s)


class AudioError(ValueError):
    """An unusable audio file; the message names the file and the problem."""


def _decode(path: str | os.PathLike) -> tuple[np.ndarray, int, int]:
    """(mono samples, rate, the file's channel count): channels are averaged."""
    import soundfile as sf

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
        return data.mean(axis=1), rate, data.shape[1]
    except Exception as sf_error:  # soundfile cannot read mp3 on some builds: fall back to librosa
        try:
            import librosa

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data, rate = librosa.load(str(path), sr=None, mono=False)
            data = np.atleast_2d(np.asarray(data, dtype=np.float32))  # (channels, samples)
            return data.mean(axis=0), int(rate), data.shape[0]
        except Exception:
            raise AudioError(f"{path}: cannot decode audio ({sf_error})") from None


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    if orig_sr == target_sr:
        return audio
    import soxr

    return soxr.resample(audio, orig_sr, target_sr, quality="HQ").astype(np.float32)


def check_openable(path: str | os.PathLike) -> None:
    """AudioError naming the file unless it is a non-empty regular file (checked before any decoder opens it)."""
    try:
        size = regular_file_size(path)
    except ValueError as err:
        raise AudioError(str(err)) from None
    if size == 0:
        raise AudioError(f"{path}: empty file")


def load_audio(path: str | os.PathLike, sample_rate: int, min_samples: int = 1,
               downmixed: list[str] | None = None, keep_level: bool = False) -> np.ndarray:
    """Mono float32 in [-1, 1] (unless `keep_level`) at `sample_rate`; raises AudioError naming the file (for an
    empty one too, unless `min_samples` is 0: a vocoder's empty output is still an output to score).

    Stereo and multi-channel files are averaged (named in `downmixed`, for the caller to report
    once); a float file peaking above 1.0 is scaled down with a warning (not clipped), since
    clipping would add distortion the vocoder then learns. `keep_level` (for scoring) changes no level: a float file
    may then peak above 1.0, as may resampling's ringing, where a scaling of one side only would alter what the
    level-dependent metrics measure.
    """
    check_openable(path)
    audio, rate, channels = _decode(path)
    if rate < LOWEST_RATE:
        raise AudioError(f"{path}: sample rate {rate} Hz in its header (a damaged header? audio is {LOWEST_RATE} Hz or "
                         "more)")
    if channels > 1 and downmixed is not None:
        downmixed.append(f"{path} ({channels} channels)")
    if len(audio) == 0:
        if min_samples > 0:
            raise AudioError(f"{path}: no samples (zero-length audio)")
        return np.zeros(0, dtype=np.float32)
    if not np.all(np.isfinite(audio)):
        raise AudioError(f"{path}: contains NaN or inf samples")
    peak = float(np.abs(audio).max())
    if peak > 1.0 and not keep_level:
        log.warning("%s: peak %.3f above 1.0, scaled down to 0.999", path, peak)
        audio = audio * (0.999 / peak)
    audio = resample(audio, rate, sample_rate)
    if len(audio) < min_samples:
        raise AudioError(f"{path}: too short ({plural(len(audio), 'sample')} at {sample_rate} Hz, need {min_samples})")
    overshoot = float(np.abs(audio).max())
    if overshoot > 1.0 and not keep_level:  # resampling a near-full-scale file can ring slightly past 1.0
        audio = audio / overshoot
    return np.ascontiguousarray(audio, dtype=np.float32)


def audio_duration(path: str | os.PathLike) -> float:
    """Duration in seconds from the header when possible (no full decode).

    An undecodable file reads as 0.0 rather than raising: corpus parsers list it, and stage 1
    then skips it with the loader's reason instead of the whole parse failing.
    """
    import soundfile as sf

    try:
        regular_file_size(path)
    except ValueError:
        return 0.0  # stage 1 then skips it with load_audio's reason
    try:
        return float(sf.info(str(path)).duration)
    except Exception:
        try:
            audio, rate, _channels = _decode(path)
        except AudioError:
            return 0.0
        return len(audio) / rate


APPLE_DOUBLE_MAGIC = b"\x00\x05\x16\x07"


def is_apple_double(path: str | os.PathLike) -> bool:
    """A macOS `._<name>` companion (resource fork and Finder data, not audio), which a copy to a non-Mac disk, a
    network share or a zip made on a Mac leaves beside every file: `._0001.wav` is taken for an utterance otherwise."""
    if not os.path.basename(path).startswith("._"):
        return False
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == APPLE_DOUBLE_MAGIC
    except OSError:
        return False


def list_audio(folder: str | os.PathLike) -> list[str]:
    """All audio files below `folder`, at any depth (symlinked folders too), sorted so listings agree across machines;
    macOS `._` companions are not audio and are passed over."""
    return sorted(p for p in walk_files(folder) if p.lower().endswith(AUDIO_EXTENSIONS) and not is_apple_double(p))
