"""Mel to waveform with a trained DiffWave: sampler choice, seeded noise, exact batching."""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.vocoders.diffusion import fused
from models.vocoders.diffusion.chunked import ChunkedDenoiser
from models.vocoders.diffusion.ddpm import FIXED_STEPS, SAMPLER_NAMES, Denoiser, make_plan
from models.vocoders.diffusion.device_policy import free_memory, inference_precision
from models.vocoders.diffusion.diffwave.diffwave import DiffWave
from models.vocoders.diffusion.experiment import Experiment
from models.vocoders.diffusion.windowed import ENGINES, GraphedDenoiser, WindowedDenoiser, least_window_bytes
from utils.config import ConfigError, bool_or_auto, source_of
from utils.text import byte_size, plural

log = logging.getLogger(__name__)
PRECISIONS = {"auto": None, "fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}  # auto: see inference_precision


def utterance_seed(base_seed: int, name: str) -> int:
    """Each utterance's noise depends only on its name and the seed, not on its batch-mates."""
    return (int(base_seed) * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % 2**63


@contextmanager
def tf32(enabled: bool = True) -> Iterator[None]:
    """TF32 for CUDA matmuls and convolutions inside the block only: the caller's settings come back after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def pick_device(device: str | None = None) -> torch.device:
    """`device` (default: cuda when present), or a ConfigError where synthesis cannot run on it."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device '{device}': not a device name; use cpu, cuda or cuda:N") from None
    if chosen.type not in ("cpu", "cuda"):
        raise ConfigError(f"device '{device}': synthesis runs on cpu or cuda only")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if chosen.type == "cuda" and (chosen.index or 0) >= count:
        raise ConfigError(f"device '{device}': {plural(count, 'CUDA GPU')} visible; use --device cpu")
    return chosen


class FiniteWatch:
    """A denoiser that notes, on its device and without waiting for it, whether every prediction was finite.
    (The sampler clamps each step's sample, so an overflow to inf would leave finite but useless audio.)"""

    def __init__(self, denoise: Denoiser) -> None:
        self.denoise, self.finite = denoise, None

    def __call__(self, audio: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        eps = self.denoise(audio, step)
        ok = torch.isfinite(eps).all()
        self.finite = ok if self.finite is None else self.finite & ok
        return eps

    def all_finite(self) -> bool:
        return self.finite is None or bool(self.finite)


def gib_at_least(count: int) -> str:
    """`count` bytes in GiB, four significant digits rounded up: a budget set to it holds them (rounded to the
    nearest, 1.816 was named for 1.8163 GiB and refused)."""
    gib = count / 2**30
    scale = 10.0 ** (3 - math.floor(math.log10(gib)))
    text = f"{math.ceil(gib * scale) / scale:.4g}"
    while int(float(text) * 2**30) < count:  # the budget's own conversion truncates: one more in the last digit
        text = f"{float(text) + 1 / scale:.4g}"
    return text


class Vocoder:
    """Vocodes lists of mels, grouped by length into padded batches that equal one-by-one synthesis."""

    def __init__(self, cfg: Any, model: DiffWave, sampler: str = "fast", steps: int | None = None,
                 batch_size: int = 1, seed: int = 1234, device: str | None = None, precision: str | None = None,
                 betas: Sequence[float] | None = None, chunk_size: int = 65536, cache_gib: float = 1.0,
                 tile: int | None = 2048, engine: str = "auto", compile: bool | str = "auto",
                 cuda_graph: bool | str = "auto", gpu_memory_gib: float | None = None) -> None:
        if sampler not in SAMPLER_NAMES:
            raise ConfigError(f"unknown sampler '{sampler}': choose one of {', '.join(SAMPLER_NAMES)}")
        setting = precision or cfg.get("inference", {}).get("precision") or "auto"  # the caller's, the config's
        if setting not in PRECISIONS:
            where = "" if precision else f"{source_of(cfg, 'inference.precision')}: inference.precision: "
            raise ConfigError(f"{where}unknown precision '{setting}': choose one of {', '.join(PRECISIONS)}")
        self.cfg = cfg
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.plan = make_plan(cfg.model.diffwave, sampler, steps, betas)
        self.sampler = sampler  # as chosen (--infer_sampler, inference.sampler): the plan's kind is ddpm or ddim
        self.batch_size = max(1, int(batch_size))
        self.seed = seed
        self.hop = int(cfg.preprocess.hop_size)
        self.n_mel = int(cfg.preprocess.n_mel)
        self.precision = inference_precision(setting, self.device)
        self.dtype = PRECISIONS[self.precision]
        self.chosen = {"precision": setting != "auto", "engine": engine != "auto"}  # else fall back where they fail
        self.overflowed = False  # an automatic half precision overflowed and this Vocoder went on in fp32
        self.chunk_size = int(chunk_size)
        self.tile = tile
        self.cache_bytes = int(float(cache_gib) * 2**30)
        self.engine = self._pick_engine(engine)
        cuda = self.device.type == "cuda"
        self.compile = bool_or_auto(compile, "inference.compile", auto=False)
        if self.compile and self.engine != "plain":  # the tiled and fused engines have no forward to compile
            if self.chosen["engine"]:
                raise ConfigError(f"inference.compile applies to the plain engine only, not '{self.engine}': set "
                                  "inference.engine to plain to compile, or compile to false")
            log.warning("inference.compile: the automatic engine here is %s, which is not compiled (compile applies to "
                        "the plain engine only: set inference.engine to plain to compile it)", self.engine)
        self.cuda_graph = cuda_graph if cuda_graph == "auto" else bool_or_auto(cuda_graph, "inference.cuda_graph", auto=cuda)
        if self.cuda_graph is True and not cuda:
            raise ConfigError(f"inference.cuda_graph: true needs a CUDA GPU, and this run vocodes on the {self.device.type}; "
                              "set it to auto or false")
        if gpu_memory_gib is not None and not (isinstance(gpu_memory_gib, int | float) and 0 < gpu_memory_gib < 2**40):
            raise ConfigError(f"inference.gpu_memory_gib must be a positive number of GiB, got {gpu_memory_gib!r}")
        self.memory_bytes = None if gpu_memory_gib is None else int(float(gpu_memory_gib) * 2**30)
        self._built: tuple[fused.FusedDiffWave | None, Any] | None = None  # the model's weights must not change after
        self.projected = False  # whether the last batch's fused kernel took every layer's conditioner projected once

    def _pick_engine(self, engine: str) -> str:
        """fused (Triton) on CUDA, row tiles for fp32 on CPU, else the plain forward; an explicit choice is checked."""
        if engine not in ENGINES:
            raise ConfigError(f"unknown inference engine '{engine}': choose one of {', '.join(ENGINES)}")
        plain_model = isinstance(self.model, DiffWave)
        too_wide = fused.too_wide(self.model, self.dtype or torch.float32, self.device) if plain_model else None
        if engine == "auto":
            if self.device.type == "cuda":
                ready = plain_model and fused.available(self.device) and not too_wide
                return "fused" if ready and fused.tensor_core_dots(self.device) else "plain"
            return "tiled" if self.dtype is None and plain_model and self.chunk_size > 0 else "plain"
        if engine == "fused" and not (plain_model and fused.available(self.device)):
            raise ConfigError("inference engine 'fused' needs a CUDA GPU and Triton (pip install triton)")
        if engine == "fused" and too_wide:
            raise ConfigError(f"inference engine 'fused': {too_wide}; use engine 'auto' or 'plain'")
        if engine == "tiled" and not plain_model:
            raise ConfigError("inference engine 'tiled' needs a plain DiffWave model")
        if engine == "tiled" and self.dtype is not None:
            if self.chosen["precision"]:
                raise ConfigError(f"inference engine 'tiled' computes in fp32 only, not {self.precision}: set precision "
                                  f"fp32 (or auto), or engine 'plain' for {self.precision}")
            self.precision, self.dtype = "fp32", None  # auto: the precision this engine computes in
        return engine

    def _autocast(self) -> Any:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def batch(self, mels: Sequence[torch.Tensor], names: Sequence[str]) -> list[np.ndarray]:
        """One padded batch: each output is `frames * hop` samples."""
        frames = torch.tensor([m.shape[-1] for m in mels])
        lengths = frames * self.hop
        padded = torch.zeros(len(mels), self.n_mel, int(frames.max()))
        for i, mel in enumerate(mels):
            padded[i, :, : mel.shape[-1]] = mel
        padded = padded.to(self.device)
        exact = None if len(mels) == 1 else lengths
        shape = (len(mels), int(lengths.max()))
        audio, finite = self._attempt(padded, exact, shape, names)
        first, redone = self.precision, not finite and self.dtype is not None and not self.chosen["precision"]
        if redone:
            del audio  # the failed attempt's buffers go before the fp32 one allocates its own
            half, self.precision, self.dtype, self._built = (self.precision, self.dtype, self.engine), "fp32", None, None
            # fp32 doubles the fused kernel's weights: where they no longer fit (fused.too_wide), its launch would fail
            unfit = fused.too_wide(self.model, torch.float32, self.device) if self.engine == "fused" else None
            self.engine = "plain" if unfit else self.engine
            audio, finite = self._attempt(padded, exact, shape, names)
            if finite:
                self.overflowed = True
                log.warning("%s synthesis overflowed for the batch with %s (non-finite noise predictions): vocoded "
                            "again in fp32%s, and the rest of the run stays in fp32", first, names[0],
                            f" on the plain forward ({unfit})" if unfit else "")
            else:  # not an overflow (a diverged checkpoint, an absurd mel): the faster precision stays
                (self.precision, self.dtype, self.engine), self._built = half, None
        if not finite:
            log.warning("non-finite noise predictions in %s for the batch with %s: its audio is noise (the model's "
                        "output is not finite for these mels)", f"{first} and in fp32" if redone else first, names[0])
        return [audio[i, : int(n)].cpu().numpy() for i, n in enumerate(lengths)]

    def _attempt(self, mel: torch.Tensor, lengths: torch.Tensor | None, shape: tuple[int, int],
                 names: Sequence[str]) -> tuple[torch.Tensor, bool]:
        """One synthesis of the batch, and whether every noise prediction was finite; where the automatic fused
        engine does not compile on this GPU, on the plain forward instead."""
        try:
            return self._sample(mel, lengths, shape, names)
        except fused.KernelError as error:
            if self.chosen["engine"]:
                raise
            log.warning("%s; vocoding with the %splain forward instead", error, "compiled " if self.compile else "")
            self.engine, self._built = "plain", None
        return self._sample(mel, lengths, shape, names)  # outside the handler: the failed call's frames are gone

    def _sample(self, mel: torch.Tensor, lengths: torch.Tensor | None, shape: tuple[int, int],
                names: Sequence[str]) -> tuple[torch.Tensor, bool]:
        """`lengths` stay on the host for the sampler (read there without waiting for the device) and go to the
        device for the denoiser. On CUDA, `self.device` is made the current device: Triton launches, streams and
        graph captures go to the current device, not to the tensors' (cuda:1 ran on cuda:0)."""
        from models.vocoders.diffusion.ddpm import sample

        cuda = self.device.type == "cuda"
        with torch.cuda.device(self.device) if cuda else nullcontext(), tf32() if cuda else nullcontext():
            watch = FiniteWatch(self._denoiser(mel, None if lengths is None else lengths.to(self.device)))
            generators = [torch.Generator().manual_seed(utterance_seed(self.seed, n)) for n in names]
            audio = sample(watch, self.plan, shape, self.device, lengths, generators)
        return audio, watch.all_finite()

    def _denoiser(self, mel: torch.Tensor, lengths: torch.Tensor | None) -> Denoiser:
        """This batch's `denoise(x, step)`: the engine, over memory-bounded windows, CUDA-graphed where it pays."""
        self.projected = False
        if self.engine == "tiled":
            return ChunkedDenoiser(self.model, mel, lengths, self.chunk_size, self.cache_bytes, self.tile)
        if self.engine == "plain" and not isinstance(self.model, DiffWave):
            model = self._engine()[1]

            def plain(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
                with self._autocast():
                    return model(x, step, mel, lengths).float()

            return plain
        samples = mel.shape[0] * mel.shape[-1] * self.hop
        # auto: a graph where kernel launches outlast the work (measured on an H200: 1 s gains, 10 s loses the capture),
        # and only where one window holds the batch with room for the graph's own copy of its working set
        graph = self.device.type == "cuda" and (self.cuda_graph is True or (self.cuda_graph == "auto" and samples <= 1 << 16))
        budget = self._window_budget(mel.shape[0], mel.shape[-1] * self.hop, graph and self.cuda_graph is True)
        auto = graph and self.cuda_graph == "auto"
        try:
            denoise = WindowedDenoiser(self.model, mel, lengths, self.dtype, budget, *self._engine(), graphed=graph)
        except ConfigError:  # `auto` asks no room for a graph: a budget that holds no graphed window runs without one
            if not auto:
                raise
            denoise = None
        if auto and (denoise is None or len(denoise.windows) > 1):
            graph, denoise = False, WindowedDenoiser(self.model, mel, lengths, self.dtype, budget, *self._engine())
        self.projected = denoise.projected
        return GraphedDenoiser(denoise) if graph else denoise

    def _engine(self) -> tuple[fused.FusedDiffWave | None, Any]:
        """Built once per Vocoder: the fused layers' packed weights, or the (compiled) forward. Compiled with dynamic
        shapes: one graph serves every length (a static one recompiled for each new length, and after dynamo's 8
        went on in eager without a word)."""
        if self._built is None:
            if self.engine == "fused":
                self._built = (fused.FusedDiffWave(self.model, self.dtype or torch.float32), None)
            else:
                self._built = (None, torch.compile(self.model, dynamic=True) if self.compile else self.model)
        return self._built

    def _window_budget(self, batch: int, length: int, graphed: bool = False) -> int:
        """Bytes the windows may use: the budget (`gpu_memory_gib`; by default 80% of what the GPU could allocate,
        or on the CPU half of the host memory available) less the sampler's buffers. One that cannot hold the
        smallest window (`graphed`: twice, for a graph that must be captured) says which budget would."""
        budget = self.memory_bytes
        if budget is None:
            budget = int((0.8 if self.device.type == "cuda" else 0.5) * free_memory(self.device))
        reserve = 8 * batch * length * 4  # x, eps, noise, the graph's copies and the update's temporaries
        engine = "fused" if self.engine == "fused" else "plain"
        need = reserve + least_window_bytes(self.model, batch, length, engine, self.dtype, graphed)
        if budget < need:
            raise ConfigError(f"inference memory budget {byte_size(budget)} is too small for a batch of {batch} x "
                              f"{length} samples: the sampler's buffers need {byte_size(reserve)} and the smallest "
                              f"window {byte_size(need - reserve)} (set inference.gpu_memory_gib to at least "
                              f"{gib_at_least(need)}, or lower the batch size)")
        return budget - reserve

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
    """`cfg` defaults to the experiment's own config."""
    experiment = Experiment(expt_dir)
    cfg = cfg if cfg is not None else experiment.config()
    model = experiment.load_model(cfg, checkpoint, use_ema)
    infer = cfg.get("inference", {})
    options.setdefault("sampler", infer.get("sampler", "fast"))
    options.setdefault("batch_size", infer.get("batch_size", 1))
    if infer.get("steps") is not None and options.get("steps") is None:
        if options["sampler"] not in FIXED_STEPS:
            options["steps"] = infer["steps"]
            trained = int(cfg.model.diffwave.noise_schedule_factors[2])
            if options["sampler"] == "ddim" and infer["steps"] > trained:  # ddim walks a subset of the training steps
                raise ConfigError(f"{source_of(cfg, 'inference.steps')}: key 'inference.steps' ({infer['steps']}) "
                                  f"must be at most the {trained} training steps for the ddim sampler")
        elif infer.get("sampler", "fast") in FIXED_STEPS:  # else they are for the config's sampler the caller replaced
            raise ConfigError(f"{source_of(cfg, 'inference.steps')}: key 'inference.steps' ({infer['steps']}) does not "
                              f"apply to the {options['sampler']} sampler ({FIXED_STEPS[options['sampler']]}); remove it, "
                              "or set inference.sampler to ddim (N steps) or searched (a searched N-step schedule)")
    for key in ("chunk_size", "cache_gib", "tile", "engine", "compile", "cuda_graph", "gpu_memory_gib"):
        if infer.get(key) is not None:
            options.setdefault(key, infer.get(key))
    if options["sampler"] == "searched" and options.get("betas") is None:
        options["betas"] = experiment.searched_betas(options.get("steps"))
    return Vocoder(cfg, model, **options)
