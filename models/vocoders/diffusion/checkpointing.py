"""When to save, what to keep, and the RNG state that makes a resume exact."""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.vocoders.diffusion.diffwave.geometry import upsample_factors
from models.vocoders.diffusion.experiment import RECORDS_FILE, Experiment, differing_results, trained_config
from models.vocoders.diffusion.train_state import TrainState
from utils.checkpoint import (
    CHECKPOINT_CONFIG,
    CHECKPOINT_PATTERN,
    CheckpointError,
    checkpoint_name,
    finish_interrupted_save,
    first_line,
    is_accelerate_folder,
    list_checkpoints,
    read_state,
    remove_checkpoint,
    resolve_checkpoint,
    safe_torch_load,
    save_checkpoint,
)
from utils.config import ConfigError, source_of, to_plain
from utils.io import load_json, probe_writable, save_json
from utils.text import plural

log = logging.getLogger(__name__)
ABANDONED_PREFIX = "abandoned-"  # outside CHECKPOINT_PATTERN: neither resumed from nor pruned


def rng_state() -> dict:
    """Every RNG the training loop draws from, as plain tensors and numbers (safe to load)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": [list(random.getstate()[1]), random.getstate()[0]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, source: str | Path = "RNG state") -> None:
    """Restore what rng_state saved; a file missing keys or holding the wrong types is one clear line."""
    try:
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
        internal, version = state["python"]
        random.setstate((version, tuple(internal), None))
        if "cuda" in state and torch.cuda.is_available():  # a resume may see fewer GPUs than the run that saved
            for index in range(min(len(state["cuda"]), torch.cuda.device_count())):
                torch.cuda.set_rng_state(state["cuda"][index], index)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as err:
        detail = f"missing key {err}" if isinstance(err, KeyError) else first_line(err)
        raise CheckpointError(f"{source}: damaged RNG state ({detail})") from None


def restore_rng(folder: Path, process_index: int) -> None:
    """A resumed process's RNG state from its own file in `folder`; accelerate's RNG pickles are never loaded."""
    if is_accelerate_folder(folder):
        log.warning("%s: written by accelerate's save_state; its RNG pickles (random_states_*.pkl) are not "
                    "loaded, since unpickling can run code: the RNG stream restarts from the seed", folder)
        return
    rng_file = folder / f"rng_{process_index}.pt"
    if rng_file.is_file():
        set_rng_state(safe_torch_load(rng_file), rng_file)
    else:
        log.warning("%s: no RNG state for process %d; the noise differs from the original run", folder, process_index)


def refuse_to_mix_runs(exp_dir: Path, resume_type: str | None) -> None:
    """A new run never lands in an existing experiment: its config and checkpoints would mix with the old ones."""
    if resume_type == "resume" or not exp_dir.is_dir():
        return
    experiment = Experiment(exp_dir)
    if list_checkpoints(experiment.checkpoints):
        raise ConfigError(f"{exp_dir}: an experiment of this name already exists; pass --resume_type resume to "
                          "continue it, or choose another --name")
    if experiment.args.exists() and resume_type == "finetune":  # it has nothing to lose: the finetune starts it again
        log.warning("%s: stopped before its first checkpoint; the finetune starts it again", exp_dir)
    elif experiment.args.exists():
        raise ConfigError(f"{exp_dir}: an experiment of this name already exists, stopped before its first checkpoint; "
                          "pass --resume_type resume to start it again from step 0, or choose another --name")


def resume_folder(experiment: Experiment, checkpoint: str | Path | None, cfg: Any) -> Path | None:
    """The checkpoint a resume under `cfg` starts from; None when the experiment stopped before its first save
    (killed, or stopped by bad steps), which then starts again from step 0 rather than being stuck.

    A checkpoint from outside an experiment that has checkpoints of its own is refused: resumed there, it would
    graft another run's weights onto this one's history."""
    own = checkpoint is None or Path(checkpoint).resolve() in (experiment.root.resolve(), experiment.checkpoints.resolve())
    finish_interrupted_save(experiment.checkpoints)  # a save killed between its renames hid the newest
    listed = list_checkpoints(experiment.checkpoints)
    started = experiment.args.is_file() or experiment.stopped_in_setup()
    aside = sorted(p.name for p in experiment.checkpoints.glob(f"{ABANDONED_PREFIX}*"))
    if own and not listed and not started and not aside:
        # a --name or --config that names no experiment: "<log_dir>/<name>/checkpoint: no complete checkpoint here" named
        # log_dir as the config wrote it (relative to the repo root, not to where run.sh was started)
        raise ConfigError(f"{experiment.root.resolve()}: no experiment of this name to resume (log_dir "
                          f"'{cfg.log_dir}' from {source_of(cfg, 'log_dir')}); check --name and --config (the one it "
                          "was trained with), or leave out --resume_type to start a new one")
    if own and started and not listed:
        if aside:  # a rollback was stopped before its first save: its start is not here to go on from
            raise ConfigError(f"{experiment.checkpoints}: no checkpoint to go on from, {plural(len(aside), 'checkpoint')} "
                              f"moved aside by a rollback ({', '.join(aside)}): pass --checkpoint with the one to resume")
        source = experiment.finetuned_from()
        if source is not None:  # step 0 of a finetune is its source's weights, which a resume has not got
            raise ConfigError(f"{experiment.root}: a finetune of {source} that stopped before its first checkpoint; "
                              f"start it again with --resume_type finetune --checkpoint {source}")
        log.warning("%s: no checkpoint yet (the run stopped before its first save): starting it again from step 0",
                    experiment.root)
        return None
    folder = resolve_checkpoint(checkpoint or experiment.checkpoints)
    if listed and folder.resolve().parent != experiment.checkpoints.resolve():
        raise ConfigError(f"{folder}: not a checkpoint of {experiment.root}, which has its own (newest "
                          f"{listed[-1].name}); to roll back to it, copy it into {experiment.checkpoints} first, or "
                          "resume it into another --name")
    experiment.refuse_changed_results(cfg, folder)
    return folder


UPSAMPLE_KEY = "model.diffwave.upsample_factors"  # compared as used: set, or derived from the hop size
SHAPE_KEYS = ("preprocess.n_mel", "model.generator", "model.diffwave.residual_channels", "model.diffwave.residual_layers",
              UPSAMPLE_KEY)


def check_finetune_source(source: Path, cfg: Any) -> None:
    """A finetune keeps the model's shape: another one is refused naming the setting (the weights would not load).
    Other settings that change the result (the mel, the noise schedule) may change, with a warning: the model
    learnt another mel, and starts far from the new one."""
    changed = _finetune_changes(source, cfg)
    for key, ours, theirs in changed:
        if key in SHAPE_KEYS:
            raise ConfigError(f"{source_of(cfg, key)}: {key} is {ours}, but {source} was trained with {theirs}; a "
                              "finetune keeps the model's shape: set it back, or train a new model")
    if changed:
        log.warning("finetuning %s under other settings than it was trained with: %s", source,
                    ", ".join(f"{key} {theirs} -> {ours}" for key, ours, theirs in changed))


def _finetune_changes(source: Path, cfg: Any) -> list[tuple[str, Any, Any]]:
    """(key, ours, theirs) of the result settings `cfg` changes from the config that trained `source`; none where that
    config is not found (a bare weights file: the load itself names a mis-shaped parameter) or not usable."""
    try:
        trained = trained_config(source)
        if trained is None:
            return []
        changed = [item for item in differing_results(cfg, trained) if item[0] != UPSAMPLE_KEY]
        factors = (upsample_factors(cfg), upsample_factors(trained))
    except (ConfigError, AttributeError, KeyError, TypeError, ValueError) as err:  # a damaged or hand-cut copy
        log.warning("%s: the config it was trained under is unusable (%s): not compared", source, first_line(err))
        return []
    return changed + ([(UPSAMPLE_KEY, *factors)] if factors[0] != factors[1] else [])


def resume(train: TrainState, folder: Path, process_index: int, tcfg: Any, processes: int = 1) -> None:
    """Everything a resume restores from `folder`: the training state and this process's RNG state (of `processes`)."""
    try:
        train.load_state_dict(folder)
        restore_rng(folder, process_index)
    except CheckpointError as err:  # name the way on: the checkpoint before the damaged one
        found = [p.name for p in list_checkpoints(folder.parent)]
        before = found[:found.index(folder.name)] if folder.name in found else []
        raise CheckpointError(f"{err}; to resume from the checkpoint before it: --checkpoint {folder.parent / before[-1]}"
                              if before else str(err)) from None
    log.info("resumed from %s at epoch %d, step %d, batch %d of the epoch", folder, train.epoch, train.step,
             train.batch_in_epoch)
    saved_by = read_state(folder).get("num_processes")
    if process_index == 0 and isinstance(saved_by, int) and saved_by != processes:  # it went on without a word
        log.warning("%s was saved by %s and is resumed by %d: the data order (its position, batch %d of the epoch, "
                    "counts each process's batches) and the noise differ from the uninterrupted run's; resume with %d "
                    "for the same ones", folder, plural(saved_by, "process", "processes"), processes,
                    train.batch_in_epoch, saved_by)
    if process_index == 0 and train.batch_in_epoch:
        _warn_of_another_epoch_order(folder, train.batch_in_epoch, tcfg)
    saved = (train.optimizer.param_groups[0].get("initial_lr"), getattr(train.scheduler, "gamma", None))
    wanted = (float(tcfg.adamw.lr), float(tcfg.exponential_lr.lr_decay))
    if None not in saved and saved != wanted:  # the restored optimizer and scheduler states carry their own
        log.warning("the config's train.adamw.lr %g and train.exponential_lr.lr_decay %g are not applied: the resumed "
                    "run goes on with the checkpoint's %g and %g (lr now %.3g); finetune to start a new schedule",
                    *wanted, *saved, train.optimizer.param_groups[0]["lr"])


def _warn_of_another_epoch_order(folder: Path, at: int, tcfg: Any) -> None:
    """Mid-epoch, the rest of the epoch goes on from batch `at` of an order that the batch size and the seed make:
    resumed under others, it repeats or skips some utterances, which went on without a word."""
    try:
        trained = trained_config(folder)
        saved = {key: trained.train.get(key) for key in ("batch_size", "random_seed")} if trained is not None else {}
    except (ConfigError, AttributeError, KeyError, TypeError, ValueError):  # no usable config beside it: no check
        return
    for key, value in saved.items():
        if value is not None and value != tcfg.get(key):
            log.warning("%s was saved at batch %d of its epoch with train.%s %s and is resumed with %s: the rest of that "
                        "epoch follows another order, so it repeats or skips some utterances; resume with %s until the "
                        "epoch ends for the same data", folder, at, key, value, tcfg.get(key), value)


def abandon_newer(folder: Path, root: Path) -> list[Path]:
    """A resume from `folder` (in `root`, maybe an abandoned one) starts a new branch: the checkpoints after it in
    `root`'s order (step, then epoch), and any other one at its place, move aside as `abandoned-<name>`, newest first,
    so retention counts from the rollback point and a later plain resume stays on the new branch. Symlinked ones are
    renamed, not followed. A `folder` whose name does not place it (a copy named `best`) is placed by its state.
    Returns where they went."""
    found = re.search(r"epoch-(\d+)_step-(\d+)_loss-", folder.name)
    state = None if found else read_state(folder)
    at = (int(found.group(2)), int(found.group(1))) if found else (state["step"], state["epoch"])
    moved = []
    for newer in reversed(list_checkpoints(root)):
        place = tuple(int(n) for n in CHECKPOINT_PATTERN.match(newer.name).group(2, 1))
        if place < at or (place == at and newer.name == folder.name):
            continue
        target, copies = root / f"{ABANDONED_PREFIX}{newer.name}", 1
        while target.exists() or target.is_symlink():
            target, copies = root / f"{ABANDONED_PREFIX}{copies}-{newer.name}", copies + 1
        os.replace(newer, target)
        moved.append(target)
    if moved:
        log.warning("resuming from %s: %s of this experiment after it moved aside as %s (never resumed from or pruned; "
                    "delete them when no longer needed)", folder, plural(len(moved), "checkpoint"),
                    ", ".join(p.name for p in moved))
    return moved


def check_room(root: Path, model: torch.nn.Module) -> None:
    """The checkpoint folder is writable and holds one more checkpoint (weights, EMA, AdamW's two moments): a
    read-only or full disk stops the run at its start, not at its first save."""
    need = 4 * sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        probe_writable(root)
        free = shutil.disk_usage(root).free
    except OSError as err:
        raise OSError(f"{root}: cannot write checkpoints here ({first_line(err)})") from None
    if free < need:
        raise OSError(f"{root}: {free / 2**20:.1f} MiB free, a checkpoint needs about {need / 2**20:.1f} MiB; "
                      "free some space on that disk or choose another log_dir")


def save_failed(folder: Path, err: OSError, saved: bool = False) -> OSError:
    """One line for a failed save, or a failed prune after a save (`saved`): the cause, the free space (a full disk
    reports itself poorly), what is kept."""
    try:
        free = f"; {shutil.disk_usage(folder.parent).free / 2**20:.1f} MiB free there: disk full?"
    except OSError:
        free = ""
    if saved:
        return OSError(f"pruning the checkpoints before {folder} failed ({first_line(err)}{free}); {folder.name} is "
                       "saved and complete, a resume goes on from it")
    kept = list_checkpoints(folder.parent)
    return OSError(f"saving checkpoint {folder} failed ({first_line(err)}{free}); " +
                   (f"earlier checkpoints are kept, the newest {kept[-1].name}" if kept else "no checkpoint was saved yet"))


class CheckpointPolicy:
    """The original config semantics, plus step-based saving.

    `save_checkpoint_stride[i]` epochs between saves of kind i, each kind keeping its
    `keep_last[i]` newest checkpoints (-1 keeps all) and running the eval when `run_eval[i]`.
    `save_checkpoints_steps` > 0 also saves every that many steps (kept like kind 0), and so are the final
    saves that end each run (a run trained in segments leaves one a segment).
    `ckpts.json` records each checkpoint with its kinds, so retention survives a resume.
    """

    def __init__(self, cfg: Any, root: Path) -> None:
        tcfg, self.root, self.config = cfg.train, root, to_plain(cfg)
        self.strides = [int(s) for s in tcfg.get("save_checkpoint_stride", [1])]
        self.keep = self._per_stride(tcfg.get("keep_last", [-1]), -1)
        self.run_eval = self._per_stride(tcfg.get("run_eval", [True]), True)
        self.every_steps = int(tcfg.get("save_checkpoints_steps", 0) or 0)
        self.records = self._read_records(root / RECORDS_FILE)

    @staticmethod
    def _read_records(path: Path) -> list[dict]:
        """The checkpoints this run wrote, as ckpts.json lists them; only plain checkpoint names are trusted.

        An entry that is not a bare `epoch-*_step-*_loss-*` name (`..`, an absolute path, a
        nested path) is ignored with a warning: pruning deletes only what is listed here.
        """
        if not path.is_file():
            return []
        try:
            listed = load_json(path).get("checkpoints", [])
        except (OSError, ValueError, AttributeError) as err:
            log.warning("%s: unreadable (%s); starting a new record, no older checkpoint will be pruned", path,
                        first_line(err))
            return []
        records = []
        for item in listed if isinstance(listed, list) else []:
            name = item.get("name") if isinstance(item, dict) else None
            kinds = item.get("kinds") if isinstance(item, dict) else None
            if isinstance(name, str) and CHECKPOINT_PATTERN.match(name) and isinstance(kinds, list):
                if (path.parent / name).is_dir() and not (path.parent / name).is_symlink():  # moved aside: not counted
                    records.append({"name": name, "step": item.get("step"), "kinds": [str(k) for k in kinds]})
            else:
                log.warning("%s: ignored entry %r: not a checkpoint folder name of this run", path, item)
        return records

    def _per_stride(self, values: list, default: Any) -> list:
        values = list(values)
        return values + [values[-1] if values else default] * (len(self.strides) - len(values))

    def due_by_epoch(self, epoch: int) -> list[str]:
        return [f"stride{i}" for i, s in enumerate(self.strides) if s > 0 and epoch % s == 0]

    def due_by_step(self, step: int) -> list[str]:
        return ["steps"] if self.every_steps > 0 and step % self.every_steps == 0 else []

    def wants_eval(self, kinds: list[str]) -> bool:
        return any(self.run_eval[int(k[6:])] for k in kinds if k.startswith("stride"))

    def _limit(self, kind: str) -> int:
        """How many of `kind` to keep; step saves and each run's final save count like kind 0; a kind this config
        does not have (recorded by an earlier config) keeps all."""
        if kind in ("steps", "final"):
            return int(self.keep[0])
        index = kind[6:] if kind.startswith("stride") else ""
        return int(self.keep[int(index)]) if index.isdigit() and int(index) < len(self.keep) else -1

    def save(self, train: TrainState, loss: float, rng_states: list[dict], kinds: list[str]) -> Path:
        """The training state and every process's RNG state as a new checkpoint, then prune."""
        files = {**train.state_dict(), CHECKPOINT_CONFIG: self.config}
        for rank, rng in enumerate(rng_states):
            files[f"rng_{rank}.pt"] = rng
        state = {**train.counters(), "loss": loss, "num_processes": len(rng_states)}
        name = checkpoint_name(train.epoch, train.step, loss if np.isfinite(loss) else 0.0)
        records = [r for r in self.records if r["name"] != name] + [{"name": name, "step": train.step, "kinds": kinds}]
        try:  # listed before it exists: a crash right after the rename leaves no checkpoint that is never pruned
            self._write_records(records, self.records[-1]["name"] if self.records else None)
            folder = save_checkpoint(self.root / name, files, state)
        except OSError as err:
            raise save_failed(self.root / name, err) from None
        self.records = records
        try:
            self._prune()
        except OSError as err:  # ckpts.json on a disk filled meanwhile: a bare "[Errno 28] No space left on device"
            raise save_failed(folder, err, saved=True) from None
        log.info("saved %s", folder)
        return folder

    def _prune(self) -> None:
        """Drop checkpoints that no kind keeps any more; the newest always stays."""
        keep = {self.records[-1]["name"]}
        for kind in {k for r in self.records for k in r["kinds"]}:
            names = [r["name"] for r in self.records if kind in r["kinds"]]
            limit = self._limit(kind)
            keep.update(names if limit < 0 else names[-limit:] if limit else [])
        for record in self.records:
            folder = self.root / record["name"]
            if record["name"] not in keep and not folder.is_symlink():
                remove_checkpoint(folder)  # renamed first: never half-deleted under its name
        self.records = [r for r in self.records
                        if r["name"] in keep and (self.root / r["name"]).is_dir() and not (self.root / r["name"]).is_symlink()]
        self._write_records(self.records, self.records[-1]["name"])

    def _write_records(self, records: list[dict], latest: str | None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        save_json(self.root / RECORDS_FILE, {"checkpoints": records, "latest": latest})
