"""Export: the TorchScript synthesis and the ONNX denoiser + runner give PyTorch's waveform under the same noise."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from models.vocoders.diffusion.diffusion_vocoder_inference import utterance_seed, vocoder_from_experiment
from models.vocoders.diffusion.export import OnnxVocoder, export_onnx, export_torchscript, noise_draws, seeded_noise
from tests.tiny_experiment import REPO, make_experiment
from utils.cli import positive_int, seconds

LENGTHS = (1, 7, 40)  # frames: one hop, an odd length, a longer one than the export example (16)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    return make_experiment(tmp_path_factory.mktemp("export"))


def mel_of(frames: int, n_mel: int = 20) -> torch.Tensor:
    return torch.randn(n_mel, frames, generator=torch.Generator().manual_seed(frames)) - 4.0


def pytorch_waveform(vocoder, mel: torch.Tensor, name: str) -> np.ndarray:
    return vocoder.batch([mel], [name])[0]


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("sampler, steps", [("fast", None), ("ddim", 4)])
def test_torchscript_synthesis_equals_pytorch(experiment, tmp_path, sampler, steps):
    expt, _ = experiment
    vocoder = vocoder_from_experiment(expt, device="cpu", sampler=sampler, steps=steps, seed=3)
    export_torchscript(vocoder, tmp_path / "vocoder.pt")
    module = torch.jit.load(str(tmp_path / "vocoder.pt"))
    assert (module.hop, module.n_mel, module.sample_rate, module.draws) == (64, 20, 8000, noise_draws(vocoder.plan))
    for frames in LENGTHS:
        mel = mel_of(frames)
        noise = seeded_noise(utterance_seed(3, "utt"), module.draws, frames * 64)
        with torch.no_grad():
            scripted = module(mel[None], noise)[0].numpy()
        reference = pytorch_waveform(vocoder, mel, "utt")
        assert scripted.shape == (frames * 64,)
        assert np.abs(scripted - reference).max() < 1e-4
    with pytest.raises(torch.jit.Error, match="noise must have shape"):
        module(mel_of(5)[None], torch.zeros(1, 1, 5))


def test_onnx_denoiser_with_runner_equals_pytorch(experiment, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")  # torch's ONNX exporter
    expt, _ = experiment
    vocoder = vocoder_from_experiment(expt, device="cpu", sampler="fast", seed=5)
    export_onnx(vocoder, tmp_path / "vocoder.onnx")
    runner = OnnxVocoder(tmp_path / "vocoder.onnx")
    assert (runner.hop, runner.n_mel, runner.sample_rate, runner.plan.steps) == (64, 20, 8000, 6)
    for frames in LENGTHS:
        mel = mel_of(frames)
        exported = runner(mel[None].numpy(), [utterance_seed(5, "utt")])[0]
        assert exported.shape == (frames * 64,)
        assert np.abs(exported - pytorch_waveform(vocoder, mel, "utt")).max() < 1e-4
    pair = torch.stack([mel_of(9), mel_of(9) + 1.0])  # a batch: each item with its own seed
    both = runner(pair.numpy(), [utterance_seed(5, "a"), utterance_seed(5, "b")])
    assert np.abs(both[1] - pytorch_waveform(vocoder, pair[1], "b")).max() < 1e-4


def test_export_cli_writes_and_verifies(experiment, tmp_path):
    expt, _ = experiment
    out = tmp_path / "v.pt"
    result = subprocess.run([sys.executable, "bins/vocoder/export.py", "--expt_dir", str(expt), "--format", "torchscript",
                             "--output", str(out), "--verify", "0.3", "--repeats", "1"],
                            cwd=REPO, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.is_file() and "fast sampler, 6 steps" in result.stdout  # as chosen, as stage 3 names it (not ddpm)
    diff = float(result.stdout.split("max abs difference to PyTorch ")[1].split(";")[0])
    assert diff < 1e-4
    bad = subprocess.run([sys.executable, "bins/vocoder/export.py", "--expt_dir", str(tmp_path), "--format", "onnx",
                          "--output", str(tmp_path / "x.onnx")], cwd=REPO, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert bad.returncode == 1 and "args.json: missing" in bad.stderr
    zero = subprocess.run([sys.executable, "bins/vocoder/export.py", "--expt_dir", str(expt), "--format", "onnx",
                           "--output", str(tmp_path / "z.onnx"), "--sampler", "ddim", "--steps", "0"], cwd=REPO,
                          capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert zero.returncode == 1 and "ddim steps must be in 1.." in zero.stderr  # was exported with 6 steps
    assert not (tmp_path / "z.onnx").exists()


def test_export_cli_applies_config_and_refuses_bad_numbers_before_exporting(experiment, tmp_path):
    """--config was accepted and ignored (the export kept the experiment's sampler); --verify -1 crashed with an
    IndexError traceback, nan and --repeats 0 with riddles, each after the export was written."""
    expt, _ = experiment
    config = tmp_path / "ddim.json"
    config.write_text(json.dumps({"inference": {"sampler": "ddim", "steps": 3}}))
    env = {"PYTHONPATH": str(REPO), "PATH": "", "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "bins/vocoder/export.py", "--expt_dir", str(expt), "--format", "torchscript"]
    ok = subprocess.run([*base, "--output", str(tmp_path / "v.pt"), "--config", str(config)], cwd=REPO,
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "ddim sampler, 3 steps" in ok.stdout, ok.stderr[-2000:]
    bad = subprocess.run([*base, "--output", str(tmp_path / "b.pt"), "--verify", "-1", "--repeats", "0"], cwd=REPO,
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "argument --verify: must be a finite number of seconds >= 0, got -1" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "b.pt").exists()
    for text in ("nan", "inf", "-0.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            seconds(text)
    with pytest.raises(argparse.ArgumentTypeError):
        positive_int("0")


def test_export_ignores_the_configs_gpu_engine_options(experiment, tmp_path, capsys):
    """A recipe config made for stage 3 on a GPU (`engine: fused`, `compile`, `cuda_graph`) stopped the export, which
    runs on the CPU in fp32, with "inference engine 'fused' needs a CUDA GPU"; the export and its check now run."""
    from bins.vocoder.export import main

    expt, _ = experiment
    config = tmp_path / "gpu.json"
    config.write_text(json.dumps({"inference": {"engine": "fused", "compile": True, "cuda_graph": True}}))
    args = argparse.Namespace(expt_dir=str(expt), config=str(config), format="torchscript", output=str(tmp_path / "v.pt"),
                              sampler="ddim", steps=2, checkpoint=None, raw_weights=False, seed=1, verify=0.05, repeats=1)
    main(args)
    assert (tmp_path / "v.pt").is_file() and "max abs difference to PyTorch" in capsys.readouterr().out
