"""The GPU suite's stage 2 cases: the real trainer's step in each setting, as a multiple of the original's step
measured first in the same run, and each convolution of the step alone."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.inference import cuda_seconds
from benchmarks.suite import CONFIG, Suite, profile_lines
from benchmarks.train import measure_plain_loop, measure_training, synthetic_setup
from models.vocoders.diffusion.diffwave import diffwave
from models.vocoders.diffusion.diffwave.diffwave import pointwise_matmul
from utils.config import load_config

# (precision, batch, compiled, compile mode, variant). The core (about 80 s on a fresh H200, most of it compiling):
# stage 2's default on an H100/H200 (bf16, compiled, compile mode and channels-last `auto`: CUDA graphs and
# channels-last for one process) at both batches, and fp32. The extras: the 1x1 convolutions left to cuDNN, the
# default compile mode (what several processes or gradient accumulation get) with and without channels-last, one
# batch replayed from the GPU (no loader), eager bf16, CUDA graphs without channels-last, fp32 at batch 64. A
# variant sets train.channels_last: "channels-last" on, "channels-first" off, else "auto"; "pointwise-conv" runs
# the 1x1 convolutions as cuDNN's (see `diffwave.pointwise_matmul`). (cuDNN's algorithm search and max-autotune
# gained nothing on an H200: no longer measured.)
CORE_TRAINING = [("bf16", 32, True, "auto", ""), ("bf16", 64, True, "auto", ""), ("no", 32, False, "default", "")]
EXTRA_TRAINING = [("bf16", 32, True, "auto", "pointwise-conv"), ("bf16", 32, True, "default", "channels-last"),
                  ("bf16", 32, True, "default", ""), ("bf16", 32, True, "default", "replay"),
                  ("bf16", 32, False, "default", ""), ("bf16", 32, False, "default", "channels-last"),
                  ("bf16", 32, True, "reduce-overhead", "channels-first"), ("no", 64, False, "default", "")]
TRAINING_CASES = CORE_TRAINING + EXTRA_TRAINING
VARIANTS = ("", "replay", "channels-last", "channels-first", "pointwise-conv")


def case_settings(precision: str, batch: int, compiled: bool, mode: str, variant: str) -> dict[str, Any]:
    """A training case's `train.*` settings."""
    return {"mixed_precision": precision, "batch_size": batch, "compile": compiled, "compile_mode": mode,
            "channels_last": {"channels-last": True, "channels-first": False}.get(variant, "auto")}


class TrainingCases:
    """Stage 2's step on one synthetic corpus, each case also as a multiple of the original's step at its batch
    (a plain fp32 loop, measured first: issue 12's training target is 3x)."""

    def __init__(self, suite: Suite, work: Path) -> None:
        self.suite, self.cfg = suite, load_config(CONFIG)
        synthetic_setup(self.cfg, work, 1024)  # 15 batches of 64 per epoch: few epoch-start stalls
        self.baselines: dict[int, float] = {}
        for batch in (32, 64):
            r = suite.case(f"train plain loop fp32 b{batch} (the original's step)",
                           lambda batch=batch: measure_plain_loop(self.cfg, batch, 10, 3, torch.device("cuda")),
                           lambda r: f"{r['ms_per_step']:7.1f} ms/step  {r['audio_s_per_s']:7.1f} audio-s/s  peak "
                                     f"{r['peak_gib']:.2f} GiB{'' if r['finite'] else '  NON-FINITE'}", expect_s=8)
            if r:
                self.baselines[batch] = r["audio_s_per_s"]

    @staticmethod
    def line(r: dict) -> str:
        ratio = f"  {r['x_plain_loop']:.2f}x the plain loop" if r["x_plain_loop"] else ""
        return (f"{r['ms_per_step']:7.1f} ms/step  {r['audio_s_per_s']:7.1f} audio-s/s  ({r['compile_mode'] or 'eager'}, "
                f"channels-last {r['channels_last']})  data wait {r['loader_ms']:.1f} "
                f"ms/step  warm-up {r['warmup_s']:.1f} s  peak {r['peak_gib']:.2f} GiB{ratio}{profile_lines(r)}")

    def run(self, cases: list[tuple[str, int, bool, str, str]]) -> None:
        for case in cases:
            precision, batch, compiled, mode, variant = case
            name = (f"train {'fp32' if precision == 'no' else precision} b{batch} "
                    f"{('compiled' + ('' if mode == 'default' else f' {mode}')) if compiled else 'eager'}"
                    f"{f' {variant}' if variant else ''}")

            def fn(case: tuple = case, name: str = name) -> dict:
                from accelerate.state import AcceleratorState, GradientState

                AcceleratorState._reset_state(reset_partial_state=True)
                GradientState._reset_state()
                self.cfg.train.update(case_settings(*case))
                self.cfg.train.dataloader.num_worker = 4
                matmul_devices = diffwave.POINTWISE_MATMUL_DEVICES
                diffwave.POINTWISE_MATMUL_DEVICES = set() if case[4] == "pointwise-conv" else matmul_devices
                try:
                    r = measure_training(self.cfg, steps=10, warmup=3, profile_steps=3,
                                         name=f"bench_{name.replace(' ', '_')}", replay=case[4] == "replay")
                finally:
                    diffwave.POINTWISE_MATMUL_DEVICES = matmul_devices
                plain = self.baselines.get(case[1])
                return {**r, "x_plain_loop": r["audio_s_per_s"] / plain if plain else None}
            # each new graph compiles for 25-30 s on a fresh machine (2-4 s from Inductor's cache on disk)
            self.suite.case(name, fn, self.line, expect_s=35 if compiled else 10)


# The residual stack's convolutions in the base model's training step: (input channels, output channels, taps,
# dilation). The conditioner projections run a dilation cycle at a time: 10 layers' 128 channels in one.
PROBED_CONVOLUTIONS = {"dilated 64->128 k3 d16": (64, 128, 3, 16), "output 64->128": (64, 128, 1, 1),
                       "conditioner 100->1280": (100, 1280, 1, 1), "skip 64->64": (64, 64, 1, 1)}


def convolution_seconds(shape: tuple[int, int, int, int], batch: int, samples: int, matmul: bool,
                        device: torch.device, repeats: int = 10) -> float:
    """Seconds for one convolution's forward and backward (input and weight gradients) in bf16 on channels-last
    one-row images from fp32 ones (autocast's casts included, as in an eager step), as cuDNN's convolution or (1x1
    only) as `pointwise_matmul`: what each of the step's convolutions costs alone, outside Inductor's fusions."""
    c_in, c_out, taps, dilation = shape
    x = torch.randn(batch, c_in, 1, samples, device=device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    weight = torch.randn(c_out, c_in, 1, taps, device=device, requires_grad=True)
    grad = torch.randn(batch, c_out, 1, samples, device=device, dtype=torch.bfloat16)
    grad = grad.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if matmul:
                y = pointwise_matmul(x, weight.squeeze(2), None)
            else:
                y = torch.nn.functional.conv2d(x, weight, padding=(0, dilation * (taps // 2)), dilation=(1, dilation))
        y.backward(grad.to(y.dtype))

    if device.type == "cuda":
        return cuda_seconds(step, repeats)
    step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def convolution_probe_case(suite: Suite) -> None:
    def fn() -> dict:
        result = {}
        for name, shape in PROBED_CONVOLUTIONS.items():
            for matmul in (False, True) if shape[2] == 1 else (False,):
                seconds = convolution_seconds(shape, 32, 8192, matmul, torch.device("cuda"))
                result[f"{name} {'matmul' if matmul else 'cudnn'}_ms"] = 1e3 * seconds
        return result
    suite.case("train probe: each convolution's forward+backward, bf16 NHWC, b32", fn,
               lambda r: "  ".join(f"[{k[:-3]}] {v:.2f} ms" for k, v in r.items() if k.endswith("_ms")), expect_s=10)
