"""Checkpoints that are safe to load and never half-written.

A checkpoint is a folder `epoch-XXXX_step-XXXXXXX_loss-X.XXXXXX/` holding `model.safetensors`
(the name accelerate's save_state uses), optional `ema.safetensors`, optimizer/scheduler/
scaler/RNG state as plain tensors (read with `weights_only=True`: no pickled code runs), the
config it was trained under (`config.json`), and `state.json` last. It is assembled under a
temporary name and renamed, so a folder with its final name is always complete.

Folders written by accelerate's `save_state` (the original toolkit's checkpoints) are read
too: weights, `optimizer.bin` and `scheduler.bin` safely, the position from the folder name;
`random_states_*.pkl` is never unpickled.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from utils.io import file_mode, load_json, remove_stale_temps, save_json

CHECKPOINT_DIR = "checkpoint"  # an experiment's checkpoints, under its folder
CHECKPOINT_PATTERN = re.compile(r"^epoch-(\d+)_step-(\d+)_loss-([0-9.]+|nan|inf)$")
CHECKPOINT_CONFIG = "config.json"  # the config a checkpoint was trained under
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt")
ACCELERATE_LAST_FILE = "random_states_0.pkl"  # save_state writes the RNG pickles after everything else


class CheckpointError(ValueError):
    """An unusable checkpoint; the message names the file and the problem."""


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def checkpoint_name(epoch: int, step: int, loss: float) -> str:
    return f"epoch-{epoch:04d}_step-{step:07d}_loss-{loss:.6f}"


def safe_torch_load(path: str | os.PathLike) -> Any:
    """torch.load that refuses anything but tensors and plain containers."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses anyway
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        detail = f"unsupported global {found.group(1)}" if found else "unsupported pickle content"
        raise CheckpointError(
            f"{path}: refused: the file carries pickled objects that could run code ({detail}); "
            "only tensors and plain containers are loaded"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({first_line(err)})") from None


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights from a checkpoint folder or file (.safetensors preferred; .bin/.pt read safely)."""
    path = Path(path)
    if path.is_dir():
        found = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
        if found is None:
            raise CheckpointError(f"{path}: no model weights ({' / '.join(WEIGHT_FILES)}) in this folder")
        path = found
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint does not exist")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except Exception as err:
            raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None
    else:
        state = safe_torch_load(path)
        for key in ("model", "state_dict", "generator"):  # common wrappers of published weights
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: not a dictionary of weight tensors")
    return require_finite(strip_wrapper_prefix(state), path)


def require_finite(state: dict[str, torch.Tensor], source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Refuse NaN/inf weights: they vocode a constant wav with exit 0 instead of failing."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{source}: parameter '{name}' holds NaN or inf values; this checkpoint is unusable")
    return state


def strip_wrapper_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """accelerate's save_state keeps DDP's `module.` prefix (multi-GPU runs of the original): drop it."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Strict load with one clear line for a missing, unexpected or mis-shaped parameter."""
    check_fits(model, state, source)
    model.load_state_dict(state)


def check_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """`state` has exactly the model's parameters, each of its shape; else one line naming the first that is not
    (EMA weights too, which are never loaded into the model: another model's would fail deep in the first step)."""
    own = model.state_dict()
    for name, tensor in state.items():
        if name in own and own[name].shape != tensor.shape:
            raise CheckpointError(
                f"{source}: parameter '{name}' has shape {tuple(tensor.shape)}, the model expects {tuple(own[name].shape)}"
            )
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"{source}: weights do not match the model ({detail})")


TEMP_PREFIX = ".tmp-"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_aside(folder: Path) -> Path | None:
    """Rename a checkpoint folder out of sight, to be deleted (None where there is none): a folder with a checkpoint
    name is never half-deleted.

    Only a real folder with a checkpoint name is ever removed; a symlink or any other name is
    refused, so no listing (ckpts.json included) can make a run delete anything else.
    """
    if folder.is_symlink() or not CHECKPOINT_PATTERN.match(folder.name):
        raise CheckpointError(f"{folder}: refused to delete: not a checkpoint folder written by this toolkit")
    if not folder.exists():
        return None
    doomed = folder.with_name(f"{TEMP_PREFIX}del-{folder.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    return doomed


def finish_interrupted_save(root: Path) -> None:
    """A save killed between its two renames (`set_aside`, then the new folder's) left the earlier checkpoint in
    `.tmp-del-<name>` and the new one, complete and synced, in `.tmp-<name>`: the new one takes its name. (A prune
    killed mid-delete leaves `.tmp-del-<name>` alone, with nothing to put back.)"""
    for doomed in root.glob(f"{TEMP_PREFIX}del-*"):
        name = doomed.name.removeprefix(f"{TEMP_PREFIX}del-")
        new = root / f"{TEMP_PREFIX}{name}"
        if CHECKPOINT_PATTERN.match(name) and not (root / name).exists() and (new / "state.json").is_file():
            try:
                os.replace(new, root / name)
            except OSError:  # a read-only copy, or another process of the run did it first
                continue


def remove_checkpoint(folder: Path) -> None:
    doomed = set_aside(folder)
    if doomed is not None:
        shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(folder: Path, files: dict[str, Any], state: dict) -> Path:
    """Write a complete checkpoint folder atomically: tensors, then state.json, fsync, then rename.

    Temporary folders (`.tmp-*`) left by an interrupted save are removed here: only the
    training process writes in this folder, and list_checkpoints never reads them.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    finish_interrupted_save(folder.parent)
    for stale in folder.parent.glob(f"{TEMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    remove_stale_temps(folder.parent)
    tmp = folder.with_name(f"{TEMP_PREFIX}{folder.name}")
    tmp.mkdir()
    try:
        for name, obj in files.items():
            if name.endswith(".safetensors"):
                save_file({k: v.detach().contiguous().cpu() for k, v in obj.items()}, str(tmp / name))
                os.chmod(tmp / name, file_mode())  # safetensors writes 0600 whatever the umask
            elif name.endswith(".json"):
                save_json(tmp / name, obj)
            else:
                torch.save(obj, tmp / name)
            _fsync(tmp / name)
        save_json(tmp / "state.json", state)
        _fsync(tmp)
        doomed = set_aside(folder)  # a checkpoint of the same name is deleted only once this one has its name
        try:
            os.replace(tmp, folder)
        except BaseException:  # a second Ctrl-C in between: the earlier one keeps its name
            if doomed is not None:
                os.replace(doomed, folder)
            raise
        _fsync(folder.parent)
        if doomed is not None:
            shutil.rmtree(doomed, ignore_errors=True)
    except (RuntimeError, SafetensorError) as err:  # how torch.save and safetensors report a failed write (a full disk)
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(first_line(err)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def is_accelerate_folder(folder: Path) -> bool:
    """Written by accelerate's save_state (no state.json), and finished: its last file is there."""
    return not (folder / "state.json").is_file() and (folder / ACCELERATE_LAST_FILE).is_file()


def is_complete(folder: Path) -> bool:
    finished = (folder / "state.json").is_file() or is_accelerate_folder(folder)
    return finished and any((folder / n).is_file() for n in WEIGHT_FILES)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest step first (of one step, the later epoch's: skipped windows
    can give an epoch's checkpoint the step of a step save before them)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: tuple(int(n) for n in CHECKPOINT_PATTERN.match(p.name).group(2, 1)))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder itself, or the newest complete one inside an experiment's checkpoint folder."""
    path = Path(path)
    if path.is_dir() and is_complete(path):
        return path
    candidates = list_checkpoints(path) or list_checkpoints(path / CHECKPOINT_DIR)
    if not candidates:
        raise CheckpointError(f"{path}: no complete checkpoint here (expected epoch-*_step-*_loss-* folders "
                              f"holding weights and state.json, or accelerate's {ACCELERATE_LAST_FILE})")
    return candidates[-1]


STATE_FIELDS = {"epoch": int, "step": int, "batch_in_epoch": int, "skipped_steps": int}


def read_state(folder: Path) -> dict:
    """state.json checked field by field (a damaged file is one clear line, never a KeyError later); for
    an accelerate save_state folder, its position from the folder name."""
    if is_accelerate_folder(folder):
        return accelerate_position(folder)
    path = folder / "state.json"
    try:
        state = load_json(path)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint state ({first_line(err)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: checkpoint state must be a JSON object, got {type(state).__name__}")
    for key, kind in STATE_FIELDS.items():
        value = state.get(key, 0) if key in ("batch_in_epoch", "skipped_steps") else state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{path}: '{key}' must be a non-negative integer, got {value!r}")
    named = re.search(r"(?:^|-)epoch-(\d+)_step-(\d+)_loss-", folder.name)  # abandoned-<name> too
    if named and (int(named[1]), int(named[2])) != (state["epoch"], state["step"]):  # the name orders resume and pruning
        raise CheckpointError(f"{path}: epoch {state['epoch']}, step {state['step']}, but its folder is named for epoch "
                              f"{int(named[1])}, step {int(named[2])} (renamed by hand?); rename it back to "
                              f"epoch-{state['epoch']:04d}_step-{state['step']:07d}_loss-...")
    return state


def accelerate_position(folder: Path) -> dict:
    """Where an accelerate save_state folder stands, from its name (it has no state.json).

    The original names a folder after the epoch it has just finished, counting from 0, and
    resumes at the next epoch: so `epoch-0009` means 10 epochs done.
    """
    match = CHECKPOINT_PATTERN.match(folder.name)
    if match is None:
        raise CheckpointError(f"{folder}: an accelerate checkpoint needs its epoch-XXXX_step-XXXXXXX_loss-X.XXXXXX "
                              "name to resume (the step and epoch are read from it); rename it back")
    return {"epoch": int(match[1]) + 1, "step": int(match[2]), "batch_in_epoch": 0, "skipped_steps": 0,
            "loss": float(match[3])}


def training_state_file(folder: Path, stem: str) -> Path:
    """`<stem>.pt` (ours) or `<stem>.bin` (accelerate's save_state); both are read with weights_only."""
    for name in (f"{stem}.pt", f"{stem}.bin"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no {stem}.pt or {stem}.bin, which --resume_type resume needs "
                          "(--resume_type finetune loads the weights alone)")
