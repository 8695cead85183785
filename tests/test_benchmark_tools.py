"""The benchmark tools a briefly lent GPU runs: their plumbing checked here on the CPU, so a lease
is not spent on a typo. The figures themselves are benchmarks, never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from torch.utils.data import DataLoader

from benchmarks import gpu_suite, quality
from benchmarks.epoch_starts import wait_ms_per_step
from benchmarks.gpu_suite import InferenceCases, run_tests
from benchmarks.gpu_training import (
    PROBED_CONVOLUTIONS,
    TRAINING_CASES,
    VARIANTS,
    TrainingCases,
    case_settings,
    convolution_seconds,
)
from benchmarks.inference import bytes_per_sample, kernel_times, measure
from benchmarks.kernel_step import kernel_cases, tuning_key
from benchmarks.suite import CONFIG, CudaLost, Suite
from benchmarks.train import measure_plain_loop, measure_training
from models.vocoders.diffusion.diffusion_vocoder_dataset import CropDataset
from models.vocoders.diffusion.diffwave.diffwave import build_diffwave
from processors.feature_store import load_entries
from processors.preprocess import preprocess
from tests.recipe_helpers import tiny_training_config
from utils.config import REPO_ROOT, load_config
from utils.config_schema import COMPILE_MODES, validate
from utils.synthetic import write_corpus


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    write_corpus(root / "corpus", 2, 3, sample_rate=8000)
    path = tiny_training_config(root, "bench.json", num_threads=1)
    preprocess(load_config(path), num_workers=1)
    return path


@pytest.mark.parametrize("replay", [False, True])
def test_training_benchmark_measures_the_trainers_step_with_and_without_the_loader(tiny: Path, replay: bool) -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    r = measure_training(load_config(tiny), steps=3, warmup=1, name=f"replay_{replay}", replay=replay)
    assert r["ms_per_step"] > 0 and r["audio_s_per_s"] > 0 and r["loader_ms"] >= 0
    assert r["replay"] is replay and r["gpu_busy"] is None and r["audio_per_step_s"] == pytest.approx(4 * 8 * 64 / 8000)


@pytest.mark.parametrize("endless", [False, True])
def test_the_epoch_start_benchmark_runs_every_epoch_through(tiny: Path, endless: bool,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """One pass per epoch, or one for the run: no extra pass first, whose reset would find the workers started
    and their first batches loaded, which the timed steps of the other way then do not pay for."""
    passes = []
    original = DataLoader.__iter__
    monkeypatch.setattr(DataLoader, "__iter__", lambda self: passes.append(self) or original(self))
    cfg = load_config(tiny)
    assert wait_ms_per_step(CropDataset(cfg, load_entries(cfg, "train")), 2, 1, endless, epochs=3, step_s=0) >= 0
    assert len(passes) == (1 if endless else 3)


def test_the_gpu_suites_training_cases_are_valid_settings(tiny: Path) -> None:
    cfg = load_config(tiny)
    for case in TRAINING_CASES:
        cfg.train.update(case_settings(*case))
        assert case[3] in COMPILE_MODES and case[4] in VARIANTS
        validate(cfg, "train")


def test_the_plain_loop_baseline_trains_and_leaves_the_math_flags_as_it_found_them(tiny: Path) -> None:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.benchmark = True  # as a trainer before may leave them
    try:
        r = measure_plain_loop(load_config(tiny), batch=2, steps=2, warmup=1, device=torch.device("cpu"))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = saved
    assert r["finite"] and r["ms_per_step"] > 0 and r["audio_s_per_s"] > 0


def test_kernel_times_are_per_step_and_ranked() -> None:
    events = [SimpleNamespace(key=key, self_device_time_total=us) for key, us in
              (("cpu_only_op", 0.0), ("conv_bwd", 6000.0), ("gemm", 3000.0), ("elementwise", 1000.0), ("adamw", 2000.0))]
    gpu_ms, top = kernel_times(events, steps=2, top=3)
    assert gpu_ms == pytest.approx(6.0)  # 12 ms of kernels over two steps; the CPU-only op counts nothing
    assert [(k["name"], k["ms_per_step"]) for k in top] == [("conv_bwd", 3.0), ("gemm", 1.5), ("adamw", 1.0)]
    assert top[0]["share"] == pytest.approx(0.5)


def test_the_gpu_suites_test_run_reports_its_output_as_lines_when_stopped(tmp_path: Path) -> None:
    # a run stopped at its time limit hands back its output so far as bytes, even with text=True
    slow = tmp_path / "test_slow.py"
    slow.write_text("import time\n\n\ndef test_slow():\n    print('first line\\nsecond line', flush=True)\n"
                    "    time.sleep(120)\n")
    suite = SimpleNamespace(results={}, out=tmp_path / "gpu_results.json")
    run_tests(suite, 8, ["--noconftest", "-p", "no:cacheprovider", "-s", str(slow)], first=[])
    report = suite.results["tests"]
    assert report["returncode"] == "timeout"
    assert "second line" in report["tail"] and report["tail"][-1] == "stopped after 8 s", report["tail"]
    assert "second line" in (tmp_path / "gpu_results_tests.log").read_text()  # the whole output, kept beside


def test_the_gpu_suite_runs_its_first_tests_alone_then_the_rest_without_them(tmp_path: Path, monkeypatch) -> None:
    runs = []

    def pytest_run(args: list[str], limit_s: float) -> tuple[int, str]:
        runs.append((args, limit_s))
        return (1 if len(runs) == 1 else 0), f"run {len(runs)}"

    monkeypatch.setattr(gpu_suite, "pytest_run", pytest_run)
    suite = SimpleNamespace(results={}, out=tmp_path / "gpu_results.json")
    run_tests(suite, 60, ["tests/test_a.py", "tests/test_b.py"], first=["tests/test_b.py::test_new"])
    assert [args for args, _ in runs] == [["tests/test_b.py::test_new"],
                                          ["tests/test_a.py", "tests/test_b.py", "--deselect", "tests/test_b.py::test_new"]]
    assert runs[1][1] <= 60 and suite.results["tests"]["returncode"] == 1  # the first run's failure is the verdict
    assert (tmp_path / "gpu_results_tests.log").read_text() == "run 1\nrun 2"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "--co", "tests/test_train_policy.py", "--deselect",
                          "tests/test_train_policy.py::test_ema_update_is_the_moving_average_of_every_float_tensor"],
                         cwd=REPO_ROOT, capture_output=True, text=True)  # the deselect form the suite passes works
    assert out.returncode == 0 and "test_train_policy.py: 7" in out.stdout, out.stdout


def test_the_quality_run_goes_on_to_the_plain_variant_when_the_fast_one_fails(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def train_and_score(work: Path, config: Path, name: str) -> dict:
        if name == "fast":
            raise subprocess.CalledProcessError(1, ["sh", "run.sh", "--stage", "2"])
        return {"last_checkpoint": {"step": 7}, "summary_path": "summary.json"}

    monkeypatch.setattr(quality, "stage", lambda *args: 0.0)
    monkeypatch.setattr(quality, "train_and_score", train_and_score)
    monkeypatch.setattr(quality, "summary_table", lambda path: "table")
    out = tmp_path / "quality.json"
    with pytest.raises(SystemExit, match="failed: fast"):
        quality.main(["--corpus", str(tmp_path), "--both", "--work", str(tmp_path / "work"), "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["fast"]["error"].startswith("CalledProcessError") and results["plain"]["last_checkpoint"]["step"] == 7
    # 7 steps of 16 crops of 32 frames x 256 samples in 8 minutes, against 1M steps x 16 x 16,000 samples
    assert results["plain"]["hours_to_paper"] == pytest.approx(1e6 * 16 * 16_000 / (7 * 16 * 32 * 256 / 480) / 3600)


def test_suite_rates_are_extrapolated_to_the_published_training_budget(tmp_path: Path, capsys) -> None:
    suite = tmp_path / "gpu_results.json"
    suite.write_text(json.dumps({"cases": [{"case": "infer fused 10s b1 fp16", "ms_per_step": 6.5},
                                           {"case": "train bf16 b64 compiled", "audio_s_per_s": 250.0}]}))
    quality.main(["--extrapolate", str(suite)])
    assert capsys.readouterr().out.split() == ["train", "bf16", "b64", "compiled", "250.0", "audio-s/s",
                                               f"{2.56e11 / (250 * 24000) / 3600:.1f}", "GPU-hours"]
    suite.write_text(json.dumps({"cases": [{"case": "infer fused 10s b1 fp16", "ms_per_step": 6.5}]}))
    with pytest.raises(SystemExit, match="no training case"):
        quality.main(["--extrapolate", str(suite)])


def test_the_gpu_suite_skips_a_case_that_would_end_past_its_budget(tmp_path: Path, fake_gpus, monkeypatch) -> None:
    fake_gpus(("NVIDIA H200", (9, 0)))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr("benchmarks.suite.cuda_alive", lambda: True)
    suite = Suite(60.0, tmp_path / "gpu_results.json")
    assert suite.case("quick", lambda: {"ms": 1.0}, str, expect_s=10)["case_s"] >= 0
    suite.start -= 45  # 45 s of the 60 gone
    assert suite.case("compiled", lambda: {"ms": 2.0}, str, expect_s=30) is None
    assert suite.case("short", lambda: 1 / 0, str, expect_s=10) is None
    saved = json.loads((tmp_path / "gpu_results.json").read_text())
    assert [c["case"] for c in saved["cases"]] == ["quick"] and suite.results["skipped"] == ["compiled"]
    assert suite.results["failed"] == [{"case": "short", "error": "ZeroDivisionError: division by zero"}]
    monkeypatch.setattr("benchmarks.suite.cuda_alive", lambda: False)  # as after an illegal memory access
    with pytest.raises(CudaLost, match="faulted"):
        suite.case("faulted", lambda: 1 / 0, str, expect_s=10)
    saved = json.loads((tmp_path / "gpu_results.json").read_text())
    assert saved["cuda_lost_in"] == "faulted" and saved["failed"][-1]["case"] == "faulted"


def test_the_gpu_suites_lines_print_measured_cases_with_and_without_a_profile(tiny: Path) -> None:
    """A case's line is printed after it ran: a format error there would end the lease's suite."""
    cfg = load_config(tiny)
    inference = object.__new__(InferenceCases)
    inference.peaks = {"bf16_tflops": 780.0, "tf32_tflops": 407.0, "copy_tbps": 4.2}
    r = {"precision": "fp32", **measure(cfg, build_diffwave(cfg).eval(), 0.2, 2, device="cpu", precision="fp32",
                                        profile=True)}
    assert r["gpu_busy"] is None and "ms/step" in inference.line(r) and "GPU busy" not in inference.line(r)
    top = [{"name": "_residual_layer", "ms_per_step": 4.4, "share": 0.9}]
    assert "GPU busy 85%\n        4.40 ms  90%  _residual_layer" in inference.line({**r, "gpu_busy": 0.85, "top_kernels": top})
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    trained = {**measure_training(cfg, steps=1, warmup=1, name="line"), "x_plain_loop": 1.5}
    assert "1.50x the plain loop" in TrainingCases.line(trained)
    assert "GPU busy 97%" in TrainingCases.line({**trained, "gpu_busy": 0.97, "top_kernels": top})


def test_the_gpu_suites_kernel_cases_expect_the_tuners_time_where_they_tune_anew() -> None:
    """Plumbing a lease would otherwise find: each kernel case's expected time, from the keys tuned before it."""
    planned = []
    recorder = SimpleNamespace(case=lambda name, fn, line, expect_s=10.0: planned.append((name, expect_s)))
    cfg = load_config(CONFIG)
    tuned = {tuning_key(cfg, 10, 1, "fp16", True)}  # what stage 3's core cases tuned: projected conditioners
    kernel_cases(recorder, cfg, build_diffwave(cfg), {}, tuned)
    expected = dict(planned)
    assert expected["kernel step 10s b1 fp16"] == 25 and expected["kernel step 1s b1 fp16"] == 10  # same key
    assert expected["kernel step 10s b1 fp16 projected"] == 10 and expected["kernel step 10s b16 fp16 projected"] == 25
    assert expected["kernel step 10s b1 fp16 skip fp16"] == 25 and expected["kernel variants 10s b1 fp16"] == 40
    assert len(planned) == 11 and tuning_key(cfg, 10, 16, "fp16", False, torch.float16) in tuned


def test_the_fused_kernels_byte_count_follows_its_conditioner_and_skip_sum() -> None:
    cfg = load_config(CONFIG)
    model = build_diffwave(cfg)  # 30 layers, 64 channels, 100 mels (rows of 112)
    assert bytes_per_sample(model, torch.float16) == 30 * ((128 + 112) * 2 + 8 * 64)
    assert bytes_per_sample(model, torch.float16, projected=True) == 30 * ((128 + 128) * 2 + 8 * 64)
    assert bytes_per_sample(model, torch.float16, skip=torch.float16) == 30 * ((128 + 112) * 2 + 4 * 64)


def test_the_convolution_probe_times_each_convolution_both_ways_on_any_device() -> None:
    times = [convolution_seconds(shape, 1, 64, matmul, torch.device("cpu"), repeats=1)
             for shape in PROBED_CONVOLUTIONS.values() for matmul in ((False, True) if shape[2] == 1 else (False,))]
    assert len(times) == 7 and all(0 < t < 60 for t in times)
