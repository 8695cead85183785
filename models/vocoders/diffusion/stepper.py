"""The optimizer step that closes a window of micro-batches, decided on the GPU where it can be.

A step is taken only when every loss of its window and the gradient norm are finite. Reading
them on the host makes the CPU wait for the GPU at every step, and the GPU then waits for the
CPU's next launches. With fused AdamW and no grad scaler the decision stays on the device: the
fused kernel skips a non-finite step itself (its `found_inf` input, the one a grad scaler uses)
and the EMA moves by zero, so the trainer may read the outcome a window later, while the GPU
already works on the next one. Otherwise the host reads and decides at once, as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

from models.vocoders.diffusion.train_state import EMA
from utils.config import ConfigError, bool_or_auto, source_of


def make_optimizer(model: torch.nn.Module, cfg: Any, device: torch.device, precision: str) -> torch.optim.AdamW:
    """AdamW; `train.adamw.fused` ("auto": on CUDA without a grad scaler) updates every tensor in one kernel.

    Under fp16's grad scaler the fused kernel would skip overflowed steps without telling
    accelerate, which counts skipped steps; there the multi-tensor update stays.
    """
    adamw = cfg.train.adamw
    fused = bool_or_auto(adamw.get("fused", "auto"), "train.adamw.fused", device.type == "cuda" and precision != "fp16")
    if fused and precision == "fp16":
        raise ConfigError(f"{source_of(cfg, 'train.adamw.fused')}: key 'train.adamw.fused' cannot be true with "
                          "mixed_precision 'fp16' (its grad scaler's skipped steps would go uncounted); use bf16, or "
                          "fused 'auto'")
    return torch.optim.AdamW(model.parameters(), lr=float(adamw.lr), betas=(float(adamw.adam_b1), float(adamw.adam_b2)),
                             fused=fused or None)


class HostCopy:
    """`values` on their way to the host: the copy starts without waiting, and `read` waits only for the
    work queued before it, not for the next window queued after it (which a plain `.tolist()` would)."""

    def __init__(self, values: Tensor) -> None:
        self.ready = None
        self.host = values
        if values.is_cuda:
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()

    def read(self) -> Any:
        """The values as Python numbers (a list, or one number for a 0-d tensor)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


@dataclass
class Inflight:
    """A launched step: its window's losses, the gradient norm and 1 if it was taken, on their way to the host."""

    readings: HostCopy
    audio_seconds: float
    stepped: bool | None  # None: decided on the device, known once `readings` are read


@dataclass
class Outcome:
    stepped: bool
    losses: list[float]
    grad_norm: float
    audio_seconds: float


class Stepper:
    """Clips, steps (or skips) and updates the EMA for each window; `settle` reads what happened."""

    def __init__(self, accelerator: Accelerator, optimizer: Any, ema: EMA | None, max_grad_norm: float) -> None:
        self.accelerator, self.optimizer, self.ema = accelerator, optimizer, ema
        self.max_norm = float(max_grad_norm or math.inf)
        self.inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
        self.on_device = bool(self.inner.defaults.get("fused")) and accelerator.scaler is None

    def launch(self, model: torch.nn.Module, losses: list[Tensor], step: int, audio_seconds: float) -> Inflight:
        """The step closing a window whose losses are `losses`, after `step` steps taken so far."""
        acc = self.accelerator
        norm = acc.clip_grad_norm_(model.parameters(), self.max_norm)
        readings = torch.stack([*losses, torch.as_tensor(norm, device=losses[0].device)]).float()
        ok = torch.isfinite(readings).all()
        if self.on_device:
            self.inner.found_inf = (~ok).float()
            try:
                self.optimizer.step()
            finally:
                del self.inner.found_inf
            if self.ema is not None:
                self.ema.update(acc.unwrap_model(model), step + 1, gate=ok)
            stepped = None
        else:
            stepped = False
            # With a grad scaler a non-finite norm is its overflow signal: it skips the step and lowers the scale.
            if acc.scaler is not None or bool(ok):
                self.optimizer.step()
                stepped = not self.optimizer.step_was_skipped
            if stepped and self.ema is not None:
                self.ema.update(acc.unwrap_model(model), step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        return Inflight(HostCopy(torch.cat([readings, ok.float().reshape(1)])), audio_seconds, stepped)

    @staticmethod
    def settle(inflight: Inflight) -> Outcome:
        """What a launched step did (waits for the GPU to get there, and no further)."""
        *losses, grad_norm, ok = inflight.readings.read()
        stepped = ok > 0 if inflight.stepped is None else inflight.stepped
        return Outcome(stepped, losses, grad_norm, inflight.audio_seconds)
