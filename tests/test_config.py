"""Config loader: inheritance, attribute access, placeholder and path errors."""

from pathlib import Path

import pytest

from utils.config import ConfigError, check_dataset_paths, load_config, merge

RECIPE = Path(__file__).resolve().parents[1] / "egs/vocoder/diffusion/diffwave/exp_config.json"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_merge_merges_dicts_and_replaces_lists_and_scalars():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 1}
    out = merge(base, {"a": {"y": [3]}, "b": 2, "c": 3})
    assert out == {"a": {"x": 1, "y": [3]}, "b": 2, "c": 3}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 1}


def test_inheritance_chain_relative_to_file_and_attribute_access(tmp_path):
    write(tmp_path / "parent.json", '{"train": {"lr": 1, "strides": [1, 2]}, "keep": true, // comment\n}')
    child = write(tmp_path / "child.json", '{"base_config": "parent.json", "train": {"strides": [5]}}')
    cfg = load_config(child)
    assert cfg.train.lr == 1 and cfg.train.strides == [5] and cfg.keep is True
    assert "base_config" not in cfg


def test_recipe_config_has_the_recipe_defaults():
    cfg = load_config(RECIPE)
    pre, train, model = cfg.preprocess, cfg.train, cfg.model.diffwave
    assert (pre.n_mel, pre.sample_rate, pre.hop_size, pre.win_size, pre.n_fft) == (100, 24000, 256, 1024, 1024)
    assert (pre.fmin, pre.fmax, pre.cut_mel_frame, pre.processed_dir) == (0, 12000, 32, "data")
    assert (train.batch_size, train.max_epoch, train.save_checkpoint_stride) == (32, 1000000, [20])
    assert (train.adamw.lr, train.adamw.adam_b1, train.adamw.adam_b2, train.exponential_lr.lr_decay) == (2e-4, 0.8, 0.99, 0.999)
    assert (model.residual_channels, model.residual_layers, model.dilation_cycle_length) == (64, 30, 10)
    assert model.noise_schedule_factors == [1e-4, 0.05, 50] and model.upsample_factors == [16, 16]
    assert model.inference_noise_schedule == [0.0001, 0.001, 0.01, 0.05, 0.2, 0.5]
    assert cfg.log_dir == "ckpts/vocoder" and len(cfg.dataset) == 13 and set(cfg.dataset) == set(cfg.dataset_path)


def test_placeholder_path_names_dataset_and_file():
    cfg = load_config(RECIPE)
    with pytest.raises(ConfigError) as err:
        check_dataset_paths(cfg)
    message = str(err.value)
    assert "'csd'" in message and "[dataset path]" in message and str(RECIPE) in message and "\n" not in message


@pytest.mark.parametrize("text, expected", [
    ('{"base_config": "nowhere.json"}', "does not exist"),
    ('{"a": ', "not valid JSON5"),
    ("[1, 2]", "top level must be an object"),
])
def test_bad_files_give_one_line(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path / "c.json", text))


def test_base_config_loop_is_reported(tmp_path):
    write(tmp_path / "a.json", '{"base_config": "b.json"}')
    write(tmp_path / "b.json", '{"base_config": "a.json"}')
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.json")
