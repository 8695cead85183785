"""Objective evaluation: metrics on known cases, Griffin-Lim alignment, output schema, CLI errors."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from scipy.signal import lfilter

from bins.vocoder.evaluate import main
from evaluation import metrics
from evaluation.evaluate import DEFAULT_CONFIG, format_table, griffin_lim, summary_table
from processors.audio import resample

SR = 16000
PRE = {"sample_rate": SR, "n_fft": 1024, "hop_size": 256, "win_size": 1024, "n_mel": 80, "fmin": 0, "fmax": 8000}
REPO = Path(__file__).resolve().parents[1]


def speechlike(seconds: float = 1.0, f0: float = 140.0, cents: float = 0.0, sr: int = SR) -> np.ndarray:
    """A vowel-like signal: gliding pulse train through three formants, in syllables with pauses."""
    t = np.arange(int(sr * seconds)) / sr
    phase = np.cumsum(f0 * 2 ** (cents / 1200) * (1 + 0.15 * np.sin(2 * np.pi * 0.7 * t))) / sr
    x = lfilter([1.0], [1.0, -0.95], np.diff(np.floor(phase), prepend=0.0))
    for fc, bw in ((700, 110), (1220, 120), (2600, 160)):
        r = np.exp(-np.pi * bw / sr)
        x = lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * fc / sr), r * r], x)
    x = x * np.clip(np.sin(2 * np.pi * 2.0 * t), 0, None) ** 0.5
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def with_noise(x: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(len(x))
    noise *= np.sqrt(np.mean(x.astype(np.float64) ** 2) / np.mean(noise**2) / 10 ** (snr_db / 10))
    return (x + noise).astype(np.float32)


@pytest.fixture(scope="module")
def voice() -> np.ndarray:
    return speechlike()


def test_identical_signals_give_ideal_values(voice):
    m = metrics.all_metrics(voice, voice, SR, PRE)
    assert m["si_snr"] >= 90 and m["pesq"] > 4.5 and m["stoi"] > 0.99
    assert m["mel_l1"] == m["mcd"] == m["mstft"] == m["f0_rmse_cents"] == m["periodicity"] == 0
    assert m["vuv_f1"] == 1
    assert list(m) == list(metrics.HIGHER_IS_BETTER)


@pytest.mark.parametrize("snr_db", [20.0, 5.0])
def test_si_snr_matches_added_noise(voice, snr_db):
    assert metrics.si_snr(voice, with_noise(voice, snr_db), SR) == pytest.approx(snr_db, abs=0.5)


def test_more_noise_scores_worse(voice):
    light, heavy = with_noise(voice, 30), with_noise(voice, 5)
    assert metrics.pesq_wb(voice, light, SR) > metrics.pesq_wb(voice, heavy, SR)
    assert metrics.mel_l1(voice, light, SR, PRE) < metrics.mel_l1(voice, heavy, SR, PRE)
    assert metrics.mstft(voice, light, SR) < metrics.mstft(voice, heavy, SR)


def test_pitch_shift_gives_its_rmse_in_cents(voice):
    scores = metrics.f0_metrics(voice, speechlike(cents=100), SR, fmin=80, fmax=400)
    assert scores["f0_rmse_cents"] == pytest.approx(100, rel=0.1)
    assert scores["vuv_f1"] > 0.9


def test_silent_reference_gives_nan_with_warning(voice):
    with pytest.warns(UserWarning, match="silent"):
        m = metrics.all_metrics(np.zeros_like(voice), voice, SR, PRE)
    assert all(math.isnan(v) for v in m.values())
    with pytest.warns(UserWarning, match="silent"):
        assert math.isnan(metrics.cheap_metrics(np.zeros_like(voice), voice, PRE)["mel_l1"])


def test_align_trims_and_warns_only_beyond_one_hop(voice):
    with pytest.warns(UserWarning, match="more than one hop"):
        ref, pred = metrics.align(voice, voice[:-300], hop=256)
    assert len(ref) == len(pred) == len(voice) - 300
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref, pred = metrics.align(voice[:-200], voice, hop=256)
    assert len(ref) == len(pred) == len(voice) - 200


def test_cheap_metrics_accepts_tensors(voice):
    out = metrics.cheap_metrics(torch.from_numpy(voice), torch.from_numpy(voice), PRE)
    assert set(out) == {"mel_l1", "mstft", "pesq"} and out["mel_l1"] == 0 and out["pesq"] > 4.5


def test_missing_pesq_disables_metric(voice, monkeypatch):
    monkeypatch.setitem(sys.modules, "pesq", None)
    metrics._optional.cache_clear()
    try:
        with pytest.warns(UserWarning, match="not installed"):
            assert metrics.pesq_wb(voice, voice, SR) is None
        assert "pesq" not in metrics.cheap_metrics(voice, voice, PRE)
    finally:
        monkeypatch.undo()
        metrics._optional.cache_clear()


def test_griffin_lim_is_aligned_and_between_identity_and_noise(voice):
    vocoded = griffin_lim(voice, SR, PRE)
    ref, gl = metrics.align(voice, vocoded, PRE["hop_size"])
    shifted = [metrics.mel_l1(ref, np.roll(gl, shift), SR, PRE) for shift in (-64, 0, 64)]
    assert shifted[1] < min(shifted[0], shifted[2])
    assert 0 < shifted[1] < metrics.mel_l1(voice, with_noise(voice, 10), SR, PRE)


def write_pair_folders(root: Path, voice: np.ndarray) -> tuple[Path, Path]:
    gt, pred = root / "gt", root / "pred"
    gt.mkdir()
    pred.mkdir()
    sf.write(gt / "a.wav", voice, SR)
    sf.write(pred / "a.wav", with_noise(voice, 20)[:-400], SR)  # > one hop shorter
    sf.write(gt / "b.wav", voice, SR)
    sf.write(pred / "b.flac", resample(with_noise(voice, 10), SR, 22050), 22050)  # other rate and format
    sf.write(gt / "only_gt.wav", voice, SR)
    sf.write(gt / "silent.wav", np.zeros(SR // 2, np.float32), SR)
    sf.write(pred / "silent.wav", with_noise(voice[: SR // 2], 0), SR)
    return gt, pred


def test_cli_writes_csv_json_and_plots(tmp_path, voice, capsys):
    gt, pred = write_pair_folders(tmp_path, voice)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"base_config": "egs/vocoder/diffusion/diffwave/exp_config.json",
                                  "preprocess": PRE}))
    out = tmp_path / "eval"
    argv = ["--ref_dir", str(gt), "--pred_dir", str(pred), "--output_dir", str(out), "--config", str(config),
            "--plot", "--baseline", "griffinlim", "--log_level", "error"]
    assert main(argv) == 0

    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["name", "system", *metrics.HIGHER_IS_BETTER]
    assert [(r["name"], r["system"]) for r in rows] == [
        (n, s) for n in ("a", "b", "silent") for s in ("pred", "griffinlim")]
    assert all(v == "" for k, v in rows[-1].items() if k in metrics.HIGHER_IS_BETTER)  # silent reference
    assert float(rows[0]["si_snr"]) == pytest.approx(20, abs=1)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["count"] == 3 and summary["missing"] == {"pred": ["only_gt"], "ref": []}
    assert summary["failed"] == {} and summary["baseline"]["method"] == "griffinlim"
    assert set(summary["means"]) == set(summary["baseline"]["means"]) == set(metrics.HIGHER_IS_BETTER)
    assert summary["baseline"]["means"]["mel_l1"] < summary["means"]["mel_l1"]
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["a.png", "b.png", "silent.png"]
    table = capsys.readouterr().out
    assert "griffinlim" in table and "pesq" in table
    header = summary_table(out / "summary.json").splitlines()[0].split()
    assert header == ["metric", "better", "model", "griffinlim"]


def test_plot_without_matplotlib_is_a_one_line_error(tmp_path, voice, capsys, monkeypatch):
    gt, pred = write_pair_folders(tmp_path, voice)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["--ref_dir", str(gt), "--pred_dir", str(pred), "--output_dir", str(tmp_path / "eval"), "--plot"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evaluate: error: --plot needs matplotlib") and "\n" not in err
    assert not (tmp_path / "eval").exists()  # refused before any scoring


def test_table_says_why_pesq_and_stoi_are_missing(monkeypatch):
    means = {"pred": {m: None if m in ("pesq", "stoi") else 1.0 for m in metrics.HIGHER_IS_BETTER}}
    assert "not installed" not in format_table(means, 1)
    monkeypatch.setitem(sys.modules, "pesq", None)
    monkeypatch.setitem(sys.modules, "pystoi", None)
    table = format_table(means, 1)
    assert "(1 utterance;" in table
    assert table.splitlines()[-1] == "disabled: pesq, stoi, as pesq, pystoi are not installed (pip install pesq pystoi)"


def test_cli_no_matching_files_exits_2(tmp_path, voice, capsys):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    sf.write(tmp_path / "gt" / "x.wav", voice, SR)
    sf.write(tmp_path / "pred" / "y.wav", voice, SR)
    assert main(["--ref_dir", str(tmp_path / "gt"), "--pred_dir", str(tmp_path / "pred"),
                 "--output_dir", str(tmp_path / "eval")]) == 2
    assert "no file names in common" in capsys.readouterr().err


def test_cli_script_missing_dir_exits_2_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "bins/vocoder/evaluate.py", "--ref_dir", str(tmp_path / "nope"),
         "--pred_dir", str(tmp_path), "--output_dir", str(tmp_path / "eval")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_default_mel_settings_are_the_recipes():
    """Stage 4 without --config scores with the toolkit's mel, which the DiffWave recipe trains on."""
    from processors.mel import mel_settings
    from utils.config import load_config

    recipe = load_config(REPO / "egs/vocoder/diffusion/diffwave/exp_config.json").preprocess
    assert mel_settings(load_config(DEFAULT_CONFIG).preprocess) == mel_settings(recipe)
