"""Stage 2 runs on one experiment folder over time: one trainer at a time, a restart of a run that died before
its first checkpoint, runs that would train nothing, and rolling back to an older checkpoint."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from models.vocoders.diffusion.experiment import Experiment
from processors.preprocess import preprocess
from tests.recipe_helpers import tiny_training_config
from tests.reliability_kit import REPO, python_bin, write_config
from tests.training_kit import scalars, trainer
from utils import file_lock
from utils.checkpoint import CheckpointError, list_checkpoints, read_state
from utils.config import ConfigError, load_config
from utils.synthetic import write_corpus


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny corpus with features and `config.json` (2 steps an epoch of 4 utterances, batch 4: 1 step an epoch)."""
    root = tmp_path_factory.mktemp("lifecycle")
    write_corpus(root / "corpus", 1, 4, sample_rate=8000)
    preprocess(load_config(tiny_training_config(root, "config.json", max_steps=2)), num_workers=1)
    return root


def steps(exp: Path) -> list[int]:
    return [read_state(p)["step"] for p in list_checkpoints(exp / "checkpoint")]


def test_a_second_trainer_on_a_running_experiment_is_refused(root: Path) -> None:
    """Two trainers on one --name (new or resumed) would overwrite each other's checkpoints and temporary saves."""
    exp = root / "ckpts" / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import time; from models.vocoders.diffusion.experiment import "
                               f"Experiment; Experiment({str(exp)!r}).lock(); print('held', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for resume_type in ("resume", None):
            with pytest.raises(ConfigError) as err:
                trainer(root / "config.json", "busy", resume_type)
            assert str(err.value) == f"{exp}: another training (pid {holder.pid}) is using this experiment"
    finally:
        holder.kill()
        holder.wait()
    trainer(root / "config.json", "busy").train()  # the lock went with its process
    assert steps(exp) == [1, 2]


def test_a_file_system_without_flock_trains_unguarded_with_a_warning(tmp_path: Path, monkeypatch, caplog) -> None:
    """Some NFS and Lustre mounts refuse flock (ENOLCK, ENOSYS): the run goes on, saying it is not guarded."""
    import errno
    import fcntl

    from models.vocoders.diffusion.experiment import Experiment

    def refuse(*_args: object) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    Experiment(tmp_path / "exp").lock()
    assert "cannot lock (No locks available)" in caplog.text


def test_a_run_that_died_before_its_first_checkpoint_can_be_started_again(root: Path, caplog) -> None:
    exp = root / "ckpts" / "dead"
    trainer(root / "config.json", "dead")  # set up (args.json written), then killed before any step
    assert (exp / "args.json").is_file() and not steps(exp)
    with pytest.raises(ConfigError, match="stopped before its first checkpoint; pass --resume_type resume to start it "
                                          "again from step 0"):
        trainer(root / "config.json", "dead")
    trainer(root / "config.json", "dead", "resume", str(exp / "checkpoint")).train()  # its empty folder named too
    assert "no checkpoint yet" in caplog.text and steps(exp) == [1, 2]


def test_resuming_a_name_that_holds_no_experiment_says_so_and_where_it_looked(root: Path) -> None:
    """A mistyped --name, or a resume without the --config it was trained with (so another log_dir), ended in
    "ckpts/vocoder/x/checkpoint: no complete checkpoint here": a path relative to the repo root, not the user's folder."""
    with pytest.raises(ConfigError) as err:
        trainer(root / "config.json", "never_trained", "resume")
    exp = (root / "ckpts" / "never_trained").resolve()
    assert str(err.value).startswith(f"{exp}: no experiment of this name to resume (log_dir '{root / 'ckpts'}' from "
                                     f"{root / 'config.json'}); check --name and --config"), err.value
    assert not exp.exists()


def test_an_epochs_progress_bar_is_numbered_as_its_summary_line(root: Path, capfd, caplog) -> None:
    """The bar of the first epoch said "epoch 0", its summary line below it "epoch 1: step 1, ..."."""
    with caplog.at_level("INFO"):
        trainer(root / "config.json", "numbered").train()
    bars = {part.split(":")[0] for part in capfd.readouterr().err.replace("\r", "\n").splitlines()
            if part.startswith("epoch ") and "batch" in part}
    summaries = {r.getMessage().split(":")[0] for r in caplog.records if r.getMessage().startswith("epoch ")}
    assert bars == summaries == {"epoch 1", "epoch 2"}, (bars, summaries)


def test_a_run_killed_during_its_setup_is_started_again_by_a_resume(root: Path, caplog) -> None:
    """A run SIGKILLed while it loaded (before args.json) left its folder with the lock file alone: every
    `--resume_type resume` then stopped with `no complete checkpoint here`, a job that always resumes was stuck."""
    exp = root / "ckpts" / "killed_in_setup"
    exp.mkdir(parents=True)
    (exp / ".train.lock").write_text("12345\n")  # what the killed process left
    trainer(root / "config.json", "killed_in_setup", "resume").train()
    assert "no checkpoint yet" in caplog.text and steps(exp) == [1, 2]
    with pytest.raises(ConfigError, match="no experiment of this name to resume"):  # a name never trained stays refused
        trainer(root / "config.json", "never_trained", "resume")
    assert not (root / "ckpts" / "never_trained").exists()


def test_a_finetune_that_died_before_its_first_checkpoint_is_started_again_from_its_source(root: Path) -> None:
    """Rerunning such a finetune was refused with `pass --resume_type resume`, and that resume trained the finetune's
    name from random weights, its source forgotten, with nothing but a `starting it again from step 0` warning."""
    trainer(root / "config.json", "ft_source").train()
    source = list_checkpoints(root / "ckpts" / "ft_source" / "checkpoint")[-1]
    trainer(root / "config.json", "ft_dead", "finetune", str(source))  # set up (args.json written), then killed
    with pytest.raises(ConfigError, match=f"a finetune of {source} that stopped before its first checkpoint; start it "
                                          f"again with --resume_type finetune --checkpoint {source}"):
        trainer(root / "config.json", "ft_dead", "resume")
    run = trainer(root / "config.json", "ft_dead", "finetune", str(source))  # the finetune itself starts it again
    weights = load_file(str(source / "model.safetensors"))
    assert all(bool((run.state.model.state_dict()[k] == v).all()) for k, v in weights.items())
    run.train()
    assert steps(root / "ckpts" / "ft_dead") == [1, 2]


def test_runs_that_would_train_nothing_are_refused_before_writing(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="already at epoch 0 of max_epoch 0"):
        trainer(tiny_training_config(root, "epoch0.json", max_epoch=0), "nothing")
    assert not (root / "ckpts" / "nothing" / "args.json").exists()
    result = python_bin("train.py", "--config", str(write_config(tmp_path)), "--exp_name", "neg", "--max_steps", "-5")
    assert result.returncode == 1 and result.stderr.strip() == "error: --max_steps must be 0 (no bound) or more, got -5"
    assert not (tmp_path / "ckpts").exists()


def test_an_empty_test_split_logs_no_validation_loss_and_names_checkpoints_by_the_training_loss(
        root: Path, tmp_path: Path, caplog) -> None:
    """A corpus whose test utterances are all missing (a subset of kising without its test songs): no loss of 0."""
    shutil.copytree(root / "data", tmp_path / "data")
    (tmp_path / "data" / "demo" / "test.json").write_text("[]")
    cfg = json.loads((root / "config.json").read_text())
    cfg["preprocess"]["processed_dir"], cfg["log_dir"] = str(tmp_path / "data"), str(tmp_path / "ckpts")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    trainer(tmp_path / "config.json", "novalid").train()
    assert "no validation utterances with features" in caplog.text
    exp = tmp_path / "ckpts" / "novalid"
    assert [read_state(p)["loss"] > 0.1 for p in list_checkpoints(exp / "checkpoint")] == [True, True]
    assert "valid/loss" not in scalars(exp)


def test_a_rollback_to_a_copy_under_a_name_of_ones_own_sticks_too(root: Path, caplog) -> None:
    """A copy of step 2 put in checkpoint/ as `best` (how a backup is rolled back to) was placed by its name, which
    places nothing: steps 3 and 4 stayed, and a plain resume after the new branch's step 3 went on with the old 4."""
    exp = root / "ckpts" / "rollback_best"
    trainer(tiny_training_config(root, "best4.json", max_steps=4, keep_last=[3]), "rollback_best").train()
    before = list_checkpoints(exp / "checkpoint")
    shutil.copytree(before[0], exp / "checkpoint" / "best")
    trainer(tiny_training_config(root, "best3.json", max_steps=3, keep_last=[3], max_grad_norm=0.01), "rollback_best",
            "resume", str(exp / "checkpoint" / "best")).train()
    # steps 3 and 4, and step 2 too: another checkpoint at the rollback's place, as the rule for rollbacks says
    assert sorted(p.name for p in (exp / "checkpoint").glob("abandoned-*")) == [f"abandoned-{p.name}" for p in before]
    assert steps(exp) == [3] and "moved aside" in caplog.text


def test_a_rollback_to_an_older_checkpoint_sticks(root: Path, caplog) -> None:
    """Resuming from step 2 of [2, 3, 4] (keep_last 3) moves 3 and 4 aside: the new branch keeps its rollback point,
    and the next plain resume goes on from the new branch, not the abandoned one."""
    exp = root / "ckpts" / "rollback"
    trainer(tiny_training_config(root, "keep3.json", max_steps=4, keep_last=[3]), "rollback").train()
    before = list_checkpoints(exp / "checkpoint")
    assert steps(exp) == [2, 3, 4]
    trainer(tiny_training_config(root, "keep3_to3.json", max_steps=3, keep_last=[3]), "rollback", "resume",
            str(before[0])).train()
    assert steps(exp) == [2, 3] and list_checkpoints(exp / "checkpoint")[0] == before[0]
    assert sorted(p.name for p in (exp / "checkpoint").glob("abandoned-*")) == [f"abandoned-{p.name}" for p in before[1:]]
    assert "moved aside" in caplog.text
    branch = list_checkpoints(exp / "checkpoint")[-1]
    caplog.set_level(logging.INFO)
    trainer(tiny_training_config(root, "keep3_to5.json", max_steps=5, keep_last=[3]), "rollback", "resume").train()
    assert f"resumed from {branch} at epoch 3, step 3" in caplog.text
    assert steps(exp) == [3, 4, 5] and len(list((exp / "checkpoint").glob("abandoned-*"))) == 2


def test_a_checkpoint_from_outside_an_experiment_with_checkpoints_is_refused_and_an_abandoned_one_branches(
        root: Path) -> None:
    """Another run's checkpoint (a backup copy, another experiment) would graft its weights onto this history: refused,
    nothing moved. An abandoned checkpoint of the experiment starts a branch like any older one."""
    exp, backup = root / "ckpts" / "branches", root / "backup"
    trainer(tiny_training_config(root, "b4.json", max_steps=4, keep_last=[-1]), "branches").train()
    shutil.copytree(exp / "checkpoint", backup)
    with pytest.raises(ConfigError, match=r"not a checkpoint of .*branches, which has its own .*copy it into"):
        trainer(tiny_training_config(root, "b3.json", max_steps=3, keep_last=[-1]), "branches", "resume",
                str(list_checkpoints(backup)[1]))
    assert steps(exp) == [1, 2, 3, 4] and not list((exp / "checkpoint").glob("abandoned-*"))
    own = list_checkpoints(exp / "checkpoint")
    trainer(root / "b3.json", "branches", "resume", str(own[1])).train()
    assert steps(exp) == [1, 2, 3] and len(list((exp / "checkpoint").glob("abandoned-*"))) == 2  # old 3 and 4
    abandoned = sorted((exp / "checkpoint").glob("abandoned-*"))[-1]  # the old step 4
    trainer(tiny_training_config(root, "b5.json", max_steps=5, keep_last=[-1]), "branches", "resume",
            str(abandoned)).train()
    assert steps(exp) == [1, 2, 3, 5]  # resumed at the abandoned 4; the new branch had nothing after it
    trainer(tiny_training_config(root, "b6.json", max_steps=6, keep_last=[-1]), "branches", "resume").train()
    assert steps(exp) == [1, 2, 3, 5, 6]


def test_a_rollback_renames_symlinked_checkpoints_and_keeps_a_later_epoch_of_the_same_step(root: Path) -> None:
    """A symlinked later checkpoint stayed and the next resume went back to it; of two checkpoints of one step
    (a skipped window), the later epoch's is after the earlier one, and resuming it moves nothing."""
    from models.vocoders.diffusion.checkpointing import abandon_newer

    exp = root / "ckpts" / "links"
    trainer(tiny_training_config(root, "l3.json", max_steps=3, keep_last=[-1]), "links").train()
    first, second, third = list_checkpoints(exp / "checkpoint")
    elsewhere = root / "elsewhere_ckpt"
    shutil.move(third, elsewhere)
    third.symlink_to(elsewhere, target_is_directory=True)
    same_step = second.with_name(second.name.replace("epoch-0002", "epoch-0003"))
    shutil.copytree(second, same_step)
    assert abandon_newer(same_step, exp / "checkpoint") == [exp / "checkpoint" / f"abandoned-{third.name}"]
    assert (exp / "checkpoint" / f"abandoned-{third.name}").is_symlink() and elsewhere.is_dir()
    moved = abandon_newer(first, exp / "checkpoint")
    assert [p.name for p in moved] == [f"abandoned-{same_step.name}", f"abandoned-{second.name}"]  # newest first


def test_a_rollback_stopped_before_its_first_save_is_not_restarted_from_step_0(root: Path) -> None:
    exp = root / "ckpts" / "stopped"
    trainer(tiny_training_config(root, "st2.json", max_steps=2, keep_last=[-1]), "stopped").train()
    for folder in list_checkpoints(exp / "checkpoint"):
        folder.rename(folder.with_name(f"abandoned-{folder.name}"))  # as a rollback from a copy, then killed, left it
    with pytest.raises(ConfigError, match=r"no checkpoint to go on from, 2 checkpoints moved aside by a rollback"):
        trainer(root / "st2.json", "stopped", "resume")


def test_a_setup_that_fails_leaves_the_experiment_unlocked_and_its_checkpoints_in_place(root: Path) -> None:
    """A rollback whose data cannot be read moved the newer checkpoints aside before failing, and an in-process
    caller (a notebook) kept the lock: the next run was refused naming the notebook's pid."""
    exp = root / "ckpts" / "setup"
    trainer(tiny_training_config(root, "s3.json", max_steps=3, keep_last=[-1]), "setup").train()
    first = list_checkpoints(exp / "checkpoint")[0]
    bad = json.loads((root / "s3.json").read_text())
    bad["preprocess"]["processed_dir"] = str(root / "nowhere")
    (root / "s3_bad.json").write_text(json.dumps(bad))
    with pytest.raises(FileNotFoundError, match="metadata missing"):
        trainer(root / "s3_bad.json", "setup", "resume", str(first))
    assert steps(exp) == [1, 2, 3] and not list((exp / "checkpoint").glob("abandoned-*"))
    assert (exp / ".train.lock").resolve() not in file_lock.HELD


def test_a_copied_experiment_resumed_by_its_checkpoint_trains_in_the_copy(root: Path) -> None:
    """`--checkpoint <copy>/checkpoint` without --config read the copy's args.json, whose log_dir named the original:
    the copy was resumed from, the original written to (and pruned)."""
    original, copy = root / "ckpts" / "moved", root / "elsewhere" / "moved"
    trainer(root / "config.json", "moved").train()
    shutil.copytree(original, copy)
    result = python_bin("train.py", "--exp_name", "moved", "--resume_type", "resume", "--checkpoint",
                        str(copy / "checkpoint"), "--max_steps", "3", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert steps(copy) == [1, 2, 3] and steps(original) == [1, 2]
    linked = root / "linked" / "moved"  # a symlinked experiment trains through its link, not beside its target
    linked.parent.mkdir()
    linked.symlink_to(copy, target_is_directory=True)
    result = python_bin("train.py", "--exp_name", "moved", "--resume_type", "resume", "--checkpoint", str(linked),
                        "--max_steps", "4", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert steps(copy) == [1, 2, 3, 4] and not (copy.parent / "copy").exists() and sorted(copy.parent.iterdir()) == [copy]


def test_a_backed_up_checkpoint_resumed_without_config_trains_where_its_config_says(root: Path) -> None:
    """A checkpoint outside any experiment (`backups/b/<checkpoint>`) was taken for one: the run trained in
    `<root>/<name>`, a folder of no experiment; its config's log_dir names where its experiments are."""
    from bins.vocoder.train import saved_config

    trainer(root / "config.json", "backed").train()
    backup = root / "backups" / "b" / list_checkpoints(root / "ckpts" / "backed" / "checkpoint")[-1].name
    shutil.copytree(root / "ckpts" / "backed" / "checkpoint" / backup.name, backup)
    assert saved_config(argparse.Namespace(resume_type="resume", checkpoint=str(backup))).log_dir == str(root / "ckpts")


def test_a_second_resume_from_one_step_keeps_the_config_that_trained_it(root: Path) -> None:
    """args.<step>.json holds the config the weights up to that step were trained with: a later resume from the same
    step (after one under another config that saved nothing) does not replace it."""
    exp = root / "ckpts" / "configs"
    trainer(root / "config.json", "configs").train()
    for lr in (5e-4, 2e-4):
        trainer(tiny_training_config(root, f"lr{lr}.json", max_steps=3, adamw={"lr": lr}), "configs", "resume")
    assert json.loads((exp / "args.2.json").read_text())["train"]["adamw"]["lr"] == 1e-3


def test_a_resume_without_config_goes_on_with_the_config_its_checkpoint_was_trained_under(root: Path) -> None:
    """Steps 1-2 trained at lr 1e-3, steps 3-4 at 5e-4: a rollback to step 2 without --config goes on at 1e-3 (not
    the newest args.json's 5e-4), and the abandoned step 4 at 5e-4; args.2.json keeps what trained up to step 2."""
    from bins.vocoder.train import saved_config

    exp = root / "ckpts" / "own_configs"
    trainer(root / "config.json", "own_configs").train()
    trainer(tiny_training_config(root, "own_lr.json", max_steps=4, adamw={"lr": 5e-4}), "own_configs", "resume").train()
    two, four = (list_checkpoints(exp / "checkpoint")[i] for i in (1, -1))

    def lr(path: Path) -> float:
        return saved_config(argparse.Namespace(resume_type="resume", checkpoint=str(path))).train.adamw.lr

    assert (lr(two), lr(four), lr(exp)) == (1e-3, 5e-4, 5e-4)
    result = python_bin("train.py", "--exp_name", "own_configs", "--resume_type", "resume", "--checkpoint", str(two),
                        "--max_steps", "3", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert steps(exp) == [1, 2, 3] and json.loads((exp / "args.json").read_text())["train"]["adamw"]["lr"] == 1e-3
    assert json.loads((exp / "args.2.json").read_text())["train"]["adamw"]["lr"] == 1e-3
    assert lr(exp / "checkpoint" / f"abandoned-{four.name}") == 5e-4


@pytest.mark.parametrize(("signum", "workers"), [(signal.SIGTERM, 1), (signal.SIGINT, 0), (signal.SIGHUP, 0)],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_stop_signal_saves_the_step_reached_and_the_resume_goes_on_from_it(root: Path, signum: int,
                                                                             workers: int) -> None:
    """A scheduler's time limit (SIGTERM to every process of the job, loader workers too) or a Ctrl-C lost every
    step since the last checkpoint: the run now stops after its step with a final checkpoint, exit 128 + signal."""
    name = f"stopped_{signum}"
    config = tiny_training_config(root, f"{name}.json", max_steps=100_000, save_checkpoint_stride=[1000],
                                  dataloader={"num_worker": workers})
    log_file = root / f"{name}.log"
    with log_file.open("w") as err:
        job = subprocess.Popen([sys.executable, str(REPO / "bins/vocoder/train.py"), "--config", str(config),
                                "--exp_name", name], cwd=REPO, stderr=err, start_new_session=True,
                               env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
        try:
            for _ in range(600):
                if "epoch 3:" in log_file.read_text():
                    break
                time.sleep(0.2)
            os.killpg(job.pid, signum)  # the whole group: what a terminal's Ctrl-C and SLURM's time limit reach
            assert job.wait(timeout=120) == 128 + signum, log_file.read_text()[-2000:]
        finally:
            job.kill()
    text = log_file.read_text()
    exp = root / "ckpts" / name
    reached = steps(exp)
    assert len(reached) == 1 and reached[0] >= 3, text[-2000:]
    assert f"stopped by {signal.Signals(signum).name} at step {reached[0]}, after saving a checkpoint" in text
    trainer(tiny_training_config(root, f"{name}_more.json", max_steps=reached[0] + 1, save_checkpoint_stride=[1000],
                                 dataloader={"num_worker": workers}), name, "resume").train()
    assert steps(exp) == [reached[0], reached[0] + 1]


def test_a_ctrl_c_echoed_by_a_launcher_is_one_stop_request_and_a_later_one_stops_at_once(monkeypatch) -> None:
    """A launcher passes the terminal's SIGINT on to processes that got it already: taken for a second Ctrl-C, it
    stopped them at once, mid-save."""
    from utils import stop_request

    stop = stop_request.StopRequest()
    stop._handle(signal.SIGINT, None)
    stop._handle(signal.SIGINT, None)  # the echo
    stop._handle(signal.SIGTERM, None)  # a scheduler's, beside it
    assert stop.signum == signal.SIGINT
    later = time.monotonic() + stop_request.ECHO_S + 0.1
    monkeypatch.setattr(stop_request.time, "monotonic", lambda: later)
    stop._handle(signal.SIGTERM, None)  # SIGTERM never insists
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)


def test_checkpoints_without_a_readable_config_copy_still_resume(root: Path, caplog) -> None:
    """Checkpoints from before the copy (or the original toolkit's) resume into another --name under --config; a
    damaged copy is passed over under --config, and without one it is a line naming the file, with nothing moved."""
    from bins.vocoder.train import saved_config

    exp = root / "ckpts" / "copyless"
    trainer(tiny_training_config(root, "copyless.json", max_steps=3, keep_last=[-1]), "copyless").train()
    first, second, _ = list_checkpoints(exp / "checkpoint")
    (second / "config.json").unlink()
    trainer(root / "copyless.json", "copyless_elsewhere", "resume", str(second)).train()
    assert steps(root / "ckpts" / "copyless_elsewhere") == [3]
    (first / "config.json").write_text("{")
    with pytest.raises(ConfigError, match=rf"^{first / 'config.json'}: not valid JSON5.*; or pass --config"):
        saved_config(argparse.Namespace(resume_type="resume", checkpoint=str(first)))
    assert steps(exp) == [1, 2, 3]
    trainer(tiny_training_config(root, "copyless2.json", max_steps=2, keep_last=[-1]), "copyless", "resume",
            str(first)).train()
    assert steps(exp) == [1, 2] and "config.json: not valid JSON5" in caplog.text


def test_a_refused_setup_removes_only_a_folder_it_created(root: Path, tmp_path: Path) -> None:
    """A refused run leaves no experiment folder behind, but never removes one that was there before it (an empty
    folder made by hand, a link to another disk), nor follows a link."""
    other_mel = tiny_training_config(root, "other_mel.json", max_steps=2)
    config = json.loads(other_mel.read_text())
    config["preprocess"]["fmax"] = 3000  # features recorded with fmax 4000: refused after the checkpoint folder's probe
    other_mel.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="were made with"):
        trainer(other_mel, "refused_new")
    assert not (root / "ckpts" / "refused_new").exists()
    (root / "ckpts" / "refused_premade").mkdir()
    with pytest.raises(ConfigError, match="were made with"):
        trainer(other_mel, "refused_premade")
    assert (root / "ckpts" / "refused_premade").is_dir()
    (tmp_path / "disk").mkdir()
    (root / "ckpts" / "refused_link").symlink_to(tmp_path / "disk")
    with pytest.raises(ConfigError, match="were made with"):
        trainer(other_mel, "refused_link")
    assert (root / "ckpts" / "refused_link").is_symlink() and (tmp_path / "disk").is_dir()


def test_a_disk_without_room_for_a_checkpoint_stops_the_run_at_its_start(root: Path, monkeypatch) -> None:
    exp = root / "ckpts" / "full"
    monkeypatch.setattr("shutil.disk_usage", lambda _path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OSError, match=r"checkpoint: 0.0 MiB free, a checkpoint needs about [0-9.]+ MiB; free some space"):
        trainer(root / "config.json", "full")
    assert not (exp / "args.json").exists()
    monkeypatch.undo()
    (root / "ckpts" / "unwritable").mkdir()
    (root / "ckpts" / "unwritable" / "checkpoint").write_text("a file where the folder goes")
    with pytest.raises(OSError, match=r"unwritable/checkpoint: cannot write checkpoints here"):
        trainer(root / "config.json", "unwritable")


def test_a_resume_under_another_config_says_what_it_does_not_apply_and_keeps_the_old_args(root: Path, caplog) -> None:
    """A new lr or decay would be overwritten by the restored optimizer and scheduler: said, not silent. Another
    noise schedule or mel is refused. The args.json that trained the weights so far stays, as args.<step>.json."""
    exp = root / "ckpts" / "changed"
    trainer(root / "config.json", "changed").train()
    base = json.loads((root / "config.json").read_text())
    for section, key, value in (("model", "diffwave", {"noise_schedule_factors": [1e-4, 0.02, 50]}),
                                ("preprocess", "fmax", 3000)):
        changed = json.loads(json.dumps(base))
        changed[section][key] = {**changed[section][key], **value} if isinstance(value, dict) else value
        path = root / f"changed_{key}.json"
        path.write_text(json.dumps(changed))
        with pytest.raises(ConfigError, match=rf"^{path}: .*{key}.* but {exp / 'checkpoint'}/epoch-\S+ was trained with"):
            trainer(path, "changed", "resume")
    nyquist = json.loads(json.dumps(base))
    nyquist["preprocess"]["fmax"] = None  # trained with fmax 4000 at 8 kHz: the same mel
    (root / "changed_nyquist.json").write_text(json.dumps(nyquist))
    Experiment(exp).refuse_changed_results(load_config(root / "changed_nyquist.json"), list_checkpoints(exp / "checkpoint")[-1])
    trainer(tiny_training_config(root, "longer.json", max_steps=3), "changed", "resume").train()
    assert not list(exp.glob("args.*.json"))  # only the bound changed
    assert "not applied" not in caplog.text
    trainer(tiny_training_config(root, "new_lr.json", max_steps=4, adamw={"lr": 5e-4}), "changed", "resume").train()
    assert "the config's train.adamw.lr 0.0005 and train.exponential_lr.lr_decay 0.999 are not applied" in caplog.text
    assert json.loads((exp / "args.3.json").read_text())["train"]["adamw"]["lr"] == 1e-3
    assert json.loads((exp / "args.json").read_text())["train"]["adamw"]["lr"] == 5e-4


def test_tensorboard_drops_the_points_a_resume_logs_again(root: Path) -> None:
    """Points logged after the resumed checkpoint (by a killed run, or an abandoned branch) are purged, not doubled."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp = root / "ckpts" / "plots"
    trainer(tiny_training_config(root, "plots4.json", max_steps=4), "plots").train()
    trainer(root / "plots4.json", "plots", "resume", str(list_checkpoints(exp / "checkpoint")[1])).train()
    events = EventAccumulator(str(exp), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_a_damaged_newest_checkpoint_names_the_one_before_it(root: Path) -> None:
    exp = root / "ckpts" / "damaged"
    trainer(root / "config.json", "damaged").train()
    older, newest = list_checkpoints(exp / "checkpoint")
    (newest / "state.json").write_text("")
    with pytest.raises(CheckpointError) as err:
        trainer(root / "config.json", "damaged", "resume")
    message = str(err.value)
    assert message.startswith(f"{newest / 'state.json'}: unreadable checkpoint state")
    assert message.endswith(f"; to resume from the checkpoint before it: --checkpoint {older}") and "\n" not in message
