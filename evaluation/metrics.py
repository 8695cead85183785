"""Objective vocoder metrics on aligned mono float32 signals.

Every metric is a pure function `(ref, pred, sample_rate[, pre]) -> float`. Conventions:
- NaN (with a warning) means "undefined for this input", e.g. a silent reference;
- None (with one warning per process) means "metric disabled", i.e. its optional package
  (`pesq`, `pystoi`) is not installed.
Callers align the signals first with `align`.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable
from functools import cache
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.fft import dct

from processors.audio import resample
from processors.mel import mel_spectrogram

SILENCE_PEAK = 1e-4  # about -80 dBFS: below this a reference carries no signal to score against
# C2 to a soprano's high C (C6, 1046.5 Hz) and its vibrato, with room above: pyin tracks a pitch near or above fmax an
# octave low (a top of 1050 Hz took every C6 for C5, so a B5 sung as a C6 scored 1100 cents instead of 100)
F0_MIN, F0_MAX = 65.0, 1400.0
# (n_fft, hop, win), Hann windows: Parallel WaveGAN's (Yamamoto et al. 2020, table 1), auraloss's defaults, with which
# BigVGAN and others report M-STFT
MSTFT_RESOLUTIONS = ((1024, 120, 600), (2048, 240, 1200), (512, 50, 240))
MSTFT_SHORTEST = max(n_fft for n_fft, _, _ in MSTFT_RESOLUTIONS) // 2 + 1  # the largest STFT's reflect padding fits
MCD_ORDER = 24  # cepstral coefficients 1..24 (c0, the energy, is left out as usual)
MCD_SCALE = 10.0 / math.log(10.0) * math.sqrt(2.0)
SI_SNR_CAP_DB = 100.0
PITCH_KEYS = ("f0_rmse_cents", "vuv_f1", "periodicity")
OPTIONAL_PACKAGES = {"pesq": "pesq", "stoi": "pystoi"}  # metric -> the package it needs
# The floor of the MOS-LQO `pesq` returns: P.862.2 (wide band) maps raw PESQ x to 0.999 + 4 / (1 + exp(-1.3669 x +
# 3.8224)), P.862.1 (narrow band) to 0.999 + 4 / (1 + exp(-1.4945 x + 4.6607)); both tend to 0.999 as x falls (x is
# not clipped at -0.5: garbled audio scores 1.02).
PESQ_FLOOR = 0.999

# Metric name -> True when higher is better; the order the CSV and table use.
HIGHER_IS_BETTER = {
    "pesq": True, "stoi": True, "mstft": False, "mel_l1": False, "mcd": False,
    "f0_rmse_cents": False, "vuv_f1": True, "periodicity": False, "si_snr": True,
}


def _np(audio: Any) -> np.ndarray:
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    return np.asarray(audio, dtype=np.float32).reshape(-1)


def _silent(ref: np.ndarray) -> bool:
    """True (with a warning) when the reference is silent, so the metric returns NaN.

    One message for all metrics, so a caller collecting warnings per utterance shows it once.
    """
    if np.abs(ref).max(initial=0.0) < SILENCE_PEAK:
        warnings.warn("reference is silent: metrics against it are undefined (NaN)", stacklevel=3)
        return True
    return False


def _score_of_silence(ref: np.ndarray, pred: np.ndarray, metric: str, worst: float,
                      of_itself: Callable[[], float | None]) -> float | None:
    """Where `pred` is silent against a non-silent `ref`: `worst` (with a warning), so silence never scores better
    than bad audio by dropping out of the mean; NaN where the metric is undefined for `ref` anyway (`of_itself`,
    `ref` scored against itself, is NaN: too short), as it would be for a perfect prediction. None otherwise."""
    if not np.abs(pred).max(initial=0.0) < SILENCE_PEAK <= np.abs(ref).max(initial=0.0):
        return None
    if not math.isfinite(of_itself() or math.nan):
        return math.nan
    warnings.warn(f"prediction is silent: {metric} gets its worst value ({worst:.3g})", stacklevel=3)
    return worst


def missing_packages() -> dict[str, str]:
    """Metric -> its optional package, for the packages that cannot be imported (those metrics show as None)."""
    missing = {}
    for metric, package in OPTIONAL_PACKAGES.items():
        try:
            importlib.import_module(package)
        except ImportError:
            missing[metric] = package
    return missing


@cache
def _optional(module: str) -> Any:
    """Import an optional metric package once; warn once when it is missing."""
    try:
        return __import__(module)
    except ImportError:
        warnings.warn(f"package '{module}' is not installed: its metric is disabled", stacklevel=3)
        return None


def align(ref: Any, pred: Any, hop: int) -> tuple[np.ndarray, np.ndarray]:
    """Both over the reference's length, so a truncated prediction cannot score as if complete: one shorter by more
    than one hop is zero-padded (its missing audio counts as silence; with a warning), a longer one trimmed (with a
    warning beyond one hop). Within one hop (a mel's partial last frame) both are cut to the shorter."""
    ref, pred = _np(ref), _np(pred)
    if abs(len(ref) - len(pred)) > hop:
        fix = "zero-padded" if len(pred) < len(ref) else "trimmed"
        warnings.warn(f"lengths differ by more than one hop: ref {len(ref)}, pred {len(pred)} samples; "
                      f"the prediction is {fix} to the reference's length", stacklevel=2)
        if len(pred) < len(ref):
            return ref, np.pad(pred, (0, len(ref) - len(pred)))
        return ref, pred[: len(ref)]
    n = min(len(ref), len(pred))
    return ref[:n], pred[:n]


def pesq_band(sample_rate: int) -> tuple[str, int]:
    """PESQ's mode and rate for audio at `sample_rate`: wide band (P.862.2) at 16 kHz where the audio reaches 8 kHz,
    narrow band (P.862.1) at 8 kHz below that. Wide band on upsampled 8 kHz audio scored a reference with nothing
    above 4 kHz, a figure no standard defines."""
    return ("wb", 16000) if sample_rate >= 16000 else ("nb", 8000)


def pesq_mos(ref: np.ndarray, pred: np.ndarray, sample_rate: int) -> float | None:
    """PESQ (MOS-LQO, about 1.0-4.64 in wide band, 4.55 in narrow band) in `pesq_band`'s mode."""
    module = _optional(OPTIONAL_PACKAGES["pesq"])
    if module is None:
        return None
    if _silent(ref):
        return math.nan
    silence = _score_of_silence(ref, pred, "pesq", PESQ_FLOOR, lambda: pesq_mos(ref, ref, sample_rate))
    if silence is not None:
        return silence
    mode, rate = pesq_band(sample_rate)
    try:
        return float(module.pesq(rate, resample(ref, sample_rate, rate), resample(pred, sample_rate, rate), mode))
    except Exception as err:  # pesq raises on inputs it finds no speech in
        warnings.warn(f"pesq failed ({type(err).__name__}: {err}): NaN", stacklevel=2)
        return math.nan


def _stoi_shortest() -> float:
    """Seconds of non-silent reference pystoi needs: N frames of N_FRAME samples at half overlap, at its rate FS."""
    consts = importlib.import_module("pystoi.stoi")  # the module, which pystoi's `stoi` function hides
    return ((consts.N - 1) * consts.N_FRAME // 2 + consts.N_FRAME) / consts.FS


def stoi(ref: np.ndarray, pred: np.ndarray, sample_rate: int) -> float | None:
    """Short-time objective intelligibility (0-1); pystoi resamples to 10 kHz itself.

    NaN (with a warning) where the reference has too little non-silent audio: pystoi then returns 1e-5, which
    would enter the mean as a near-worst score for what may be a perfect prediction.
    """
    module = _optional(OPTIONAL_PACKAGES["stoi"])
    if module is None:
        return None
    if _silent(ref):
        return math.nan
    silence = _score_of_silence(ref, pred, "stoi", 0.0, lambda: stoi(ref, ref, sample_rate))
    if silence is not None:
        return silence
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            score = float(module.stoi(ref.astype(np.float64), pred.astype(np.float64), sample_rate, extended=False))
        except ValueError:  # under one of its frames once resampled and rid of silence, pystoi fails on an axis
            score = math.nan
    if math.isnan(score) or any("Not enough STFT frames" in str(w.message) for w in caught):
        warnings.warn(f"stoi undefined (NaN): shorter than {_stoi_shortest():.2f} s of non-silent audio", stacklevel=2)
        return math.nan
    return score


def _magnitude(audio: np.ndarray, n_fft: int, hop: int, win: int) -> torch.Tensor:
    spec = torch.stft(torch.from_numpy(audio), n_fft, hop, win, torch.hann_window(win), return_complex=True)
    return spec.abs().pow(2).clamp(min=1e-7).sqrt()


def mstft(ref: np.ndarray, pred: np.ndarray, sample_rate: int) -> float:
    """Multi-resolution STFT distance: spectral convergence + log-magnitude L1, averaged over
    MSTFT_RESOLUTIONS (the auxiliary loss of Parallel WaveGAN, with its resolutions, used here as a metric).

    NaN (with a warning) for audio the largest STFT's reflect padding does not fit.
    """
    if _silent(ref):
        return math.nan
    if len(ref) < MSTFT_SHORTEST:
        warnings.warn(f"mstft undefined (NaN): shorter than {MSTFT_SHORTEST} samples", stacklevel=2)
        return math.nan
    total = 0.0
    for n_fft, hop, win in MSTFT_RESOLUTIONS:
        a, b = _magnitude(ref, n_fft, hop, win), _magnitude(pred, n_fft, hop, win)
        total += float(torch.linalg.norm(a - b) / torch.linalg.norm(a))
        total += float((a.log() - b.log()).abs().mean())
    return total / len(MSTFT_RESOLUTIONS)


def log_mel(audio: np.ndarray, sample_rate: int, pre: Any) -> np.ndarray:
    """The project's log-mel, at the config's rate (the rate the mel settings are defined for)."""
    return mel_spectrogram(resample(audio, sample_rate, int(pre["sample_rate"])), pre).numpy()


def mel_l1(ref: np.ndarray, pred: np.ndarray, sample_rate: int, pre: Any) -> float:
    """Mean absolute difference of natural-log mel magnitudes (processors.mel)."""
    if _silent(ref):
        return math.nan
    return float(np.abs(log_mel(ref, sample_rate, pre) - log_mel(pred, sample_rate, pre)).mean())


def mel_cepstra(log_mel_frames: np.ndarray, order: int) -> np.ndarray:
    """Cepstral coefficients 1..`order` (rows) of each frame (column) of a natural-log mel, on the scale the MCD constant
    assumes: a frame's log mel at the M band centres, read as ln|H(w)| = c_0 + sum_k c_k cos(k w) on the warped axis
    (SPTK's convention), gives c_k = (2/M) sum_m x_m cos(pi k (m + 1/2) / M), the orthonormal DCT-II times sqrt(2/M).

    On that scale 10/ln(10) * sqrt(2 * sum_k (c_k - c'_k)^2) is the RMS difference in dB of the two log spectra, less
    their mean (c_0) and smoothed to `order` coefficients; the orthonormal DCT alone is sqrt(M/2) times larger, which
    made a figure in no unit that grew with n_mel (x7.1 at 100 mels)."""
    n_mel = log_mel_frames.shape[0]
    return dct(log_mel_frames, type=2, norm="ortho", axis=0)[1 : order + 1] * math.sqrt(2.0 / n_mel)


def mcd(ref: np.ndarray, pred: np.ndarray, sample_rate: int, pre: Any) -> float:
    """Mel cepstral distortion in dB over cepstra 1..MCD_ORDER (c_0, the level, left out), without DTW (the signals
    are aligned): per frame 10/ln(10) * sqrt(2 * sum_k (c_k - c'_k)^2), averaged over all frames.

    Cepstra come from the project's log mel (`mel_cepstra`), not from SPTK's mel-cepstral analysis (all-pass warping
    alpha, a WORLD or periodogram envelope) that pymcd or ESPnet use, and no DTW nor silence removal is applied, so
    compare the figures with those only as to order of magnitude.
    """
    if _silent(ref):
        return math.nan
    order = min(MCD_ORDER, int(pre["n_mel"]) - 1)
    c_ref = mel_cepstra(log_mel(ref, sample_rate, pre), order)
    c_pred = mel_cepstra(log_mel(pred, sample_rate, pre), order)
    return float(MCD_SCALE * np.sqrt(((c_ref - c_pred) ** 2).sum(axis=0)).mean())


def si_snr(ref: np.ndarray, pred: np.ndarray, sample_rate: int) -> float:
    """Scale-invariant SNR in dB, within +-SI_SNR_CAP_DB: identical signals stay finite, and nothing scores below a
    silent (or orthogonal) prediction's -SI_SNR_CAP_DB."""
    if _silent(ref):
        return math.nan
    ref64, pred64 = ref.astype(np.float64) - ref.mean(), pred.astype(np.float64) - pred.mean()
    target = (pred64 @ ref64) / (ref64 @ ref64) * ref64
    target_energy = float(target @ target)
    noise_energy = float((pred64 - target) @ (pred64 - target))
    if target_energy == 0.0:  # pred orthogonal to (or silent against) the reference
        return -SI_SNR_CAP_DB
    ratio = target_energy / max(noise_energy, target_energy * 10 ** (-SI_SNR_CAP_DB / 10))
    return max(-SI_SNR_CAP_DB, 10.0 * math.log10(ratio))


class PitchTrack(NamedTuple):
    """pyin output: f0 in Hz (NaN where unvoiced), voiced flags, voicing probability, frame times."""

    f0: np.ndarray
    voiced: np.ndarray
    probability: np.ndarray
    times: np.ndarray


def pitch_track(audio: np.ndarray, sample_rate: int, fmin: float = F0_MIN, fmax: float = F0_MAX) -> PitchTrack:
    """librosa pyin at a 10 ms hop, with a frame long enough for two periods of fmin; fmax at most the Nyquist frequency."""
    import librosa

    fmax = min(fmax, sample_rate / 2)
    hop = max(1, round(sample_rate * 0.01))
    frame_length = 2 * 2 ** math.ceil(math.log2(2 * sample_rate / fmin + 2))
    audio = audio if len(audio) >= frame_length else np.pad(audio, (0, frame_length - len(audio)))
    f0, voiced, prob = librosa.pyin(audio, fmin=fmin, fmax=fmax, sr=sample_rate, frame_length=frame_length,
                                    hop_length=hop)
    return PitchTrack(f0, voiced, prob, np.arange(len(f0)) * hop / sample_rate)


def pitch_scores(ref: PitchTrack, pred: PitchTrack) -> dict[str, float]:
    """F0 RMSE in cents on frames voiced in both, V/UV F1 (reference voiced = positive), and
    periodicity error: RMSE between the two pyin voicing probabilities over all frames."""
    n = min(len(ref.f0), len(pred.f0))
    rv, pv = ref.voiced[:n].astype(bool), pred.voiced[:n].astype(bool)
    both = rv & pv
    if both.any():
        cents = 1200.0 * np.log2(pred.f0[:n][both] / ref.f0[:n][both])
        f0_rmse = float(np.sqrt(np.mean(cents**2)))
    else:
        f0_rmse = math.nan
    tp, fp, fn = int(both.sum()), int((~rv & pv).sum()), int((rv & ~pv).sum())
    vuv_f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
    if not both.any():
        also = " and V/UV F1 (no frame is voiced in either)" if math.isnan(vuv_f1) else ""
        warnings.warn(f"no frame is voiced in both signals: F0 RMSE{also} undefined (NaN)", stacklevel=2)
    periodicity = float(np.sqrt(np.mean((ref.probability[:n] - pred.probability[:n]) ** 2)))
    return {"f0_rmse_cents": f0_rmse, "vuv_f1": vuv_f1, "periodicity": periodicity}


def f0_metrics(ref: np.ndarray, pred: np.ndarray, sample_rate: int,
               fmin: float = F0_MIN, fmax: float = F0_MAX) -> dict[str, float]:
    """F0 RMSE (cents), V/UV F1 and periodicity error from pyin on both signals."""
    if _silent(ref):
        return dict.fromkeys(PITCH_KEYS, math.nan)
    return pitch_scores(pitch_track(ref, sample_rate, fmin, fmax), pitch_track(pred, sample_rate, fmin, fmax))


def all_metrics(ref: np.ndarray, pred: np.ndarray, sample_rate: int, pre: Any,
                tracks: tuple[PitchTrack, PitchTrack] | None = None) -> dict[str, float | None]:
    """Every metric, keyed and ordered as HIGHER_IS_BETTER; `tracks` reuses pyin output."""
    ref, pred = _np(ref), _np(pred)
    if tracks is None:
        pitch = f0_metrics(ref, pred, sample_rate)
    else:
        pitch = dict.fromkeys(PITCH_KEYS, math.nan) if _silent(ref) else pitch_scores(*tracks)
    return {
        "pesq": pesq_mos(ref, pred, sample_rate),
        "stoi": stoi(ref, pred, sample_rate),
        "mstft": mstft(ref, pred, sample_rate),
        "mel_l1": mel_l1(ref, pred, sample_rate, pre),
        "mcd": mcd(ref, pred, sample_rate, pre),
        **pitch,
        "si_snr": si_snr(ref, pred, sample_rate),
    }


def cheap_metrics(ref: Any, pred: Any, pre: Any) -> dict[str, float]:
    """Fast metrics for the trainer's eval points: log-mel L1, M-STFT, and PESQ when installed.

    `ref` and `pred` (numpy or torch, at pre.sample_rate) are aligned here; a missing `pesq`
    package drops its key so every value can go straight to a scalar logger.
    """
    ref, pred = align(ref, pred, int(pre["hop_size"]))
    sample_rate = int(pre["sample_rate"])
    out = {"mel_l1": mel_l1(ref, pred, sample_rate, pre), "mstft": mstft(ref, pred, sample_rate)}
    score = pesq_mos(ref, pred, sample_rate)
    if score is not None:
        out["pesq"] = score
    return out
