"""What a training checkpoint holds, written and read back in one place.

A checkpoint folder holds the model and EMA weights (safetensors), the optimizer, LR scheduler
and grad scaler states, one RNG file per process (see checkpointing), and state.json with the
counters that put a resumed run exactly where the uninterrupted one would be. `state_dict`
names every file; `load_state_dict` (resume) and `load_weights` (finetune, inference) read them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from utils.checkpoint import (
    WEIGHT_FILES,
    CheckpointError,
    check_fits,
    first_line,
    load_into,
    load_weights,
    read_state,
    safe_torch_load,
    training_state_file,
)

log = logging.getLogger(__name__)
MODEL_FILE, EMA_FILE, SCALER_FILE = WEIGHT_FILES[0], "ema.safetensors", "scaler.pt"
COUNTERS = ("epoch", "step", "batch_in_epoch", "skipped_steps")


def float_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached fp32 copy of the weights: what a fresh EMA starts from."""
    return {k: v.detach().clone().float() for k, v in model.state_dict().items()}


def weights_source(folder: Path, use_ema: bool = True) -> Path:
    """The file (EMA weights when present and wanted) or folder (raw weights) to synthesise with."""
    ema = folder / EMA_FILE
    return ema if use_ema and ema.is_file() else folder


class EMA:
    """Exponential moving average of the weights, warmed up so short runs are usable."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = float_copy(model)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int, gate: torch.Tensor | None = None) -> None:
        """shadow += (1 - decay) (weights - shadow) for every float tensor at once; times `gate` (0 or 1, on the
        device) when the optimizer step it follows was decided there."""
        decay = min(self.decay, (1 + step) / (10 + step))
        shadows, values = [], []
        for name, value in model.state_dict().items():
            shadow = self.shadow[name]
            if shadow.device != value.device:  # made or loaded before the model moved to its device
                shadow = self.shadow[name] = shadow.to(value.device)
            if value.dtype.is_floating_point:
                shadows.append(shadow)
                values.append(value.detach().float())
            else:
                shadow.copy_(value)
        if shadows:
            moves = torch._foreach_sub(values, shadows)
            torch._foreach_mul_(moves, (1 - decay) if gate is None else gate.float() * (1 - decay))
            torch._foreach_add_(shadows, moves)


def this_runs_kernel(saved: Any, optimizer: torch.optim.Optimizer) -> None:
    """Give a saved optimizer state this run's kernel choice (train.adamw.fused), not the saving run's.

    Loading would otherwise copy the saved groups' `fused`/`foreach` over this optimizer's, so a checkpoint
    saved without fused AdamW would step unfused under a trainer that passes it the device's skip flag.
    """
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    for group, current in zip(groups if isinstance(groups, list) else [], optimizer.param_groups, strict=False):
        if isinstance(group, dict):
            group.update({key: current[key] for key in ("fused", "foreach", "capturable") if key in current})


@dataclass
class TrainState:
    """The unwrapped model and optimizer, the scheduler, the EMA (`.shadow`) and grad scaler, and the counters."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Any = None
    scaler: Any = None
    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    skipped_steps: int = 0

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's files by name, without the counters (`counters`) and RNG states."""
        files: dict[str, Any] = {
            MODEL_FILE: self.model.state_dict(),
            "optimizer.pt": self.optimizer.state_dict(),
            "scheduler.pt": self.scheduler.state_dict(),
        }
        if self.ema is not None:
            files[EMA_FILE] = self.ema.shadow
        if self.scaler is not None:
            files[SCALER_FILE] = self.scaler.state_dict()
        return files

    def counters(self) -> dict[str, int]:
        return {key: getattr(self, key) for key in COUNTERS}

    def load_state_dict(self, folder: Path) -> None:
        """Resume: everything from a complete checkpoint folder, ours or accelerate's save_state."""
        load_into(self.model, load_weights(folder), folder)
        parts = [(training_state_file(folder, stem), target) for stem, target in (("optimizer", self.optimizer),
                                                                                    ("scheduler", self.scheduler))]
        if self.scaler is not None and (folder / SCALER_FILE).is_file():
            parts.append((folder / SCALER_FILE, self.scaler))
        for path, target in parts:
            saved = safe_torch_load(path)  # a refused file is reported as refused, not as damaged
            if target is self.optimizer:
                this_runs_kernel(saved, self.optimizer)
            fresh = target.state_dict()
            try:
                target.load_state_dict(saved)
                unfit = misfit_moment(self.optimizer, self.model) if target is self.optimizer else misfit_field(fresh, saved)
            except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as err:
                raise CheckpointError(f"{path}: damaged or from another model ({first_line(err)})") from None
            if unfit:  # it would fail deep inside the first step or the epoch's end, as a traceback
                raise CheckpointError(f"{path}: damaged or from another model ({unfit})")
        if self.ema is not None:
            ema_file = folder / EMA_FILE
            if not ema_file.is_file():
                log.warning("%s: no EMA weights (%s); the EMA starts again from the resumed weights", folder, EMA_FILE)
            self.ema.shadow = self.ema_from(ema_file) if ema_file.is_file() else float_copy(self.model)
        state = read_state(folder)
        self.epoch, self.step = state["epoch"], state["step"]
        self.batch_in_epoch, self.skipped_steps = state.get("batch_in_epoch", 0), state.get("skipped_steps", 0)

    def load_weights(self, source: Path) -> None:
        """Finetune: the weights of a checkpoint folder or weights file, and its EMA when it has one.

        Without EMA weights in the source, the EMA restarts from the loaded weights; the optimizer
        and counters stay fresh.
        """
        load_into(self.model, load_weights(source), source)
        if self.ema is None:
            return
        ema_file = source / EMA_FILE if source.is_dir() else None
        self.ema.shadow = self.ema_from(ema_file) if ema_file is not None and ema_file.is_file() else float_copy(self.model)

    def ema_from(self, path: Path) -> dict[str, torch.Tensor]:
        """EMA weights checked against the model as its raw weights are (the same clear error for a shape mismatch)."""
        shadow = load_weights(path)
        check_fits(self.model, shadow, path)
        return {name: tensor.float() for name, tensor in shadow.items()}


def misfit_moment(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> str | None:
    """The first restored optimizer state tensor whose shape is not its parameter's (another model's optimizer.pt)."""
    names = {id(p): name for name, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                    return (f"'{key}' of parameter '{names.get(id(param), '?')}' has shape {tuple(value.shape)}, the "
                            f"model's is {tuple(param.shape)}")
    return None


def misfit_field(fresh: dict, saved: dict) -> str | None:
    """The first field of a restored scheduler state whose kind differs from a fresh one's (a list of another length,
    a string for a number)."""
    def kind(value: Any) -> str:
        if isinstance(value, list | tuple):
            return f"[{', '.join(kind(v) for v in value)}]"
        return "number" if isinstance(value, int | float) and not isinstance(value, bool) else type(value).__name__
    for key, value in fresh.items():
        if key in saved and kind(saved[key]) != kind(value):
            return f"'{key}' is {saved[key]!r}, expected {kind(value)}"
    return None
