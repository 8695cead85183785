"""Training data drawn from the feature store (processors/feature_store.py).

Training takes random crops of `cut_mel_frame` mel frames with the matching audio slice. The
crop of every item is a pure function of (seed, epoch, position), and the sampler can start
mid-epoch, so a resumed run sees exactly the batches the uninterrupted run would.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from processors.feature_store import feature_paths, load_entries
from utils.io import load_npy
from utils.stop_request import ignore_stop_signals
from utils.text import plural

log = logging.getLogger(__name__)


class CropDataset(Dataset):
    """Indexed by (item, crop_seed): returns a (mel crop, audio crop) pair aligned on frames."""

    def __init__(self, cfg: Any, entries: list[dict]) -> None:
        self.entries = entries
        self.processed_dir = cfg.preprocess.processed_dir
        self.hop = int(cfg.preprocess.hop_size)
        self.n_mel = int(cfg.preprocess.n_mel)
        self.frames = int(cfg.preprocess.cut_mel_frame)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor]:
        index, seed = key
        # Mapped: a crop of a minutes-long song reads its own pages, not the whole file.
        mel_path, audio_path = feature_paths(self.processed_dir, self.entries[index])
        mel, audio = load_npy(mel_path, mmap=True), load_npy(audio_path, mmap=True)
        if mel.ndim != 2 or audio.ndim != 1:
            raise ValueError(f"{mel_path if mel.ndim != 2 else audio_path}: expected a (n_mel, frames) mel and 1-D audio, "
                             f"got shapes {mel.shape} and {audio.shape}")
        self._check_settings(mel, audio, mel_path)
        mel_crop, audio_crop = crop_pair(mel, audio, self.frames, self.hop, np.random.default_rng(seed))
        for crop, path in ((mel_crop, mel_path), (audio_crop, audio_path)):
            if not bool(torch.isfinite(crop).all()):  # it would make every step that draws it a skipped one
                raise ValueError(f"{path}: holds NaN or inf values (damaged since stage 1?); delete it and rerun "
                                 "stage 1 to extract it again")
        return mel_crop, audio_crop

    def _check_settings(self, mel: np.ndarray, audio: np.ndarray, mel_path: Path) -> None:
        """Features extracted under other mel settings (stale after a config change) are refused, not trained on:
        a wrong hop pairs each mel frame with the wrong audio, a wrong n_mel fails deep inside the model."""
        if mel.shape[0] != self.n_mel:
            raise ValueError(f"{mel_path}: {mel.shape[0]} mel bands, but preprocess.n_mel is {self.n_mel}: features "
                             "from other mel settings; rerun stage 1 to extract them again")
        expected = len(audio) // self.hop
        if abs(expected - mel.shape[1]) > 1:
            raise ValueError(f"{mel_path}: {mel.shape[1]} frames for {len(audio)} audio samples, but preprocess.hop_size "
                             f"{self.hop} gives {expected}: features from other mel settings; rerun stage 1 to extract "
                             "them again")


def crop_pair(mel: np.ndarray, audio: np.ndarray, frames: int, hop: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """Frames [s, s+frames) of the mel and samples [s*hop, (s+frames)*hop) of the audio, zero-padded."""
    available = min(mel.shape[1], len(audio) // hop)
    start = int(rng.integers(0, available - frames + 1)) if available > frames else 0
    mel_crop = np.zeros((mel.shape[0], frames), dtype=np.float32)
    audio_crop = np.zeros(frames * hop, dtype=np.float32)
    take = min(frames, available)
    mel_crop[:, :take] = mel[:, start : start + take]
    audio_crop[: take * hop] = audio[start * hop : (start + take) * hop]
    if take < frames:
        mel_crop[:, take:] = np.log(1e-5)
    return torch.from_numpy(mel_crop), torch.from_numpy(audio_crop)


def collate(batch: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    mels, audios = zip(*batch, strict=True)
    return torch.stack(mels), torch.stack(audios)


class EpochBatchSampler:
    """Shuffled batches of (item, crop_seed) for one process, resumable at any batch.

    Every process draws the same permutation from (seed, epoch) and takes every
    `world`-th batch, so data is sharded without overlap and without a distributed sampler.
    An `endless` sampler goes on to the next epochs' batches, so that a loader prefetches
    across an epoch's end instead of stalling at each new epoch's first batch; `len` is
    the batches of one epoch.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True, drop_last: bool = True, endless: bool = False) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world, self.shuffle, self.drop_last = rank, world, shuffle, drop_last
        self.endless, self.epoch, self.skip = endless, 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def _all_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.size) if self.shuffle else np.arange(self.size)
        crop_seeds = rng.integers(0, 2**31, size=self.size) if self.shuffle else np.arange(self.size) + self.seed
        pairs = [(int(i), int(crop_seeds[k])) for k, i in enumerate(order)]
        batches = [pairs[i : i + self.batch_size] for i in range(0, len(pairs), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size and len(batches) > 1:
            batches.pop()
        if not self.drop_last:  # evaluation: every item exactly once, shards may be uneven or empty
            return batches
        if batches and len(batches) < self.world:  # training: every process must take the same number of steps
            batches = [batches[i % len(batches)] for i in range(self.world)]
        return batches[: len(batches) - len(batches) % self.world]

    def __len__(self) -> int:
        return len(self._all_batches(self.epoch)[self.rank :: self.world])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, skip = self.epoch, self.skip
        while True:
            batches = self._all_batches(epoch)[self.rank :: self.world]
            yield from batches[skip:]
            if not (self.endless and batches):
                return
            epoch, skip = epoch + 1, 0


class EpochBatches:
    """Training batches by epoch from one loader iterator over an endless sampler, so the workers prefetch
    across an epoch's end; a new iterator starts only where the last one stopped elsewhere (a resume)."""

    def __init__(self, loader: DataLoader, sampler: EpochBatchSampler) -> None:
        self.loader, self.sampler = loader, sampler
        self.iterator: Iterator = iter(())
        self.at: tuple[int, int] | None = None  # the (epoch, batch) the iterator yields next

    def rest_of_epoch(self, epoch: int, first: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches `first`... of `epoch`. A resume may start past the end of an epoch that is shorter now (a
        larger batch, more processes): then there are none, and the iterator is at the next epoch's start."""
        if (epoch, first) != self.at:
            self.sampler.set_epoch(epoch, first)
            self.iterator = iter(self.loader)
        per_epoch = len(self.sampler)
        self.at = (epoch, first) if first < per_epoch else (epoch + 1, 0)
        for done in range(first + 1, per_epoch + 1):
            self.at = None  # a batch that fails to load is used up: a retry there must start a new pass
            batch = next(self.iterator)
            self.at = (epoch, done) if done < per_epoch else (epoch + 1, 0)  # taken, trained on or not
            yield batch


def dataloader_workers(cfg: Any) -> int:
    """`train.dataloader.num_worker`, or (when -1) the spare cores up to 4."""
    wanted = int(cfg.train.get("dataloader", {}).get("num_worker", -1))
    if wanted >= 0:
        return wanted
    return max(0, min(4, len(os.sched_getaffinity(0)) - 1))


class TrainingData:
    """A process's shard of the training batches and of the validation utterances, with their loaders."""

    def __init__(self, cfg: Any, seed: int, rank: int = 0, world: int = 1) -> None:
        train_entries = load_entries(cfg, "train")
        self.valid_entries = load_entries(cfg, "valid")
        if not train_entries:
            raise ValueError(f"no training utterances with features under {cfg.preprocess.processed_dir}")
        if not self.valid_entries:
            log.warning("no validation utterances with features under %s (an empty test split): no valid/loss is "
                        "logged, and checkpoints are named by the training loss", cfg.preprocess.processed_dir)
        batch = int(cfg.train.batch_size)
        workers = dataloader_workers(cfg)
        pin = torch.cuda.is_available() and bool(cfg.train.get("dataloader", {}).get("pin_memory", True))
        self.train_sampler = EpochBatchSampler(len(train_entries), batch, seed, rank, world, endless=True)
        self.train_loader = make_loader(CropDataset(cfg, train_entries), self.train_sampler, workers, pin)
        self.train_batches = EpochBatches(self.train_loader, self.train_sampler)
        valid_sampler = EpochBatchSampler(len(self.valid_entries), batch, seed, rank, world, shuffle=False, drop_last=False)
        self.valid_loader = make_loader(CropDataset(cfg, self.valid_entries), valid_sampler, min(workers, 1), pin)
        log.info("data: %d train / %s, %s of %d per process per epoch, %s", len(train_entries),
                 plural(len(self.valid_entries), "valid utterance"), plural(len(self.train_sampler), "batch", "batches"),
                 batch, plural(workers, "persistent loader worker"))


def make_loader(dataset: CropDataset, sampler: EpochBatchSampler, workers: int, pin: bool) -> DataLoader:
    """Persistent workers, which leave stopping to the main process; its own generator, so creating an iterator
    draws nothing from the global RNG a resume restores; pinned batches, four per worker queued ahead, so the copy
    to the GPU overlaps the step before."""
    return DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers, generator=torch.Generator(),
        persistent_workers=workers > 0, pin_memory=pin, prefetch_factor=4 if workers else None,
        worker_init_fn=ignore_stop_signals if workers else None,
    )
