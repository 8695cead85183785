"""Issue 13, checkpoints: retention keeps what it promises, deletes only its own folders, refuses damage.

Each case is a checkpoint folder state a long run can meet: many saves under keep_last, a hostile or
damaged ckpts.json, a corrupt state.json or RNG file, NaN weights, a disk that fills mid-save, and a
second run started into an existing experiment name.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.vocoders.diffusion.checkpointing import CheckpointPolicy, refuse_to_mix_runs, rng_state, set_rng_state
from tests.reliability_kit import make_experiment, python_bin, tiny_train_state, write_config
from utils.checkpoint import (
    CheckpointError,
    checkpoint_name,
    list_checkpoints,
    load_weights,
    read_state,
    remove_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from utils.config import ConfigError, to_attrdict

RNG = [{"torch": torch.get_rng_state()}]


def test_train_state_reads_back_what_the_policy_saved(tmp_path):
    """One TrainState writes and reads a checkpoint: weights, optimizer moments, LR schedule and counters."""
    source = tiny_train_state(5)
    source.epoch, source.skipped_steps = 2, 1
    source.model(torch.randn(3, 2)).square().sum().backward()
    source.optimizer.step()
    source.scheduler.step()
    folder = CheckpointPolicy(to_attrdict({"train": {}}), tmp_path / "checkpoint").save(source, 0.5, RNG, ["stride0"])
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "optimizer.pt",
                                                        "rng_0.pt", "scheduler.pt", "state.json"]
    target = tiny_train_state(0)
    target.load_state_dict(folder)
    assert target.counters() == {"epoch": 2, "step": 5, "batch_in_epoch": 5, "skipped_steps": 1}
    assert all(torch.equal(v, target.model.state_dict()[k]) for k, v in source.model.state_dict().items())
    assert target.scheduler.state_dict() == source.scheduler.state_dict()
    moments = [source.optimizer.state_dict()["state"][0], target.optimizer.state_dict()["state"][0]]
    assert torch.equal(moments[0]["exp_avg_sq"], moments[1]["exp_avg_sq"]) and moments[1]["step"] == 1


@pytest.mark.parametrize("saved", [{}, {**torch.amp.GradScaler("cpu").state_dict(), "scale": "big"}],
                         ids=["empty", "ill_typed"])
def test_a_damaged_grad_scaler_file_is_one_line_naming_it(tmp_path, saved):
    """fp16's scaler.pt was loaded unguarded: a damaged one stopped the resume with a KeyError traceback."""
    source, target = tiny_train_state(1), tiny_train_state(0)
    source.scaler = target.scaler = torch.amp.GradScaler("cpu")
    folder = CheckpointPolicy(to_attrdict({"train": {}}), tmp_path / "checkpoint").save(source, 0.5, RNG, ["stride0"])
    torch.save(saved, folder / "scaler.pt")
    with pytest.raises(CheckpointError, match=r"scaler\.pt: damaged or from another model \(.+\)$"):
        target.load_state_dict(folder)


def policy_run(root: Path, saves: int, **train: object) -> tuple[CheckpointPolicy, list[int]]:
    """`saves` one-epoch saves through the policy; returns it and the steps still on disk."""
    policy = CheckpointPolicy(to_attrdict({"train": {"save_checkpoint_stride": [1], **train}}), root)
    for step in range(1, saves + 1):
        state = tiny_train_state(step)
        state.epoch = step
        policy.save(state, 1.0 / step, RNG, policy.due_by_epoch(step))
    return policy, [read_state(p)["step"] for p in list_checkpoints(root)]


@pytest.mark.parametrize(("keep", "saves", "expected"), [
    ([3], 2, [1, 2]),  # fewer saves than asked: every one stays
    ([3], 3, [1, 2, 3]),
    ([3], 6, [4, 5, 6]),
    ([5], 4, [1, 2, 3, 4]),
    ([5], 7, [3, 4, 5, 6, 7]),
    ([2], 5, [4, 5]),
    ([1], 3, [3]),
    ([-1], 4, [1, 2, 3, 4]),
])
def test_keep_last_keeps_exactly_the_newest_n(tmp_path, keep, saves, expected):
    _policy, kept = policy_run(tmp_path / "checkpoint", saves, keep_last=keep)
    assert kept == expected


def test_a_checkpoint_whose_save_was_cut_short_after_the_rename_is_still_pruned(tmp_path, monkeypatch):
    """A crash between a checkpoint's rename and the ckpts.json update must not leave a folder keep_last never sees."""
    root = tmp_path / "checkpoint"
    policy_run(root, 1, keep_last=[1])
    policy = CheckpointPolicy(to_attrdict({"train": {"save_checkpoint_stride": [1], "keep_last": [1]}}), root)

    def killed() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(policy, "_prune", killed)
    with pytest.raises(KeyboardInterrupt):
        policy.save(tiny_train_state(2), 0.5, RNG, ["stride0"])
    assert [read_state(p)["step"] for p in list_checkpoints(root)] == [1, 2]
    resumed = CheckpointPolicy(to_attrdict({"train": {"save_checkpoint_stride": [1], "keep_last": [1]}}), root)
    resumed.save(tiny_train_state(3), 0.5, RNG, ["stride0"])
    assert [read_state(p)["step"] for p in list_checkpoints(root)] == [3]


def test_the_final_checkpoints_of_runs_in_segments_are_kept_like_kind_0(tmp_path):
    """Each segment of a run trained in pieces ends with a "final" save; keep_last [2] keeps the newest two of them."""
    root = tmp_path / "checkpoint"
    policy = CheckpointPolicy(to_attrdict({"train": {"save_checkpoint_stride": [1], "keep_last": [2]}}), root)
    for step, kinds in enumerate([["stride0"], ["final"], ["stride0"], ["final"], ["stride0"], ["final"],
                                  ["stride0", "final"]], start=1):
        policy.save(tiny_train_state(step), 0.5, RNG, kinds)
    assert [read_state(p)["step"] for p in list_checkpoints(root)] == [5, 6, 7]


def test_keep_last_of_the_original_base_config_keeps_all_of_the_every_other_stride(tmp_path):
    # stride 1 keeps 3, stride 2 keeps every save: the original toolkit's [3, -1].
    root = tmp_path / "checkpoint"
    policy = CheckpointPolicy(to_attrdict({"train": {"save_checkpoint_stride": [1, 2], "keep_last": [3, -1]}}), root)
    for epoch in range(1, 9):
        state = tiny_train_state(epoch)
        state.epoch = epoch
        policy.save(state, 0.5, RNG, policy.due_by_epoch(epoch))
    assert [read_state(p)["step"] for p in list_checkpoints(root)] == [2, 4, 6, 7, 8]
    reopened = CheckpointPolicy(to_attrdict({"train": {"save_checkpoint_stride": [1, 2], "keep_last": [3, -1]}}), root)
    assert [r["name"] for r in reopened.records] == [p.name for p in list_checkpoints(root)]  # survives a resume


@pytest.mark.parametrize("hostile", ["../../victim", "{abs}", "sub/epoch-0000_step-0000001_loss-0.500000",
                                     "..", "", "epoch-0000_step-0000009_loss-0.5/../../../victim"])
def test_ckpts_json_cannot_make_a_run_delete_outside_its_checkpoints(tmp_path, hostile):
    victim = tmp_path / "victim"
    (victim / "precious").mkdir(parents=True)
    root = tmp_path / "exp" / "checkpoint"
    (root / "sub" / "epoch-0000_step-0000001_loss-0.500000").mkdir(parents=True)
    name = hostile.replace("{abs}", str(victim))
    listing = [{"name": name, "step": 0, "kinds": ["stride0"]}, {"name": 7, "kinds": "x"}, "junk"]
    (root / "ckpts.json").write_text(json.dumps({"checkpoints": listing}))
    policy_run(root, 3, keep_last=[1])
    assert (victim / "precious").is_dir()
    assert (root / "sub" / "epoch-0000_step-0000001_loss-0.500000").is_dir()
    assert [read_state(p)["step"] for p in list_checkpoints(root)] == [3]


def test_a_symlink_named_like_a_checkpoint_is_never_followed_or_deleted(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "model.safetensors").write_bytes(b"x")
    (victim / "state.json").write_text('{"epoch": 0, "step": 0}')
    root = tmp_path / "checkpoint"
    root.mkdir()
    link = root / checkpoint_name(0, 0, 0.1)
    link.symlink_to(victim, target_is_directory=True)
    (root / "ckpts.json").write_text(json.dumps({"checkpoints": [{"name": link.name, "step": 0, "kinds": ["stride0"]}]}))
    policy_run(root, 2, keep_last=[1])
    assert link.is_symlink() and sorted(p.name for p in victim.iterdir()) == ["model.safetensors", "state.json"]
    with pytest.raises(CheckpointError, match="refused to delete"):
        remove_checkpoint(link)
    with pytest.raises(CheckpointError, match="refused to delete"):
        remove_checkpoint(victim)  # not a checkpoint name


def test_unreadable_ckpts_json_prunes_nothing_it_did_not_list(tmp_path, caplog):
    root = tmp_path / "checkpoint"
    policy_run(root, 2, keep_last=[-1])
    (root / "ckpts.json").write_text("{not json")
    policy, _kept = policy_run(root, 0, keep_last=[1])
    state = tiny_train_state(9)
    policy.save(state, 0.1, RNG, ["stride0"])
    assert len(list_checkpoints(root)) == 3  # the two it could not vouch for are left alone
    assert "unreadable" in caplog.text


def checkpoint_folder(tmp_path: Path) -> Path:
    model = torch.nn.Linear(2, 2)
    return save_checkpoint(tmp_path / checkpoint_name(1, 2, 0.5), {"model.safetensors": model.state_dict(),
                           "rng_0.pt": rng_state()}, {"epoch": 1, "step": 2})


def test_a_checkpoint_renamed_by_hand_is_refused_naming_its_place(tmp_path):
    # a later name made every resume go back to it, and the run then saved over its own newer checkpoints' names
    renamed = checkpoint_folder(tmp_path).rename(tmp_path / checkpoint_name(9, 90, 0.5))
    with pytest.raises(CheckpointError, match=r"named for epoch 9, step 90 .*rename it back to epoch-0001_step-0000002_"):
        read_state(renamed)
    assert read_state(renamed.rename(tmp_path / "best"))["step"] == 2  # a name that does not place it: not compared


@pytest.mark.parametrize(("content", "reason"), [
    ("", "unreadable checkpoint state"),
    ("not json at all", "unreadable checkpoint state"),
    ("[1, 2]", "must be a JSON object"),
    ('{"epoch": "one", "step": 2}', "'epoch' must be a non-negative integer"),
    ('{"epoch": 1}', "'step' must be a non-negative integer"),
    ('{"epoch": 1, "step": -4}', "'step' must be a non-negative integer"),
    ('{"epoch": 1, "step": 2, "batch_in_epoch": null}', "'batch_in_epoch'"),
    ('{"epoch": true, "step": 2}', "'epoch'"),
])
def test_corrupt_state_json_is_one_line_naming_the_file(tmp_path, content, reason):
    folder = checkpoint_folder(tmp_path)
    (folder / "state.json").write_text(content)
    with pytest.raises(CheckpointError) as err:
        read_state(folder)
    assert str(folder / "state.json") in str(err.value) and reason in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("damage", ["no_numpy", "no_torch", "not_a_dict", "wrong_type"])
def test_damaged_rng_file_is_one_line_naming_the_file(tmp_path, damage):
    state = rng_state()
    broken = {"no_numpy": {k: v for k, v in state.items() if k != "numpy"},
              "no_torch": {k: v for k, v in state.items() if k != "torch"},
              "not_a_dict": [1, 2, 3],
              "wrong_type": {**state, "python": "abc"}}[damage]
    with pytest.raises(CheckpointError) as err:
        set_rng_state(broken, tmp_path / "rng_0.pt")
    assert "rng_0.pt: damaged RNG state" in str(err.value) and "\n" not in str(err.value)


def test_a_resume_on_fewer_gpus_restores_the_generators_it_has(monkeypatch):
    """A run saved on two GPUs resumed on one (`--gpu 0,1` then `--gpu 0`): the GPU that is there gets its state
    back; restoring every saved one failed on the missing device and read as a damaged file."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state.tolist(), device)))
    saved = {**rng_state(), "cuda": [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)]}
    set_rng_state(saved, "rng_0.pt")
    assert restored == [([1], 0)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_non_finite_weights_are_refused_at_load(tmp_path, bad, weights_file):
    weights = torch.nn.Linear(3, 3).state_dict()
    weights["bias"][1] = bad
    folder = save_checkpoint(tmp_path / checkpoint_name(0, 1, 0.5), {weights_file: weights}, {"epoch": 0, "step": 1})
    with pytest.raises(CheckpointError, match=r"parameter 'bias' holds NaN or inf"):
        load_weights(folder)


def test_stage3_refuses_nan_weights_with_one_line(tmp_path):
    config = write_config(tmp_path)
    expt = make_experiment(tmp_path, config)
    folder = resolve_checkpoint(expt)
    weights = load_weights(folder)
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], float("nan"))
    from safetensors.torch import save_file

    save_file(weights, str(folder / "model.safetensors"))
    (tmp_path / "mels").mkdir()
    result = python_bin("inference.py", "--infer_mode", "infer_from_feature", "--infer_expt_dir", str(expt),
                        "--output_dir", str(tmp_path / "out"), "--feature_folder", str(tmp_path / "mels"))
    assert result.returncode == 1 and f"parameter '{name}' holds NaN or inf" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out" / "pred").exists()


@pytest.mark.parametrize("failing", ["utils.checkpoint.save_file", "torch.save"])
def test_full_disk_in_any_checkpoint_file_is_one_line_and_keeps_the_earlier(tmp_path, monkeypatch, failing):
    root = tmp_path / "checkpoint"
    policy, _kept = policy_run(root, 1, keep_last=[1])
    before = list_checkpoints(root)

    def full(*_args, **_kwargs):
        if failing == "torch.save":  # what torch's zip writer raises when the disk fills
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0\nmore detail")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(failing, full)
    state = tiny_train_state(2)
    with pytest.raises(OSError) as err:
        policy.save(state, 0.4, RNG, ["stride0"])
    assert "earlier checkpoints are kept" in str(err.value) and "\n" not in str(err.value)
    assert list_checkpoints(root) == before and load_weights(before[0])["weight"].shape == (2, 2)
    assert not list(root.glob(".tmp-*"))


def test_a_checkpoint_saved_over_one_of_its_name_never_leaves_the_name_empty(tmp_path, monkeypatch):
    """The earlier folder was deleted before the new one took its name: an interruption in between (a second Ctrl-C)
    lost both. Now the earlier one is set aside, and deleted only once the new one has the name, or put back."""
    folder = tmp_path / "checkpoint" / checkpoint_name(0, 1, 0.5)
    save_checkpoint(folder, {"model.safetensors": {"w": torch.zeros(2)}}, {"epoch": 0, "step": 1})
    real_replace = os.replace

    def interrupted(src, dst):
        if Path(src).name.startswith(".tmp-") and not Path(src).name.startswith(".tmp-del-"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr("utils.checkpoint.os.replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(folder, {"model.safetensors": {"w": torch.ones(2)}}, {"epoch": 0, "step": 1})
    assert list_checkpoints(folder.parent) == [folder] and torch.equal(load_weights(folder)["w"], torch.zeros(2))
    monkeypatch.setattr("utils.checkpoint.os.replace", real_replace)
    save_checkpoint(folder, {"model.safetensors": {"w": torch.ones(2)}}, {"epoch": 0, "step": 1})
    assert torch.equal(load_weights(folder)["w"], torch.ones(2)) and not list(folder.parent.glob(".tmp-*"))


@pytest.mark.parametrize("killed", ["saving", "pruning"])
def test_a_save_killed_between_its_renames_is_finished_and_a_killed_prune_is_not_undone(tmp_path, killed):
    """Killed between set_aside and the new folder's rename, a same-name save left both folders hidden: the resume
    listing went back to an older checkpoint and the next save's cleanup deleted both."""
    root = tmp_path / "checkpoint"
    older, name = root / checkpoint_name(0, 1, 0.5), checkpoint_name(1, 2, 0.4)
    save_checkpoint(older, {"model.safetensors": {"w": torch.zeros(2)}}, {"epoch": 0, "step": 1})
    save_checkpoint(root / name, {"model.safetensors": {"w": torch.zeros(2)}}, {"epoch": 1, "step": 2})
    os.replace(root / name, root / f".tmp-del-{name}")  # set aside ...
    if killed == "saving":  # ... for a complete, synced new folder that had yet to take the name
        save_checkpoint(tmp_path / "new" / name, {"model.safetensors": {"w": torch.ones(2)}}, {"epoch": 1, "step": 2})
        os.replace(tmp_path / "new" / name, root / f".tmp-{name}")
    assert list_checkpoints(root) == [older]
    save_checkpoint(root / checkpoint_name(2, 3, 0.3), {"model.safetensors": {"w": torch.zeros(2)}}, {"epoch": 2, "step": 3})
    names = [p.name for p in list_checkpoints(root)]
    assert names == ([older.name, name, checkpoint_name(2, 3, 0.3)] if killed == "saving" else [older.name,
                                                                                                  checkpoint_name(2, 3, 0.3)])
    if killed == "saving":
        assert torch.equal(load_weights(root / name)["w"], torch.ones(2))
    assert not list(root.glob(".tmp-*"))


def test_a_loose_weights_file_takes_no_config_from_folders_above_it(tmp_path):
    """Its grandparent's args.json is no experiment's of its: a finetune compared the model with an unrelated config."""
    from models.vocoders.diffusion.experiment import trained_config

    (tmp_path / "args.json").write_text('{"model": {"diffwave": {"residual_channels": 999}}}')
    loose = tmp_path / "downloads" / "model.safetensors"
    loose.parent.mkdir()
    save_file({"w": torch.zeros(2)}, str(loose))
    assert trained_config(loose) is None
    inside = tmp_path / "exp" / "checkpoint" / checkpoint_name(0, 1, 0.5)
    save_checkpoint(inside, {"model.safetensors": {"w": torch.zeros(2)}}, {"epoch": 0, "step": 1})
    (tmp_path / "exp" / "args.json").write_text('{"model": {"diffwave": {"residual_channels": 7}}}')
    assert trained_config(inside / "model.safetensors").model.diffwave.residual_channels == 7


def test_a_new_run_into_an_existing_experiment_is_refused(tmp_path):
    exp = tmp_path / "exp"
    refuse_to_mix_runs(exp, None)  # nothing there yet
    exp.mkdir()
    refuse_to_mix_runs(exp, None)  # an empty folder is fine
    checkpoint_folder(exp / "checkpoint")
    for resume_type in (None, "finetune"):
        with pytest.raises(ConfigError, match="--resume_type resume"):
            refuse_to_mix_runs(exp, resume_type)
    refuse_to_mix_runs(exp, "resume")


def test_stage2_cli_never_overwrites_an_existing_experiments_args(tmp_path):
    config = write_config(tmp_path)
    exp = tmp_path / "ckpts" / "taken"
    exp.mkdir(parents=True)
    (exp / "args.json").write_text('{"mine": 1}')
    result = python_bin("train.py", "--config", str(config), "--exp_name", "taken")
    assert result.returncode == 1 and "already exists" in result.stderr and "--resume_type resume" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and (exp / "args.json").read_text() == '{"mine": 1}'


def other_shape(path: Path) -> None:
    """Another model's file in place of `path`: its first tensor of another shape (it failed in the first step)."""
    if path.suffix == ".safetensors":
        weights = load_file(str(path))
        save_file({**weights, next(iter(weights)): torch.zeros(5)}, str(path))
    else:
        state = torch.load(path)
        state["state"][0]["exp_avg"] = torch.zeros(5)
        torch.save(state, path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny experiment trained for two steps in-process: a real, complete checkpoint to damage."""
    from processors.preprocess import preprocess
    from tests.recipe_helpers import tiny_training_config
    from tests.training_kit import trainer
    from utils.config import load_config
    from utils.synthetic import write_corpus

    root = tmp_path_factory.mktemp("trained")
    write_corpus(root / "corpus", 1, 4, sample_rate=8000)
    preprocess(load_config(tiny_training_config(root, "config.json", max_steps=2)), num_workers=1)
    trainer(root / "config.json", "src").train()
    return root, list_checkpoints(root / "ckpts" / "src" / "checkpoint")[-1], trainer


@pytest.mark.parametrize(("damage", "culprit", "words"), [
    (lambda f: (f / "state.json").write_text(""), "state.json", "unreadable checkpoint state"),
    (lambda f: (f / "state.json").write_text('{"epoch": 0, "step": "2"}'), "state.json", "'step' must be"),
    (lambda f: torch.save({"torch": torch.get_rng_state()}, f / "rng_0.pt"), "rng_0.pt", "missing key 'numpy'"),
    (lambda f: torch.save({"state": {}, "param_groups": "x"}, f / "optimizer.pt"), "optimizer.pt", "damaged"),
    (lambda f: torch.save([1, 2], f / "scheduler.pt"), "scheduler.pt", "damaged"),
    (lambda f: other_shape(f / "ema.safetensors"), "ema.safetensors", "has shape (5,), the model expects"),
    (lambda f: other_shape(f / "optimizer.pt"), "optimizer.pt", "'exp_avg' of parameter"),
    (lambda f: torch.save({**torch.load(f / "scheduler.pt"), "last_epoch": "7"}, f / "scheduler.pt"), "scheduler.pt",
     "'last_epoch' is '7'"),
], ids=["empty_state", "ill_typed_state", "rng_missing_keys", "ill_typed_optimizer", "scheduler_not_a_dict",
        "foreign_ema", "foreign_optimizer", "ill_typed_scheduler"])
def test_resume_from_damaged_metadata_is_one_line_naming_the_file(trained, tmp_path, damage, culprit, words):
    root, source, trainer = trained
    folder = tmp_path / source.name
    shutil.copytree(source, folder)
    damage(folder)
    with pytest.raises(CheckpointError) as err:
        trainer(root / "config.json", "resumed", "resume", str(folder))
    message = str(err.value)
    assert message.startswith(str(folder / culprit)) and words in message and "\n" not in message


def test_a_resume_without_ema_weights_says_its_ema_starts_again(trained, tmp_path, caplog):
    root, source, trainer = trained
    folder = tmp_path / source.name
    shutil.copytree(source, folder)
    (folder / "ema.safetensors").unlink()
    from tests.recipe_helpers import tiny_training_config

    trainer(tiny_training_config(root, "longer.json", max_steps=3), "no_ema", "resume", str(folder))
    assert "no EMA weights (ema.safetensors); the EMA starts again" in caplog.text


def test_a_resume_by_another_number_of_processes_says_the_data_order_differs(trained, tmp_path, caplog):
    root, source, trainer = trained
    folder = tmp_path / source.name
    shutil.copytree(source, folder)
    (folder / "state.json").write_text(json.dumps({**json.loads((folder / "state.json").read_text()), "num_processes": 2}))
    from tests.recipe_helpers import tiny_training_config

    trainer(tiny_training_config(root, "longer.json", max_steps=3), "two_to_one", "resume", str(folder))
    assert "was saved by 2 processes and is resumed by 1: the data order" in caplog.text


def test_kinds_the_config_no_longer_has_are_kept_not_crashed_on(tmp_path):
    # an earlier run saved with two strides (or ckpts.json was edited): what only those kinds hold stays
    root = tmp_path / "checkpoint"
    policy_run(root, 2, save_checkpoint_stride=[1, 1], keep_last=[1, -1])
    record = json.loads((root / "ckpts.json").read_text())
    record["checkpoints"][0]["kinds"] += ["stride7", "strideX", "bogus"]
    (root / "ckpts.json").write_text(json.dumps(record))
    policy = CheckpointPolicy(to_attrdict({"train": {"save_checkpoint_stride": [1], "keep_last": [1]}}), root)
    for step in (10, 11):
        state = tiny_train_state(step)
        policy.save(state, 0.5, RNG, ["stride0"])
    assert [read_state(p)["step"] for p in list_checkpoints(root)] == [1, 2, 11]


@pytest.mark.parametrize("listed", [False, True], ids=["listed-in-order", "listed-reversed"])
def test_the_newest_of_two_checkpoints_at_one_step_is_the_later_epochs(tmp_path: Path, monkeypatch, listed: bool) -> None:
    """Skipped windows at an epoch's end give its epoch checkpoint the step of a step save before them; a resume
    from the experiment picks the later one whatever order the folder lists them in."""
    root = tmp_path / "checkpoint"
    names = ["epoch-0000_step-0000002_loss-0.500000", "epoch-0001_step-0000002_loss-0.600000"]
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "state.json").write_text("{}")
        (root / name / "model.safetensors").write_bytes(b"")
    listing = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(sorted(listing(self), reverse=listed)))
    assert [p.name for p in list_checkpoints(root)] == names
    assert resolve_checkpoint(tmp_path).name == names[1]



@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_checkpoint_file_honours_the_umask(tmp_path, umask):
    """safetensors writes 0600: a group-shared experiment could not be read by the group."""
    import stat

    state = tiny_train_state(1)
    previous = os.umask(umask)
    try:
        folder = CheckpointPolicy(to_attrdict({"train": {}}), tmp_path / "checkpoint").save(state, 0.5, RNG, ["stride0"])
        save_checkpoint(tmp_path / checkpoint_name(0, 2, 0.5), {"ema.safetensors": state.model.state_dict()}, {})
    finally:
        os.umask(previous)
    files = [*folder.iterdir(), tmp_path / checkpoint_name(0, 2, 0.5) / "ema.safetensors"]
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: oct(0o666 & ~umask) for p in files}


@pytest.mark.parametrize("writer", ["torch.save", "utils.checkpoint.save_file"])
def test_a_failed_first_save_says_none_is_kept_and_how_much_room_there_is(tmp_path, monkeypatch, writer):
    """A full disk as torch.save and safetensors report it (a RuntimeError; a SafetensorError, which was a traceback)."""
    from safetensors import SafetensorError

    def full(*_args, **_kwargs):
        if writer == "torch.save":
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1856 vs 1750")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(writer, full)
    with pytest.raises(OSError) as err:
        CheckpointPolicy(to_attrdict({"train": {}}), tmp_path / "checkpoint").save(tiny_train_state(1), 0.5, RNG, ["stride0"])
    message = str(err.value)
    assert "MiB free there: disk full?" in message and message.endswith("no checkpoint was saved yet")
    assert "earlier checkpoints are kept" not in message and "\n" not in message


def test_a_prune_that_fails_after_its_save_says_the_new_checkpoint_is_complete(tmp_path, monkeypatch):
    """A disk that filled between the save and ckpts.json's rewrite stopped the run with a bare
    `[Errno 28] No space left on device`: no file, no word of the checkpoint just saved."""
    from models.vocoders.diffusion import checkpointing
    from utils.io import save_json

    policy = CheckpointPolicy(to_attrdict({"train": {"save_checkpoint_stride": [1], "keep_last": [1]}}), tmp_path)
    train = tiny_train_state(1)
    train.epoch = 1
    policy.save(train, 0.5, [rng_state()], ["stride0"])
    writes = []

    def full_on_the_prune(path, obj):
        writes.append(path)
        if len(writes) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        save_json(path, obj)

    monkeypatch.setattr(checkpointing, "save_json", full_on_the_prune)
    train.epoch, train.step, train.batch_in_epoch = 2, 2, 0
    with pytest.raises(OSError) as err:
        policy.save(train, 0.4, [rng_state()], ["stride0"])
    new = tmp_path / checkpoint_name(2, 2, 0.4)
    assert str(err.value).startswith(f"pruning the checkpoints before {new} failed ([Errno 28] No space left on device; ")
    assert str(err.value).endswith(f"{new.name} is saved and complete, a resume goes on from it")
    assert list_checkpoints(tmp_path)[-1] == new
