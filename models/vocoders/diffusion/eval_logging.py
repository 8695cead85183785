"""At eval points: the validation loss, and a few fixed validation utterances vocoded, logged as audio, mels
and metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from evaluation.metrics import cheap_metrics
from models.vocoders.diffusion.diffusion_vocoder_inference import Vocoder
from processors.feature_store import first_by_name, load_items
from processors.mel import mel_spectrogram

log = logging.getLogger(__name__)
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, mel, audio) -> mean loss
MEL_IMAGE_MIN = (320, 640)  # pixels (height, width) of the mel images in TensorBoard, at least


def mel_image(mel: np.ndarray, min_size: tuple[int, int] = MEL_IMAGE_MIN) -> np.ndarray:
    """A (1, height, width) image in [0, 1], low frequencies at the bottom.

    TensorBoard shows an image at its own pixel size, so each bin and frame is repeated until the
    image is at least `min_size` (height, width): a 40 x 125 mel would otherwise be a thumbnail.
    """
    low, high = float(mel.min()), float(mel.max())
    image = ((mel - low) / max(high - low, 1e-6))[::-1]
    rows, cols = -(-min_size[0] // image.shape[0]), -(-min_size[1] // max(image.shape[1], 1))
    return np.repeat(np.repeat(image, rows, axis=0), cols, axis=1)[None].copy()


@torch.no_grad()
def validation_loss(accelerator: Accelerator, model: torch.nn.Module, loader: DataLoader, loss: LossFn, seed: int,
                    compiled: bool) -> float:
    """Mean loss over one crop of every test utterance, with the same noise every time.

    A compiled model runs eagerly here: its eval-mode, no-grad batches would each be a new
    graph to compile (20-30 s apiece on a GPU) for a pass that takes well under a second.
    """
    model = accelerator.unwrap_model(model)  # uneven shards: no collectives inside the loop
    model.eval()
    device = accelerator.device
    total = torch.zeros(2, device=device)
    eager = torch.compiler.set_stance("force_eager") if compiled else nullcontext()
    with eager, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for mel, audio in loader:
            mel, audio = mel.to(device), audio.to(device)
            total += torch.stack([loss(model, mel, audio) * len(audio), torch.tensor(float(len(audio)), device=device)])
    total = accelerator.reduce(total, "sum")
    model.train()
    return float(total[0] / total[1].clamp(min=1))


class EvalLogger:
    """Uses the fast schedule and at most `eval_seconds` per utterance so eval stays cheap."""

    def __init__(self, cfg: Any, entries: list[dict], writer: Any) -> None:
        self.cfg, self.writer = cfg, writer
        count = int(cfg.train.get("eval_utterances", 3))
        self.entries = first_by_name(entries, count)
        self.max_frames = int(float(cfg.train.get("eval_seconds", 2.0)) * cfg.preprocess.sample_rate / cfg.preprocess.hop_size)
        self.logged_truth = False
        self.precision: str | None = None  # the config's, or fp32 once an automatic half precision overflowed

    @torch.no_grad()
    def log(self, model: torch.nn.Module, step: int) -> None:
        if self.writer is None or not self.entries:
            return
        was_training = model.training
        items = load_items(self.cfg, "valid", entries=self.entries, max_frames=self.max_frames)
        device = next(model.parameters()).device
        vocoder = Vocoder(self.cfg, model, sampler="fast", batch_size=len(items), device=str(device),
                          precision=self.precision)
        with torch.compiler.set_stance("force_eager"):  # as in validation_loss: no graph for a pass this short
            preds = vocoder([m for _, m, _ in items], [n for n, _, _ in items])
        self.precision = "fp32" if vocoder.overflowed else self.precision
        model.train(was_training)
        rate = int(self.cfg.preprocess.sample_rate)
        totals: dict[str, list[float]] = {}
        for (name, mel, truth), pred in zip(items, preds, strict=True):
            self.writer.add_audio(f"eval/{name}/pred", torch.from_numpy(pred)[None], step, sample_rate=rate)
            pred_mel = mel_spectrogram(pred, self.cfg.preprocess).numpy()
            self.writer.add_image(f"eval/{name}/mel_pred", mel_image(pred_mel), step)
            if not self.logged_truth:
                self.writer.add_audio(f"eval/{name}/gt", torch.from_numpy(truth)[None], step, sample_rate=rate)
                self.writer.add_image(f"eval/{name}/mel_gt", mel_image(mel.numpy()), step)
            for key, value in self._metrics(truth, pred).items():
                totals.setdefault(key, []).append(value)
        self.logged_truth = True
        for key, values in totals.items():
            self.writer.add_scalar(f"eval/{key}", float(np.mean(values)), step)
        self.writer.flush()

    def _metrics(self, truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
        values = cheap_metrics(truth, pred, self.cfg.preprocess)
        return {k: float(v) for k, v in values.items() if v is not None and np.isfinite(v)}
