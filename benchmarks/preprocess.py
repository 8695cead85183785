"""Stage 1 feature-extraction throughput: one worker against all cores on a generated corpus.

Generates `--utterances` tone-plus-noise wavs (a generic folder dataset, 10 speakers) at
`--source_rate`, parses it once, then times `extract_features` with the recipe's mel settings
(config/vocoder.json: 24 kHz, 100 mels, hop 256) for `--num_workers 1` and for all cores, each into
an empty processed folder, after an untimed warm-up (imports, mel filterbank) so both runs measure
steady-state throughput plus the pool start-up. Prints files/s, audio-hours/s and the speed-up.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from processors.preprocess import extract_features, feature_pool, write_metadata
from utils.config import REPO_ROOT, load_config

DATASET = "bench"


def make_corpus(folder: Path, count: int, seconds: float, rate: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        n = round(rng.uniform(0.5, 1.5) * seconds * rate)
        t = np.arange(n) / rate
        audio = 0.3 * np.sin(2 * np.pi * rng.uniform(110, 880) * t) + rng.normal(0, 0.02, n)
        path = folder / f"spk{i % 10}" / f"utt{i:05d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), audio.astype(np.float32), rate, subtype="PCM_16")


def run(cfg, entries: list[dict], workers: int, processed: Path) -> float:
    cfg.preprocess.processed_dir = str(processed)
    start = time.perf_counter()
    pool = feature_pool(workers)
    done, skipped = extract_features(cfg, DATASET, entries, pool)
    seconds = time.perf_counter() - start
    if pool is not None:
        pool.shutdown()
    assert done == len(entries) and not skipped, f"{len(skipped)} skipped: {skipped[:1]}"
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmark.py preprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=3.0, help="mean utterance length (uniform 0.5x-1.5x)")
    parser.add_argument("--source_rate", type=int, default=44100)
    parser.add_argument("--num_workers", type=int, default=os.cpu_count() or 1, help="the 'all cores' run")
    args = parser.parse_args(argv)

    cfg = load_config(REPO_ROOT / "config" / "vocoder.json")
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        corpus = Path(tmp) / "corpus"
        make_corpus(corpus, args.utterances, args.seconds, args.source_rate)
        cfg.update(dataset=[DATASET], dataset_path={DATASET: str(corpus)}, use_custom_dataset=[DATASET])
        cfg.preprocess.processed_dir = str(Path(tmp) / "meta")
        train, test, _left = write_metadata(cfg, DATASET)
        entries = train + test
        hours = sum(e["Duration"] for e in entries) / 3600
        print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} before the runs")
        print(f"corpus: {len(entries)} utterances, {hours * 60:.1f} min of {args.source_rate} Hz wav -> "
              f"{cfg.preprocess.sample_rate} Hz, {cfg.preprocess.n_mel} mels, hop {cfg.preprocess.hop_size}")
        run(cfg, entries[:4], 1, Path(tmp) / "warmup")  # imports and mel filters once, outside the timings
        times = {}
        for workers in dict.fromkeys((1, args.num_workers)):
            times[workers] = run(cfg, entries, workers, Path(tmp) / f"out{workers}")
            print(f"num_workers {workers}: {times[workers]:.2f} s, {len(entries) / times[workers]:.1f} files/s, "
                  f"{hours / times[workers]:.4f} audio-hours/s")
        print(f"speed-up with {args.num_workers} workers: {times[1] / times[args.num_workers]:.2f}x")


if __name__ == "__main__":
    main()
