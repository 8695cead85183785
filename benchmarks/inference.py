"""Stage 3 synthesis speed and memory against this machine's measured fp32 matmul peak.

Builds the config's DiffWave (random weights: speed does not depend on them), vocodes `--batch`
random mels of `--seconds` each through `Vocoder` (the real synthesis path), and prints wall time,
real-time factor, the model's GFLOP per second of audio per step (counted from the layer shapes of
a plain forward pass, so the conditioner is counted at every step even where it is cached),
effective GFLOP/s, the fp32 matmul peak measured on the same threads just before and just after
the synthesis (the better of the two), their ratio, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from typing import Any

import torch
from torch import nn

from models.vocoders.diffusion.ddpm import SAMPLERS
from models.vocoders.diffusion.diffusion_vocoder_inference import Vocoder
from models.vocoders.diffusion.diffwave.diffwave import DiffWave, build_diffwave
from utils.config import REPO_ROOT, load_config


def flops_per_sample(model: DiffWave, n_mel: int) -> float:
    """FLOPs of one plain forward pass per audio sample, from the layer shapes (multiply-add = 2)."""
    total = 0.0
    for module in model.modules():
        if isinstance(module, nn.Conv1d):  # every Conv1d runs at audio rate
            total += 2 * module.in_channels * module.out_channels * module.kernel_size[0] / module.groups
    rate = 1.0 / model.hop_size  # upsampler layers: each output element gets kh * kw / stride taps
    for factor, name in zip(model.spectrogram_upsampler.factors, ("conv1", "conv2", "conv3", "conv4"), strict=False):
        conv = getattr(model.spectrogram_upsampler, name)
        rate *= factor
        total += rate * n_mel * 2 * conv.weight[0, 0].numel() / factor
    return total


def matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of a large square torch.matmul on the current threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)
    best = min(_timed(lambda: torch.matmul(a, b)) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmark.py infer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "egs/vocoder/diffusion/diffwave/exp_config.json"))
    parser.add_argument("--sampler", default="fast", choices=SAMPLERS)
    parser.add_argument("--steps", type=int, default=None, help="ddim steps")
    parser.add_argument("--batch", type=int, default=1, help="utterances vocoded together")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each utterance")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after one warm-up; the best is reported")
    parser.add_argument("--chunk_size", type=int, default=65536, help="0: the plain full-length forward pass")
    parser.add_argument("--cache_gib", type=float, default=1.0, help="budget for cached conditioner projections")
    parser.add_argument("--tile", type=int, default=2048, help="rows per tile inside a chunk (0: the whole chunk)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no_warmup", action="store_true", help="skip the warm-up run (long utterances)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(args.config)
    torch.manual_seed(0)
    model = build_diffwave(cfg).eval()
    n_mel, hop, rate = int(cfg.preprocess.n_mel), int(cfg.preprocess.hop_size), int(cfg.preprocess.sample_rate)
    frames = max(1, round(args.seconds * rate / hop))
    mels = [torch.randn(n_mel, frames) for _ in range(args.batch)]
    names = [f"utt{i}" for i in range(args.batch)]
    vocoder = Vocoder(cfg, model, args.sampler, args.steps, args.batch, device=args.device, precision=args.precision,
                      chunk_size=args.chunk_size, cache_gib=args.cache_gib, tile=args.tile)
    audio_seconds = args.batch * frames * hop / rate
    per_step = flops_per_sample(model, n_mel) * rate / 1e9
    print(f"{os.cpu_count()} cores, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}; "
          f"{args.config}: {model.residual_layers[0].dilated_conv.in_channels} channels, "
          f"{len(model.residual_layers)} layers, {n_mel} mels, halo {model.receptive_halo}")
    print(f"sampler {args.sampler}, {vocoder.plan.steps} steps, batch {args.batch} x {frames * hop / rate:.2f} s, "
          f"chunk {args.chunk_size}, tile {args.tile or 'whole chunk'}, "
          f"conditioner cache {args.cache_gib} GiB, {args.precision} on {vocoder.device}")
    peak_before = matmul_peak()
    if not args.no_warmup:
        vocoder(mels, names)
    wall = min(_timed(lambda: vocoder(mels, names)) for _ in range(max(1, args.repeats)))
    peak = max(peak_before, matmul_peak())
    effective = per_step * audio_seconds * vocoder.plan.steps / wall
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"wall {wall:.3f} s, RTF {wall / audio_seconds:.4f}, model {per_step:.2f} GFLOP per audio-second per step, "
          f"effective {effective:.1f} GFLOP/s, matmul peak {peak:.1f} GFLOP/s (before {peak_before:.1f}), "
          f"ratio {effective / peak:.1%}, peak RSS {rss:.2f} GiB, load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
