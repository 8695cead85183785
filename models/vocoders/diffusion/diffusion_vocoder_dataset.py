"""Training data: random crops of `cut_mel_frame` mel frames with the matching audio slice.

The crop of every item is a pure function of (seed, epoch, position), and the sampler can
start mid-epoch, so a resumed run sees exactly the batches the uninterrupted run would.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from processors.preprocess import feature_paths
from utils.io import load_json, load_npy
from utils.text import plural

log = logging.getLogger(__name__)


def load_entries(cfg: Any, split: str, datasets: list[str] | None = None) -> list[dict]:
    """Metadata of every listed dataset whose features exist; missing ones are named and dropped."""
    pre = cfg.preprocess
    name = pre.train_file if split == "train" else pre.valid_file
    entries, missing = [], 0
    for dataset in datasets or cfg.dataset:
        meta = Path(pre.processed_dir) / dataset / name
        if not meta.is_file():
            raise FileNotFoundError(f"{meta}: metadata missing; run stage 1 for dataset '{dataset}' first")
        for entry in load_json(meta):
            mel_path, audio_path = feature_paths(pre.processed_dir, entry)
            if mel_path.is_file() and audio_path.is_file():
                entries.append(entry)
            else:
                missing += 1
    if missing:
        log.warning("%s split: %s without features (skipped in stage 1?) left out", split, plural(missing, "utterance"))
    return entries


class CropDataset(Dataset):
    """Indexed by (item, crop_seed): returns a (mel crop, audio crop) pair aligned on frames."""

    def __init__(self, cfg: Any, entries: list[dict]) -> None:
        self.entries = entries
        self.processed_dir = cfg.preprocess.processed_dir
        self.hop = int(cfg.preprocess.hop_size)
        self.frames = int(cfg.preprocess.cut_mel_frame)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor]:
        index, seed = key
        mel_path, audio_path = feature_paths(self.processed_dir, self.entries[index])
        mel, audio = load_npy(mel_path), load_npy(audio_path)
        return crop_pair(mel, audio, self.frames, self.hop, np.random.default_rng(seed))


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
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True, drop_last: bool = True) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world, self.shuffle, self.drop_last = rank, world, shuffle, drop_last
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def _all_batches(self) -> list[list[tuple[int, int]]]:
        rng = np.random.default_rng([self.seed, self.epoch])
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
        return len(self._all_batches()[self.rank :: self.world])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        yield from self._all_batches()[self.rank :: self.world][self.skip :]
