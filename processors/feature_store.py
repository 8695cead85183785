"""The feature store: where stage 1 writes each utterance's (mel, audio) features, and how the
later stages read them back.

`feature_paths` names the files; training, the TensorBoard evaluation, schedule search and
stage 3's dataset mode read them through `load_entries` and `load_items`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from processors.mel import mel_settings, mel_spectrogram
from utils import file_lock
from utils.config import ConfigError
from utils.io import load_json, load_npy, npy_shape, safe_name, save_json
from utils.text import plural

log = logging.getLogger(__name__)
Item = tuple[str, Tensor, np.ndarray]
SETTINGS_FILE = "features.json"
LOCK_FILE = ".features.lock"  # shared by the trainings reading a dataset's features, exclusive while stage 1 remakes them
SETTING_NAMES = ("sample_rate", "n_fft", "hop_size", "win_size", "n_mel", "fmin", "fmax")


def feature_paths(processed_dir: str | os.PathLike, entry: dict) -> tuple[Path, Path]:
    """Where an entry's (mel, audio) features live: found through its own `Dataset` field.

    Names are sanitised, so a Uid such as `../x` from a corpus listing stays inside the folder.
    """
    folder, name = os.path.join(processed_dir, safe_name(entry["Dataset"])), f"{safe_name(entry['Uid'])}.npy"
    return Path(folder, "mels", name), Path(folder, "audios", name)  # one Path each: run per entry on every rerun


def features_done(pre: Any, entry: dict) -> bool:
    """Both files complete, from their headers alone: float32 audio (samples,), mel (n_mel, samples // hop).

    A zero-byte, truncated or foreign file is not done, so stage 1 makes it again.
    """
    mel_path, audio_path = feature_paths(pre["processed_dir"], entry)
    mel, audio = npy_shape(mel_path), npy_shape(audio_path)
    if mel is None or audio is None or mel[1] != np.float32 or audio[1] != np.float32 or len(audio[0]) != 1:
        return False
    return mel[0] == (int(pre["n_mel"]), audio[0][0] // int(pre["hop_size"]))


def feature_settings(pre: Any) -> dict:
    """The settings the features are made with, as stage 1 records them beside the features."""
    return _explicit_fmax(dict(zip(SETTING_NAMES, mel_settings(pre), strict=True)))


def _explicit_fmax(settings: dict) -> dict:
    """fmax null is the Nyquist frequency (librosa's default): the same features as fmax sample_rate / 2."""
    fmax = settings["fmax"]
    return {**settings, "fmax": float(settings["sample_rate"]) / 2 if fmax is None else float(fmax)}


def recorded_settings(record: Path) -> dict | str | None:
    """What `features.json` records: the settings, None where there is no record, "unreadable" where it cannot be
    read or lacks a setting."""
    try:
        then = load_json(record) if record.exists() else None
        if then is None:
            return None
        return _explicit_fmax(then) if isinstance(then, dict) and set(SETTING_NAMES) <= set(then) else "unreadable"
    except (OSError, ValueError, TypeError):
        return "unreadable"


def unrecorded_mismatch(pre: Any, entries: list[dict]) -> str | None:
    """Why features made before `features.json` existed do not fit the current settings, or None when they do.

    Checks the first and the last entry with features (cheap, unlike remaking every feature of a
    processed folder from before): the mel must have n_mel rows and len // hop frames and equal the mel
    of the stored audio, and the audio's length must fit the entry's Duration at the sample rate.
    """
    def stored(e: dict) -> bool:
        return all(npy_shape(p) is not None for p in feature_paths(pre["processed_dir"], e))

    ends = [next((e for e in seq if stored(e)), None) for seq in (entries, reversed(entries))]
    rate, hop, n_mel = int(pre["sample_rate"]), int(pre["hop_size"]), int(pre["n_mel"])
    for e in {id(e): e for e in ends if e is not None}.values():
        mel, audio = read_features(pre["processed_dir"], e)
        expected = float(e.get("Duration", 0.0)) * rate
        if audio.ndim != 1 or abs(len(audio) - expected) > max(2.0, expected * 1e-4):
            return f"{e['Uid']}: {len(audio)} audio samples, {e.get('Duration')} s at sample_rate {rate} is {expected:.0f}"
        if mel.shape != (n_mel, len(audio) // hop):
            return f"{e['Uid']}: mel of shape {mel.shape}, expected ({n_mel}, {len(audio) // hop}) for n_mel {n_mel}, hop {hop}"
        if not np.allclose(mel, mel_spectrogram(audio, pre).numpy(), rtol=0, atol=1e-3):
            return f"{e['Uid']}: its mel is not the mel of its audio under the current settings"
    return None


def forget_features_of_other_settings(pre: Any, dataset: str, entries: list[dict]) -> None:
    """Delete a dataset's features when they were made with other mel settings, so all are made anew, under the
    dataset's lock (see `remaking_lock`), which the caller releases when the features are made.

    Without a readable record (features from before it existed) a few features are checked instead.
    The settings are recorded in `features.json` after the deletion: a run killed in between deletes again.
    """
    folder = Path(pre["processed_dir"]) / dataset
    record, now = folder / SETTINGS_FILE, feature_settings(pre)
    then = recorded_settings(record)
    if then == now:
        return
    if isinstance(then, dict):
        why = ", ".join(f"{k} {then[k]} -> {v}" for k, v in now.items() if then[k] != v)
    else:
        if then is not None:
            log.warning("%s: unreadable or incomplete; the features are checked against the current settings", record)
        why = unrecorded_mismatch(pre, entries) if any((folder / "mels").glob("*.npy")) else None
    if why:
        remaking_lock(folder, f"the features were made with other settings ({why})")
        log.warning("%s: the features were made with other settings (%s): all are made anew", dataset, why)
        for sub in ("mels", "audios"):
            for path in (folder / sub).glob("*.npy"):
                path.unlink(missing_ok=True)
    save_json(record, now)


def remaking_lock(folder: Path, why: str) -> None:
    """Stage 1's exclusive hold on a dataset's features while it remakes them (until `release_features`);
    refused while a training reads them, which would go on with features deleted and remade under it."""
    try:
        file_lock.take(folder / LOCK_FILE, exclusive=True)
    except file_lock.LockBusy as busy:
        if not busy.shared:
            raise ConfigError(f"{folder}: {why}, and another stage 1 (pid {busy.holder}) is remaking them; run this one "
                              "when it has ended") from None
        raise ConfigError(f"{folder}: {why} and a training is reading them; remaking them now would change its data "
                          "under it: run stage 1 when it has ended, or give this config its own preprocess.processed_dir"
                          ) from None


def hold_features(pre: Any, datasets: list[str]) -> None:
    """A training's shared hold on its datasets' features for the whole run (until `release_features`), so that
    stage 1 cannot remake them meanwhile; refused while stage 1 is remaking them."""
    for dataset in datasets:
        folder = Path(pre["processed_dir"]) / dataset
        if not folder.is_dir():  # nothing to guard: load_entries says what is missing
            continue
        try:
            file_lock.take(folder / LOCK_FILE, exclusive=False)
        except file_lock.LockBusy as busy:
            release_features(pre, datasets)
            raise ConfigError(f"{folder}: stage 1 (pid {busy.holder}) is remaking these features; train when it has "
                              "ended") from None


def features_held(pre: Any, datasets: list[str]) -> list[str]:
    """The datasets whose features this process holds (a training set up in this process, a notebook)."""
    return [d for d in datasets if (Path(pre["processed_dir"]) / d / LOCK_FILE).resolve() in file_lock.HELD]


def release_features(pre: Any, datasets: list[str]) -> None:
    for dataset in datasets:
        file_lock.release(Path(pre["processed_dir"]) / dataset / LOCK_FILE)


def settings_differ(record: Path, pre: Any, ours: str = "this config") -> str | None:
    """The settings `record` (a features.json) names that differ from `pre`'s, in words; None where they agree or
    nothing readable is recorded: features of another fmax or rate have the right shapes, so only the record tells."""
    then, now = recorded_settings(record), feature_settings(pre)
    if not isinstance(then, dict) or then == now:  # no record, or an unreadable one: stage 1 checks the features
        return None
    return ", ".join(f"{k} {then[k]} ({ours}: {v})" for k, v in now.items() if then[k] != v)


def refuse_other_settings(pre: Any, dataset: str) -> None:
    """Stages 2 and 3 read a dataset's features only when stage 1 recorded the settings they are configured with."""
    record = Path(pre["processed_dir"]) / dataset / SETTINGS_FILE
    differ = settings_differ(record, pre)
    if differ:
        raise ConfigError(f"{record}: the features of '{dataset}' were made with {differ}; rerun stage 1 with this "
                          "config (in its own processed_dir), or use the config they were made with")


def read_features(processed_dir: str | os.PathLike, entry: dict, mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """An entry's (mel, audio) arrays, each checked by the safe .npy loader (mapped, not read, with `mmap`)."""
    mel_path, audio_path = feature_paths(processed_dir, entry)
    return load_npy(mel_path, mmap), load_npy(audio_path, mmap)


def load_entries(cfg: Any, split: str, datasets: list[str] | None = None, missing: list[str] | None = None) -> list[dict]:
    """Metadata of every listed dataset whose features exist; the others are counted and dropped, and with `missing`
    each is named there (stage 3 lists them in skipped.txt)."""
    pre = cfg.preprocess
    name = pre.train_file if split == "train" else pre.valid_file
    entries, dropped = [], 0
    for dataset in datasets or cfg.dataset:
        meta = Path(pre.processed_dir) / dataset / name
        if not meta.is_file():
            raise FileNotFoundError(f"{meta}: metadata missing; run stage 1 for dataset '{dataset}' first")
        refuse_other_settings(pre, dataset)
        for entry in load_json(meta):
            mel_path, audio_path = feature_paths(pre.processed_dir, entry)
            if mel_path.is_file() and audio_path.is_file():
                entries.append(entry)
                continue
            dropped += 1
            if missing is not None:
                absent = mel_path if not mel_path.is_file() else audio_path
                missing.append(f"{absent}: no features for {dataset} utterance {entry['Uid']} (skipped in stage 1?)")
    if dropped:
        log.warning("%s split: %s without features (skipped in stage 1?) left out", split, plural(dropped, "utterance"))
    return entries


def first_by_name(entries: list[dict], count: int) -> list[dict]:
    """The first `count` entries by (Dataset, Uid): a fixed choice whatever order the metadata lists them in."""
    return sorted(entries, key=lambda e: (e["Dataset"], e["Uid"]))[:count]


def load_items(cfg: Any, split: str, datasets: list[str] | None = None, *, entries: list[dict] | None = None,
               max_frames: int | None = None, qualified: bool = True,
               check: Callable[[np.ndarray, str], Tensor] | None = None, skipped: list[str] | None = None) -> list[Item]:
    """(name, mel, audio) of a split's utterances (or of `entries`), named `<Dataset>_<Uid>` or, unqualified, `<Uid>`.

    `max_frames` cuts each mel and its audio to match; `check` validates a loaded mel. With
    `skipped`, an item that fails to load is named there and left out instead of raising.
    """
    pre = cfg.preprocess
    items = []
    for entry in load_entries(cfg, split, datasets) if entries is None else entries:
        mel_path, audio_path = feature_paths(pre.processed_dir, entry)
        try:
            mel = load_npy(mel_path)
            mel = check(mel, str(mel_path)) if check else torch.from_numpy(np.ascontiguousarray(mel))
            audio = load_npy(audio_path)
        except (ValueError, OSError) as err:
            if skipped is None:
                raise
            skipped.append(str(err))
            continue
        if max_frames is not None:
            mel = mel[:, :max_frames].contiguous()
            audio = audio[: mel.shape[1] * int(pre.hop_size)]
        items.append((f"{entry['Dataset']}_{entry['Uid']}" if qualified else entry["Uid"], mel, audio))
    return items
