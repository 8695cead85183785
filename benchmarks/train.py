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
from pathlib import Path

import torch

from models.vocoders.diffusion.diffusion_vocoder_trainer import DiffusionVocoderTrainer
from processors.preprocess import preprocess
from utils.config import REPO_ROOT, load_config
from utils.synthetic import write_corpus

DATASET = "bench"


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmark.py train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "egs/vocoder/diffusion/diffwave/exp_config.json"))
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, kernels, workers)")
    parser.add_argument("--batch_size", type=int, default=None, help="default: the config's train.batch_size")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="default: the config's")
    parser.add_argument("--utterances", type=int, default=24, help="synthetic utterances (2 speakers)")
    args = parser.parse_args(argv)

    cfg = load_config(args.config)
    if args.batch_size:
        cfg.train.batch_size = args.batch_size
    if args.mixed_precision:
        cfg.train.mixed_precision = args.mixed_precision
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        rate = int(cfg.preprocess.sample_rate)
        write_corpus(Path(tmp) / "corpus", 2, args.utterances // 2, sample_rate=rate, seconds=(2.0, 4.0))
        cfg.update(dataset=[DATASET], use_custom_dataset=[DATASET], dataset_path={DATASET: str(Path(tmp) / "corpus")},
                   log_dir=str(Path(tmp) / "ckpts"))
        cfg.preprocess.processed_dir = str(Path(tmp) / "data")
        preprocess(cfg, num_workers=len(os.sched_getaffinity(0)))
        trainer = DiffusionVocoderTrainer(cfg, "bench")
        acc = trainer.accelerator
        if acc.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(acc.device)
        frames, hop = int(cfg.preprocess.cut_mel_frame), int(cfg.preprocess.hop_size)
        batch = int(cfg.train.batch_size)
        print(f"device {acc.device}, {torch.get_num_threads()} torch threads, precision "
              f"{cfg.train.get('mixed_precision', 'no')}, model {cfg.model.diffwave.residual_channels} channels x "
              f"{cfg.model.diffwave.residual_layers} layers, batch {batch} x {frames} frames x hop {hop} "
              f"({batch * frames * hop / rate:.2f} s of audio per step)")
        done, epoch, start = 0, 0, 0.0
        while done < args.warmup + args.steps:
            trainer.train_sampler.set_epoch(epoch)
            for mel, audio in trainer.train_loader:
                if done == args.warmup:
                    if acc.device.type == "cuda":
                        torch.cuda.synchronize(acc.device)
                    start = time.perf_counter()
                trainer.micro_step(mel.to(acc.device), audio.to(acc.device), 1, True)
                trainer.optimizer_step(True)
                done += 1
                if done == args.warmup + args.steps:
                    break
            epoch += 1
        if acc.device.type == "cuda":
            torch.cuda.synchronize(acc.device)
        seconds = time.perf_counter() - start
        audio_seconds = args.steps * batch * frames * hop / rate
        print(f"{args.steps} steps in {seconds:.2f} s: {args.steps / seconds:.3f} steps/s, "
              f"{audio_seconds / seconds:.2f} audio s/s, peak memory {peak_memory_gib(acc.device):.2f} GiB "
              f"({'CUDA allocator' if acc.device.type == 'cuda' else 'process RSS'})")


if __name__ == "__main__":
    main()
