"""Stage 3's three modes: vocode a processed dataset's test split, a folder of mels, or a folder of audio.

Bad items are skipped, named in `<output>/skipped.txt`, and never stop the batch.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models.vocoders.diffusion.diffusion_vocoder_inference import Vocoder
from processors.audio import AudioError, list_audio, load_audio
from processors.feature_store import SETTINGS_FILE, feature_paths, load_entries, load_items, settings_differ
from processors.mel import mel_spectrogram, min_samples
from processors.mel_conventions import MelConverter
from utils.io import (
    atomic_write_text,
    load_npy,
    move_aside,
    probe_writable,
    remove_stale_temps,
    safe_name,
    save_wav,
    unique_names,
)
from utils.text import first_few, plural

log = logging.getLogger(__name__)
MODES = ("infer_from_dataset", "infer_from_feature", "infer_from_audio")


class InputError(ValueError):
    """An input folder or file that cannot be vocoded; the message names it."""


def check_mel(mel: np.ndarray, n_mel: int, source: str) -> torch.Tensor:
    """A (n_mel, frames) float32 tensor, or InputError naming the file and the problem (checked after the cast to
    float32 too: a float64 beyond its range would become inf)."""
    if not (np.issubdtype(mel.dtype, np.floating) or np.issubdtype(mel.dtype, np.integer)):  # complex: no silent .real
        raise InputError(f"{source}: mel must be a real (float or integer) array, got dtype {mel.dtype}")
    if mel.ndim == 3 and mel.shape[0] == 1:
        mel = mel[0]
    if mel.ndim != 2:
        raise InputError(f"{source}: mel must be 2-D (n_mel, frames), got shape {mel.shape}")
    if mel.size == 0:  # before the orientation: (0, n_mel) is no mel to transpose
        raise InputError(f"{source}: mel has zero frames (shape {mel.shape})")
    if mel.shape[0] != n_mel:
        if mel.shape[1] == n_mel:
            log.warning("%s: mel stored as (frames, n_mel) %s; transposed", source, mel.shape)
            mel = mel.T
        else:
            raise InputError(f"{source}: mel has {mel.shape[0]} bins, the model expects n_mel={n_mel} (shape {mel.shape})")
    if not np.all(np.isfinite(mel)):
        raise InputError(f"{source}: mel contains NaN or inf")
    with np.errstate(over="ignore"):  # float64 beyond float32's range: refused below, not a raw numpy warning
        single = np.ascontiguousarray(mel, dtype=np.float32)
    if not np.all(np.isfinite(single)):
        raise InputError(f"{source}: mel values overflow float32 (largest magnitude {np.abs(mel).max():.3g})")
    return torch.from_numpy(single)


def check_audio(audio: np.ndarray, samples: int, source: str) -> np.ndarray:
    """Ground truth as float32 cut to its mel's `samples`, or InputError: stage 4 scores the prediction against it."""
    if not np.issubdtype(audio.dtype, np.floating):
        raise InputError(f"{source}: audio must be a float array, got dtype {audio.dtype}")
    if audio.ndim != 1:
        raise InputError(f"{source}: audio must be 1-D (samples), got shape {audio.shape}")
    if len(audio) < samples:
        raise InputError(f"{source}: audio has {len(audio)} samples, its mel's frames * hop_size need {samples}")
    audio = audio[:samples]
    if not np.all(np.isfinite(audio)):
        raise InputError(f"{source}: audio contains NaN or inf")
    return np.asarray(audio, dtype=np.float32)


def _write_outputs(vocoder: Vocoder, items: list[tuple[str, torch.Tensor, np.ndarray | None]], out: Path) -> int:
    """Vocode (name, mel, ground truth) items; write pred/ and gt/ wavs atomically as batches finish."""
    rate = int(vocoder.cfg.preprocess.sample_rate)
    bar = tqdm(total=len(items), desc="vocoding", unit="utt", dynamic_ncols=True)

    def write(indices: list[int], audios: list[np.ndarray]) -> None:
        for i, audio in zip(indices, audios, strict=True):
            name, _mel, truth = items[i]
            save_wav(out / "pred" / f"{name}.wav", audio, rate)
            if truth is not None:
                save_wav(out / "gt" / f"{name}.wav", truth[: len(audio)], rate)
        bar.update(len(indices))

    vocoder([m for _, m, _ in items], [n for n, _, _ in items], on_batch=write)
    bar.close()
    return len(items)


def named_outputs(items: list[tuple[str, torch.Tensor, Any]]) -> list[tuple[str, torch.Tensor, Any]]:
    """Items renamed by the one output-naming rule: inputs whose stems sanitise alike still get their own wav."""
    seen: dict[str, int] = {}
    identities = []
    for stem, _mel, _truth in items:  # the stem and its occurrence: stable across runs of the same inputs
        identities.append((stem, f"{stem}#{seen.get(stem, 0)}"))
        seen[stem] = seen.get(stem, 0) + 1
    names = unique_names(identities)
    for (stem, _mel, _truth), name in zip(items, names, strict=True):
        if name != safe_name(stem):
            log.warning("%s: written as %s.wav: its name collides with another input's", stem, name)
    return [(name, mel, truth) for name, (_stem, mel, truth) in zip(names, items, strict=True)]


def clear_stale_outputs(out: Path, items: list[tuple[str, torch.Tensor, Any]]) -> int:
    """Move the pred/ and gt/ wavs this run will not write to `earlier/`, so stage 4 never scores an earlier run's
    output of an input skipped now or gone, and nothing finished is lost; this run's own wavs stay until rewritten,
    so a killed rerun loses nothing valid."""
    keep = {"pred": {name for name, _, _ in items}, "gt": {name for name, _, truth in items if truth is not None}}
    stale = [wav for sub, names in keep.items() if (out / sub).is_dir()
             for wav in sorted((out / sub).glob("*.wav")) if wav.stem not in names and not wav.is_dir()]
    if not stale:
        return 0
    aside = move_aside(out, stale)
    log.warning("moved %s of an earlier run that this run does not write (inputs skipped now or not given) to %s: %s",
                plural(len(stale), "wav"), aside, ", ".join(str(w.relative_to(out)) for w in stale[:10]))
    return len(stale)


def check_writable(folder: Path) -> None:
    """Refuse an output folder that cannot be written before anything is vocoded, not after the first batch."""
    try:
        probe_writable(folder)
    except OSError as err:
        raise InputError(f"{folder}: cannot write the outputs there ({err.strerror or err})") from None


def record_skipped(out: Path, skipped: list[str]) -> None:
    """`skipped.txt` lists this run's skipped inputs, and exists only when there are some."""
    if skipped:
        atomic_write_text(out / "skipped.txt", "".join(f"{s}\n" for s in skipped))
    else:
        (out / "skipped.txt").unlink(missing_ok=True)
    for reason in skipped:
        log.warning("skipped %s", reason)


def dataset_items(cfg: Any, datasets: list[str], skipped: list[str]) -> list[tuple[str, torch.Tensor, np.ndarray]]:
    """The test split's (name, mel, ground truth); an utterance whose mel or audio fails its check is listed. A dataset
    without metadata is named with the datasets the experiment was trained on (`--infer_datasets "a,b"` arrives as
    one name)."""
    try:
        entries = load_entries(cfg, "valid", datasets, missing=skipped)
    except FileNotFoundError as err:
        comma = "; --infer_datasets takes space-separated names" if any("," in d for d in datasets) else ""
        raise InputError(f"{err}{comma} (the experiment was trained on {' '.join(cfg.dataset)})") from None
    n_mel, hop = int(cfg.preprocess.n_mel), int(cfg.preprocess.hop_size)
    items = []
    for entry in entries:
        audio_path = feature_paths(cfg.preprocess.processed_dir, entry)[1]
        for name, mel, audio in load_items(cfg, "valid", entries=[entry], qualified=len(datasets) > 1, skipped=skipped,
                                           check=lambda mel, source: check_mel(mel, n_mel, source)):
            try:
                items.append((name, mel, check_audio(audio, mel.shape[1] * hop, str(audio_path))))
            except InputError as err:
                skipped.append(str(err))
    return items


def feature_items(cfg: Any, folder: Path, skipped: list[str],
                  convert: MelConverter | None = None) -> list[tuple[str, torch.Tensor, None]]:
    """Mels of a folder; `convert` checks each against the mel contract and undoes other conventions."""
    if folder.is_file():
        raise InputError(f"{folder}: a file; vocode a folder of .npy mels (put this one in a folder of its own)")
    mel_dir = folder / "mels" if (folder / "mels").is_dir() else folder
    found = sorted(p for p in mel_dir.iterdir() if not p.is_dir()) if mel_dir.is_dir() else []
    files = [p for p in found if p.suffix.lower() == ".npy"]
    if not files:
        raise InputError(f"{folder}: no mel files (expected {folder}/mels/*.npy)")
    record = (mel_dir.parent if mel_dir.name == "mels" else mel_dir) / SETTINGS_FILE  # a stage 1 dataset folder's
    differ = settings_differ(record, cfg.preprocess, "the model's")
    if differ:  # same shapes, another rate or hop: vocoded to wrong audio without a word
        raise InputError(f"{record}: these mels were made with {differ}; vocode them with an experiment trained on "
                         "those settings, or make them anew from the audio (infer_from_audio)")
    skipped += [f"{p}: not a .npy mel ({p.suffix or 'no extension'}): unsupported format" for p in found
                if p not in files and not p.name.startswith(".")]  # a hidden file (.DS_Store) is not offered as a mel
    items, n_mel = [], int(cfg.preprocess.n_mel)
    for path in files:
        try:
            mel = check_mel(load_npy(path), n_mel, str(path))
            if mel.shape[1] == n_mel:  # stage 1's own features are (n_mel, frames) by contract; these may not be
                log.warning("%s: square mel %s: its orientation is ambiguous; assumed (n_mel, frames)", path,
                            tuple(mel.shape))
            items.append((path.stem, convert(mel, str(path)) if convert else mel, None))
        except (InputError, ValueError, OSError) as err:
            skipped.append(str(err))
    return items


def audio_items(cfg: Any, folder: Path, skipped: list[str], out: Path) -> list[tuple[str, torch.Tensor, np.ndarray]]:
    """The audio below `folder` (or the one file it names) with its mels; not what this stage wrote there (an output
    folder inside the input folder fed every run's outputs back in, more at each run)."""
    own = out.resolve()
    if folder.is_file():
        files, base = [str(folder)], folder.parent
    else:
        files = [f for f in list_audio(folder) if not Path(f).resolve().is_relative_to(own)] if folder.is_dir() else []
        base = folder
    if not files:
        raise InputError(f"{folder}: no audio files (wav, flac, ogg, mp3, ...) found")
    pre = cfg.preprocess
    items, downmixed = [], []
    for path in files:
        try:
            audio = load_audio(path, int(pre.sample_rate), min_samples=min_samples(pre), downmixed=downmixed)
        except AudioError as err:
            skipped.append(str(err))
            continue
        items.append((str(Path(path).relative_to(base).with_suffix("")), mel_spectrogram(audio, pre), audio))
    if downmixed:
        log.info("%s downmixed to mono (channels averaged): %s", plural(len(downmixed), "input"), first_few(downmixed))
    return items


def run_inference(vocoder: Vocoder, mode: str, output_dir: str | Path, datasets: list[str] | None = None,
                  feature_dir: str | None = None, audio_dir: str | None = None, convert: MelConverter | None = None) -> int:
    """Vocode everything the mode names into `output_dir`; returns the number of wavs written."""
    out, skipped, cfg = Path(output_dir), [], vocoder.cfg
    start = time.time()
    for sub in ("pred",) if mode == "infer_from_feature" else ("pred", "gt"):  # features bring no ground truth
        check_writable(out / sub)
    for sub in ("pred", "gt"):
        remove_stale_temps(out / sub)
    if mode == "infer_from_dataset":
        items = dataset_items(cfg, list(dict.fromkeys(datasets or cfg.dataset)), skipped)  # each dataset once
    elif mode == "infer_from_feature":
        items = feature_items(cfg, Path(feature_dir or ""), skipped, convert)
    elif mode == "infer_from_audio":
        items = audio_items(cfg, Path(audio_dir or ""), skipped, out)
    else:
        raise InputError(f"unknown infer_mode '{mode}': choose one of {', '.join(MODES)}")
    items = named_outputs(items)
    clear_stale_outputs(out, items)
    record_skipped(out, skipped)
    written = _write_outputs(vocoder, items, out) if items else 0
    if not written:
        where = f"; reasons in {out / 'skipped.txt'}" if skipped else ""
        raise InputError(f"{mode}: nothing was vocoded, {len(skipped)} inputs skipped{where}")
    seconds = sum(m.shape[-1] for _, m, _ in items) * vocoder.hop / int(cfg.preprocess.sample_rate)
    elapsed = time.time() - start
    log.info("%s: %s written to %s, %d skipped; %.1f s of audio in %.1f s (RTF %.2f) with the %s sampler (%s)",
             mode, plural(written, "wav"), out / "pred", len(skipped), seconds, elapsed, elapsed / max(seconds, 1e-9),
             vocoder.sampler, plural(vocoder.plan.steps, "step"))
    return written
