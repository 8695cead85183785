"""The DDPM maths, in one place: schedules, training noise, and the samplers.

Used by the trainer, the in-training evaluation and stage 3 alike.
- full: the T-step ancestral sampler over the training betas;
- fast: DiffWave's fast sampler over `inference_noise_schedule`, each of its steps mapped
  to a fractional training step by matching sqrt(alpha_cum);
- ddim: the deterministic DDIM update on N evenly spaced training steps from the last (N = 1: the last alone).
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from utils.config import ConfigError

SAMPLERS = ("fast", "full", "ddim")
SAMPLER_NAMES = (*SAMPLERS, "searched")  # searched: the fast sampler over an experiment's searched schedule
Denoiser = Callable[[Tensor, Tensor], Tensor]


def training_betas(params: Any) -> Tensor:
    start, end, steps = params["noise_schedule_factors"]
    return torch.linspace(float(start), float(end), int(steps), dtype=torch.float64)


def alpha_cum(betas: Tensor) -> Tensor:
    return torch.cumprod(1.0 - betas.double(), dim=0)


def add_noise(audio: Tensor, noise: Tensor, t: Tensor, cum: Tensor) -> Tensor:
    """x_t = sqrt(alpha_cum[t]) x_0 + sqrt(1 - alpha_cum[t]) eps, per item."""
    a = cum.to(audio.device)[t].float().unsqueeze(-1)
    return a.sqrt() * audio + (1.0 - a).sqrt() * noise


def noise_prediction_loss(model: torch.nn.Module, mel: Tensor, audio: Tensor, cum: Tensor,
                          autocast: AbstractContextManager | None = None) -> Tensor:
    """DiffWave's training objective: L1 between the noise added at a random training step and the model's
    prediction of it (the prediction in `autocast`, the loss in fp32)."""
    t = torch.randint(0, len(cum), (audio.shape[0],), device=audio.device)
    noise = torch.randn_like(audio)
    with autocast or nullcontext():
        predicted = model(add_noise(audio, noise, t, cum), t, mel)
    return F.l1_loss(predicted.float(), noise)


def fractional_steps(train_betas: Tensor, infer_betas: Tensor) -> Tensor:
    """Training-step positions whose interpolated sqrt(alpha_cum) equals each inference step's."""
    train = alpha_cum(train_betas).sqrt()
    target = alpha_cum(infer_betas).sqrt()
    steps = []
    for value in target.tolist():
        if value >= train[0]:
            steps.append(0.0)
            continue
        if value <= train[-1]:
            steps.append(float(len(train) - 1))
            continue
        t = int(torch.searchsorted(-train, torch.tensor(-value, dtype=train.dtype))) - 1
        steps.append(t + float((train[t] - value) / (train[t] - train[t + 1])))
    return torch.tensor(steps, dtype=torch.float32)


class Step(NamedTuple):
    """One reverse step: x <- clamp(x_scale * x + eps_scale * eps(x, position) + sigma * fresh noise, -1, 1)."""

    position: float
    x_scale: float
    eps_scale: float
    sigma: float


@dataclass(frozen=True)
class SamplerPlan:
    """A reverse walk: per step, the position fed to the step embedding and the schedule values."""

    kind: str
    positions: Tensor
    betas: Tensor

    @property
    def steps(self) -> int:
        return len(self.positions)

    def walk(self) -> list[Step]:
        """The steps in the order they run, as the one table every sampler loop (PyTorch, TorchScript, ONNX) reads."""
        cum = alpha_cum(self.betas).tolist()
        if self.kind == "ddim":  # x0 = (x - sqrt(1 - a) eps) / sqrt(a); x <- sqrt(a') x0 + sqrt(1 - a') eps
            order = self.positions.long().flip(0).tolist()
            walk = []
            for i, t in enumerate(order):
                a, prev = cum[t], cum[order[i + 1]] if i + 1 < len(order) else 1.0
                scale = math.sqrt(prev) / math.sqrt(a)
                walk.append(Step(float(t), scale, math.sqrt(1 - prev) - scale * math.sqrt(1 - a), 0.0))
            return walk
        walk = []  # ancestral: x <- (x - beta / sqrt(1 - a) eps) / sqrt(1 - beta) + sigma z, no noise at the last step
        for n in range(self.steps - 1, -1, -1):
            beta, a = float(self.betas[n]), cum[n]
            sigma = math.sqrt((1 - cum[n - 1]) / (1 - a) * beta) if n > 0 else 0.0
            walk.append(Step(float(self.positions[n]), 1 / math.sqrt(1 - beta), -beta / math.sqrt(1 - a) / math.sqrt(1 - beta),
                             sigma))
        return walk


# Samplers whose number of steps is set elsewhere, and where.
FIXED_STEPS = {"fast": "its steps are the config's model.diffwave.inference_noise_schedule",
               "full": "it walks every training step"}


def make_plan(params: Any, sampler: str = "fast", steps: int | None = None, betas: Sequence[float] | None = None) -> SamplerPlan:
    """Build a sampler plan from `model.diffwave` params; `betas` overrides the fast schedule (and is the searched
    one). Steps or betas a sampler would ignore are refused, as is an empty schedule (its "audio" was the noise)."""
    if sampler in FIXED_STEPS and steps is not None:
        raise ConfigError(f"sampler '{sampler}' takes no steps ({FIXED_STEPS[sampler]}); use ddim (N steps) or "
                          "searched (a searched N-step schedule)")
    if sampler in ("full", "ddim") and betas is not None:
        raise ConfigError(f"sampler '{sampler}' takes no betas: they replace the fast schedule (samplers fast and searched)")
    if sampler == "searched" and betas is None:
        raise ConfigError("sampler 'searched' needs its searched schedule (betas): vocoder_from_experiment loads the "
                          "experiment's, which bins/vocoder/search_schedule.py finds")
    if betas is not None and len(betas) == 0:
        raise ConfigError("an empty noise schedule (betas []): a sampler needs at least one step")
    if sampler == "searched" and steps is not None and steps != len(betas):
        raise ConfigError(f"sampler 'searched' takes the steps of its schedule ({len(betas)}), not {steps}")
    train = training_betas(params)
    if sampler == "full":
        return SamplerPlan("ddpm", torch.arange(len(train), dtype=torch.float32), train)
    if sampler in ("fast", "searched"):
        infer = torch.tensor(betas if betas is not None else params["inference_noise_schedule"], dtype=torch.float64)
        return SamplerPlan("ddpm", fractional_steps(train, infer), infer)
    if sampler == "ddim":
        n = 6 if steps is None else int(steps)
        if not 1 <= n <= len(train):
            raise ConfigError(f"ddim steps must be in 1..{len(train)}, got {n}")
        # The walk starts from pure noise, so it must start at the last training step: one step is that step alone
        # (linspace(0, T - 1, 1) is [0], where the x0 estimate is the starting noise itself)
        chosen = torch.linspace(0, len(train) - 1, n).round().long().unique() if n > 1 else torch.tensor([len(train) - 1])
        return SamplerPlan("ddim", chosen.float(), train)
    raise ConfigError(f"unknown sampler '{sampler}': choose one of {', '.join(SAMPLER_NAMES)}")


def _noise(shape: tuple[int, int], sizes: list[int] | None, generators: Sequence[torch.Generator] | None,
           pinned: bool = False) -> Tensor:
    """Gaussian noise drawn per item from its own generator, zero past each item's end (`sizes`), straight into
    page-locked memory when it goes to a GPU. Items are drawn on parallel threads (torch releases the GIL), so a
    batch of 16 costs about what one costs: on one thread the host drew 16 x 10 s in about 20 ms, a third of an
    H200's denoising step. Each item is drawn exactly once, and all are drawn before this returns or raises."""
    if generators is None:
        out = torch.randn(shape, pin_memory=pinned)
        for b, n in enumerate(sizes or []):
            out[b, n:] = 0.0
        return out
    out = torch.empty(shape, pin_memory=pinned)
    done = [threading.Event() for _ in generators]
    claimed: set[int] = set()
    errors: list[Exception] = []
    lock = threading.Lock()

    def draw(b: int) -> None:  # a row may be queued twice (see below): the first to claim it draws it
        with lock:
            if b in claimed:
                return
            claimed.add(b)
        try:
            n = shape[1] if sizes is None else sizes[b]
            torch.randn(n, generator=generators[b], out=out[b, :n])
            out[b, n:] = 0.0
        except Exception as error:
            errors.append(error)
        finally:
            done[b].set()

    parallel = len({id(g) for g in generators}) == len(generators) > 1  # a shared generator's draws keep their order
    for b in range(len(generators)):
        if parallel:
            try:
                _drawers().submit(draw, b)
                continue
            except RuntimeError:  # no thread to be had (the interpreter is shutting down, or the process's limit);
                parallel = False  # submit may have queued the row before failing to start a thread for it
        draw(b)
    for event in done:
        event.wait()
    if errors:
        raise errors[0]
    return out


@functools.cache
def _drawers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(16, len(os.sched_getaffinity(0))), thread_name_prefix="noise")


os.register_at_fork(after_in_child=_drawers.cache_clear)  # a forked child has none of the parent's threads


@torch.no_grad()
def sample(
    denoise: Denoiser,
    plan: SamplerPlan,
    shape: tuple[int, int],
    device: torch.device | str = "cpu",
    lengths: Tensor | None = None,
    generators: Sequence[torch.Generator] | None = None,
) -> Tensor:
    """Run the reverse process from Gaussian noise; `denoise(x, step_positions)` predicts eps.

    Nothing here waits for the device: each step's noise is drawn on the host while the device denoises. (The
    lengths of a padded batch were once read from the GPU at every step, so the host drew only after the GPU had
    finished: the likely cause of the 30 ms by which a batch-16 step outlasted its kernels on an H200.)"""
    values = lengths.tolist() if isinstance(lengths, Tensor) else lengths  # a GPU tensor is read here, once
    sizes = None if values is None else [int(n) for n in values]
    if generators is not None and len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} noise generators for a batch of {shape[0]}")
    if sizes is not None and (len(sizes) != shape[0] or not all(0 <= n <= shape[1] for n in sizes)):
        raise ValueError(f"lengths {sizes} do not fit a batch of shape {tuple(shape)}")
    pinned = torch.device(device).type == "cuda"
    x = _to_device(_noise(shape, sizes, generators, pinned), device)
    for step in plan.walk():
        eps = denoise(x, torch.full((shape[0],), step.position, device=device))
        x = step.x_scale * x + step.eps_scale * eps
        if step.sigma > 0:  # drawn on the CPU (the same noise on every device) while the device denoises
            x = x + step.sigma * _to_device(_noise(shape, sizes, generators, pinned), device)
        # Clamped after every step on every path. (Clamping DDIM's x0 estimate instead pins each
        # overshoot at exactly +-1, and the deterministic walk keeps it there: clicks.)
        x = x.clamp(-1.0, 1.0)
    return x


def _to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """A CPU tensor on `device`; to CUDA from pinned memory without waiting for the queued work (the host allocator
    keeps the pinned block until the copy is done)."""
    return tensor.to(device, non_blocking=tensor.is_pinned())
