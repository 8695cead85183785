"""The GPU suite in one command, sized for a GPU that is lent briefly (under 5 minutes on an H100/H200).

    python -m benchmarks.gpu_suite --out gpu_results.json

1. the GPU tests: the fused kernel against the plain forward, the samplers and inference, and the
   trainer's features (EMA, resume, gradient accumulation, clipping, evaluation logging) on CUDA;
   `--all_tests` adds the recipe's three stages and the model's tests;
2. the card's own peaks (bf16 and TF32 matmul, device copy), measured in this run;
3. the core of stage 3: 1 s and 10 s at batch 1 and 16 in fp16/bf16/fp32 through the default engine
   (fused, CUDA-graphed where it pays) and the plain forward; a 10-minute utterance within 4 GiB;
4. the core of stage 2: each convolution's forward and backward alone (cuDNN against a matmul), then
   stage 2's default (bf16, compiled) at batch 32 and 64 and fp32 eager; each with the GPU's busy
   fraction, the kernels that take the most of it and the time spent waiting for data, and as a
   multiple of the original recipe's step at its batch, measured first in the same run as a plain
   fp32 loop (`benchmarks.train.measure_plain_loop`);
5. the extras, while time is left: the fused network's step alone with its error against float64
   (also with a 16-bit skip sum), each of the kernel tuner's variants pinned, CUDA graphs forced on
   and off, the plain forward in more cases and under torch.compile, windows against one window; in
   training the 1x1 convolutions as cuDNN's, torch's default compile mode (with and without
   channels-last), a batch replayed from the GPU (the step without the loader), eager bf16 (also
   channels-last), CUDA graphs without channels-last, fp32 at batch 64.

Each case prints one line as it finishes; all figures go to `--out` as JSON. `--budget_s` bounds the
whole run, tests included: a case whose usual time would end past it is skipped and listed, so a
short lease still returns a result, and the default (295 s) keeps the run under 5 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.gpu_training import CORE_TRAINING, EXTRA_TRAINING, TrainingCases, convolution_probe_case
from benchmarks.inference import cuda_peaks, measure
from benchmarks.kernel_step import kernel_cases, tuning_key
from benchmarks.suite import CONFIG, CudaLost, Suite, profile_lines
from models.vocoders.diffusion.diffwave.diffwave import build_diffwave
from utils.config import REPO_ROOT, load_config

GPU_TESTS = ["tests/test_fused.py", "tests/test_training.py", "tests/test_train_policy.py", "tests/test_recipe.py",
             "tests/test_inference.py", "tests/test_model_ddpm.py"]
QUICK_TESTS = ["tests/test_fused.py", "tests/test_inference.py", "tests/test_training.py", "tests/test_train_policy.py",
               "tests/test_model_ddpm.py", "-k", "not checkpoint_policy and not step_based"]
# GPU behaviour no lease has seen yet (or whose last GPU run failed): run first, so a short lease still checks them
GPU_FIRST = ["tests/test_fused.py::test_every_tuned_variant_computes_the_base_models_layers",
             "tests/test_fused.py::test_triton_before_3_counts_as_absent",
             "tests/test_training.py::test_skips_next_to_due_saves_give_the_same_checkpoints_decided_on_host_or_device"]


def pytest_run(args: list[str], limit_s: float) -> tuple[int | str, str]:
    """One pytest run's exit status ("timeout" when cut short) and whole output."""
    # -vv against addopts' -q names each test as it ends: a run cut short still names its failures
    command = [sys.executable, "-m", "pytest", "-vv", "-p", "no:cacheprovider", "-rf", "--tb=short", *args]
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=limit_s)
        return done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as stopped:  # its output so far comes as bytes, whatever `text` says
        so_far = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part
                         for part in (stopped.stdout or b"", stopped.stderr or b""))
        return "timeout", f"{so_far}\nstopped after {limit_s:.0f} s"


def run_tests(suite: Suite, limit_s: float, tests: list[str], first: list[str] = GPU_FIRST) -> None:
    """The tests `first` in a run of their own, then `tests` without them, within `limit_s` together."""
    start = time.perf_counter()
    codes, texts = [], []
    rest = [*tests, *(arg for node in first for arg in ("--deselect", node))]
    for group in ([first] if first else []) + [rest]:
        left = limit_s - (time.perf_counter() - start)
        if left < 5:
            codes.append("timeout")
            break
        code, text = pytest_run(group, left)
        codes.append(code)
        texts.append(text)
    code = next((c for c in codes if c != 0), 0)
    text = "\n".join(texts)
    log = suite.out.with_name(f"{suite.out.stem}_tests.log")  # whole, tracebacks included: the tail may hold none
    log.write_text(text, encoding="utf-8")
    tail = text.strip().splitlines()[-40:]
    suite.results["tests"] = {"returncode": code, "seconds": time.perf_counter() - start, "tail": tail, "log": str(log)}
    print("\n".join(["== GPU tests", *tail, f"(exit {code}, {time.perf_counter() - start:.0f} s)"]), flush=True)


class InferenceCases:
    """Stage 3 on the base model with random weights: `core` first (what issue 12 asks the suite to cover),
    `extras` with what time is left."""

    def __init__(self, suite: Suite, peaks: dict[str, float]) -> None:
        self.suite, self.peaks, self.cfg = suite, peaks, load_config(CONFIG)
        torch.manual_seed(0)
        self.model = build_diffwave(self.cfg).eval().cuda()
        torch.nn.init.normal_(self.model.output_projection.weight, std=0.1)  # zero at initialisation: make it matter
        self.tuned: set[tuple] = set()  # the fused kernel's tuning keys seen (see `tuning_key`): 20 s each

    def line(self, r: dict) -> str:
        peak = self.peaks["tf32_tflops" if r["precision"] == "fp32" else "bf16_tflops"]
        first = f"first {r['first_call_s']:.1f} s, " if r.get("first_call_s") else ""
        return (f"{r['ms_per_step']:8.2f} ms/step  RTF {r['rtf']:.5f}  {r['x_realtime']:8.0f}x  "
                f"{r['gflops'] / 1e3:6.1f} TFLOP/s ({r['gflops'] / 1e3 / peak:5.1%})  {r['gbps'] / 1e3:5.2f} TB/s "
                f"({r['gbps'] / 1e3 / self.peaks['copy_tbps']:5.1%})  {first}peak {r['peak_gib']:.2f} GiB"
                f"{'  projected' if r.get('projected') else ''}"
                f"{'' if r['finite'] else '  NON-FINITE'}{profile_lines(r)}")

    def run(self, name: str, seconds: float, batch: int, precision: str, profile: bool = False,
            **options: Any) -> dict | None:
        def fn() -> dict:
            return {"precision": precision, **measure(self.cfg, self.model, seconds, batch, 3, device="cuda",
                                                      precision=precision, profile=profile, **options)}
        keys = {projected: tuning_key(self.cfg, seconds, batch, precision, projected) for projected in (True, False)}
        fused_first = "engine" not in options and not set(keys.values()) & self.tuned  # which runs: known after it
        expect = 30 if options.get("compile") else 25 if fused_first else 6
        result = self.suite.case(name, fn, self.line, expect_s=expect)
        if "engine" not in options and result is not None:  # the kernel the free memory chose was tuned
            self.tuned.add(keys[bool(result.get("projected"))])
        return result

    def core(self) -> None:
        """fp16 first (stage 3's default on CUDA); batch 1 and 16, 1 s and 10 s, the three precisions, the plain
        forward, and 10 minutes within 4 GiB. The two targets' cases (10 s fp16, batch 1 and 16) are profiled."""
        for seconds, batch, precision in ((10, 1, "fp16"), (10, 1, "bf16"), (10, 1, "fp32"), (1, 1, "fp16"),
                                          (10, 16, "fp16"), (10, 16, "fp32"), (1, 16, "fp16")):
            self.run(f"infer fused {seconds}s b{batch} {precision}", seconds, batch, precision,
                     profile=seconds == 10 and precision == "fp16")
        self.run("infer plain 10s b1 fp32", 10, 1, "fp32", engine="plain", cuda_graph=False)
        ten_minutes(self.suite, self.line)

    def extras(self) -> None:
        # first: the plain forward compiled with dynamic shapes, unmeasured on a GPU since it replaced the static one
        self.run("infer plain+compile 10s b1 fp32", 10, 1, "fp32", engine="plain", cuda_graph=False, compile=True)
        kernel_cases(self.suite, self.cfg, self.model, self.peaks, self.tuned)
        self.run("infer fused 1s b1 fp32", 1, 1, "fp32")
        self.run("infer fused 1s b1 fp16 no-graph", 1, 1, "fp16", cuda_graph=False)
        self.run("infer fused 10s b1 fp16 graph", 10, 1, "fp16", cuda_graph=True)
        for seconds, batch, precision in ((10, 1, "fp16"), (1, 1, "fp32"), (10, 16, "fp16")):
            self.run(f"infer plain {seconds}s b{batch} {precision}", seconds, batch, precision, engine="plain",
                     cuda_graph=False)
        windows_exact(self.suite, self.cfg, self.model)


def windows_exact(suite: Suite, cfg: Any, model: torch.nn.Module) -> None:
    """60 s in windows of a 0.5 GiB budget against one window: the same samples."""
    outputs = {}

    def fn() -> dict:
        for budget in (0.5, None):
            outputs[budget] = measure(cfg, model, 60, 1, 1, warmup=False, device="cuda", precision="fp16",
                                      gpu_memory_gib=budget)["audio"][0]
        return {"max_abs_diff": float(np.abs(outputs[0.5] - outputs[None]).max())}

    suite.case("infer fused 60s windows (0.5 GiB) vs one", fn, lambda r: f"max |difference| {r['max_abs_diff']:.2e}",
               expect_s=15)


def ten_minutes(suite: Suite, line: Callable[[dict], str]) -> None:
    """600 s within 4 GiB, as a user runs it: a fresh process, the allocator's expandable segments."""
    def fn() -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "r.json"
            env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
            subprocess.run([sys.executable, "bins/vocoder/benchmark.py", "infer", "--device", "cuda", "--seconds", "600",
                            "--gpu_memory_gib", "4", "--no_warmup", "--json", str(out)],
                           cwd=REPO_ROOT, env=env, check=True, timeout=120)
            return json.loads(out.read_text())

    r = suite.case("infer fused 600s b1 default precision (4 GiB budget)", fn, line, expect_s=30)
    if r:
        print(f"600 s: peak reserved {r['peak_gib']:.2f} GiB, allocated {r['peak_allocated_gib']:.2f} GiB "
              f"(<= 4 GiB: {r['peak_gib'] <= 4.0})", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_results.json")
    parser.add_argument("--budget_s", type=float, default=295.0,
                        help="the whole run's seconds, tests included: no case starts that would end later")
    parser.add_argument("--skip_tests", action="store_true")
    parser.add_argument("--all_tests", action="store_true",
                        help="also the recipe and model tests (default: the kernel, inference and trainer tests)")
    parser.add_argument("--tests_s", type=float, default=60.0, help="stop the GPU tests after this many seconds")
    parser.add_argument("--only", choices=["infer", "train"], default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("the GPU suite needs a CUDA GPU; on CPU use `python bins/vocoder/benchmark.py infer|train`")
    suite = Suite(args.budget_s, Path(args.out))
    if not args.skip_tests:
        run_tests(suite, args.tests_s, GPU_TESTS if args.all_tests else QUICK_TESTS)
    peaks = cuda_peaks(torch.device("cuda"))
    suite.results["peaks"] = peaks
    print(f"== {suite.results['device']}: bf16 matmul {peaks['bf16_tflops']:.0f} TFLOP/s, TF32 {peaks['tf32_tflops']:.0f} "
          f"TFLOP/s, device copy {peaks['copy_tbps']:.2f} TB/s", flush=True)
    try:
        run_cases(suite, args.only)
    except CudaLost as lost:
        sys.exit(f"== stopped: case '{lost}' lost the CUDA context, so no later case can run; figures so far in {args.out}")
    suite.save()
    print(f"== done in {suite.results['elapsed_s']:.0f} s; skipped {len(suite.results['skipped'])}, failed "
          f"{len(suite.results['failed'])}; figures in {args.out}", flush=True)


def run_cases(suite: Suite, only: str | None) -> None:
    """The core of both stages first, then the extras."""
    peaks = suite.results["peaks"]
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
        inference = InferenceCases(suite, peaks) if only != "train" else None
        if inference:
            inference.core()
        training = TrainingCases(suite, Path(tmp)) if only != "infer" else None
        if training:
            convolution_probe_case(suite)
            training.run(CORE_TRAINING)
        if inference:
            inference.extras()
        if training:
            training.run(EXTRA_TRAINING)


if __name__ == "__main__":
    main()
