"""Mel to waveform with a trained DiffWave: sampler choice, seeded noise, exact batching."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.vocoders.diffusion.chunked import ChunkedDenoiser
from models.vocoders.diffusion.ddpm import SAMPLERS, make_plan
from models.vocoders.diffusion.diffwave.diffwave import DiffWave, build_diffwave
from utils.checkpoint import load_into, load_weights, resolve_checkpoint
from utils.config import ConfigError, load_config

log = logging.getLogger(__name__)
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def utterance_seed(base_seed: int, name: str) -> int:
    """Each utterance's noise depends only on its name and the seed, not on its batch-mates."""
    return (int(base_seed) * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % 2**63


def experiment_config(expt_dir: str | Path) -> Any:
    args = Path(expt_dir) / "args.json"
    if not args.is_file():
        raise ConfigError(f"{args}: missing; is '{expt_dir}' an experiment folder written by stage 2?")
    return load_config(args)


def load_model(cfg: Any, expt_dir: str | Path, checkpoint: str | None = None, use_ema: bool = True) -> DiffWave:
    """The experiment's newest complete checkpoint (or `checkpoint`), EMA weights when present."""
    folder = resolve_checkpoint(checkpoint or Path(expt_dir) / "checkpoint")
    model = build_diffwave(cfg)
    ema = folder / "ema.safetensors"
    source = ema if use_ema and ema.is_file() else folder
    load_into(model, load_weights(source), source)
    log.info("loaded %s", source)
    return model.eval()


def pick_device(device: str | None = None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


class Vocoder:
    """Vocodes lists of mels, grouped by length into padded batches that equal one-by-one synthesis."""

    def __init__(self, cfg: Any, model: DiffWave, sampler: str = "fast", steps: int | None = None,
                 batch_size: int = 1, seed: int = 1234, device: str | None = None, precision: str = "fp32",
                 betas: Sequence[float] | None = None, chunk_size: int = 65536, cache_gib: float = 1.0,
                 tile: int | None = 2048) -> None:
        if sampler not in (*SAMPLERS, "searched"):
            raise ConfigError(f"unknown sampler '{sampler}': choose one of {', '.join((*SAMPLERS, 'searched'))}")
        if precision not in PRECISIONS:
            raise ConfigError(f"unknown precision '{precision}': choose one of {', '.join(PRECISIONS)}")
        self.cfg = cfg
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.plan = make_plan(cfg.model.diffwave, sampler, steps, betas)
        self.batch_size = max(1, int(batch_size))
        self.seed = seed
        self.hop = int(cfg.preprocess.hop_size)
        self.n_mel = int(cfg.preprocess.n_mel)
        self.dtype = PRECISIONS[precision]
        self.chunk_size = int(chunk_size)
        self.tile = tile
        self.cache_bytes = int(float(cache_gib) * 2**30)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _autocast(self) -> Any:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def batch(self, mels: Sequence[torch.Tensor], names: Sequence[str]) -> list[np.ndarray]:
        """One padded batch: each output is `frames * hop` samples."""
        from models.vocoders.diffusion.ddpm import sample

        frames = torch.tensor([m.shape[-1] for m in mels])
        lengths = frames * self.hop
        padded = torch.zeros(len(mels), self.n_mel, int(frames.max()))
        for i, mel in enumerate(mels):
            padded[i, :, : mel.shape[-1]] = mel
        padded = padded.to(self.device)
        exact = None if len(mels) == 1 else lengths.to(self.device)
        generators = [torch.Generator().manual_seed(utterance_seed(self.seed, n)) for n in names]

        def autocast_denoise(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
            with self._autocast():
                return self.model(x, step, padded, exact).float()

        # fp32 runs chunk by chunk (exact, bounded memory, conditioner cached across steps);
        # fp16/bf16 and wrapped models (DDP during training) use the plain forward
        chunked = self.dtype is None and isinstance(self.model, DiffWave) and self.chunk_size > 0
        denoise = autocast_denoise
        if chunked:
            denoise = ChunkedDenoiser(self.model, padded, exact, self.chunk_size, self.cache_bytes, self.tile)

        audio = sample(denoise, self.plan, (len(mels), int(lengths.max())), self.device, exact, generators)
        return [audio[i, : int(n)].cpu().numpy() for i, n in enumerate(lengths)]

    def __call__(self, mels: Sequence[torch.Tensor], names: Sequence[str],
                 on_batch: Callable[[list[int], list[np.ndarray]], None] | None = None) -> list[np.ndarray]:
        """Vocode all, longest first in groups of `batch_size` similar lengths; order preserved.

        `on_batch(indices, audios)` sees each finished group, so callers can write as they go.
        """
        order = sorted(range(len(mels)), key=lambda i: -mels[i].shape[-1])
        out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(mels)
        for start in range(0, len(order), self.batch_size):
            group = order[start : start + self.batch_size]
            audios = self.batch([mels[i] for i in group], [names[i] for i in group])
            for i, audio in zip(group, audios, strict=True):
                out[i] = audio
            if on_batch is not None:
                on_batch(group, audios)
        return out


def vocoder_from_experiment(expt_dir: str | Path, checkpoint: str | None = None, use_ema: bool = True,
                            cfg: Any = None, **options: Any) -> Vocoder:
    """`cfg` defaults to the experiment's args.json."""
    cfg = cfg if cfg is not None else experiment_config(expt_dir)
    model = load_model(cfg, expt_dir, checkpoint, use_ema)
    infer = cfg.get("inference", {})
    options.setdefault("sampler", infer.get("sampler", "fast"))
    options.setdefault("batch_size", infer.get("batch_size", 1))
    if infer.get("steps") is not None:
        options.setdefault("steps", infer.get("steps"))
    for key in ("chunk_size", "cache_gib", "tile"):
        if infer.get(key) is not None:
            options.setdefault(key, infer.get(key))
    if options["sampler"] == "searched" and options.get("betas") is None:
        from models.vocoders.diffusion.schedule_search import searched_betas

        options["betas"] = searched_betas(expt_dir, options.get("steps"))
    return Vocoder(cfg, model, **options)
