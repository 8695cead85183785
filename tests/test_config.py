"""Config loader: inheritance, attribute access, placeholder and path errors."""

import json
import re
import shutil
from pathlib import Path

import pytest

from models.vocoders.diffusion import ddpm, device_policy, windowed
from utils import config_schema
from utils.config import ConfigError, load_config, merge, source_of
from utils.config_schema import check_dataset_paths, unknown_keys, validate

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
    assert message.endswith("or leave it out of 'dataset' there")  # a user with one corpus trims the list


@pytest.mark.parametrize("text, expected", [
    ('{"base_config": "nowhere.json"}', "does not exist"),
    ('{"a": ', "not valid JSON5"),
    ("[1, 2]", "top level must be an object"),
])
def test_bad_files_give_one_line(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path / "c.json", text))


@pytest.mark.parametrize("value", ['""', "false", "null", "[]"])
def test_a_base_config_that_is_no_path_is_an_error(tmp_path, value):
    """`base_config: ""` or `false` dropped the whole chain without a word."""
    child = write(tmp_path / "c.json", f'{{"base_config": {value}, "train": {{"batch_size": 2}}}}')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(child))}: key 'base_config' must be a path to a config "
                                          rf"file, got {re.escape(value)}$"):
        load_config(child)


def test_a_folder_given_as_config_is_one_line(tmp_path):
    from tests.reliability_kit import python_bin

    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path))}: is a folder, not a config file$"):
        load_config(tmp_path)
    result = python_bin("check_config.py", "--config", str(tmp_path), "--stage", "train")
    assert result.returncode == 1 and result.stderr.strip() == f"error: {tmp_path}: is a folder, not a config file"


def test_a_relative_base_beside_the_child_and_under_the_repo_root_is_refused_naming_both(tmp_path):
    """A project's own config/base.json was shadowed by the toolkit's without a word."""
    repo_base = RECIPE.parents[4] / "config/base.json"
    (tmp_path / "config").mkdir()
    write(tmp_path / "config" / "base.json", '{"train": {"batch_size": 3}}')
    child = write(tmp_path / "exp.json", '{"base_config": "config/base.json"}')
    with pytest.raises(ConfigError) as err:
        load_config(child)
    assert str(err.value) == (f"{child}: base_config 'config/base.json' is both {tmp_path / 'config/base.json'} and "
                              f"{repo_base}: name one of them by its absolute path, or as './config/base.json' for the "
                              "one beside this config")
    write(child, '{"base_config": "./config/base.json"}')
    assert load_config(child).train == {"batch_size": 3}
    shutil.copy(repo_base, tmp_path / "config" / "base.json")  # an unchanged copy (a project's, a second clone's)
    write(child, '{"base_config": "config/base.json"}')
    assert load_config(child).train == load_config(repo_base).train


def test_a_relative_base_is_found_under_the_repo_root_or_beside_never_in_the_working_folder(tmp_path, monkeypatch):
    original = write(tmp_path / "original.json", '{"base_config": "egs/vocoder/diffusion/diffwave/exp_config.json"}')
    assert load_config(original).model.generator == "diffwave"  # the original toolkit's recipes name bases so
    (tmp_path / "cwd").mkdir()
    write(tmp_path / "cwd" / "p.json", '{"a": 1}')
    monkeypatch.chdir(tmp_path / "cwd")
    child = write(tmp_path / "child.json", '{"base_config": "p.json"}')
    with pytest.raises(ConfigError, match=r"base_config 'p.json' does not exist \(looked beside this config and under "):
        load_config(child)


def test_a_base_config_under_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path / "p.json", '{"a": 1}')
    (tmp_path / "sub").mkdir()
    assert load_config(write(tmp_path / "sub" / "c.json", '{"base_config": "~/p.json"}')).a == 1


def test_base_config_loop_is_reported(tmp_path):
    write(tmp_path / "a.json", '{"base_config": "b.json"}')
    write(tmp_path / "b.json", '{"base_config": "a.json"}')
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.json")


# ----- issue 13: ranges, cross-field checks and unknown keys -------------------------------------------------

RECIPES = sorted((RECIPE.parent).glob("**/*.json"))
BASES = [RECIPE.parents[4] / "config/base.json", RECIPE.parents[4] / "config/vocoder.json",
         RECIPE.parents[1] / "exp_config_base.json"]


def override(tmp_path: Path, section: str, values: dict) -> Path:
    """A child of the recipe config that sets `values` in `section` (dotted, e.g. model.diffwave)."""
    node: dict = dict(values)
    for part in reversed(section.split(".")):
        node = {part: node}
    text = json.dumps({"base_config": str(RECIPE), **node}).replace('"__nan__"', "NaN")
    return write(tmp_path / "child.json", text)


BAD_VALUES = [  # (section, values, stage, key named in the error, words of the reason)
    ("preprocess", {"win_size": 2048}, "preprocess", "preprocess.win_size", "must not exceed preprocess.n_fft"),
    ("preprocess", {"hop_size": 4096}, "inference", "preprocess.hop_size", "must not exceed preprocess.n_fft"),
    ("preprocess", {"fmin": 9000, "fmax": 8000}, "preprocess", "preprocess.fmin", "must be below preprocess.fmax"),
    ("preprocess", {"fmin": 500, "fmax": 500}, "train", "preprocess.fmin", "must be below"),
    ("preprocess", {"fmax": 16000}, "preprocess", "preprocess.fmax", "half the sample rate"),
    ("preprocess", {"fmax": None, "fmin": 12000}, "preprocess", "preprocess.fmin", "below preprocess.fmax (12000"),
    ("preprocess", {"fmin": -5}, "preprocess", "preprocess.fmin", "must be in [0, inf)"),
    ("preprocess", {"n_mel": 600}, "preprocess", "preprocess.n_mel", "513 FFT bins"),
    ("preprocess", {"sample_rate": 0}, "preprocess", "preprocess.sample_rate", "must be in (0, inf)"),
    ("preprocess", {"hop_size": -256}, "train", "preprocess.hop_size", "must be in (0, inf)"),
    ("preprocess", {"n_fft": True}, "preprocess", "preprocess.n_fft", "must be int"),
    ("model.diffwave", {"noise_schedule_factors": [1e-4, 0.05]}, "train", "noise_schedule_factors", "must hold 3 values"),
    ("model.diffwave", {"noise_schedule_factors": [1e-4, 0.05, 0]}, "train", "noise_schedule_factors", "integer >= 1"),
    ("model.diffwave", {"noise_schedule_factors": [1e-4, 0.05, 2.5]}, "inference", "noise_schedule_factors", "integer"),
    ("model.diffwave", {"noise_schedule_factors": [0.05, 1e-4, 50]}, "train", "noise_schedule_factors", "beta_start < beta_end"),
    ("model.diffwave", {"noise_schedule_factors": [1e-4, 1.5, 50]}, "inference", "noise_schedule_factors", "< 1"),
    ("model.diffwave", {"noise_schedule_factors": [0, 0.05, 50]}, "train", "noise_schedule_factors", "0 < beta_start"),
    ("model.diffwave", {"inference_noise_schedule": []}, "inference", "inference_noise_schedule", "must not be empty"),
    ("model.diffwave", {"inference_noise_schedule": [0.1, 1.2]}, "inference", "inference_noise_schedule", "(0, 1)"),
    ("model.diffwave", {"inference_noise_schedule": [0.0, 0.5]}, "train", "inference_noise_schedule", "(0, 1)"),
    ("model.diffwave", {"inference_noise_schedule": ["x"]}, "inference", "inference_noise_schedule", "must hold"),
    ("model.diffwave", {"residual_channels": 0}, "train", "model.diffwave.residual_channels", "(0, inf)"),
    ("model.diffwave", {"residual_layers": -3}, "inference", "model.diffwave.residual_layers", "(0, inf)"),
    ("model.diffwave", {"upsample_factors": [16, 0]}, "train", "upsample_factors", "(0, inf)"),
    ("train", {"adamw": {"lr": 0}}, "train", "train.adamw.lr", "(0, 1]"),
    ("train", {"adamw": {"lr": "__nan__"}}, "train", "train.adamw.lr", "finite"),
    ("train", {"adamw": {"adam_b1": 1.0}}, "train", "train.adamw.adam_b1", "[0, 1)"),
    ("train", {"exponential_lr": {"lr_decay": 0}}, "train", "train.exponential_lr.lr_decay", "(0, 1]"),
    ("train", {"exponential_lr": {"lr_decay": 1.5}}, "train", "train.exponential_lr.lr_decay", "(0, 1]"),
    ("train", {"ema_decay": 1}, "train", "train.ema_decay", "[0, 1)"),
    ("train", {"keep_last": [3, -2]}, "train", "train.keep_last", "[-1, inf)"),
    ("train", {"save_checkpoint_stride": [-1]}, "train", "train.save_checkpoint_stride", "[0, inf)"),
    ("train", {"batch_size": 0}, "train", "train.batch_size", "(0, inf)"),
    ("train", {"max_grad_norm": -1}, "train", "train.max_grad_norm", "[0, inf)"),
    ("inference", {"batch_size": -1}, "inference", "inference.batch_size", "(0, inf)"),
    ("inference", {"chunk_size": -5}, "inference", "inference.chunk_size", "(0, inf)"),
    ("inference", {"tile": 0}, "inference", "inference.tile", "(0, inf)"),
    ("inference", {"cache_gib": -1}, "inference", "inference.cache_gib", "[0, inf)"),
    ("preprocess", {"use_mel": False}, "train", "preprocess.use_mel", "choose one of true"),
    ("preprocess", {"extract_audio": False}, "preprocess", "preprocess.extract_audio", "choose one of true"),
    ("train", {"tracker": ["tensorboard", "wandb"]}, "train", "train.tracker", "'wandb': choose one of tensorboard"),
    ("train", {"dataloader": {"pin_memory": "yes"}}, "train", "train.dataloader.pin_memory", "must be bool"),
    ("train", {"compile_mode": "fast"}, "train", "train.compile_mode", "choose one of auto, default, reduce-overhead"),
    ("train", {"adamw": {"fused": "yes"}}, "train", "train.adamw.fused", "auto"),
    # 0 stopped the run at its first (good) step: "0 optimizer steps in a row had a non-finite loss"
    ("train", {"max_nonfinite_steps": 0}, "train", "train.max_nonfinite_steps", "(0, inf)"),
    ("preprocess", {"valid_file": "train.json"}, "preprocess", "preprocess.valid_file", "must differ from"),
    # these failed as "invalid literal for int()" naming nothing, a traceback after the final save, an AdamW overflow
    ("train", {"eval_utterances": "three"}, "train", "train.eval_utterances", "must be int"),
    ("train", {"eval_seconds": "2s"}, "train", "train.eval_seconds", "must be"),
    ("train", {"eval_seconds": -1}, "train", "train.eval_seconds", "(0, inf)"),
    ("train", {"adamw": {"lr": 1e38}}, "train", "train.adamw.lr", "(0, 1]"),
    # read by the trainer but unchecked: ["false"] and "no" were truthy, false a TypeError in stage 2, "false" TF32 on
    ("train", {"run_eval": ["false"]}, "train", "train.run_eval", "must hold bool values"),
    ("train", {"run_eval": "no"}, "train", "train.run_eval", "must be list"),
    ("train", {"run_eval": False}, "train", "train.run_eval", "must be list"),
    ("train", {"tf32": "false"}, "train", "train.tf32", "must be bool"),
    ("preprocess", {"spk2id": ["singers.json"]}, "preprocess", "preprocess.spk2id", "must be str"),
    ("inference", {"mel_convention": 10}, "inference", "inference.mel_convention", "must be str"),
    ("inference", {"mel_stats": True}, "inference", "inference.mel_stats", "must be str or null"),
    # "abc" failed as "invalid literal for int()", 0 without the file, 3.5 ran 3 steps
    ("inference", {"steps": "abc"}, "inference", "inference.steps", "must be int"),
    ("inference", {"steps": 0}, "inference", "inference.steps", "(0, inf)"),
    ("inference", {"steps": 3.5}, "inference", "inference.steps", "must be int"),
]


@pytest.mark.parametrize(("key", "value"), [("model_type", "GANVocoder"), ("task_type", "tts")])
def test_the_originals_selector_keys_must_select_this_recipe(tmp_path, key, value):
    """model_type / task_type pick the model family in the original; here another choice is refused, not ignored."""
    child = write(tmp_path / "child.json", json.dumps({"base_config": str(RECIPE), key: value}))
    with pytest.raises(ConfigError, match=rf"key '{key}' is '{value}': choose one of"):
        validate(load_config(child), "train")


@pytest.mark.parametrize(("section", "values", "stage", "key", "reason"), BAD_VALUES,
                         ids=[f"{s}-{'-'.join(v)}-{st}" for s, v, st, _k, _r in BAD_VALUES])
def test_out_of_range_value_is_one_line_naming_key_and_file(tmp_path, section, values, stage, key, reason):
    child = override(tmp_path, section, values)
    with pytest.raises(ConfigError) as err:
        validate(load_config(child), stage)
    message = str(err.value)
    assert message.startswith(f"{child}: key '") and key in message and reason in message and "\n" not in message


def test_a_bad_value_set_in_a_parent_is_blamed_on_the_parent(tmp_path):
    parent = override(tmp_path, "preprocess", {"win_size": 4096})
    child = write(tmp_path / "grandchild.json", json.dumps({"base_config": str(parent), "train": {"batch_size": 2}}))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(parent))}: key 'preprocess.win_size'"):
        validate(load_config(child), "preprocess")


@pytest.mark.parametrize(("values", "key"), [
    ({"valid_file": "./train.json"}, "preprocess.valid_file"),
    ({"valid_file": "Train.json"}, "preprocess.valid_file"),
    ({"valid_file": "features.json"}, "preprocess.valid_file"),
    ({"train_file": "inputs.json"}, "preprocess.train_file"),
    ({"train_file": "meta_info.json"}, "preprocess.train_file"),
    ({"valid_file": "skipped.txt"}, "preprocess.valid_file"),
    ({"valid_file": "./singers.json"}, "preprocess.valid_file"),
    ({"utt2spk": "spk.json", "train_file": "spk.json"}, "preprocess.train_file"),
])
def test_metadata_file_names_never_overwrite_each_other_or_stage1_records(tmp_path, values, key):
    """`./train.json` passed a plain string comparison; `features.json` overwrote stage 1's own record."""
    child = override(tmp_path, "preprocess", values)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(child))}: key '{re.escape(key)}'"):
        validate(load_config(child), "preprocess")


def test_stage1_records_are_all_reserved():
    from processors.feature_store import SETTINGS_FILE
    from processors.fingerprint import FINGERPRINT_FILE

    assert {SETTINGS_FILE, FINGERPRINT_FILE} <= set(config_schema.STAGE1_FILES)


@pytest.mark.parametrize("path", [*RECIPES, *BASES], ids=lambda p: p.name)
def test_shipped_configs_have_no_unknown_keys_and_recipes_validate(path):
    cfg = load_config(path)
    assert unknown_keys(cfg) == []
    if path not in BASES:
        for stage in ("preprocess", "train", "inference", "evaluation"):
            validate(cfg, stage)
    if path.name == "vocoder.json":  # stage 4's default mel
        validate(cfg, "evaluation")


def test_unknown_keys_are_warned_with_the_closest_known_key(tmp_path, caplog):
    child = write(tmp_path / "typo.json", json.dumps({
        "base_config": str(RECIPE),
        "train": {"batch_szie": 8, "adamw": {"lerning_rate": 1e-3}},
        "preprocess": {"hop_sise": 256},
        "dataset_path": {"my_corpus": "/data/mine"},  # a free section: any name is fine
        "my_section": {"nested": {"deeper": 1}},
    }))
    cfg = load_config(child)
    found = dict(unknown_keys(cfg))
    assert found == {"train.batch_szie": "train.batch_size", "train.adamw.lerning_rate": "train.adamw.lr",
                     "preprocess.hop_sise": "preprocess.hop_size", "my_section": None}
    validate(cfg, "train")
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"{child}: unknown config key 'train.batch_szie' is ignored; did you mean 'train.batch_size'?" in warned


def test_check_config_cli_refuses_a_bad_range_before_any_work(tmp_path):
    from tests.reliability_kit import python_bin

    child = override(tmp_path, "model.diffwave", {"inference_noise_schedule": [0.2, 3.0]})
    result = python_bin("check_config.py", "--config", str(child), "--stage", "inference")
    assert result.returncode == 1 and "inference_noise_schedule" in result.stderr and str(child) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_schema_names_what_the_models_accept():
    """utils/config_schema sits below models/ and keeps its own lists of names: they must stay the models' names."""
    assert config_schema.SAMPLER_NAMES == ddpm.SAMPLER_NAMES
    assert config_schema.SCHEMA["inference.sampler"].choices == ddpm.SAMPLER_NAMES
    assert config_schema.SCHEMA["train.mixed_precision"].choices == device_policy.TRAIN_PRECISIONS
    assert config_schema.SCHEMA["inference.engine"].choices == windowed.ENGINES


def test_stage3_recipe_config_values_are_blamed_on_that_file_and_derived_factors_named_so(tmp_path, caplog):
    from models.vocoders.diffusion.experiment import Experiment, with_recipe_config
    from tests.tiny_experiment import make_experiment

    expt, _cfg = make_experiment(tmp_path)  # upsample_factors unset: derived from its hop of 64
    recipe = write(tmp_path / "recipe.json", json.dumps({"base_config": str(RECIPE), "inference": {"batch_size": 0}}))
    cfg = with_recipe_config(Experiment(expt).config(), recipe)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(recipe.resolve()))}: key 'inference.batch_size'"):
        validate(cfg, "inference")
    factors = next(r.getMessage() for r in caplog.records if "upsample_factors" in r.getMessage())
    assert "(derived from the hop size)" in factors and "None" not in factors


@pytest.mark.parametrize("value", [5, ["a"], {"path": "x"}])
def test_a_dataset_path_that_is_not_a_string_is_one_line_naming_the_key(tmp_path, value):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"base_config": str(RECIPE), "dataset": ["ljspeech"], "dataset_path": {"ljspeech": value}}))
    with pytest.raises(ConfigError, match=r"^dataset_path\.ljspeech must be a folder path \(a string\), got ") as err:
        check_dataset_paths(load_config(config))
    assert str(config) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", [".mine", "a/b", "mine ", "x" * 181])
def test_a_dataset_name_unfit_for_a_folder_is_refused(tmp_path, name):
    """safe_name changed such a name for the features but not for the metadata: two folders, features.json defeated."""
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"base_config": str(RECIPE), "dataset": [name], "dataset_path": {name: str(tmp_path)}}))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(config))}: key 'dataset' names ") as err:
        check_dataset_paths(load_config(config))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("datasets", "problem"), [([], "must not be empty"), (["a", "b", "a"], "names 'a' more than once")])
@pytest.mark.parametrize("stage", ["preprocess", "train"])
def test_an_empty_or_repeated_dataset_list_is_refused(tmp_path, datasets, problem, stage):
    """`dataset: []` made stage 1 do nothing and exit 0; a dataset listed twice trained on each utterance twice."""
    child = write(tmp_path / "c.json", json.dumps({"base_config": str(RECIPE), "dataset": datasets,
                                                   "dataset_path": {"a": str(tmp_path), "b": str(tmp_path)}}))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(child))}: key 'dataset' {problem}") as err:
        validate(load_config(child), stage)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("inference", "problem"), [({"precision": "fp8"}, "key 'inference.precision' is 'fp8'"),
                                                  (None, "key 'inference' must be an object")])
def test_the_precision_stage2_evaluates_in_is_checked_before_training(tmp_path, inference, problem):
    """Both passed stage 2's check: the run trained up to its first evaluation, then stopped there (null: a traceback)."""
    child = write(tmp_path / "c.json", json.dumps({"base_config": str(RECIPE), "inference": inference}))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(child))}: {re.escape(problem)}"):
        validate(load_config(child), "train")


def test_the_shipped_configs_are_the_tracked_ones():
    """known_keys reads a fixed list: it must name every config the toolkit ships, and only those."""
    import subprocess

    root = RECIPE.parents[4]
    tracked = subprocess.run(["git", "ls-files", "config/*.json", "egs/*.json"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.split()
    assert sorted(config_schema.SHIPPED_CONFIGS) == sorted(tracked)


def test_a_users_config_under_egs_still_has_its_typos_reported(tmp_path):
    """Every egs/**/*.json counted as shipped: a config saved beside the recipes made its own typos known keys."""
    mine = RECIPE.parent / f"my_exp_{tmp_path.name}.json"
    write(mine, json.dumps({"base_config": str(RECIPE), "train": {"batch_szie": 8}}))
    config_schema.known_keys.cache_clear()
    try:
        assert dict(unknown_keys(load_config(mine))) == {"train.batch_szie": "train.batch_size"}
    finally:
        mine.unlink()
        config_schema.known_keys.cache_clear()


def test_log_level_in_a_config_is_warned_as_ignored_with_where_to_set_it(tmp_path, caplog):
    """config/base.json set log_level, which nothing read: the level is the --log_level option."""
    child = write(tmp_path / "c.json", json.dumps({"base_config": str(RECIPE), "log_level": "debug"}))
    validate(load_config(child), "train")
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"{child}: unknown config key 'log_level' is ignored; the log level is the --log_level option of run.sh " \
           "and the bins" in warned
    caplog.clear()  # an experiment trained before: its args.json copied the key, and is nothing to edit
    (tmp_path / "expt").mkdir()
    validate(load_config(write(tmp_path / "expt" / "args.json", json.dumps({**load_config(child), "config_path": ""}))),
             "inference")
    assert "log_level" not in caplog.text


def test_ddim_steps_beyond_the_training_steps_name_the_key_and_file(tmp_path):
    """ddim walks a subset of the training steps: more than those failed as "ddim steps must be in 1..50, got 60"."""
    from models.vocoders.diffusion.diffusion_vocoder_inference import vocoder_from_experiment
    from models.vocoders.diffusion.experiment import Experiment, with_recipe_config
    from tests.tiny_experiment import make_experiment

    expt, _cfg = make_experiment(tmp_path)
    recipe = write(tmp_path / "recipe.json", json.dumps({"inference": {"sampler": "ddim", "steps": 60}}))
    cfg = with_recipe_config(Experiment(expt).config(), recipe)
    trained = cfg.model.diffwave.noise_schedule_factors[2]
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(recipe))}: key 'inference.steps' \(60\) must be at most "
                                          rf"the {trained} training steps for the ddim sampler$"):
        vocoder_from_experiment(expt, cfg=cfg)


def test_stage3_recipe_config_differences_blame_the_file_that_set_each_value(tmp_path, caplog):
    """A value set in a base file of --config was blamed on the top file, which does not hold it."""
    from models.vocoders.diffusion.experiment import Experiment, with_recipe_config
    from tests.tiny_experiment import make_experiment

    expt, cfg = make_experiment(tmp_path)
    setter = source_of(load_config(RECIPE), "preprocess.sample_rate")
    assert setter != str(RECIPE) and cfg.preprocess.sample_rate != load_config(RECIPE).preprocess.sample_rate
    recipe = write(tmp_path / "recipe.json", json.dumps({"base_config": str(RECIPE), "inference": {"batch_size": 2}}))
    with_recipe_config(Experiment(expt).config(), recipe)
    warned = [r.getMessage() for r in caplog.records if "preprocess.sample_rate is" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"{setter}: preprocess.sample_rate is "), warned


@pytest.mark.parametrize(("key", "stage"), [("preprocess.processed_dir", "preprocess"), ("preprocess.processed_dir", "inference"),
                                            ("log_dir", "train")])
def test_an_output_folder_that_is_a_file_names_its_key(tmp_path, key, stage):
    """It stopped the stage with a bare "[Errno 20] Not a directory" naming no key."""
    taken = write(tmp_path / "taken", "a file")
    section, _, name = key.rpartition(".")
    values = {section: {name: str(taken)}} if section else {name: str(taken)}
    child = write(tmp_path / "c.json", json.dumps({"base_config": str(RECIPE), **values}))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(child))}: key '{key}' \('{re.escape(str(taken))}'\) is a file"):
        validate(load_config(child), stage)


def test_a_folder_named_as_base_config_is_called_a_folder(tmp_path):
    (tmp_path / "configs").mkdir()
    child = write(tmp_path / "c.json", '{"base_config": "./configs"}')
    with pytest.raises(ConfigError, match=r"base_config './configs' is the folder .*configs: name a config file"):
        load_config(child)
