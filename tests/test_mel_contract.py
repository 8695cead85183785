"""Mels from other toolkits: the recorded contract, n_mel errors, convention warnings, lossless converters,
derived upsampling factors, and the shipped 22.05 kHz / 44.1 kHz configs end to end through run.sh."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from models.vocoders.diffusion.diffusion_vocoder_inference import Vocoder, vocoder_from_experiment
from models.vocoders.diffusion.diffwave.geometry import factorize, upsample_factors
from models.vocoders.diffusion.experiment import CONTRACT_FILE, Experiment
from models.vocoders.diffusion.inference_modes import InputError, feature_items
from processors.feature_store import feature_settings
from processors.mel import mel_spectrogram
from processors.mel_conventions import MelConverter, from_natural_log, guess_convention, mel_contract, mel_converter
from tests.recipe_helpers import run_recipe
from tests.tiny_experiment import REPO, TINY_PRE, make_experiment
from utils.config import ConfigError, load_config, to_attrdict
from utils.io import save_json, save_npy
from utils.synthetic import synthetic_voice, write_corpus

CONFIGS = REPO / "egs/vocoder/diffusion/diffwave"


def native_mel(seconds: float = 0.5, seed: int = 1, pre: dict = TINY_PRE) -> torch.Tensor:
    return mel_spectrogram(synthetic_voice(seconds, pre["sample_rate"], seed), pre)


def stats_for(mel: torch.Tensor) -> np.ndarray:
    """Per-bin mean and scale, as a corpus's statistics would give (here: of this one mel)."""
    return np.stack([mel.double().mean(1).numpy(), mel.double().std(1).numpy()])


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    return make_experiment(tmp_path_factory.mktemp("contract"))


def test_contract_records_the_mel_definition(experiment, tmp_path):
    expt, cfg = experiment
    contract = json.loads((expt / CONTRACT_FILE).read_text())
    assert contract == mel_contract(cfg.preprocess)
    assert {k: contract[k] for k in ("sample_rate", "n_fft", "hop_size", "win_size", "n_mel", "fmin", "fmax")} == {
        "sample_rate": 8000, "n_fft": 256, "hop_size": 64, "win_size": 256, "n_mel": 20, "fmin": 0.0, "fmax": 4000.0}
    assert (contract["log_base"], contract["clamp_floor"], contract["normalisation"]) == ("e", 1e-5, "none")
    older = tmp_path / "older"  # experiments written before the contract: derived from args.json
    older.mkdir()
    (older / "args.json").write_text((expt / "args.json").read_text())
    assert Experiment(older).read_contract() == contract
    with pytest.raises(ConfigError, match=r"neither mel_contract\.json nor args\.json"):
        Experiment(tmp_path).read_contract()


def test_wrong_n_mel_is_an_error_naming_both_numbers(experiment, tmp_path):
    expt, cfg = experiment
    with pytest.raises(ValueError, match=r"x\.npy: mel has 30 bins, the experiment's mel contract has n_mel=20"):
        MelConverter(Experiment(expt).read_contract())(torch.zeros(30, 7), "x.npy")
    np.save(tmp_path / "wide.npy", np.zeros((80, 9), np.float32))
    skipped: list[str] = []
    assert feature_items(cfg, tmp_path, skipped, MelConverter(Experiment(expt).read_contract())) == []
    assert "wide.npy" in skipped[0] and "80" in skipped[0] and "n_mel=20" in skipped[0]


@pytest.mark.parametrize("given", ["folder", "mels"])
def test_stage1_mels_of_other_settings_are_refused_by_their_record(experiment, tmp_path, given):
    """A stage 1 folder made at 16 kHz, hop 128 with the model's 20 bins: the shapes fit, so every mel was vocoded at
    the model's 8 kHz, hop 64 without a word. Its features.json says what they were made with."""
    _expt, cfg = experiment
    other = {**TINY_PRE, "sample_rate": 16000, "hop_size": 128, "n_fft": 512, "win_size": 512, "fmax": 8000}
    folder = tmp_path / "data" / "other"
    save_npy(folder / "mels" / "a.npy", native_mel(pre=other).numpy())
    save_json(folder / "features.json", feature_settings(to_attrdict(other)))
    with pytest.raises(InputError, match=r"features\.json: these mels were made with sample_rate 16000 \(the model's: 8000\)"):
        feature_items(cfg, folder if given == "folder" else folder / "mels", [])
    save_json(folder / "features.json", feature_settings(cfg.preprocess))  # the model's own settings: vocoded
    assert [name for name, _mel, _ in feature_items(cfg, folder, [])] == ["a"]


@pytest.mark.parametrize("convention", ["log10", "db", "db_normalized", "meanvar", "linear"])
def test_other_conventions_are_recognised_and_named(experiment, convention, caplog):
    expt, _ = experiment
    mel = native_mel()
    converter = MelConverter(Experiment(expt).read_contract())
    with caplog.at_level(logging.WARNING):
        converter(mel, "native.npy")
    assert not caplog.records and guess_convention(mel)[0] == "ln"
    foreign = from_natural_log(mel, convention, stats_for(mel))
    if convention == "db":  # values far outside any natural-log mel of audio: refused with the hint, not vocoded
        with pytest.raises(ValueError, match=r"^foreign\.npy: .*; it looks like a db mel: convert with "
                                             r"--infer_mel_convention db"):
            converter(foreign, "foreign.npy")
        return
    with caplog.at_level(logging.WARNING):
        converter(foreign, "foreign.npy")
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "foreign.npy" in message and f"look like a {convention} mel" in message
    assert f"--infer_mel_convention {convention}" in message


@pytest.mark.parametrize("convention", ["log10", "db", "db_normalized", "meanvar", "meanvar+log10", "linear"])
def test_converted_mels_vocode_to_the_native_waveform(experiment, convention, tmp_path):
    expt, cfg = experiment
    # lmnt's [0, 1] dB scale keeps magnitudes in [1e-4, 10] only: test on that range
    mel = native_mel().clamp(math.log(1e-4), math.log(10.0))
    stats = stats_for(mel)
    foreign = mel
    for part in reversed(convention.split("+")):
        foreign = from_natural_log(foreign, part, stats)
    for folder, data in (("native", mel), ("foreign", foreign)):
        (tmp_path / folder).mkdir()
        np.save(tmp_path / folder / "utt.npy", data.numpy())
    np.save(tmp_path / "stats.npy", stats)
    contract = Experiment(expt).read_contract()
    native = feature_items(cfg, tmp_path / "native", [], MelConverter(contract))
    stats_file = tmp_path / "stats.npy" if "meanvar" in convention else None
    converted = feature_items(cfg, tmp_path / "foreign", [], MelConverter(contract, convention, stats_file))
    refused: list[str] = []
    unconverted = feature_items(cfg, tmp_path / "foreign", refused, MelConverter(contract))
    vocoder = vocoder_from_experiment(expt, device="cpu", seed=7)
    (a,), (b,) = (vocoder([m for _, m, _ in items], ["utt"]) for items in (native, converted))
    assert np.abs(a - b).max() < 1e-4
    # the conversion matters: unconverted, the mel drives the output elsewhere, or no audio gives it and it is refused
    if unconverted:
        (c,) = vocoder([unconverted[0][1]], ["utt"])
        assert np.abs(a - c).max() > 1e-2
    else:
        assert "as a natural-log mel" in refused[0] and convention in ("db", "meanvar+log10")


def test_meanvar_needs_valid_statistics(experiment, tmp_path):
    contract = Experiment(experiment[0]).read_contract()
    with pytest.raises(ConfigError, match="--infer_mel_stats"):
        MelConverter(contract, "meanvar")
    np.save(tmp_path / "bad.npy", np.ones((2, 7)))
    with pytest.raises(ConfigError, match=r"bad\.npy: mel statistics must have shape \(2, 20\)"):
        MelConverter(contract, "meanvar", tmp_path / "bad.npy")
    with pytest.raises(ConfigError, match="unknown mel convention 'log2'"):
        MelConverter(contract, "log2")


def test_statistics_without_meanvar_are_an_error_not_ignored(experiment, tmp_path):
    np.save(tmp_path / "stats.npy", np.ones((2, 7)))  # the wrong shape too: nothing else would have said so
    with pytest.raises(ConfigError, match=r"^--infer_mel_stats \(inference.mel_stats\) applies only with a meanvar "
                                          r"convention, not 'log10'$"):
        MelConverter(Experiment(experiment[0]).read_contract(), "log10", tmp_path / "stats.npy")
    contract = Experiment(experiment[0]).read_contract()  # a flag leaves a config's meanvar setup, stats and all
    config = {"inference": {"mel_convention": "meanvar", "mel_stats": str(tmp_path / "stats.npy")}}
    assert mel_converter(contract, config, "log10").convention == "log10"
    with pytest.raises(ConfigError, match=r"stats\.npy: mel statistics must have shape"):
        mel_converter(contract, config)  # the config's own meanvar still reads its stats


HK22 = {"sample_rate": 22050, "hop_size": 256, "n_fft": 1024, "win_size": 1024, "n_mel": 80, "fmin": 0, "fmax": 8000}


@pytest.mark.parametrize("pre", [TINY_PRE, HK22], ids=["8k", "22k"])
@pytest.mark.parametrize("gain", [1.0, 0.1, 0.01])
def test_linear_mels_are_told_from_db_normalized_ones_at_any_level(pre, gain):
    """Both lie in [0, 1] for quiet audio; linear ones pile up near 0, lmnt's dB-normalised ones do not."""
    for seed in range(3):
        mel = mel_spectrogram(gain * synthetic_voice(0.5, pre["sample_rate"], seed), pre)
        assert guess_convention(mel)[0] == "ln"
        assert guess_convention(from_natural_log(mel, "linear"))[0] == "linear"
        assert guess_convention(from_natural_log(mel, "db_normalized"))[0] == "db_normalized"
        assert guess_convention(from_natural_log(mel, "db"))[0] == "db"


def test_full_scale_audio_stays_under_the_ceiling_and_impossible_values_are_refused(experiment):
    contract = Experiment(experiment[0]).read_contract()
    converter = MelConverter(contract)
    t = np.arange(contract["sample_rate"]) / contract["sample_rate"]
    for signal in (np.sign(np.sin(2 * np.pi * 500 * t)), np.sin(2 * np.pi * 1000 * t), np.ones_like(t)):
        mel = mel_spectrogram(signal.astype(np.float32), TINY_PRE)  # the loudest a mel gets: it must pass
        assert float(mel.max()) <= converter.full_scale and converter(mel, "loud.npy") is mel
    mel = native_mel()
    cases = {"huge": torch.full_like(mel, 1e30), "coded": (mel * 1000).round(), "db": from_natural_log(mel, "db") + 20}
    assert float(mel.max()) < 0 and float(cases["db"].max()) > converter.full_scale + 1  # coded: too low, db: too high
    for name, values in cases.items():
        with pytest.raises(ValueError, match=rf"^{name}\.npy: values \(min .*\) reach .* as a natural-log mel, "
                                             rf"(above the {converter.full_scale:.2f} that full-scale audio gives here|"
                                             r"below ln\(1e-10\), the lowest floor log mels are clamped at); "):
            converter(values, f"{name}.npy")
    with pytest.raises(ValueError, match="it looks like a db mel"):
        converter(from_natural_log(mel, "db"), "quiet_db.npy")  # under the ceiling, but far below any floor
    with pytest.raises(ValueError, match="it looks like a db mel: convert with --infer_mel_convention db"):
        converter(cases["db"], "db.npy")
    with pytest.raises(ValueError, match=r"a dB mel \(--infer_mel_convention db\)\? .* save ln\(max\(m, 1e-5\)\)"):
        converter(cases["huge"], "huge.npy")  # 1e30 is no linear mel either: no hint that would fail too
    converted = MelConverter(contract, "db")(cases["db"], "db.npy")  # named: the same mel 20 dB up is fine
    assert torch.allclose(converted, (mel + math.log(10)).float(), atol=1e-5)


@pytest.mark.parametrize("hop", [1, 7, 64, 256, 300, 441, 512, 600, 1024, 1031, 2048, 2062, 4096])
def test_upsample_factors_derive_from_the_hop(hop):
    factors = factorize(hop)
    assert math.prod(factors) == hop and len(factors) <= 3
    assert all(f > 1 for f in factors) or factors == [1]
    if hop in (2048, 4096):
        assert len(factors) == 3


def test_given_upsample_factors_must_multiply_to_the_hop():
    cfg = to_attrdict({"preprocess": {"hop_size": 512}, "model": {"diffwave": {"upsample_factors": [16, 16]}},
                       "config_path": "c.json"})
    with pytest.raises(ConfigError, match=r"c\.json: .*\[16, 16\] multiply to 256, not preprocess.hop_size 512"):
        upsample_factors(cfg)
    assert upsample_factors(load_config(CONFIGS / "exp_config_44k_hop512.json")) == [16, 32]
    assert upsample_factors(load_config(CONFIGS / "exp_config_22k_hop256.json")) == [16, 16]


@pytest.mark.parametrize("name, rate, hop, n_mel", [("exp_config_22k_hop256.json", 22050, 256, 80),
                                                   ("exp_config_44k_hop512.json", 44100, 512, 128)])
def test_shipped_config_end_to_end(tmp_path, name, rate, hop, n_mel):
    """Stage 1 -> 2 (2 steps) -> 3 on the shipped mel settings with a tiny model; then mels written as log10
    vocode, with --infer_mel_convention log10, to the same wavs as the native mels."""
    write_corpus(tmp_path / "corpus", speakers=1, per_speaker=4, sample_rate=rate, seconds=(0.4, 0.6))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "base_config": str(CONFIGS / name), "dataset": ["toy"], "use_custom_dataset": ["toy"],
        "dataset_path": {"toy": str(tmp_path / "corpus")}, "log_dir": str(tmp_path / "ckpts"),
        "preprocess": {"processed_dir": str(tmp_path / "data"), "cut_mel_frame": 8},
        "model": {"diffwave": {"residual_channels": 4, "residual_layers": 2, "dilation_cycle_length": 2}},
        "train": {"batch_size": 2, "save_checkpoint_stride": [1000], "dataloader": {"num_worker": 0}},
    }))
    run_recipe("--stage", "1", "--config", str(config), "--num_workers", "1")
    run_recipe("--stage", "2", "--config", str(config), "--name", "toy", "--max_steps", "2")
    expt = tmp_path / "ckpts" / "toy"
    contract = json.loads((expt / CONTRACT_FILE).read_text())
    assert (contract["sample_rate"], contract["hop_size"], contract["n_mel"]) == (rate, hop, n_mel)
    out = tmp_path / "out"
    run_recipe("--stage", "3", "--config", str(config), "--infer_mode", "infer_from_dataset", "--infer_datasets", "toy",
               "--infer_expt_dir", str(expt), "--infer_output_dir", str(out))
    mels = sorted((tmp_path / "data" / "toy" / "mels").glob("*.npy"))
    tested = {p.stem: np.load(p) for p in mels if (out / "pred" / f"{p.stem}.wav").is_file()}
    assert tested
    for uid, mel in tested.items():
        audio, sr = sf.read(out / "pred" / f"{uid}.wav")
        assert sr == rate and mel.shape[0] == n_mel and len(audio) == mel.shape[1] * hop
    uid, mel = next(iter(tested.items()))
    for folder, data in (("native", mel), ("log10", mel / math.log(10))):
        (tmp_path / folder).mkdir()
        np.save(tmp_path / folder / f"{uid}.npy", data.astype(np.float32))
        flags = ["--infer_mel_convention", "log10"] if folder == "log10" else []
        run_recipe("--stage", "3", "--config", str(config), "--infer_mode", "infer_from_feature", *flags,
                   "--infer_feature_dir", str(tmp_path / folder), "--infer_expt_dir", str(expt),
                   "--infer_output_dir", str(tmp_path / f"out_{folder}"))
    native, _ = sf.read(tmp_path / "out_native" / "pred" / f"{uid}.wav")
    converted, _ = sf.read(tmp_path / "out_log10" / "pred" / f"{uid}.wav")
    assert len(native) == mel.shape[1] * hop and np.abs(native - converted).max() <= 1 / 32768


def test_vocoder_rebuilds_any_hop_from_the_experiment(tmp_path):
    expt, cfg = make_experiment(tmp_path, sample_rate=16000, hop_size=300, n_fft=1200, win_size=1200)
    vocoder = vocoder_from_experiment(expt, device="cpu")
    assert isinstance(vocoder, Vocoder) and vocoder.model.hop_size == 300
    mel = native_mel(0.4, pre=dict(cfg.preprocess))
    (audio,) = vocoder([mel], ["x"])
    assert len(audio) == mel.shape[1] * 300
