"""Stage 3 synthesis speed and memory against the device's own measured peaks.

Builds the config's DiffWave (random weights: speed does not depend on them), vocodes `--batch`
random mels of `--seconds` each through `Vocoder` (the real synthesis path), and prints wall time,
time per denoising step, real-time factor, effective GFLOP/s (the model's FLOPs counted from the
layer shapes of a plain forward pass, so the conditioner counts at every step even where it is
cached or projected once) and peak memory. On CPU the ratio is to an fp32 matmul measured on the same threads just
before and after the synthesis; on CUDA to the card's bf16 or TF32 matmul and device-copy rates,
measured in the same run (`cuda_peaks`), with the fused engine's device-memory traffic as bytes/s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.vocoders.diffusion.ddpm import SAMPLERS
from models.vocoders.diffusion.diffusion_vocoder_inference import PRECISIONS, Vocoder, tf32
from models.vocoders.diffusion.diffwave.diffwave import DiffWave, build_diffwave
from models.vocoders.diffusion.fused import mel_row, projected_row
from models.vocoders.diffusion.windowed import ENGINES
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


def cuda_peaks(device: torch.device, size: int = 8192, repeats: int = 10) -> dict[str, float]:
    """The card's own ceilings, measured now: bf16 and TF32 matmul (TFLOP/s), device copy (TB/s, read + write)."""
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("tf32", torch.float32)):
        a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
        with tf32():  # fp32 operands on the tensor cores
            out[f"{name}_tflops"] = 2 * size**3 / cuda_seconds(lambda a=a, b=b: torch.matmul(a, b), repeats) / 1e12
    src = torch.randn(2**28, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    out["copy_tbps"] = 2 * src.numel() * 4 / cuda_seconds(lambda: dst.copy_(src), repeats) / 1e12
    return out


def cuda_seconds(fn: Any, repeats: int) -> float:
    """Median device time of `fn` after warm-ups, from CUDA events."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def bytes_per_sample(model: DiffWave, dtype: torch.dtype | None, projected: bool = False,
                     skip: torch.dtype = torch.float32) -> float:
    """Device-memory traffic of one fused denoising step per audio sample: each layer reads its input and the
    upsampled mel (its padded rows; or, `projected`, its own 2 x channels of conditioner) once and writes its output
    once (I/O dtype), and reads and writes the skip sum (fp32 unless `skip`)."""
    layer = model.residual_layers[0]
    channels, n_mel = layer.dilated_conv.in_channels, layer.conditioner_projection.in_channels
    size = 4 if dtype is None else torch.finfo(dtype).bits // 8
    cond = projected_row(channels) if projected else mel_row(n_mel)
    return len(model.residual_layers) * ((2 * channels + cond) * size + 2 * skip.itemsize * channels)


def kernel_times(averages: Any, steps: int, top: int = 8) -> tuple[float, list[dict[str, Any]]]:
    """GPU milliseconds per step, and the `top` kernels by their share of it, from a profile of `steps` steps.

    The busy fraction is this time over the unprofiled step's wall time: the profiler's own
    overhead lengthens the profiled steps, not the kernels.
    """
    per_step = [(e.key, e.self_device_time_total / 1e3 / steps) for e in averages if e.self_device_time_total > 0]
    total = sum(ms for _, ms in per_step)
    ranked = sorted(per_step, key=lambda kv: kv[1], reverse=True)[:top]
    return total, [{"name": name[:100], "ms_per_step": ms, "share": ms / total} for name, ms in ranked]


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(cfg: Any, model: DiffWave, seconds: float, batch: int = 1, repeats: int = 1, warmup: bool = True,
            profile: bool = False, **options: Any) -> dict[str, Any]:
    """Vocode `batch` random mels of `seconds` each through `Vocoder`; wall time of the best repeat and its rates.
    `profile` (CUDA): one more call under torch.profiler, for the GPU's busy fraction and the kernels taking it."""
    n_mel, hop, rate = int(cfg.preprocess.n_mel), int(cfg.preprocess.hop_size), int(cfg.preprocess.sample_rate)
    frames = max(1, round(seconds * rate / hop))
    gen = torch.Generator().manual_seed(0)
    mels = [torch.randn(n_mel, frames, generator=gen) for _ in range(batch)]
    names = [f"utt{i}" for i in range(batch)]
    vocoder = Vocoder(cfg, model, batch_size=batch, **options)
    cuda = vocoder.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(vocoder.device)
    first = _timed(lambda: vocoder(mels, names)) if warmup else None
    outputs: list = []
    wall = min(_timed(lambda: outputs.append(vocoder(mels, names))) for _ in range(max(1, repeats)))
    audio_seconds = batch * frames * hop / rate
    steps = vocoder.plan.steps
    busy, kernels = None, []
    if profile and cuda:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            vocoder(mels, names)
        gpu_ms, kernels = kernel_times(prof.key_averages(), steps)
        busy = gpu_ms / (1e3 * wall / steps)
    return {
        "engine": vocoder.engine, "precision": vocoder.precision, "device": str(vocoder.device), "steps": steps,
        "batch": batch, "seconds": seconds,
        "first_call_s": first, "wall_s": wall, "ms_per_step": 1e3 * wall / steps, "rtf": wall / audio_seconds,
        "x_realtime": audio_seconds / wall,
        "gflops": flops_per_sample(model, n_mel) * rate * audio_seconds * steps / wall / 1e9,
        "gbps": bytes_per_sample(model, vocoder.dtype, vocoder.projected) * rate * audio_seconds * steps / wall / 1e9,
        "projected": vocoder.projected,
        "peak_gib": (torch.cuda.max_memory_reserved(vocoder.device) if cuda
                     else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30,
        "peak_allocated_gib": torch.cuda.max_memory_allocated(vocoder.device) / 2**30 if cuda else None,
        "finite": all(bool(np.isfinite(a).all()) for a in outputs[-1]), "audio": outputs[-1],
        "gpu_busy": busy, "top_kernels": kernels,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmark.py infer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "egs/vocoder/diffusion/diffwave/exp_config.json"))
    parser.add_argument("--sampler", default="fast", choices=SAMPLERS)
    parser.add_argument("--steps", type=int, default=None, help="ddim steps")
    parser.add_argument("--batch", type=int, default=1, help="utterances vocoded together")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each utterance")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after one warm-up; the best is reported")
    parser.add_argument("--engine", default="auto", choices=ENGINES,
                        help="auto: fused on CUDA, tiled for fp32 on CPU; plain: the full-length forward")
    parser.add_argument("--chunk_size", type=int, default=65536, help="tiled engine: samples per chunk")
    parser.add_argument("--cache_gib", type=float, default=1.0, help="tiled engine: cached conditioner budget")
    parser.add_argument("--tile", type=int, default=2048, help="tiled engine: rows per tile (0: the whole chunk)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the plain engine's forward")
    parser.add_argument("--no_cuda_graph", action="store_true", help="launch every kernel instead of graph replay")
    parser.add_argument("--gpu_memory_gib", type=float, default=None, help="GPU memory budget (default: 80%% of free)")
    parser.add_argument("--precision", default=None, choices=list(PRECISIONS),
                        help="default: the config's inference.precision, else auto (fp16 on CUDA GPUs with tensor "
                             "cores, else fp32)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no_warmup", action="store_true", help="skip the warm-up run (long utterances)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(args.config)
    torch.manual_seed(0)
    model = build_diffwave(cfg).eval()
    device = torch.device(args.device)
    print(f"{os.cpu_count()} cores, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}; "
          f"{args.config}: {model.residual_layers[0].dilated_conv.in_channels} channels, "
          f"{len(model.residual_layers)} layers, {cfg.preprocess.n_mel} mels, halo {model.receptive_halo}")
    if device.type == "cuda":
        peaks = cuda_peaks(device)
        print(f"{torch.cuda.get_device_name(device)}: bf16 matmul {peaks['bf16_tflops']:.0f} TFLOP/s, TF32 "
              f"{peaks['tf32_tflops']:.0f} TFLOP/s, device copy {peaks['copy_tbps']:.2f} TB/s")
    else:
        peak_before = matmul_peak()
    options = {"sampler": args.sampler, "steps": args.steps, "device": args.device, "precision": args.precision,
               "engine": args.engine, "chunk_size": args.chunk_size, "cache_gib": args.cache_gib, "tile": args.tile,
               "compile": args.compile, "cuda_graph": False if args.no_cuda_graph else "auto",
               "gpu_memory_gib": args.gpu_memory_gib}
    r = measure(cfg, model, args.seconds, args.batch, args.repeats, not args.no_warmup, **options)
    print(f"sampler {args.sampler}, {r['steps']} steps, batch {args.batch} x {args.seconds:.2f} s, engine {r['engine']}"
          f"{' (conditioner projected once)' if r['projected'] else ''}, "
          f"{r['precision']} on {r['device']}" + (f", first call {r['first_call_s']:.2f} s" if r["first_call_s"] else ""))
    if device.type == "cuda":
        tf32 = r["precision"] == "fp32"
        matmul = peaks["tf32_tflops" if tf32 else "bf16_tflops"] * 1e3
        ratio = (f"{r['gflops'] / matmul:.1%} of the {'TF32' if tf32 else 'bf16'} peak, "
                 f"{r['gbps'] / 1e3:.2f} TB/s = {r['gbps'] / 1e3 / peaks['copy_tbps']:.1%} of the copy peak")
        memory = "peak GPU memory (reserved)"
    else:
        matmul = max(peak_before, matmul_peak())
        ratio = f"matmul peak {matmul:.1f} GFLOP/s (before {peak_before:.1f}), ratio {r['gflops'] / matmul:.1%}"
        memory = "peak RSS"
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in r.items() if k != "audio"}))
    allocated = "" if r["peak_allocated_gib"] is None else f" ({r['peak_allocated_gib']:.2f} GiB allocated)"
    print(f"wall {r['wall_s']:.3f} s, {r['ms_per_step']:.2f} ms per step, RTF {r['rtf']:.4f}, "
          f"{r['x_realtime']:.3g}x real time, effective {r['gflops']:.1f} GFLOP/s, {ratio}, {memory} "
          f"{r['peak_gib']:.2f} GiB{allocated}, load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
