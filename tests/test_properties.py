"""Property-based tests (hypothesis) of the config loader and the audio and mel loaders. About 10 s."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors.audio import load_audio
from processors.mel import mel_spectrogram
from utils.config import load_config, merge, save_config, to_plain

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PRE = {"sample_rate": 24000, "n_fft": 1024, "win_size": 1024, "hop_size": 256, "n_mel": 100, "fmin": 0, "fmax": 12000}
MIN_SAMPLES = max(PRE["hop_size"], (PRE["n_fft"] - PRE["hop_size"]) // 2 + 1)

keys = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=6).filter(
    lambda k: k not in ("base_config", "config_path"))
scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False) | st.text(
    st.characters(codec="utf-8"), max_size=8)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
                      max_leaves=12)
configs = st.dictionaries(keys, values, max_size=5)


def check_merge(base: dict, override: dict, out: dict) -> None:
    assert set(out) == set(base) | set(override)
    for key, value in out.items():
        if key not in override:
            assert value == base[key]
        elif isinstance(override[key], dict) and isinstance(base.get(key), dict):
            check_merge(base[key], override[key], value)
        else:
            assert value == override[key]  # lists and scalars replace, never concatenate


@SETTINGS
@given(configs, configs)
def test_merge_semantics(base, override):
    before = copy.deepcopy((base, override))
    out = merge(base, override)
    check_merge(base, override, out)
    assert (base, override) == before  # inputs untouched
    assert merge(out, override) == out and merge(base, {}) == base and merge({}, override) == override


@SETTINGS
@given(configs, configs)
def test_saved_config_loads_back_and_inherits_like_merge(parent, child):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        save_config(parent, root / "parent.json")
        assert to_plain(load_config(root / "parent.json")) == {**parent, "config_path": str(root / "parent.json")}
        # json.dumps escapes non-ASCII (astral characters as surrogate pairs), as other tools' configs do
        (root / "child.json").write_text(json.dumps({**child, "base_config": str(root / "parent.json")}), encoding="utf-8")
        loaded = to_plain(load_config(root / "child.json"))
        assert loaded.pop("config_path") == str(root / "child.json")
        assert loaded == merge(parent, child)


@SETTINGS
@given(st.integers(MIN_SAMPLES, 12000), st.sampled_from(["silence", "noise", "clipped", "tone"]), st.integers(0, 2**31))
def test_any_audio_of_at_least_one_frame_gives_len_over_hop_finite_frames(length, kind, seed):
    rng = np.random.default_rng(seed)
    audio = {
        "silence": np.zeros(length),
        "noise": rng.uniform(-1, 1, length),
        "clipped": np.sign(rng.standard_normal(length)),
        "tone": 0.9 * np.sin(np.arange(length) * rng.uniform(0.001, 3.0)),
    }[kind].astype(np.float32)
    mel = mel_spectrogram(audio, PRE)
    assert mel.shape == (PRE["n_mel"], length // PRE["hop_size"]) and bool(mel.isfinite().all())


@SETTINGS
@given(st.integers(4000, 96000), st.floats(0.05, 0.4), st.sampled_from(["PCM_16", "PCM_24", "FLOAT", "PCM_U8"]),
       st.integers(1, 2), st.integers(0, 2**31))
def test_any_rate_is_resampled_to_the_config_rate(rate, seconds, subtype, channels, seed):
    samples = max(1, int(rate * seconds))
    audio = np.random.default_rng(seed).uniform(-0.9, 0.9, (samples, channels)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.wav"
        sf.write(path, audio, rate, subtype=subtype)
        loaded = load_audio(path, PRE["sample_rate"])
    assert loaded.dtype == np.float32 and loaded.ndim == 1
    assert abs(len(loaded) - samples * PRE["sample_rate"] / rate) <= 1
    assert np.isfinite(loaded).all() and np.abs(loaded).max() <= 1.0
    if len(loaded) >= MIN_SAMPLES:
        assert mel_spectrogram(loaded, PRE).shape[-1] == len(loaded) // PRE["hop_size"]
