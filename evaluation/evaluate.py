"""Score a folder of vocoded audio against a folder of ground truth, file by file.

Outputs in `output_dir`: `metrics.csv` (one row per utterance and system), `summary.json`
(means and the utterances each covers, counts, missing partners, failures, length mismatches,
optional baseline) and, with `plot`, one `plots/<name>.png` per utterance. Everything is written
atomically; a rerun first moves an earlier run's outputs to `earlier/<date-time>/`.
"""

from __future__ import annotations

import csv
import importlib
import io
import logging
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from evaluation.metrics import HIGHER_IS_BETTER, PitchTrack, align, all_metrics, log_mel, missing_packages, pesq_band, pitch_track
from processors.audio import AudioError, list_audio, load_audio, resample
from processors.mel import min_samples
from utils.config import REPO_ROOT, load_config
from utils.io import atomic_write_bytes, atomic_write_text, load_json, move_aside, probe_writable, save_json
from utils.text import first_few, plural

log = logging.getLogger(__name__)
DEFAULT_CONFIG = REPO_ROOT / "config/vocoder.json"  # the toolkit's mel, which the DiffWave recipe inherits
BASELINES = ("griffinlim",)
GRIFFIN_LIM_ITERS = 32
OUTPUTS = ("metrics.csv", "summary.json", "plots")  # what a run writes in output_dir; a rerun moves them aside


class EvaluationError(ValueError):
    """The evaluation cannot run at all (missing folder, nothing to match); one-line message."""


def _index(folder: str | os.PathLike) -> dict[str, str]:
    """Audio files keyed by their path below `folder` without the extension."""
    if not os.path.isdir(folder):
        raise EvaluationError(f"{folder}: folder does not exist")
    index: dict[str, str] = {}
    for path in list_audio(folder):
        key = Path(path).relative_to(folder).with_suffix("").as_posix()
        if key in index:
            raise EvaluationError(f"{folder}: two files for '{key}' ({index[key]}, {path})")
        index[key] = path
    return index


def match_files(ref_dir: str | os.PathLike, pred_dir: str | os.PathLike) -> tuple[list[tuple[str, str, str]], dict]:
    """(name, ref_path, pred_path) for names in both folders, and the names each folder lacks."""
    refs, preds = _index(ref_dir), _index(pred_dir)
    pairs = [(name, refs[name], preds[name]) for name in sorted(refs.keys() & preds.keys())]
    missing = {"pred": sorted(refs.keys() - preds.keys()), "ref": sorted(preds.keys() - refs.keys())}
    if not pairs:
        raise EvaluationError(f"no file names in common between {ref_dir} ({plural(len(refs), 'audio file')}) "
                              f"and {pred_dir} ({plural(len(preds), 'audio file')})")
    return pairs, missing


def griffin_lim(ref: np.ndarray, sample_rate: int, pre: Any, n_iter: int = GRIFFIN_LIM_ITERS) -> np.ndarray:
    """Vocode the project mel of `ref` with Griffin-Lim, sample-aligned with `ref`.

    Our mel frame t is centred on sample t*hop + hop/2 (reflect pad (n_fft-hop)/2, center=False)
    while librosa's center=True frame t is centred on t*hop, so the inverse is delayed by hop/2.
    """
    import librosa

    rate, hop = int(pre["sample_rate"]), int(pre["hop_size"])
    mel = log_mel(ref, sample_rate, pre)
    stft = librosa.feature.inverse.mel_to_stft(np.exp(mel), sr=rate, n_fft=int(pre["n_fft"]), power=1.0,
                                               fmin=float(pre.get("fmin", 0)), fmax=pre.get("fmax"))
    audio = librosa.griffinlim(stft, n_iter=n_iter, hop_length=hop, win_length=int(pre["win_size"]),
                               n_fft=int(pre["n_fft"]), center=True, pad_mode="reflect",
                               length=mel.shape[1] * hop - hop // 2, random_state=0)
    audio = np.concatenate([np.zeros(hop // 2, np.float32), audio.astype(np.float32)])
    return resample(audio, rate, sample_rate)


def _native_rate(path: str, default: int) -> int:
    import soundfile as sf

    try:
        return int(sf.info(path).samplerate)
    except Exception:  # formats soundfile cannot open are decoded by librosa later; assume the model rate
        return default


def _plot(path: Path, name: str, ref: np.ndarray, pred: np.ndarray, rate: int, pre: Any,
          tracks: tuple[PitchTrack, PitchTrack]) -> None:
    """GT and predicted mel side by side, F0 contours below; no pyplot, so no global state."""
    from matplotlib.figure import Figure

    mels = log_mel(ref, rate, pre), log_mel(pred, rate, pre)
    seconds = len(ref) / rate
    fig = Figure(figsize=(12, 6), layout="constrained")
    grid = fig.add_gridspec(2, 2)
    for col, (title, mel) in enumerate(zip(("ground truth", "predicted"), mels, strict=True)):
        ax = fig.add_subplot(grid[0, col])
        ax.imshow(mel, origin="lower", aspect="auto", extent=(0, seconds, 0, mel.shape[0]),
                  vmin=float(mels[0].min()), vmax=float(mels[0].max()))
        ax.set(title=f"{name}: {title} log-mel", xlabel="s", ylabel="mel bin")
    ax = fig.add_subplot(grid[1, :])
    for label, track in zip(("ground truth", "predicted"), tracks, strict=True):
        ax.plot(track.times, track.f0, label=label, linewidth=1.2)
    ax.set(title="F0 (pyin)", xlabel="s", ylabel="Hz", xlim=(0, seconds))
    ax.legend(loc="upper right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    atomic_write_bytes(path, buffer.getvalue())


def _score(name: str, ref_path: str, pred_path: str, rate: int, pre: Any, baseline: str | None,
           plot_dir: Path | None, downmixed: list[str]) -> tuple[dict[str, dict], bool]:
    """Metrics (and `length_diff`, pred minus ref samples) for one utterance per system, scored over the reference's
    length, and whether the prediction's length is off by more than one hop; warnings are logged once each, with the
    name and system. ValueError for a reference too short for even one mel frame (no metric is defined); an empty
    prediction scores as silence. A baseline that fails leaves the model's scores alone (its own are NaN). Files of
    several channels are averaged to mono and listed in `downmixed`."""
    hop = max(1, round(int(pre["hop_size"]) * rate / int(pre["sample_rate"])))
    ref = load_audio(ref_path, rate, keep_level=True, downmixed=downmixed)
    need = math.ceil(min_samples(pre) * rate / int(pre["sample_rate"]))
    if len(ref) < need:
        raise ValueError(f"too short ({len(ref)} samples; one mel frame needs {need} at {rate} Hz)")
    pred = load_audio(pred_path, rate, min_samples=0, keep_level=True, downmixed=downmixed)
    length_diff = len(pred) - len(ref)
    with _named_warnings(name):
        ref_aligned, pred = align(ref, pred, hop)
        ref_track, pred_track = pitch_track(ref_aligned, rate), pitch_track(pred, rate)
        scores = {"pred": {**all_metrics(ref_aligned, pred, rate, pre, tracks=(ref_track, pred_track)),
                           "length_diff": length_diff}}
        if plot_dir is not None:
            _plot(plot_dir / f"{name}.png", name, ref_aligned, pred, rate, pre, (ref_track, pred_track))
    if baseline == "griffinlim":
        scores[baseline] = _griffin_lim_scores(name, ref, rate, pre, hop, ref_track)
    return scores, abs(length_diff) > hop


@contextmanager
def _named_warnings(name: str, system: str | None = None) -> Iterator[None]:
    """The metrics' warnings, logged once each after the block with the utterance (and the system, for a baseline)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:  # also where scoring then fails: what led there is worth seeing
            for message in dict.fromkeys(str(w.message) for w in caught):
                log.warning("%s%s: %s", name, f" ({system})" if system else "", message)


def _griffin_lim_scores(name: str, ref: np.ndarray, rate: int, pre: Any, hop: int, ref_track: PitchTrack) -> dict:
    """The baseline's metrics; NaN (with a warning) where it fails, so its failure never drops the model's row."""
    try:
        with _named_warnings(name, "griffinlim"):
            vocoded = griffin_lim(ref, rate, pre)
            ref_gl, aligned = align(ref, vocoded, hop)
            return {**all_metrics(ref_gl, aligned, rate, pre, tracks=(ref_track, pitch_track(aligned, rate))),
                    "length_diff": len(vocoded) - len(ref)}
    except Exception as err:  # the baseline is a comparison, never a reason to drop an utterance
        log.warning("%s (griffinlim): not scored (%s: %s)", name, type(err).__name__, str(err).strip().splitlines()[0])
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        return {**dict.fromkeys(HIGHER_IS_BETTER, math.nan), "length_diff": None, "failed": reason}


def _mean(values: list[float | None]) -> float | None:
    """Mean over finite values; None when the metric is disabled or never defined."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _count(values: list[float | None]) -> int:
    """How many utterances a mean covers: its finite values."""
    return sum(v is not None and math.isfinite(v) for v in values)


def format_table(summary: dict) -> str:
    """Metrics as rows, systems (`model`, the baseline) as columns; what was scored, failed and unmatched below, and
    an `n` column per system (the utterances each mean covers) where a mean covers fewer than were scored."""
    missing = summary.get("disabled", missing_packages())  # as when it was scored (older summaries: as now)
    columns = {"model": (summary["means"], summary["n"])}
    if "baseline" in summary:
        columns[summary["baseline"]["method"]] = (summary["baseline"]["means"], summary["baseline"]["n"])
    counts = summary["counts"]
    show_n = any(n[m] != counts["scored"] for _, n in columns.values() for m in HIGHER_IS_BETTER if m not in missing)
    n_heads = [("n" if len(columns) == 1 else f"n({name})") for name in columns] if show_n else []
    lines = [f"{'metric':<15}{'better':<8}" + "".join(f"{n:>12}" for n in columns) + "".join(f"{h:>15}" for h in n_heads)]
    for metric, higher in HIGHER_IS_BETTER.items():
        row = "".join(f"{'-' if means[metric] is None else f'{means[metric]:.3f}':>12}" for means, _ in columns.values())
        row += "".join(f"{n[metric]:>15}" for _, n in columns.values()) if show_n else ""
        lines.append(f"{metric:<15}{'higher' if higher else 'lower':<8}{row}")
    notes = [f"{counts['scored']} scored, {counts['failed']} failed, {counts['unmatched']} unmatched"]
    if counts["length_mismatch"]:
        notes.append(f"{plural(counts['length_mismatch'], 'prediction')} off by more than one hop: zero-padded or "
                     "trimmed to the reference's length")
    baseline_failures = len(summary.get("baseline", {}).get("failed", {}))
    if baseline_failures:
        notes.append(f"{summary['baseline']['method']} failed on {plural(baseline_failures, 'utterance')} (see the log)")
    narrow = summary.get("pesq_band", {}).get("nb", 0)
    if narrow:
        notes.append(f"PESQ in narrow band (P.862.1 at 8 kHz) for {plural(narrow, 'utterance')} scored below 16 kHz, "
                     "wide band for the rest")
    notes.append("'-': disabled, undefined or failed")
    if show_n:
        notes.append("n: utterances a mean covers")
    lines.append(f"({'; '.join(notes)})")
    if missing:
        lines.append(f"disabled: {', '.join(missing)}, as {', '.join(missing.values())} "
                     f"{'is' if len(missing) == 1 else 'are'} not installed (pip install {' '.join(missing.values())})")
    return "\n".join(lines)


def summary_table(path: str | os.PathLike) -> str:
    """The table of a finished evaluation (its summary.json): the model and, when scored, the baseline."""
    return format_table(load_json(path))


def evaluate_dirs(ref_dir: str | os.PathLike, pred_dir: str | os.PathLike, output_dir: str | os.PathLike,
                  sample_rate: int | None = None, plot: bool = False, baseline: str | None = None,
                  pre: Any = None) -> dict:
    """Score every file of `pred_dir` against the same-named file of `ref_dir`.

    Audio is resampled to `sample_rate`, or to each reference's own rate; `pre` (mel settings,
    a config `preprocess` section) defaults to the toolkit's (config/vocoder.json). Returns the summary, which
    also lands in `summary.json`: `means` and `n` (the utterances each mean covers), `count` (scored), `counts`
    (scored, failed, unmatched, length_mismatch), `missing` (names absent from `pred` / from `ref`), `failed`
    (utterance -> why it was skipped), `length_mismatch` (utterance -> pred minus ref samples, beyond one hop) and,
    with a baseline, `baseline.means` and `baseline.n`.
    """
    if baseline is not None and baseline not in BASELINES:
        raise EvaluationError(f"unknown baseline '{baseline}' (choose from {', '.join(BASELINES)})")
    pre = pre if pre is not None else load_config(DEFAULT_CONFIG).preprocess
    if plot:
        try:
            importlib.import_module("matplotlib.figure")
        except ImportError as err:
            raise EvaluationError("--plot needs matplotlib, which is not installed: pip install matplotlib, "
                                  "or leave out --plot") from err
    pairs, missing = match_files(ref_dir, pred_dir)
    for side, names in missing.items():
        if names:
            log.warning("%s no partner in the %s folder: %s", plural(len(names), "file has", "files have"), side,
                        ", ".join(names[:10]))
    output_dir = Path(output_dir)
    try:
        probe_writable(output_dir)
    except OSError as err:
        raise EvaluationError(f"{output_dir}: cannot write the outputs there ({err.strerror or err})") from None
    earlier = move_aside(output_dir, [output_dir / f for f in OUTPUTS if (output_dir / f).exists()])
    if earlier:
        log.warning("moved the outputs of an earlier evaluation to %s", earlier)
    plot_dir = output_dir / "plots" if plot else None
    systems = ["pred", *([baseline] if baseline else [])]
    rows: list[dict] = []
    failed: dict[str, str] = {}
    baseline_failed: dict[str, str] = {}
    mismatched: dict[str, int] = {}
    pesq_bands = {"wb": 0, "nb": 0}  # utterances scored in each PESQ mode (their scoring rate decides)
    downmixed: list[str] = []
    for name, ref_path, pred_path in tqdm(pairs, desc="scoring", unit="utt", dynamic_ncols=True):
        log.debug("scoring %s", name)
        rate = sample_rate or _native_rate(ref_path, int(pre["sample_rate"]))
        try:
            scores, mismatch = _score(name, ref_path, pred_path, rate, pre, baseline, plot_dir, downmixed)
        except Exception as err:  # one bad utterance is skipped and listed, never the end of the batch
            lines = str(err).strip().splitlines() or [""]
            reason = lines[0] if isinstance(err, (AudioError, ValueError)) else f"{type(err).__name__}: {lines[0]}"
            log.warning("%s: skipped (%s)", name, reason)
            failed[name] = reason
            continue
        pesq_bands[pesq_band(rate)[0]] += 1
        if mismatch:
            mismatched[name] = scores["pred"]["length_diff"]
        if baseline and "failed" in scores[baseline]:
            baseline_failed[name] = scores[baseline].pop("failed")
        rows += [{"name": name, "system": system, **scores[system]} for system in systems]
    if downmixed:  # channels in opposite phase cancel: a stereo file may score as silence
        log.warning("%s of several channels averaged to mono for scoring: %s", plural(len(downmixed), "file"),
                    first_few(downmixed))
    if not rows:
        first = next(iter(failed.items()))
        raise EvaluationError(f"none of the {plural(len(pairs), 'matched utterance')} could be scored "
                              f"(e.g. {first[0]}: {first[1]})")

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["name", "system", *HIGHER_IS_BETTER, "length_diff"],
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None or (isinstance(v, float) and math.isnan(v)) else v
                         for k, v in row.items()})
    atomic_write_text(output_dir / "metrics.csv", buffer.getvalue())

    values = {s: {m: [r[m] for r in rows if r["system"] == s] for m in HIGHER_IS_BETTER} for s in systems}
    means = {s: {m: _mean(v) for m, v in values[s].items()} for s in systems}
    n = {s: {m: _count(v) for m, v in values[s].items()} for s in systems}
    scored = len(rows) // len(systems)
    summary = {
        "ref_dir": str(ref_dir), "pred_dir": str(pred_dir), "sample_rate": sample_rate, "count": scored,
        "counts": {"scored": scored, "failed": len(failed), "unmatched": len(missing["pred"]) + len(missing["ref"]),
                   "length_mismatch": len(mismatched)},
        "means": means["pred"], "n": n["pred"], "missing": missing, "failed": failed, "length_mismatch": mismatched,
        "disabled": missing_packages(), "pesq_band": pesq_bands, "downmixed": downmixed,
    }
    if baseline:
        summary["baseline"] = {"method": baseline, "means": means[baseline], "n": n[baseline], "failed": baseline_failed}
    save_json(output_dir / "summary.json", summary)
    print(format_table(summary))
    return summary
