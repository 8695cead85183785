"""Stage 2: the accelerate DDPM trainer for DiffWave."""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.vocoders.diffusion.checkpointing import CheckpointPolicy, rng_state, set_rng_state
from models.vocoders.diffusion.ddpm import add_noise, alpha_cum, training_betas
from models.vocoders.diffusion.diffusion_vocoder_dataset import CropDataset, EpochBatchSampler, collate, load_entries
from models.vocoders.diffusion.diffwave.diffwave import build_diffwave
from models.vocoders.diffusion.eval_logging import EvalLogger
from utils.checkpoint import load_into, load_weights, read_state, resolve_checkpoint, safe_torch_load
from utils.config import ConfigError, save_config

log = logging.getLogger(__name__)
PRECISIONS = ("no", "fp16", "bf16")


class EMA:
    """Exponential moving average of the weights, warmed up so short runs are usable."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[name].mul_(decay).add_(value.detach().float(), alpha=1 - decay)
            else:
                self.shadow[name].copy_(value)


def dataloader_workers(cfg: Any) -> int:
    wanted = int(cfg.train.get("dataloader", {}).get("num_worker", -1))
    if wanted >= 0:
        return wanted
    import os

    return max(0, min(4, (os.cpu_count() or 1) - 1))


class DiffusionVocoderTrainer:
    def __init__(self, cfg: Any, name: str, resume_type: str | None = None, checkpoint: str | None = None) -> None:
        self.cfg, tcfg = cfg, cfg.train
        precision = tcfg.get("mixed_precision", "no")
        if precision not in PRECISIONS:
            raise ConfigError(f"{cfg.config_path}: train.mixed_precision must be one of {PRECISIONS}, got {precision!r}")
        self.accelerator = Accelerator(
            mixed_precision=precision, gradient_accumulation_steps=int(tcfg.get("gradient_accumulation_step", 1))
        )
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = bool(tcfg.get("tf32", True))
            torch.backends.cudnn.allow_tf32 = bool(tcfg.get("tf32", True))
        self.exp_dir = Path(cfg.log_dir) / name
        self.ckpt_dir = self.exp_dir / "checkpoint"
        self.seed = int(tcfg.get("random_seed", 114514))
        self._seed_everything(self.seed + self.accelerator.process_index)

        self.model = build_diffwave(cfg)
        self.cum = alpha_cum(training_betas(cfg.model.diffwave))
        adamw = tcfg.adamw
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=float(adamw.lr), betas=(float(adamw.adam_b1), float(adamw.adam_b2))
        )
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, float(tcfg.exponential_lr.lr_decay))
        decay = float(tcfg.get("ema_decay", 0.0))
        self.ema = EMA(self.model, decay) if decay > 0 else None
        self.epoch, self.step, self.batch_in_epoch, self.skipped_steps = 0, 0, 0, 0

        if resume_type == "finetune":
            self._finetune(checkpoint)
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        if resume_type == "resume":
            self._resume(checkpoint or self.ckpt_dir)
        elif resume_type not in (None, "", "finetune"):
            raise ConfigError(f"unknown --resume_type '{resume_type}': use resume or finetune")

        self._build_data()
        self.policy = CheckpointPolicy(tcfg, self.ckpt_dir)
        self.writer = None
        if self.accelerator.is_main_process:
            from torch.utils.tensorboard import SummaryWriter

            self.exp_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.exp_dir / "args.json")
            self.writer = SummaryWriter(str(self.exp_dir))
        self.eval_logger = EvalLogger(cfg, self.valid_entries, self.writer)

    # ----- setup -----------------------------------------------------------------
    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _build_data(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        train_entries = load_entries(cfg, "train")
        self.valid_entries = load_entries(cfg, "valid")
        if not train_entries:
            raise ValueError(f"no training utterances with features under {cfg.preprocess.processed_dir}")
        batch = int(cfg.train.batch_size)
        workers = dataloader_workers(cfg)
        self.train_sampler = EpochBatchSampler(
            len(train_entries), batch, self.seed, acc.process_index, acc.num_processes, shuffle=True, drop_last=True
        )
        self.train_loader = self._loader(CropDataset(cfg, train_entries), self.train_sampler, workers)
        valid_sampler = EpochBatchSampler(
            len(self.valid_entries), batch, self.seed, acc.process_index, acc.num_processes, shuffle=False, drop_last=False
        )
        self.valid_loader = self._loader(CropDataset(cfg, self.valid_entries), valid_sampler, min(workers, 1))
        log.info(
            "data: %d train / %d valid utterances; %d process(es), %d torch threads each, %d loader workers",
            len(train_entries), len(self.valid_entries), acc.num_processes, torch.get_num_threads(), workers,
        )

    @staticmethod
    def _loader(dataset: CropDataset, sampler: EpochBatchSampler, workers: int) -> DataLoader:
        return DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
        )

    def _finetune(self, checkpoint: str | None) -> None:
        if not checkpoint:
            raise ConfigError("--resume_type finetune needs --checkpoint <checkpoint folder or weights file>")
        source = resolve_checkpoint(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint)
        load_into(self.model, load_weights(source), source)
        if self.ema is not None:
            ema_file = source / "ema.safetensors" if source.is_dir() else None
            self.ema.shadow = load_weights(ema_file) if ema_file and ema_file.is_file() else {
                k: v.detach().clone().float() for k, v in self.model.state_dict().items()
            }
        log.info("finetuning from %s: weights loaded, optimizer and step start fresh", source)

    def _resume(self, checkpoint: str | Path) -> None:
        folder = resolve_checkpoint(checkpoint)
        model = self.accelerator.unwrap_model(self.model)
        load_into(model, load_weights(folder), folder)
        self.optimizer.optimizer.load_state_dict(safe_torch_load(folder / "optimizer.pt"))
        self.scheduler.load_state_dict(safe_torch_load(folder / "scheduler.pt"))
        if self.accelerator.scaler is not None and (folder / "scaler.pt").is_file():
            self.accelerator.scaler.load_state_dict(safe_torch_load(folder / "scaler.pt"))
        if self.ema is not None and (folder / "ema.safetensors").is_file():
            self.ema.shadow = load_weights(folder / "ema.safetensors")
        state = read_state(folder)
        self.epoch, self.step = state["epoch"], state["step"]
        self.batch_in_epoch, self.skipped_steps = state.get("batch_in_epoch", 0), state.get("skipped_steps", 0)
        rng_file = folder / f"rng_{self.accelerator.process_index}.pt"
        if rng_file.is_file():
            set_rng_state(safe_torch_load(rng_file))
        log.info("resumed from %s at epoch %d, step %d", folder, self.epoch, self.step)

    # ----- training --------------------------------------------------------------
    def _loss(self, mel: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        t = torch.randint(0, len(self.cum), (audio.shape[0],), device=audio.device)
        noise = torch.randn_like(audio)
        noisy = add_noise(audio, noise, t, self.cum)
        with self.accelerator.autocast():
            predicted = self.model(noisy, t, mel)
        return F.l1_loss(predicted.float(), noise)

    def _train_step(self, mel: torch.Tensor, audio: torch.Tensor) -> tuple[float, float | None]:
        acc = self.accelerator
        with acc.accumulate(self.model):
            loss = self._loss(mel, audio)
            finite = bool(torch.isfinite(acc.reduce(loss.detach(), "mean")))
            if not finite:
                self.optimizer.zero_grad(set_to_none=True)
                return float("nan"), None
            acc.backward(loss)
            grad_norm = None
            if acc.sync_gradients:
                max_norm = float(self.cfg.train.get("max_grad_norm", 0) or math.inf)
                grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), max_norm))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), grad_norm

    @torch.no_grad()
    def validate(self) -> float:
        self.model.eval()
        total = torch.zeros(2, device=self.accelerator.device)
        generator_state = torch.get_rng_state()
        torch.manual_seed(self.seed)  # the same noise every time, so valid losses compare across epochs
        for mel, audio in self.valid_loader:
            mel, audio = mel.to(self.accelerator.device), audio.to(self.accelerator.device)
            total += torch.stack([self._loss(mel, audio) * len(audio), torch.tensor(float(len(audio)), device=total.device)])
        torch.set_rng_state(generator_state)
        total = self.accelerator.reduce(total, "sum")
        self.model.train()
        return float(total[0] / total[1].clamp(min=1))

    def _log(self, scalars: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in scalars.items():
                if value is not None:
                    self.writer.add_scalar(tag, value, self.step)

    def _save(self, loss: float, kinds: list[str]) -> None:
        acc = self.accelerator
        rng_states = gather_object([rng_state()]) if acc.num_processes > 1 else [rng_state()]
        if acc.is_main_process:
            model = acc.unwrap_model(self.model)
            self.policy.save(self, model, loss, rng_states, kinds)
            if self.policy.wants_eval(kinds) or "final" in kinds:
                self.eval_logger.log(self._inference_weights(model), self.step)
        acc.wait_for_everyone()

    def _inference_weights(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.ema is None:
            return model
        copy = build_diffwave(self.cfg)
        copy.load_state_dict(self.ema.shadow)
        return copy.to(self.accelerator.device)

    def train(self) -> None:
        acc, tcfg = self.accelerator, self.cfg.train
        max_steps = int(tcfg.get("max_steps", 0) or 0)
        max_epoch = int(tcfg.get("max_epoch", -1))
        max_bad = int(tcfg.get("max_nonfinite_steps", 20))
        hop = int(self.cfg.preprocess.hop_size)
        sample_rate = int(self.cfg.preprocess.sample_rate)
        bad_in_row, loss = 0, float("nan")
        self.model.train()
        while (max_epoch < 0 or self.epoch < max_epoch) and not (max_steps and self.step >= max_steps):
            self.train_sampler.set_epoch(self.epoch, self.batch_in_epoch)
            bar = tqdm(total=len(self.train_sampler), initial=0, desc=f"epoch {self.epoch}", disable=not acc.is_main_process,
                       dynamic_ncols=True, leave=False)
            epoch_losses, tick = [], time.time()
            for mel, audio in self.train_loader:
                mel, audio = mel.to(acc.device), audio.to(acc.device)
                loss, grad_norm = self._train_step(mel, audio)
                self.batch_in_epoch += 1
                if not math.isfinite(loss):
                    self.skipped_steps += 1
                    bad_in_row += 1
                    if bad_in_row >= max_bad:
                        raise FloatingPointError(
                            f"{bad_in_row} non-finite losses in a row at step {self.step}: training stopped; "
                            f"the last good checkpoint is kept in {self.ckpt_dir}"
                        )
                    continue
                bad_in_row = 0
                if acc.sync_gradients:
                    self.step += 1
                    if self.ema is not None:
                        self.ema.update(acc.unwrap_model(self.model), self.step)
                epoch_losses.append(loss)
                elapsed = max(time.time() - tick, 1e-9)
                tick = time.time()
                audio_seconds = audio.shape[0] * audio.shape[1] * acc.num_processes / sample_rate
                self._log({
                    "train/loss": loss, "train/lr": self.optimizer.param_groups[0]["lr"], "train/grad_norm": grad_norm,
                    "train/steps_per_sec": 1 / elapsed, "train/audio_sec_per_sec": audio_seconds / elapsed,
                    "train/skipped_steps": self.skipped_steps,
                })
                bar.set_postfix(loss=f"{loss:.4f}", step=self.step)
                bar.update()
                if self.policy.due_by_step(self.step):
                    self._save(loss, self.policy.due_by_step(self.step))
                if max_steps and self.step >= max_steps:
                    break
            bar.close()
            finished_epoch = not (max_steps and self.step >= max_steps) or self.batch_in_epoch >= len(self.train_sampler)
            if finished_epoch:
                self.epoch += 1
                self.batch_in_epoch = 0
                self.scheduler.step()
            valid_loss = self.validate()
            mean_loss = float(np.mean(epoch_losses)) if epoch_losses else float("nan")
            self._log({"valid/loss": valid_loss, "train/epoch_loss": mean_loss})
            if acc.is_main_process:
                log.info("epoch %d step %d: train loss %.5f, valid loss %.5f, lr %.3g, %d skipped steps",
                         self.epoch, self.step, mean_loss, valid_loss, self.optimizer.param_groups[0]["lr"], self.skipped_steps)
            stop = bool(max_steps and self.step >= max_steps) or (max_epoch >= 0 and self.epoch >= max_epoch)
            kinds = self.policy.due_by_epoch(self.epoch) if finished_epoch else []
            if kinds or stop:
                self._save(valid_loss, kinds + (["final"] if stop else []))
            if stop:
                break
        if self.writer is not None:
            self.writer.close()
        acc.end_training()
