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
from evaluation import evaluate, metrics
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


def test_si_snr_of_a_nearly_orthogonal_prediction_is_no_worse_than_silence():
    """A sine delayed by a quarter period is orthogonal up to rounding: it scored -341 dB, far below the -100 dB a
    silent prediction gets, so one such utterance weighed more than silence in the mean."""
    t = np.arange(SR) / SR
    ref = (0.5 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    quarter = np.roll(ref, SR // 800)
    assert metrics.si_snr(ref, np.zeros_like(ref), SR) == -metrics.SI_SNR_CAP_DB
    assert metrics.si_snr(ref, quarter, SR) == -metrics.SI_SNR_CAP_DB


def test_more_noise_scores_worse(voice):
    light, heavy = with_noise(voice, 30), with_noise(voice, 5)
    assert metrics.pesq_mos(voice, light, SR) > metrics.pesq_mos(voice, heavy, SR)
    assert metrics.mel_l1(voice, light, SR, PRE) < metrics.mel_l1(voice, heavy, SR, PRE)
    assert metrics.mstft(voice, light, SR) < metrics.mstft(voice, heavy, SR)


def test_pitch_shift_gives_its_rmse_in_cents(voice):
    scores = metrics.f0_metrics(voice, speechlike(cents=100), SR, fmin=80, fmax=400)
    assert scores["f0_rmse_cents"] == pytest.approx(100, rel=0.1)
    assert scores["vuv_f1"] > 0.9


def test_a_sopranos_high_c_is_tracked_at_its_pitch():
    """C6 (1046.5 Hz) lay at the top of pyin's 65-1050 Hz range, where pyin takes a pitch for its octave below: a B5
    against a C6 scored 1100 cents instead of 100."""
    sr = 16000
    t = np.arange(sr // 2) / sr

    def note(f0: float) -> np.ndarray:
        return (0.3 * sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 5))).astype(np.float32)

    track = metrics.pitch_track(note(1046.5), sr)
    assert np.nanmedian(track.f0[track.voiced]) == pytest.approx(1046.5, rel=0.01)
    assert metrics.f0_metrics(note(987.8), note(1046.5), sr)["f0_rmse_cents"] == pytest.approx(100, abs=10)
    low = metrics.pitch_track(note(200.0)[: sr // 4][::6], sr // 6)  # 2.67 kHz audio: fmax kept below its Nyquist
    assert np.nanmedian(low.f0[low.voiced]) == pytest.approx(200, rel=0.02)


def test_mcd_is_the_rms_db_difference_of_the_log_mels_less_their_mean(voice):
    """With every cepstrum kept (20 mels, 19 coefficients), MCD is, by Parseval, the RMS over mel bands of the dB
    difference of the two log mels less its mean, averaged over frames; the constant 10 sqrt(2) / ln 10 assumes that
    cepstral scale. The orthonormal DCT alone was sqrt(n_mel / 2) times larger (x3.2 here) and grew with n_mel."""
    pre = {**PRE, "n_mel": 20}
    other = with_noise(voice, 10)
    diff = metrics.log_mel(voice, SR, pre) - metrics.log_mel(other, SR, pre)
    rms_db = 20 / math.log(10) * np.sqrt(((diff - diff.mean(axis=0)) ** 2).mean(axis=0))
    assert metrics.mcd(voice, other, SR, pre) == pytest.approx(rms_db.mean(), rel=1e-4)


def test_mstft_is_parallel_wavegans_loss_at_its_resolutions(voice):
    """Spectral convergence + mean |log magnitude difference| at Parallel WaveGAN's published (FFT, hop, window):
    (1024, 120, 600), (2048, 240, 1200), (512, 50, 240), Hann windows, averaged; an independent librosa STFT here.
    The metric used (512, 128, 512), (1024, 256, 1024), (2048, 512, 2048), so its M-STFT matched no published one."""
    import librosa

    other = with_noise(voice, 10)
    total = 0.0
    for n_fft, hop, win in ((1024, 120, 600), (2048, 240, 1200), (512, 50, 240)):
        a, b = (np.sqrt(np.maximum(np.abs(librosa.stft(x.astype(np.float64), n_fft=n_fft, hop_length=hop,
                                                      win_length=win, window="hann", pad_mode="reflect")) ** 2, 1e-7))
                for x in (voice, other))
        total += np.linalg.norm(a - b) / np.linalg.norm(a) + np.abs(np.log(a) - np.log(b)).mean()
    assert metrics.mstft(voice, other, SR) == pytest.approx(total / 3, rel=1e-4)


def test_vuv_f1_undefined_without_voiced_frames_is_named_in_the_warning():
    unvoiced = metrics.PitchTrack(np.full(5, np.nan), np.zeros(5, bool), np.full(5, 0.1), np.arange(5) * 0.01)
    with pytest.warns(UserWarning, match=r"F0 RMSE and V/UV F1 \(no frame is voiced in either\) undefined"):
        scores = metrics.pitch_scores(unvoiced, unvoiced)
    assert math.isnan(scores["f0_rmse_cents"]) and math.isnan(scores["vuv_f1"])


def test_silent_reference_gives_nan_with_warning(voice):
    with pytest.warns(UserWarning, match="silent"):
        m = metrics.all_metrics(np.zeros_like(voice), voice, SR, PRE)
    assert all(math.isnan(v) for v in m.values())
    with pytest.warns(UserWarning, match="silent"):
        assert math.isnan(metrics.cheap_metrics(np.zeros_like(voice), voice, PRE)["mel_l1"])


def test_align_scores_over_the_reference_and_warns_only_beyond_one_hop(voice):
    with pytest.warns(UserWarning, match="zero-padded"):
        ref, pred = metrics.align(voice, voice[:-300], hop=256)
    assert len(ref) == len(pred) == len(voice) and not pred[-300:].any()
    with pytest.warns(UserWarning, match="trimmed"):
        ref, pred = metrics.align(voice[:-300], voice, hop=256)
    assert len(ref) == len(pred) == len(voice) - 300
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref, pred = metrics.align(voice[:-200], voice, hop=256)
    assert len(ref) == len(pred) == len(voice) - 200


def test_truncated_prediction_scores_worse_than_complete(voice):
    with pytest.warns(UserWarning, match="zero-padded"):
        half = metrics.all_metrics(*metrics.align(voice, voice[: len(voice) // 2], 256), SR, PRE)
    assert half["mel_l1"] > 1 and half["si_snr"] < 10 and half["pesq"] < 3


@pytest.mark.filterwarnings("ignore:no frame is voiced")
def test_silent_prediction_gets_the_worst_pesq_and_stoi(voice):
    with pytest.warns(UserWarning, match="prediction is silent"):
        m = metrics.all_metrics(voice, np.zeros_like(voice), SR, PRE)
    assert m["pesq"] == metrics.PESQ_FLOOR and m["stoi"] == 0
    assert m["pesq"] <= metrics.pesq_mos(voice, with_noise(voice, -10), SR)  # no better than the worst audio


def test_stoi_and_mstft_are_nan_on_audio_too_short_for_them(voice):
    short = voice[:1000]  # 62 ms: under pystoi's 30 frames and under the 2048-point STFT's padding
    with pytest.warns(UserWarning, match=r"stoi undefined \(NaN\): shorter than 0.40 s"):
        assert math.isnan(metrics.stoi(short, short, SR))
    with pytest.warns(UserWarning, match="mstft undefined"):
        assert math.isnan(metrics.mstft(short, short, SR))


def test_stoi_under_one_frame_and_silence_against_a_short_reference_are_nan(voice):
    """Under one pystoi frame pystoi itself fails; and where a perfect prediction is undefined, silence is too."""
    tiny = voice[: SR // 40]  # 25 ms: under one 256-sample frame at pystoi's 10 kHz
    with pytest.warns(UserWarning, match="stoi undefined"):
        assert math.isnan(metrics.stoi(tiny, tiny, SR))
    short = voice[:1000]
    with pytest.warns(UserWarning, match="stoi undefined"):
        assert math.isnan(metrics.stoi(short, np.zeros_like(short), SR))


def test_cheap_metrics_accepts_tensors(voice):
    out = metrics.cheap_metrics(torch.from_numpy(voice), torch.from_numpy(voice), PRE)
    assert set(out) == {"mel_l1", "mstft", "pesq"} and out["mel_l1"] == 0 and out["pesq"] > 4.5


def test_missing_pesq_disables_metric(voice, monkeypatch):
    monkeypatch.setitem(sys.modules, "pesq", None)
    metrics._optional.cache_clear()
    try:
        with pytest.warns(UserWarning, match="not installed"):
            assert metrics.pesq_mos(voice, voice, SR) is None
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
    assert list(rows[0]) == ["name", "system", *metrics.HIGHER_IS_BETTER, "length_diff"]
    assert rows[0]["length_diff"] == "-400"
    assert [(r["name"], r["system"]) for r in rows] == [
        (n, s) for n in ("a", "b", "silent") for s in ("pred", "griffinlim")]
    assert all(v == "" for k, v in rows[-1].items() if k in metrics.HIGHER_IS_BETTER)  # silent reference
    assert float(rows[0]["si_snr"]) == pytest.approx(20, abs=1)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["count"] == 3 and summary["missing"] == {"pred": ["only_gt"], "ref": []}
    assert summary["failed"] == {} and summary["baseline"]["method"] == "griffinlim"
    assert summary["counts"] == {"scored": 3, "failed": 0, "unmatched": 1, "length_mismatch": 1}
    assert summary["length_mismatch"] == {"a": -400} and summary["n"]["mel_l1"] == 2  # the silent reference: NaN
    assert set(summary["means"]) == set(summary["baseline"]["means"]) == set(metrics.HIGHER_IS_BETTER)
    assert summary["baseline"]["means"]["mel_l1"] < summary["means"]["mel_l1"]
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["a.png", "b.png", "silent.png"]
    table = capsys.readouterr().out
    assert table == summary_table(out / "summary.json") + "\n"  # the printed table and demo.sh's agree
    assert table.splitlines()[0].split() == ["metric", "better", "model", "griffinlim", "n(model)", "n(griffinlim)"]
    assert "(3 scored, 0 failed, 1 unmatched; 1 prediction off by more than one hop" in table


def test_plot_without_matplotlib_is_a_one_line_error(tmp_path, voice, capsys, monkeypatch):
    gt, pred = write_pair_folders(tmp_path, voice)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["--ref_dir", str(gt), "--pred_dir", str(pred), "--output_dir", str(tmp_path / "eval"), "--plot"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evaluate: error: --plot needs matplotlib") and "\n" not in err
    assert not (tmp_path / "eval").exists()  # refused before any scoring


def test_table_says_why_pesq_and_stoi_are_missing(monkeypatch):
    means = {m: None if m in ("pesq", "stoi") else 1.0 for m in metrics.HIGHER_IS_BETTER}
    summary = {"means": means, "n": {m: 0 if v is None else 1 for m, v in means.items()},
               "counts": {"scored": 1, "failed": 0, "unmatched": 0, "length_mismatch": 0}}
    assert "not installed" not in format_table(summary)
    monkeypatch.setitem(sys.modules, "pesq", None)
    monkeypatch.setitem(sys.modules, "pystoi", None)
    table = format_table(summary)
    assert "(1 scored, 0 failed, 0 unmatched;" in table and " n " not in table.splitlines()[0]
    assert table.splitlines()[-1] == "disabled: pesq, stoi, as pesq, pystoi are not installed (pip install pesq pystoi)"


def test_pesq_below_16_khz_is_narrow_band_and_the_table_says_so(tmp_path, voice):
    """8 kHz audio was scored in wide band after upsampling to 16 kHz: a reference with nothing above 4 kHz, a figure
    no standard defines. Below 16 kHz it is now P.862.1 narrow band at 8 kHz, and the table names the utterances."""
    pesq = pytest.importorskip("pesq")
    ref, pred = resample(voice, SR, 8000), resample(with_noise(voice, 15), SR, 8000)
    assert metrics.pesq_mos(ref, pred, 8000) == pytest.approx(pesq.pesq(8000, ref, pred, "nb"))
    upsampled_wide = pesq.pesq(16000, resample(ref, 8000, SR), resample(pred, 8000, SR), "wb")
    assert abs(metrics.pesq_mos(ref, pred, 8000) - upsampled_wide) > 0.05
    assert metrics.pesq_mos(voice, with_noise(voice, 15), SR) == pytest.approx(
        pesq.pesq(SR, voice, with_noise(voice, 15), "wb"))
    for folder in ("gt", "pred"):
        (tmp_path / folder).mkdir()
    for name, rate, audio in (("low", 8000, ref), ("wide", SR, voice)):
        sf.write(tmp_path / "gt" / f"{name}.wav", audio, rate)
        sf.write(tmp_path / "pred" / f"{name}.wav", audio, rate)
    summary = evaluate.evaluate_dirs(tmp_path / "gt", tmp_path / "pred", tmp_path / "eval", pre=PRE)
    assert summary["pesq_band"] == {"wb": 1, "nb": 1}
    assert "PESQ in narrow band (P.862.1 at 8 kHz) for 1 utterance scored below 16 kHz" in format_table(summary)


def test_files_of_several_channels_are_named_as_averaged(tmp_path, voice, caplog):
    """A stereo file is averaged to mono; channels in opposite phase cancel, so the average is named, not silent."""
    for folder in ("gt", "pred"):
        (tmp_path / folder).mkdir()
    sf.write(tmp_path / "gt" / "a.wav", voice, SR)
    sf.write(tmp_path / "pred" / "a.wav", np.stack([voice, -voice], axis=1), SR)
    with caplog.at_level("WARNING"):
        summary = evaluate.evaluate_dirs(tmp_path / "gt", tmp_path / "pred", tmp_path / "eval", pre=PRE)
    assert summary["downmixed"] == [f"{tmp_path / 'pred' / 'a.wav'} (2 channels)"]
    assert "1 file of several channels averaged to mono for scoring" in caplog.text


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


def tone_pairs(root: Path, lengths: dict[str, int], sr: int = 8000) -> tuple[Path, Path]:
    """gt/ and pred/ holding the same 200 Hz tone of each length."""
    for sub in ("gt", "pred"):
        (root / sub).mkdir()
        for name, n in lengths.items():
            sf.write(root / sub / f"{name}.wav", (0.3 * np.sin(2 * np.pi * 200 * np.arange(n) / sr)).astype(np.float32), sr)
    return root / "gt", root / "pred"


def test_files_are_scored_at_their_own_level(tmp_path, voice):
    """A float prediction 1.2 times the reference, peaking above 1.0, is scored as it is: the loader used to scale it
    down to a 0.999 peak (and any file resampling made ring past 1.0), which hid most of its level error from the
    level-dependent metrics (mel L1 0.03 instead of 0.10 here)."""
    ref = voice / np.abs(voice).max() * 0.95
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    sf.write(gt / "a.wav", ref, SR, subtype="FLOAT")
    sf.write(pred / "a.wav", 1.2 * ref, SR, subtype="FLOAT")
    summary = evaluate.evaluate_dirs(gt, pred, tmp_path / "eval", pre=PRE)
    for metric in ("mel_l1", "mstft", "mcd"):
        expected = getattr(metrics, metric)(*(x.astype(np.float32) for x in (ref, 1.2 * ref)), SR,
                                            *((PRE,) if metric != "mstft" else ()))
        assert summary["means"][metric] == pytest.approx(expected, rel=1e-4), metric


def test_short_and_crashing_files_are_listed_and_the_rest_scored(tmp_path, monkeypatch):
    gt, pred = tone_pairs(tmp_path, {"good": 4000, "short": 600, "tiny": 10, "boom": 4000})
    real = evaluate.pitch_track

    def crashes_on_boom(audio: np.ndarray, rate: int) -> metrics.PitchTrack:  # boom: the only 3999-sample pair
        if len(audio) == 3999:
            raise RuntimeError("kaput\nmore")
        return real(audio, rate)

    monkeypatch.setattr(evaluate, "pitch_track", crashes_on_boom)
    sf.write(pred / "boom.wav", np.zeros(3999, np.float32), 8000)
    summary = evaluate.evaluate_dirs(gt, pred, tmp_path / "eval", pre=PRE | {"sample_rate": 8000, "fmax": 4000})
    assert summary["failed"] == {"boom": "RuntimeError: kaput",
                                 "tiny": "too short (10 samples; one mel frame needs 385 at 8000 Hz)"}
    assert summary["counts"]["scored"] == 2 and summary["n"]["mstft"] == 1 and summary["n"]["mel_l1"] == 2


@pytest.mark.filterwarnings("ignore:no frame is voiced")
def test_an_empty_prediction_scores_as_silence_and_a_failing_baseline_keeps_the_models_scores(tmp_path, monkeypatch,
                                                                                                caplog):
    gt, pred = tone_pairs(tmp_path, {"good": 4000, "empty": 4000})
    sf.write(pred / "empty.wav", np.zeros(0, np.float32), 8000)

    def fails(*_args: object) -> np.ndarray:
        raise RuntimeError("no phase today")

    monkeypatch.setattr(evaluate, "griffin_lim", fails)
    summary = evaluate.evaluate_dirs(gt, pred, tmp_path / "eval", baseline="griffinlim",
                                     pre=PRE | {"sample_rate": 8000, "fmax": 4000})
    assert summary["counts"] == {"scored": 2, "failed": 0, "unmatched": 0, "length_mismatch": 1}
    assert summary["n"]["mel_l1"] == 2 and summary["baseline"]["n"]["mel_l1"] == 0
    assert summary["length_mismatch"] == {"empty": -4000}
    assert "empty (griffinlim): not scored (RuntimeError: no phase today)" in caplog.text
    assert summary["baseline"]["failed"] == dict.fromkeys(("empty", "good"), "RuntimeError: no phase today")
    assert "griffinlim failed on 2 utterances" in format_table(summary)
    rows = list(csv.DictReader((tmp_path / "eval" / "metrics.csv").open()))
    assert [r["length_diff"] for r in rows if r["system"] == "griffinlim"] == ["", ""]
    assert summary["disabled"] == metrics.missing_packages()


def cli(gt: Path, pred: Path, out: Path, *more: str) -> list[str]:
    return ["--ref_dir", str(gt), "--pred_dir", str(pred), "--output_dir", str(out), "--log_level", "error", *more]


@pytest.mark.parametrize("preprocess, message", [
    (None, "key 'preprocess' must be an object"),
    ({"hop_size": 0}, "key 'preprocess.hop_size' must be in (0, inf), got 0"),
    ({"n_mel": 2000}, "key 'preprocess.n_mel' (2000) must not exceed"),
])
def test_bad_mel_config_is_refused_before_scoring(tmp_path, capsys, preprocess, message):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"base_config": str(DEFAULT_CONFIG), "preprocess": preprocess}))
    assert main(cli(tmp_path, tmp_path, tmp_path / "eval", "--config", str(config))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"evaluate: error: {config}: {message}") and "\n" not in err
    assert not (tmp_path / "eval").exists()


def test_expt_dir_finds_args_json_from_the_checkpoint_folder(tmp_path, capsys):
    from tests.tiny_experiment import make_experiment

    expt, _ = make_experiment(tmp_path)
    gt, pred = tone_pairs(tmp_path, {"a": 4000})
    assert main(cli(gt, pred, tmp_path / "eval", "--expt_dir", str(expt / "checkpoint"))) == 0
    capsys.readouterr()
    assert main(cli(gt, pred, tmp_path / "eval2", "--expt_dir", str(tmp_path / "nope"))) == 2
    assert capsys.readouterr().err.strip() == f"evaluate: error: {tmp_path / 'nope'}: experiment folder does not exist"
    assert main(cli(tmp_path / "result" / "gt", pred, tmp_path / "eval3", "--expt_dir", str(expt))) == 2
    assert ("result/gt: folder does not exist; run stage 3 with --infer_mode infer_from_dataset or infer_from_audio first"
            in capsys.readouterr().err)


def test_rerun_moves_earlier_outputs_aside_and_an_unwritable_output_is_refused_first(tmp_path, capsys):
    gt, pred = tone_pairs(tmp_path, {"a": 4000, "b": 4000})
    out = tmp_path / "eval"
    pre = PRE | {"sample_rate": 8000, "fmax": 4000}
    evaluate.evaluate_dirs(gt, pred, out, plot=True, pre=pre)
    (pred / "a.wav").write_bytes(b"junk")
    (pred / "b.wav").write_bytes(b"junk")
    with pytest.raises(evaluate.EvaluationError, match="none of the 2 matched utterances could be scored"):
        evaluate.evaluate_dirs(gt, pred, out, pre=pre)
    (aside,) = (out / "earlier").iterdir()
    assert sorted(p.name for p in out.iterdir()) == ["earlier"]  # no result of the earlier run looks current
    assert sorted(p.name for p in (aside / "plots").iterdir()) == ["a.png", "b.png"] and (aside / "summary.json").is_file()
    (tmp_path / "file").write_text("")
    assert main(cli(gt, pred, tmp_path / "file")) == 2
    assert "cannot write the outputs there" in capsys.readouterr().err


def test_a_warning_during_a_progress_bar_starts_a_line_of_its_own() -> None:
    """Stage 4's per-utterance warnings (and every stage's) went on after the bar's text, mid-line, easy to miss."""
    script = ("import logging; from tqdm import tqdm; from utils.cli import setup_logging; setup_logging('info')\n"
              "for i in tqdm(range(2), desc='scoring'):\n"
              "    logging.getLogger('evaluation.evaluate').warning('utt%d: F0 RMSE undefined', i)\n")
    err = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True).stderr
    lines = err.replace("\r", "\n").splitlines()
    for i in range(2):
        assert any(line.split(" ", 1)[-1] == f"WARNING evaluation.evaluate: utt{i}: F0 RMSE undefined"
                   for line in lines), err
