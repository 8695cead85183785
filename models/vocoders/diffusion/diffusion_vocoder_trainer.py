"""Stage 2: the accelerate DDPM trainer for DiffWave.

Gradient accumulation is done here rather than by `accelerator.accumulate`: windows are
aligned to the epoch (the last one may be shorter), so every checkpoint sits on a window
boundary and a resumed run takes exactly the steps the uninterrupted run would (a resume under another
accumulation starts its first window at the checkpoint).
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from tqdm import tqdm

from models.vocoders.diffusion import checkpointing as ckpt
from models.vocoders.diffusion.checkpointing import CheckpointPolicy, rng_state
from models.vocoders.diffusion.ddpm import alpha_cum, noise_prediction_loss, training_betas
from models.vocoders.diffusion.device_policy import (
    CUDA_GRAPH_MODES,
    CpuThreads,
    channels_last,
    compile_in_place,
    compile_mode,
    set_cuda_math,
    training_precision,
)
from models.vocoders.diffusion.diffusion_vocoder_dataset import TrainingData
from models.vocoders.diffusion.diffwave.diffwave import build_diffwave
from models.vocoders.diffusion.eval_logging import EvalLogger, validation_loss
from models.vocoders.diffusion.experiment import Experiment
from models.vocoders.diffusion.stepper import HostCopy, Inflight, Stepper, make_optimizer
from models.vocoders.diffusion.train_state import EMA, TrainState
from processors.feature_store import hold_features, release_features
from utils.checkpoint import list_checkpoints, resolve_checkpoint
from utils.config import ConfigError
from utils.stop_request import StopRequest, StopRequested
from utils.text import plural

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class DiffusionVocoderTrainer:
    def __init__(self, cfg: Any, name: str, resume_type: str | None = None, checkpoint: str | None = None) -> None:
        self.cfg, tcfg = cfg, cfg.train
        if resume_type not in (None, "", "resume", "finetune"):
            raise ConfigError(f"unknown --resume_type '{resume_type}': use resume or finetune")
        setting, cuda = tcfg.get("mixed_precision", "auto"), torch.cuda.is_available()
        precision = training_precision(setting, cuda, str(cfg.config_path))
        # cpu=True without CUDA makes a multi-process launch a gloo process group instead of N lone trainers.
        self.accelerator = Accelerator(mixed_precision=precision, cpu=not cuda)
        self.accum = max(1, int(tcfg.get("gradient_accumulation_step", 1)))
        if cuda:
            set_cuda_math(tcfg)
        self.experiment = Experiment(Path(cfg.log_dir) / name)
        self.exp_dir, self.ckpt_dir = self.experiment.root, self.experiment.checkpoints
        if self.accelerator.num_processes > 1:  # the main process's view, from before it locks: another process that
            # looked after the lock was made took it for a run stopped in its setup (a resume into a name never trained
            # warned "starting it again from step 0" there and trained on alone, while the main process refused)
            self.experiment.lock_found = broadcast_object_list([self.experiment.lock_found])[0]
        if self.accelerator.is_main_process:  # the only writer
            self.experiment.lock()
        try:
            hold_features(cfg.preprocess, list(cfg.dataset))  # stage 1 may not remake them under this run
            self._build(resume_type, checkpoint, precision, setting)
        except BaseException:  # a notebook or a test that goes on must not keep the experiment locked
            release_features(cfg.preprocess, list(cfg.dataset))
            self.experiment.unlock(remove_if_created=True)
            raise

    def _build(self, resume_type: str | None, checkpoint: str | None, precision: str, setting: str) -> None:
        """Everything after the lock: model, optimizer, resume, data, logs."""
        cfg, tcfg, cuda = self.cfg, self.cfg.train, torch.cuda.is_available()
        ckpt.refuse_to_mix_runs(self.exp_dir, resume_type)
        self.seed = int(tcfg.get("random_seed", 114514))

        seed_everything(self.seed)  # the same initial weights on every process
        self.model = build_diffwave(cfg)
        self.compile_mode = mode = compile_mode(tcfg, self.accelerator.device, self.accelerator.num_processes)
        self.model.channels_last = channels_last(tcfg.get("channels_last", "auto"), cuda,
                                                 int(cfg.model.diffwave.residual_channels),
                                                 graphed=cuda and mode in CUDA_GRAPH_MODES)
        self.cum = alpha_cum(training_betas(cfg.model.diffwave)).to(self.accelerator.device)
        self.optimizer = make_optimizer(self.model, cfg, self.accelerator.device, precision)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, float(tcfg.exponential_lr.lr_decay))
        decay = float(tcfg.get("ema_decay", 0.0))
        self.ema = EMA(self.model, decay) if decay > 0 else None
        self.state = TrainState(self.model, self.optimizer, self.scheduler, self.ema, self.accelerator.scaler)
        self.threads = CpuThreads(tcfg, cuda)
        seed_everything(self.seed + self.accelerator.process_index)  # different noise per process

        self.finetuned_from = self._finetune(checkpoint) if resume_type == "finetune" else None
        self.compiled = compile_in_place(self.model, mode, self.accum, self.accelerator.device, str(cfg.config_path))
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.stepper = Stepper(self.accelerator, self.optimizer, self.ema, tcfg.get("max_grad_norm", 0))
        folder = ckpt.resume_folder(self.experiment, checkpoint, cfg) if resume_type == "resume" else None
        if folder is not None:
            ckpt.resume(self.state, folder, self.accelerator.process_index, tcfg, self.accelerator.num_processes)
        self._refuse_no_op()
        if self.accelerator.is_main_process:  # the only writer
            ckpt.check_room(self.ckpt_dir, self.state.model)

        data = TrainingData(cfg, self.seed, self.accelerator.process_index, self.accelerator.num_processes)
        self.train_sampler, self.train_loader, self.train_batches = data.train_sampler, data.train_loader, data.train_batches
        self.valid_entries, self.valid_loader = data.valid_entries, data.valid_loader
        if self.accelerator.is_main_process and folder is not None:  # set up without failing: a new branch starts
            ckpt.abandon_newer(folder, self.ckpt_dir)
        self.policy = CheckpointPolicy(cfg, self.ckpt_dir)
        self.writer = None
        if self.accelerator.is_main_process:
            from torch.utils.tensorboard import SummaryWriter

            self.experiment.write_setup(cfg, folder, self.state.step, self.finetuned_from)
            resumed = resume_type == "resume"  # from step 0 too, where the run stopped before its first save
            self.writer = SummaryWriter(str(self.exp_dir), purge_step=self.state.step + 1 if resumed else None)
        self.eval_logger = EvalLogger(cfg, self.valid_entries, self.writer)
        self._log_setup(precision if setting != "auto" else f"{precision} (auto)")

    # ----- setup -----------------------------------------------------------------
    def _log_setup(self, precision: str) -> None:
        acc = self.accelerator
        state = acc.state
        where = f" (rendezvous {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')})" if acc.num_processes > 1 else ""
        machines = int(os.environ.get("WORLD_SIZE", 1)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        log.info("accelerate: %s on %s, %s on %s%s; %s per process (OMP_NUM_THREADS=%s, OMP_WAIT_POLICY=%s%s)",
                 state.distributed_type.value, acc.device, plural(acc.num_processes, "process", "processes"),
                 plural(machines, "machine"), where, plural(torch.get_num_threads(), "torch thread"),
                 os.environ.get("OMP_NUM_THREADS", "unset"), os.environ.get("OMP_WAIT_POLICY", "unset"),
                 "; follows the load average" if self.threads.adaptive else "")
        log.info("mixed precision %s, gradient accumulation %d, max_grad_norm %s, torch.compile %s, channels-last %s, "
                 "TF32 %s, AdamW %s", precision, self.accum, self.cfg.train.get("max_grad_norm", 0) or "off",
                 f"{self.compiled} ({self.compile_mode}; the first step compiles, ~30 s on a GPU)" if self.compiled else False,
                 acc.unwrap_model(self.model).channels_last,
                 torch.backends.cuda.matmul.allow_tf32 if torch.cuda.is_available() else "n/a (CPU)",
                 "fused, steps decided on the device" if self.stepper.on_device else "multi-tensor")
        if acc.num_processes > 1 and torch.distributed.is_initialized():
            log.info("process group: backend %s, world size %d, rendezvous port %s", torch.distributed.get_backend(),
                     torch.distributed.get_world_size(), os.environ.get("MASTER_PORT"))

    def _finetune(self, checkpoint: str | None) -> Path:
        if not checkpoint:
            raise ConfigError("--resume_type finetune needs --checkpoint <checkpoint folder or weights file>")
        source = resolve_checkpoint(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint)
        ckpt.check_finetune_source(source, self.cfg)
        self.state.load_weights(source)
        log.info("finetuning from %s: weights%s loaded, optimizer and step start fresh", source,
                 " and EMA" if self.ema is not None else "")
        return source.resolve()

    def _bounds(self) -> tuple[int, int]:
        """(max_steps, max_epoch) as the config says now: 0 and -1 mean no bound."""
        return int(self.cfg.train.get("max_steps", 0) or 0), int(self.cfg.train.get("max_epoch", -1))

    def _refuse_no_op(self) -> None:
        """A run (resumed or new) already at its bound would train nothing: say so instead of exiting 0 silently."""
        max_steps, max_epoch = self._bounds()
        if max_steps and self.state.step >= max_steps:
            raise ValueError(f"already at step {self.state.step} of max_steps {max_steps}; raise --max_steps to continue")
        if 0 <= max_epoch <= self.state.epoch:
            raise ValueError(f"already at epoch {self.state.epoch} of max_epoch {max_epoch}; raise train.max_epoch to continue")

    # ----- training --------------------------------------------------------------
    def _loss(self, model: torch.nn.Module, mel: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        return noise_prediction_loss(model, mel, audio, self.cum, self.accelerator.autocast())

    def micro_step(self, mel: torch.Tensor, audio: torch.Tensor, window: int, sync: bool) -> torch.Tensor:
        """Forward and backward of one batch; returns its loss, mean over processes, still on the device."""
        acc = self.accelerator
        with nullcontext() if sync else acc.no_sync(self.model):
            loss = self._loss(self.model, mel, audio)
            # Every process backpropagates, so collective calls stay in step; a bad window is dropped at sync.
            acc.backward(loss / window)
        return acc.reduce(loss.detach(), "mean")

    def validate(self) -> float:
        return validation_loss(self.accelerator, self.model, self.valid_loader, self._loss, self.seed, self.compiled)

    def _log(self, scalars: dict[str, float | None]) -> None:
        if self.writer is not None:
            for tag, value in scalars.items():
                if value is not None:
                    self.writer.add_scalar(tag, value, self.state.step)

    def _save(self, loss: float, kinds: list[str]) -> None:
        acc = self.accelerator
        rng_states = gather_object([rng_state()]) if acc.num_processes > 1 else [rng_state()]
        if acc.is_main_process:
            model = acc.unwrap_model(self.model)
            self.policy.save(self.state, loss, rng_states, kinds)
            if (self.policy.wants_eval(kinds) or "final" in kinds) and not self.signalled:  # a stop signal's grace is short
                with torch.random.fork_rng(devices=[acc.device] if acc.device.type == "cuda" else []):
                    self.eval_logger.log(self._inference_weights(model), self.state.step)
        acc.wait_for_everyone()

    def _inference_weights(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.ema is None:
            return model
        copy = build_diffwave(self.cfg)
        copy.load_state_dict(self.ema.shadow)
        return copy.to(self.accelerator.device)

    def _too_many_bad(self, bad_in_row: int) -> FloatingPointError:
        kept = list_checkpoints(self.ckpt_dir)
        where = f"the last good checkpoint {kept[-1]} is kept" if kept else f"no checkpoint was saved yet in {self.ckpt_dir}"
        return FloatingPointError(
            f"{bad_in_row} optimizer steps in a row had a non-finite loss or gradient (at step {self.state.step}, epoch "
            f"{self.state.epoch}): training stopped; {where}. Lower train.adamw.lr or set train.max_grad_norm"
        )

    def train(self) -> None:
        """Train to the config's bounds; a SIGINT, SIGTERM or SIGHUP stops at the next step with a final checkpoint, then
        raises StopRequested (a second Ctrl-C stops at once, losing the steps since the last checkpoint)."""
        self.stop = StopRequest()
        try:
            with self.stop:
                self._train()
        except KeyboardInterrupt:
            kept = list_checkpoints(self.ckpt_dir)
            log.warning("stopped at once at step %d; %s", self.state.step, f"the last checkpoint is {kept[-1]}, the steps "
                        "after it are lost" if kept else "no checkpoint was saved")
            raise
        finally:
            if self.writer is not None:
                self.writer.close()
            release_features(self.cfg.preprocess, list(self.cfg.dataset))
            self.experiment.unlock()
        # Every process leaves together, and the DDP wrapper (its gradient buckets and their collectives' work) goes
        # before the process group it talks through: either torn down out of order can abort a peer at exit (gloo:
        # "terminate called without an active exception", seen twice in CI with two processes).
        self.accelerator.wait_for_everyone()
        self.model = self.accelerator.unwrap_model(self.model)
        self.accelerator.free_memory()
        self.accelerator.end_training()
        if self.signalled:  # on a process the signal did not reach, another one's
            raise StopRequested(self.signalled, f"stopped by {signal.Signals(self.signalled).name} at step "
                                f"{self.state.step}, after saving a checkpoint")

    def _train(self) -> None:
        self.bad_in_row, self.started, self.time_flag, self.signalled = 0, time.perf_counter(), None, 0
        self.model.train()
        # The wall-time budget is decided within the epoch and at its end (which saves the final checkpoint), not
        # here: with several processes a check reads the previous one's reduction, so a budget spent during
        # validation would be read here first and end the run with its last steps unsaved.
        while not self._at_bound(clock=False):
            epoch = EpochLog()
            pending = self._run_epoch(epoch)
            if self._end_epoch(epoch, pending):
                break

    def _at_bound(self, clock: bool = True) -> bool:
        max_steps, max_epoch = self._bounds()
        return (bool(max_steps and self.state.step >= max_steps) or 0 <= max_epoch <= self.state.epoch
                or (clock and self._cut_short()))

    def _cut_short(self) -> bool:
        """`train.max_minutes` of this run's wall time are spent, or a stop signal came (then `signalled` is its
        number, the same on every process); every process stops when the first one asks.

        With several processes that is a reduction, read one check later: reading it at once would
        wait for the GPU to finish the window queued before it, at every window.
        """
        minutes = float(self.cfg.train.get("max_minutes", 0) or 0)
        spent = 0 < minutes < (time.perf_counter() - self.started) / 60
        ask = float(1 + self.stop.signum if self.stop.signum else spent)  # a signal (1 + its number) outranks the budget
        decided = ask
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(torch.full((), ask, device=self.accelerator.device), "max")
            previous, self.time_flag = self.time_flag, HostCopy(flag)
            decided = previous.read() if previous is not None else 0.0
        self.signalled = self.signalled or (int(decided) - 1 if decided > 1 else 0)
        return decided > 0

    def _run_epoch(self, epoch: EpochLog) -> list[str]:
        """Batches until the epoch ends or a bound is reached; returns the checkpoint kinds still to save.

        A step decided on the GPU is settled (read, counted, logged) while the next window runs,
        unless it may be due for a save or end the run: then before that window starts, so that
        a checkpoint holds exactly the state after its step (see stepper).
        """
        acc, state = self.accelerator, self.state
        epoch.per_epoch = len(self.train_sampler)
        # numbered as its summary line and checkpoint name will be, from 1 (the bar said "epoch 0" above "epoch 1: ...")
        with tqdm(total=epoch.per_epoch, initial=state.batch_in_epoch, desc=f"epoch {state.epoch + 1}", unit="batch",
                  disable=not acc.is_main_process, dynamic_ncols=True, leave=False) as bar:  # cleared on any exit
            return self._run_windows(epoch, bar)

    def _run_windows(self, epoch: EpochLog, bar: tqdm) -> list[str]:
        acc, state = self.accelerator, self.state
        rate = float(self.cfg.preprocess.sample_rate)
        pending: list[str] = []
        losses: list[torch.Tensor] = []
        window_audio, self.tick, inflight = 0.0, time.perf_counter(), None
        window_start = state.batch_in_epoch  # a checkpoint ends a window (of its own run's accumulation)
        for mel, audio in self.train_batches.rest_of_epoch(state.epoch, state.batch_in_epoch):
            if inflight is not None and state.batch_in_epoch == window_start and self._settle_first():
                stopping, inflight = self._settle(inflight, epoch, bar, pending), None
                if stopping:
                    break
            mel, audio = mel.to(acc.device, non_blocking=True), audio.to(acc.device, non_blocking=True)
            window = min(self.accum, epoch.per_epoch - window_start)
            sync = state.batch_in_epoch + 1 - window_start >= window
            losses.append(self.micro_step(mel, audio, window, sync))
            state.batch_in_epoch += 1
            window_audio += audio.numel() * acc.num_processes / rate
            bar.update()
            if not sync:
                continue
            if inflight is not None:  # the GPU has this window's work queued: reading the last step costs no wait
                self._settle(inflight, epoch, bar, pending, bounds=False)
            inflight = self.stepper.launch(self.model, losses, state.step, window_audio)
            losses, window_audio, window_start = [], 0.0, state.batch_in_epoch
            if inflight.stepped is not None:  # decided on the host already
                stopping, inflight = self._settle(inflight, epoch, bar, pending), None
                if stopping:
                    break
        if inflight is not None:
            self._settle(inflight, epoch, bar, pending)
        return pending

    def _settle_first(self) -> bool:
        """Whether the step in flight may be due for a save or end the run, if it was taken."""
        step, (max_steps, _) = self.state.step + 1, self._bounds()
        return bool(self.policy.due_by_step(step)) or bool(max_steps and step >= max_steps) or self._cut_short()

    def _settle(self, inflight: Inflight, epoch: EpochLog, bar: tqdm, pending: list[str], bounds: bool = True) -> bool:
        """Count and log a launched step, save when due, stop after too many bad ones; True when a bound is reached.

        Without `bounds` (a settle while the next window runs) due saves wait for the epoch's end.
        """
        state, outcome = self.state, Stepper.settle(inflight)
        elapsed = max(time.perf_counter() - self.tick, 1e-9)
        epoch.losses += [v for v in outcome.losses if math.isfinite(v)]
        if outcome.stepped:
            state.step += 1
            self.bad_in_row = 0
        else:
            state.skipped_steps += 1
            self.bad_in_row += 1
        losses, window_audio = epoch.losses, outcome.audio_seconds
        self._log({  # a skipped step's loss and non-finite norm are gaps in the plots, not points that wreck their scale
            "train/loss": losses[-1] if outcome.stepped and losses else None,
            "train/grad_norm": outcome.grad_norm if math.isfinite(outcome.grad_norm) else None,
            "train/lr": self.optimizer.param_groups[0]["lr"], "train/skipped_steps": state.skipped_steps,
            "train/steps_per_sec": 1 / elapsed, "train/audio_sec_per_sec": window_audio / elapsed,
        })
        epoch.audio, epoch.steps = epoch.audio + window_audio, epoch.steps + 1
        bar.set_postfix(loss=f"{losses[-1] if losses else float('nan'):.4f}", step=state.step,
                        steps_s=f"{1 / elapsed:.2f}", audio_s_s=f"{window_audio / elapsed:.1f}")
        if self.bad_in_row >= int(self.cfg.train.get("max_nonfinite_steps", 20)):
            raise self._too_many_bad(self.bad_in_row)
        if outcome.stepped:
            self.threads.after_step(state.step)
        kinds = self.policy.due_by_step(state.step) if outcome.stepped else []
        stopping = bounds and self._at_bound()
        if kinds and bounds and not stopping and state.batch_in_epoch < epoch.per_epoch:
            self._save(losses[-1], kinds)
        else:
            pending += kinds  # saved once at the epoch's end, with the epoch's or the final checkpoint
        self.tick = time.perf_counter()
        return stopping

    def _end_epoch(self, epoch: EpochLog, pending: list[str]) -> bool:
        """Validation, the epoch's log line and saves; True when training is over."""
        state = self.state
        seconds = max(time.perf_counter() - epoch.start, 1e-9)
        finished = state.batch_in_epoch >= epoch.per_epoch
        if finished:
            state.epoch += 1
            state.batch_in_epoch = 0
            with warnings.catch_warnings():  # a resume may reach an epoch's end before this process's first step:
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)  # due all the same
                self.scheduler.step()
        validated = not self.signalled and bool(self.valid_entries)  # an empty test split has no loss (0 looked perfect)
        valid_loss = self.validate() if validated else float("nan")
        mean_loss = float(np.mean(epoch.losses)) if epoch.losses else float("nan")
        self._log({"valid/loss": valid_loss if validated else None, "train/epoch_loss": mean_loss})
        log.info("epoch %d%s: step %d, train loss %.5f, valid loss %.5f, lr %.3g, %.2f steps/s, %.1f audio s/s, "
                 "%s skipped, %.1f s", state.epoch if finished else state.epoch + 1,
                 "" if finished else f" (stopped mid-epoch; {state.epoch} complete, as checkpoint names count)",
                 state.step, mean_loss, valid_loss,
                 self.optimizer.param_groups[0]["lr"], epoch.steps / seconds, epoch.audio / seconds,
                 plural(state.skipped_steps, "step"), seconds)
        stop = self._at_bound()
        kinds = pending + (self.policy.due_by_epoch(state.epoch) if finished else [])
        if kinds or stop:
            self._save(valid_loss if validated else mean_loss, kinds + (["final"] if stop else []))
        return stop


@dataclass
class EpochLog:
    """What one epoch's log line reports."""

    per_epoch: int = 0
    losses: list[float] = field(default_factory=list)
    audio: float = 0.0
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)
