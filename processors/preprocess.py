"""Stage 1: per-dataset metadata, the speaker tables, and mel/audio features.

Resumable at every level: metadata is reused while the corpus is unchanged, a feature pair counts
as done once both files are complete (each is written atomically; checked from the headers) and made
with the recorded mel settings, and unreadable items are skipped and listed in `skipped.txt` instead
of stopping the run.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm import tqdm

from processors.audio import AudioError, load_audio
from processors.datasets import DatasetError, collecting_left_out, get_parser, test_rule
from processors.feature_store import (
    feature_paths,
    features_done,
    features_held,
    forget_features_of_other_settings,
    release_features,
    remaking_lock,
)
from processors.fingerprint import changes, corpus_fingerprint, mark_pending, read_fingerprint, stale_uids, write_fingerprint
from processors.mel import mel_spectrogram, min_samples
from utils.config_schema import check_dataset_paths
from utils.io import atomic_write_text, load_json, remove_stale_temps, safe_name, save_json, save_npy, unique_names
from utils.text import plural

log = logging.getLogger(__name__)
AUGMENTATION_SUFFIXES = ("_equalizer", "_formant_shift", "_pitch_shift", "_time_stretch")


def speaker_key(entry: dict) -> str:
    dataset = entry["Dataset"]
    for suffix in AUGMENTATION_SUFFIXES:
        dataset = dataset.removesuffix(suffix)
    return f"{dataset}_{entry['Singer']}"


def write_metadata(cfg: Any, dataset: str) -> tuple[list[dict], list[dict], list[str]]:
    """Parse the corpus, or reuse train.json/test.json while the corpus is unchanged since they were written.

    A changed corpus (another dataset_path, files added, removed or rewritten) is parsed again, and
    the features of every utterance whose source changed are removed so they are made anew, under the dataset's
    features lock (refused while a training reads them), which the caller releases.
    Also returns the files the parser left out, each with its reason (kept in inputs.json).
    """
    out = Path(cfg.preprocess.processed_dir) / dataset
    train_file, test_file = out / cfg.preprocess.train_file, out / cfg.preprocess.valid_file
    root = Path(cfg.dataset_path[dataset]).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        shown = root if root.is_absolute() else f"{root} (relative to the working folder: {root.absolute()})"
        raise DatasetError(f"{shown}: the folder of dataset '{dataset}' {what} (dataset_path.{dataset})")
    now = corpus_fingerprint(root, skip=[cfg.preprocess.processed_dir])
    then = read_fingerprint(out)
    if train_file.is_file() and test_file.is_file():
        changed = changes(then, now)
        if then is None:
            log.warning("%s: no record of the inputs it was built from (written by another tool or an older version): "
                        "reused as is; delete it to rebuild from %s", train_file, root)
            return load_json(train_file), load_json(test_file), []
        train, test = load_json(train_file), load_json(test_file)
        gone = [] if changed else missing_clips(out, train + test)
        if not changed and not gone:
            return train, test, list(then.get("left_out", []))
        if changed:
            log.warning("%s: the corpus changed since its metadata was written (%s): rebuilding", dataset, changed)
        else:
            log.warning("%s: clips missing (%s, e.g. %s): re-cutting", dataset, plural(len(gone), "clip"), gone[0])
    parse = get_parser(dataset, cfg.get("use_custom_dataset") or ())
    with collecting_left_out() as dropped:
        train, test = parse(root, dataset, out)
    distinct_uids(train + test)
    for split in (train, test):
        split.sort(key=lambda e: (e["Duration"], e["Uid"]))
        for index, item in enumerate(split):
            item["index"] = index
    if then is not None:
        stale = [p for uid in stale_uids(then, train + test)
                 for p in feature_paths(cfg.preprocess.processed_dir, {"Dataset": dataset, "Uid": uid}) if p.exists()]
        if stale:  # a training reading them would fail on a deleted file, or read the new audio under an old length
            remaking_lock(out, f"the corpus changed ({plural(len({p.name for p in stale}), 'source')} rewritten)")
        for path in stale:
            path.unlink(missing_ok=True)
    mark_pending(out, then)
    save_json(test_file, test)
    save_json(train_file, train)
    write_fingerprint(out, {**now, "left_out": dropped}, train + test)
    return train, test, dropped


def missing_clips(out: Path, entries: list[dict]) -> list[str]:
    """The clips (audio stage 1 cut into `out`, outside the corpus fingerprint) that are no longer there."""
    inside = f"{out}{os.sep}"
    return [e["Path"] for e in entries if e["Path"].startswith(inside) and not os.path.isfile(e["Path"])]


def distinct_uids(entries: list[dict]) -> None:
    """Give every entry a Uid whose feature files no other entry shares (the one output-naming rule)."""
    names = unique_names([(e["Uid"], f"{e['Path']}|{e['Uid']}") for e in entries])
    for e, name in zip(entries, names, strict=True):
        if name != safe_name(e["Uid"]):
            log.warning("%s: Uid '%s' renamed '%s': its feature files would collide with another utterance's",
                        e["Path"], e["Uid"], name)
            e["Uid"] = name


def write_speaker_tables(cfg: Any, dataset: str, train: list[dict], test: list[dict]) -> None:
    out = Path(cfg.preprocess.processed_dir) / dataset
    everything = train + test
    speakers = sorted({speaker_key(e) for e in everything})
    save_json(out / cfg.preprocess.get("spk2id", "singers.json"), {s: i for i, s in enumerate(speakers)})
    lines = "".join(f"{e['Dataset']}_{e['Uid']}\t{speaker_key(e)}\n" for e in everything)
    atomic_write_text(out / cfg.preprocess.get("utt2spk", "utt2spk"), lines)
    save_json(out / "meta_info.json", meta_info(dataset, train, test))


def meta_info(dataset: str, train: list[dict], test: list[dict]) -> dict:
    def hours(items: list[dict]) -> float:
        return round(sum(e["Duration"] for e in items) / 3600, 4)

    def minutes(items: list[dict]) -> dict[str, float]:
        totals: dict[str, float] = {}
        for e in items:
            totals[speaker_key(e)] = totals.get(speaker_key(e), 0.0) + e["Duration"] / 60
        return {k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))}

    every = train + test
    return {
        "dataset": dataset,
        "statistics": {"size": len(every), "hours": hours(every)},
        "train": {"size": len(train), "hours": hours(train)},
        "test": {"size": len(test), "hours": hours(test)},
        "singers": {"size": len(minutes(every)), "training_minutes": minutes(train), "minutes": minutes(every)},
    }


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def extract_one(job: tuple[str, str, str, dict]) -> str | None:
    """Write one utterance's audio and mel features; return the reason when it is skipped."""
    path, mel_path, audio_path, pre = job
    try:
        audio = load_audio(path, int(pre["sample_rate"]), min_samples=min_samples(pre))
    except AudioError as err:
        return str(err)
    except Exception as err:
        return f"{path}: cannot read ({type(err).__name__}: {err})"
    mel = mel_spectrogram(audio, pre).numpy()
    try:
        save_npy(audio_path, audio)
        save_npy(mel_path, mel)
    except OSError as err:
        return f"{path}: features not written ({err.strerror or err}: {err.filename or audio_path})"
    return None


def extract_features(cfg: Any, dataset: str, entries: list[dict], pool: Executor | None = None,
                     left: list[str] | None = None, todo: list[dict] | None = None) -> tuple[int, list[str]]:
    """Featurise what is not done yet (in `pool` when given); returns (newly done, skip reasons).

    skipped.txt lists those reasons after `left`, the files the corpus parser left out. `todo`: the
    entries not done, when the caller has already checked (so no header is read twice).
    """
    pre = dict(cfg.preprocess)
    for sub in ("mels", "audios"):
        remove_stale_temps(Path(pre["processed_dir"]) / dataset / sub)
    jobs = []
    for e in [e for e in entries if not features_done(pre, e)] if todo is None else todo:
        mel_path, audio_path = feature_paths(pre["processed_dir"], e)
        jobs.append((e["Path"], str(mel_path), str(audio_path), pre))
    skipped: list[str] = []
    bar = tqdm(total=len(jobs), desc=f"{dataset} features", unit="file", dynamic_ncols=True)
    results = pool.map(extract_one, jobs, chunksize=4) if pool else map(extract_one, jobs)
    for reason in results:
        if reason:
            skipped.append(reason)
        bar.update()
    bar.close()
    skipped_file = Path(pre["processed_dir"]) / dataset / "skipped.txt"
    if skipped or left:
        atomic_write_text(skipped_file, "".join(f"{r}\n" for r in [*(left or []), *skipped]))
        for reason in skipped:
            log.warning("skipped %s", reason)
    else:
        skipped_file.unlink(missing_ok=True)
    return len(jobs) - len(skipped), skipped


def feature_pool(workers: int) -> Executor | None:
    """One pool for every dataset, forked after the heavy imports of this module so workers start at once."""
    return ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_init_worker) if workers > 1 else None


def feature_bytes(pre: Any, entries: list[dict]) -> int:
    """Disk needed by the float32 audio and mel features of `entries`, from their durations."""
    rate, hop, n_mel = int(pre["sample_rate"]), int(pre["hop_size"]), int(pre["n_mel"])
    header = 128
    total = 0
    for e in entries:
        samples = int(float(e.get("Duration", 0.0)) * rate) + 1
        total += 4 * samples + 4 * n_mel * (samples // hop) + 2 * header
    return total


def check_disk_space(pre: Any, todo: list[dict]) -> None:
    """Refuse to start when the features clearly will not fit; say how much they need."""
    need = feature_bytes(pre, todo)
    folder = Path(pre["processed_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if need * 1.05 > free:
        raise OSError(
            f"{folder}: not enough free disk space for the features of {plural(len(todo), 'utterance')}: "
            f"need about {need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free"
        )
    log.info("features need about %.1f MiB; %.1f MiB free in %s", need / 2**20, free / 2**20, folder)


def default_workers(jobs: int) -> int:
    """The CPUs this process may run on (taskset, cgroup cpusets), no more than there are files to make."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, jobs))


def preprocess(cfg: Any, num_workers: int | None = None) -> None:
    """Stage 1 for every dataset; one whose every utterance is skipped fails the stage after the others are done."""
    check_dataset_paths(cfg)
    held = features_held(cfg.preprocess, list(cfg.dataset))
    try:
        splits = {dataset: write_metadata(cfg, dataset) for dataset in cfg.dataset}
        failed = extract_all(cfg, splits, num_workers)
    finally:  # the datasets this run locked to remake them, also where it failed half-way (a notebook goes on)
        release_features(cfg.preprocess, [d for d in cfg.dataset if d not in held])
    if failed:
        raise ValueError("; ".join(failed))


def extract_all(cfg: Any, splits: dict[str, tuple[list[dict], list[dict], list[str]]],
                num_workers: int | None) -> list[str]:
    """Every dataset's features; what failed whole datasets, in words."""
    todo = {}
    for dataset, (train, test, _left) in splits.items():
        forget_features_of_other_settings(cfg.preprocess, dataset, train + test)
        todo[dataset] = [e for e in train + test if not features_done(cfg.preprocess, e)]
    check_disk_space(cfg.preprocess, [e for entries in todo.values() for e in entries])
    jobs = sum(map(len, todo.values()))
    pool = feature_pool(max(1, min(num_workers, jobs)) if num_workers else default_workers(jobs))  # no idle forks
    failed = []
    try:
        for dataset, (train, test, left) in splits.items():
            start = time.time()
            write_speaker_tables(cfg, dataset, train, test)
            done, skipped = extract_features(cfg, dataset, train + test, pool, left, todo[dataset])
            log.info(
                "%s: %d train / %s; features: %d done, %d skipped; %s left out by the parser; %.1f s",
                dataset, len(train), plural(len(test), "test utterance"), done, len(skipped),
                plural(len(left), "file"), time.time() - start,
            )
            if not test:
                rule = test_rule(dataset, cfg.get("use_custom_dataset") or ())
                log.warning("%s: the test split is empty (the test rule: %s); stage 2 evaluates nothing and stage 3's "
                            "dataset mode has nothing to vocode", dataset, rule)
            if skipped and len(skipped) == len(train + test):
                failed.append(f"{dataset}: every one of its {len(skipped)} utterances was skipped; reasons in "
                              f"{Path(cfg.preprocess.processed_dir) / dataset / 'skipped.txt'}")
    except BrokenProcessPool:
        raise ChildProcessError("an extraction worker died (out of memory?); finished features are kept: rerun stage 1, "
                                "perhaps with fewer --num_workers") from None
    finally:
        if pool is not None:
            pool.shutdown()
    return failed
