"""Stage 2 training throughput: optimizer steps/s, audio seconds/s and peak memory for a config.

Writes a synthetic corpus at the config's sample rate, runs stage 1 on it into a temporary
folder, builds the real trainer (accelerate, the config's model, optimizer, precision and
data loader) and times `--steps` optimizer steps of its step code after `--warmup` untimed
ones; validation, checkpoints and TensorBoard are left out. Peak memory is the CUDA
allocator's peak on a GPU and the process's peak resident set on CPU.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.inference import kernel_times
from models.vocoders.diffusion.ddpm import alpha_cum, noise_prediction_loss, training_betas
from models.vocoders.diffusion.diffusion_vocoder_trainer import DiffusionVocoderTrainer
from models.vocoders.diffusion.diffwave.diffwave import build_diffwave
from processors.preprocess import preprocess
from utils.config import REPO_ROOT, load_config
from utils.config_schema import COMPILE_MODES
from utils.synthetic import write_corpus

DATASET = "bench"


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def synthetic_setup(cfg: Any, root: Path, utterances: int) -> None:
    """Point `cfg` at a synthetic corpus under `root` and run stage 1 on it."""
    rate = int(cfg.preprocess.sample_rate)
    write_corpus(root / "corpus", 2, max(1, utterances // 2), sample_rate=rate, seconds=(2.0, 4.0))
    cfg.update(dataset=[DATASET], use_custom_dataset=[DATASET], dataset_path={DATASET: str(root / "corpus")},
               log_dir=str(root / "ckpts"))
    cfg.preprocess.processed_dir = str(root / "data")
    preprocess(cfg, num_workers=len(os.sched_getaffinity(0)))


def batches(trainer: DiffusionVocoderTrainer, replay: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The trainer's batches epoch after epoch, on its device; with `replay`, its first batch again and again."""
    device = trainer.accelerator.device
    for mel, audio in trainer.train_loader:  # its sampler is endless: epoch after epoch, as in training
        pair = mel.to(device, non_blocking=True), audio.to(device, non_blocking=True)
        if replay:
            while True:
                yield pair
        yield pair


def measure_training(cfg: Any, steps: int, warmup: int, profile_steps: int = 0, name: str = "bench",
                     replay: bool = False) -> dict[str, Any]:
    """Time `steps` optimizer steps of the real trainer's step code (data loader included) after `warmup`.

    `loader_ms` is the time per timed step spent waiting for the next batch; `replay` feeds the
    first batch again and again from the device, which takes the loader out of the measurement.
    With `profile_steps` on CUDA, that many more steps run under torch.profiler: their kernel time per
    step gives the GPU's busy fraction and the kernels that take it (`kernel_times`).
    """
    trainer = DiffusionVocoderTrainer(cfg, name)
    acc = trainer.accelerator
    cuda = acc.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(acc.device)
    frames, hop, rate = int(cfg.preprocess.cut_mel_frame), int(cfg.preprocess.hop_size), int(cfg.preprocess.sample_rate)
    batch = int(cfg.train.batch_size)
    marks: dict[int, float] = {}
    profile = profile_steps if cuda else 0
    total = warmup + steps + profile
    prof, waited, source, inflight = None, 0.0, batches(trainer, replay), None
    for done in range(total):
        if done in (0, warmup, warmup + steps):
            if cuda:
                torch.cuda.synchronize(acc.device)
            marks[done] = time.perf_counter()
            if profile and done == warmup + steps:
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                prof.__enter__()
        before = time.perf_counter()
        mel, audio = next(source)
        if warmup <= done < warmup + steps:
            waited += time.perf_counter() - before
        loss = trainer.micro_step(mel, audio, 1, True)
        if inflight is not None:  # as the trainer does: read a step decided on the GPU while the next one runs
            trainer.stepper.settle(inflight)
        inflight = trainer.stepper.launch(trainer.model, [loss], done, 0.0)
        if inflight.stepped is not None:
            trainer.stepper.settle(inflight)
            inflight = None
    if cuda:
        torch.cuda.synchronize(acc.device)
    marks[total] = time.perf_counter()
    seconds = marks[warmup + steps] - marks[warmup]
    busy, kernels = None, []
    if prof is not None:
        prof.__exit__(None, None, None)
        gpu_ms, kernels = kernel_times(prof.key_averages(), profile)
        busy = gpu_ms / (1e3 * seconds / steps)
    audio_seconds = steps * batch * frames * hop / rate
    return {"batch": batch, "precision": acc.mixed_precision, "device": str(acc.device),
            "compile": bool(trainer.compiled), "compile_mode": trainer.compile_mode,
            "channels_last": trainer.accelerator.unwrap_model(trainer.model).channels_last,
            "fused_adamw": bool(trainer.optimizer.defaults.get("fused")), "replay": replay,
            "warmup_s": marks[warmup] - marks[0], "steps_per_s": steps / seconds,
            "ms_per_step": 1e3 * seconds / steps, "loader_ms": 1e3 * waited / steps, "audio_s_per_s": audio_seconds / seconds,
            "peak_gib": peak_memory_gib(acc.device), "gpu_busy": busy, "top_kernels": kernels,
            "audio_per_step_s": batch * frames * hop / rate}


def measure_plain_loop(cfg: Any, batch: int, steps: int, warmup: int, device: torch.device) -> dict[str, Any]:
    """The original recipe's step as a minimal loop, the baseline the trainer's step is compared with in one run:
    the same network in fp32, eager, AdamW, PyTorch's default math flags, one batch of random crops kept on the
    device (no loader, EMA, clipping, checks or host reads: the loop at its fastest)."""
    frames, hop, rate = int(cfg.preprocess.cut_mel_frame), int(cfg.preprocess.hop_size), int(cfg.preprocess.sample_rate)
    torch.manual_seed(0)
    model = build_diffwave(cfg).to(device).train()
    adamw = cfg.train.adamw
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(adamw.lr), betas=(float(adamw.adam_b1), float(adamw.adam_b2)))
    cum = alpha_cum(training_betas(cfg.model.diffwave)).to(device)
    mel = torch.randn(batch, int(cfg.preprocess.n_mel), frames, device=device)
    audio = torch.rand(batch, frames * hop, device=device) * 2 - 1
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = False, True, False
    try:
        for done in range(warmup + steps):
            if done == warmup:
                if cuda:
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
            loss = noise_prediction_loss(model, mel, audio, cum)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved
    audio_per_step = batch * frames * hop / rate
    return {"batch": batch, "ms_per_step": 1e3 * seconds / steps, "audio_s_per_s": steps * audio_per_step / seconds,
            "peak_gib": peak_memory_gib(device), "finite": bool(torch.isfinite(loss))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmark.py train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "egs/vocoder/diffusion/diffwave/exp_config.json"))
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, kernels, workers)")
    parser.add_argument("--batch_size", type=int, default=None, help="default: the config's train.batch_size")
    parser.add_argument("--mixed_precision", choices=["auto", "no", "fp16", "bf16"], default=None,
                        help="default: the config's")
    parser.add_argument("--compile", choices=["auto", "true", "false"], default=None, help="default: the config's")
    parser.add_argument("--utterances", type=int, default=24, help="synthetic utterances (2 speakers)")
    parser.add_argument("--compile_mode", choices=COMPILE_MODES, default=None, help="default: the config's")
    parser.add_argument("--channels_last", choices=["auto", "true", "false"], default=None,
                        help="train.channels_last (default: the config's, else auto: on the CPU)")
    parser.add_argument("--threads", type=int, default=None, help="CPU: train.num_threads (default: follow the load)")
    parser.add_argument("--replay", action="store_true", help="feed one batch again and again: the step without the loader")
    parser.add_argument("--profile_steps", type=int, default=3, help="CUDA: steps profiled for the GPU's busy fraction")
    args = parser.parse_args(argv)

    cfg = load_config(args.config)
    if args.batch_size:
        cfg.train.batch_size = args.batch_size
    if args.mixed_precision:
        cfg.train.mixed_precision = args.mixed_precision
    if args.compile:
        cfg.train.compile = {"true": True, "false": False}.get(args.compile, "auto")
    if args.compile_mode:
        cfg.train.compile_mode = args.compile_mode
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be 1 or more, got {args.threads}")
    if args.threads:
        cfg.train.num_threads = args.threads
    if args.channels_last:
        cfg.train.channels_last = {"true": True, "false": False}.get(args.channels_last, "auto")
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        synthetic_setup(cfg, Path(tmp), args.utterances)
        r = measure_training(cfg, args.steps, args.warmup, args.profile_steps, replay=args.replay)
    busy = "" if r["gpu_busy"] is None else f", GPU busy {r['gpu_busy']:.0%}"
    model = cfg.model.diffwave
    print(f"device {r['device']}, {torch.get_num_threads()} torch threads, precision {r['precision']}, compile "
          f"{r['compile_mode'] or False}, channels_last {r['channels_last']}, model {model.residual_channels} channels x "
          f"{model.residual_layers} layers, batch {r['batch']} ({r['audio_per_step_s']:.2f} s of audio per step)")
    print(f"{args.steps} steps: {r['steps_per_s']:.3f} steps/s, {r['ms_per_step']:.1f} ms/step, {r['audio_s_per_s']:.2f} "
          f"audio s/s ({r['loader_ms']:.1f} ms/step waiting for data), warm-up {r['warmup_s']:.1f} s, "
          f"peak memory {r['peak_gib']:.2f} GiB "
          f"({'CUDA allocator' if r['device'].startswith('cuda') else 'process RSS'}){busy}")


if __name__ == "__main__":
    main()
