"""The GPU suite's kernel cases: one denoising step of the fused network alone (30 layers and the tail, no
sampler), timed with CUDA events, with its error against the plain forward in float64; each of the tuner's variants
pinned."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from benchmarks.inference import bytes_per_sample, cuda_seconds, flops_per_sample
from models.vocoders.diffusion import fused
from models.vocoders.diffusion.fused import FusedDiffWave

PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def tuning_key(cfg: Any, seconds: float, batch: int, precision: str, projected: bool,
               skip: torch.dtype = torch.float32) -> tuple:
    """What the fused kernel's tuner tunes anew (about 20 s each on an H200): precision, size class, conditioner
    kind, skip sum dtype."""
    return precision, fused.size_class(batch * seconds * int(cfg.preprocess.sample_rate)), projected, skip


def kernel_cases(suite: Any, cfg: Any, model: torch.nn.Module, peaks: dict[str, float], tuned: set) -> None:
    """One denoising step of the fused network alone (30 layers and the tail; no sampler), timed with CUDA
    events, with its error against the plain forward in float64."""
    rate, hop = int(cfg.preprocess.sample_rate), int(cfg.preprocess.hop_size)
    per_sample = flops_per_sample(model, int(cfg.preprocess.n_mel))

    def inputs(seconds: float, batch: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        frames = round(seconds * rate / hop)
        gen = torch.Generator(device="cuda").manual_seed(0)
        mel = torch.randn(batch, int(cfg.preprocess.n_mel), frames, device="cuda", generator=gen)
        audio = torch.randn(batch, frames * hop, device="cuda", generator=gen)
        return frames, mel, audio, torch.full((batch,), 20.5, device="cuda")

    def fn(seconds: float, batch: int, precision: str, skip: torch.dtype = torch.float32,
           projected: bool = False) -> Callable[[], dict]:
        def inner() -> dict:
            dtype = PRECISION_DTYPES[precision]
            frames, mel, audio, step = inputs(seconds, batch)
            net = FusedDiffWave(model, dtype or torch.float32, skip_dtype=skip)
            cond = net.projected(net.conditioner(mel)) if projected else net.conditioner(mel)
            start = time.perf_counter()
            out = net(audio, step, cond)
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            step_s = cuda_seconds(lambda: net(audio, step, cond), 20)
            span = min(frames, rate // hop)  # the first second, against float64; the cut edge's halo left out
            with torch.no_grad():
                wide = copy.deepcopy(model).double()
                ref = wide(audio[:1, : span * hop].double(), step[:1], mel[:1, :, :span].double()).float()
            keep = span * hop - model.receptive_halo - 4 * hop
            got, ref = out[:1, :keep].float(), ref[:, :keep]
            samples = batch * frames * hop
            return {"precision": precision, "ms_per_step": 1e3 * step_s, "first_call_s": first,
                    "tflops": per_sample * samples / step_s / 1e12,
                    "tbps": bytes_per_sample(model, dtype, projected, skip) * samples / step_s / 1e12,
                    "relative_error": float((got - ref).norm() / ref.norm()),
                    "kernel": fused.kernel_in_use(dtype or torch.float32, projected)}
        return inner

    def line(r: dict) -> str:
        peak = peaks["tf32_tflops" if r["precision"] == "fp32" else "bf16_tflops"]
        return (f"{r['ms_per_step']:8.3f} ms/step  {r['tflops']:6.1f} TFLOP/s ({r['tflops'] / peak:5.1%})  "
                f"{r['tbps']:5.2f} TB/s ({r['tbps'] / peaks['copy_tbps']:5.1%})  rel.err {r['relative_error']:.1e}  "
                f"first {r['first_call_s']:.1f} s  {r['kernel']}")

    def variants() -> dict:
        """Each of the tuner's variants pinned, at 10 s batch 1 in fp16: what the tuner's choice is worth, and the
        registers and spills the driver reports for it (to check `benchmarks.kernel_resources`, compiled offline)."""
        _, mel, audio, step = inputs(10, 1)
        times, resources = {}, {}
        for config in fused.TUNED:
            pinned = fused.pinned(config)
            label = " ".join(f"{k}={v}" for k, v in pinned.items())
            before = set(compiled_kernels())
            net = FusedDiffWave(model, torch.float16, config=pinned)
            times[label] = 1e3 * cuda_seconds(partial(net, audio, step, net.conditioner(mel)), 10)
            resources[label] = [(getattr(k, "n_regs", None), getattr(k, "n_spills", None))
                                for h, k in compiled_kernels().items() if h not in before]
        return {"ms_per_step": times, "registers_spills": resources}

    def kernel_case(name: str, seconds: float, batch: int, precision: str, skip: torch.dtype = torch.float32,
                    projected: bool = False) -> None:
        key = tuning_key(cfg, seconds, batch, precision, projected, skip)
        suite.case(name, fn(seconds, batch, precision, skip, projected), line, expect_s=10 if key in tuned else 25)
        tuned.add(key)

    for seconds, batch, precision in ((10, 1, "fp16"), (10, 16, "fp16"), (10, 1, "bf16"), (10, 1, "fp32"),
                                      (10, 16, "fp32"), (1, 1, "fp16")):
        kernel_case(f"kernel step {seconds}s b{batch} {precision}", seconds, batch, precision)
    for batch in (1, 16):  # the conditioner projected once (stage 3's choice where it fits), against the mel dots
        kernel_case(f"kernel step 10s b{batch} fp16 projected", 10, batch, "fp16", projected=True)
    for batch in (1, 16):  # what a 16-bit skip sum (half the bytes of the fp32 one) gains, and costs in error
        kernel_case(f"kernel step 10s b{batch} fp16 skip fp16", 10, batch, "fp16", torch.float16)
    suite.case("kernel variants 10s b1 fp16", variants,
               lambda r: "  ".join(f"[{k}] {ms:.2f} ms {r['registers_spills'][k]}" for k, ms in r["ms_per_step"].items()),
               expect_s=40)


def compiled_kernels() -> dict[str, Any]:
    """The fused layer's kernels compiled in this process, by hash (Triton's internals: empty where they differ)."""
    found = {}
    for caches in getattr(fused._residual_layer, "device_caches", {}).values():
        kernels = caches[0] if isinstance(caches, tuple) and caches and isinstance(caches[0], dict) else {}
        found.update({getattr(kernel, "hash", str(key)): kernel for key, kernel in kernels.items()})
    return found
