"""What a new epoch costs the loader: a fresh iterator per epoch, or one over the endless sampler (stage 2's).

    python -m benchmarks.epoch_starts [--utterances 96] [--batch_size 32] [--step_ms 40] [--epochs 20]

A small corpus (the base config's features, 2-4 s utterances) makes epochs of a few batches, as
the singing corpora do. The loop stands in for training: it takes a batch, then sleeps for one
step's time (the GPU's work; the CPU is free for the worker meanwhile). Printed: the time per
step spent waiting for a batch, with the loader's workers restarting their prefetch at each
epoch, and with one iterator that prefetches across the epochs' ends.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.train import synthetic_setup
from models.vocoders.diffusion.diffusion_vocoder_dataset import CropDataset, EpochBatchSampler, make_loader
from processors.feature_store import load_entries
from utils.config import REPO_ROOT, load_config

CONFIG = REPO_ROOT / "egs/vocoder/diffusion/diffwave/exp_config.json"


def wait_ms_per_step(dataset: CropDataset, batch_size: int, workers: int, endless: bool, epochs: int,
                     step_s: float) -> float:
    sampler = EpochBatchSampler(len(dataset), batch_size, seed=0, endless=endless)
    loader = make_loader(dataset, sampler, workers, pin=False)
    per_epoch, waited, steps = len(sampler), 0.0, 0
    for epoch in range(epochs):
        # Not endless: what stage 2 did before, each epoch a new pass, its prefetch started from nothing. Both ways
        # start their first pass here, so both pay for the workers' start in their timed steps.
        if epoch == 0 or not endless:
            sampler.set_epoch(epoch)
            batches = iter(loader)
        for _ in range(per_epoch):
            before = time.perf_counter()
            next(batches)
            waited += time.perf_counter() - before
            steps += 1
            time.sleep(step_s)
    return 1e3 * waited / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.epoch_starts", description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=96)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--step_ms", type=float, default=40.0, help="the stand-in for one training step")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args(argv)
    cfg = load_config(CONFIG)
    with tempfile.TemporaryDirectory(prefix="bench_epochs_") as tmp:
        synthetic_setup(cfg, Path(tmp), args.utterances)
        dataset = CropDataset(cfg, load_entries(cfg, "train"))
        per_epoch = len(EpochBatchSampler(len(dataset), args.batch_size, seed=0))
        print(f"{len(dataset)} training utterances, batch {args.batch_size}: {per_epoch} batches per epoch; "
              f"{args.workers} worker(s), a step of {args.step_ms:g} ms")
        for endless in (False, True, False, True):  # alternated: less noise
            ms = wait_ms_per_step(dataset, args.batch_size, args.workers, endless, args.epochs, args.step_ms / 1e3)
            print(f"  {'one iterator, endless sampler' if endless else 'a new iterator per epoch':32} "
                  f"{ms:6.2f} ms per step waiting for data")


if __name__ == "__main__":
    main()
