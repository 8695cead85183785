"""Multi-process and two-"node" launches of stage 2 through run.sh: real `accelerate launch` subprocesses on
gloo that shard the data, save once, stop together and use the rendezvous port they are given."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.recipe_helpers import REPO, RUN_SH
from tests.training_kit import config, preprocessed_corpus
from utils.checkpoint import list_checkpoints


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return preprocessed_corpus(tmp_path_factory.mktemp("train"))


# A gloo peer aborting as its process exits, after training and saving are done (pytorch/pytorch#190489): seen twice
# in CI in two-"node" launches on one loaded machine. The trainer now frees its DDP wrapper before the process
# group; the two-node test still tries once more on this message alone, so a repeat of it, or any other failure,
# fails the test.
GLOO_EXIT_ABORT = "terminate called without an active exception"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cfg: Path, name: str, *extra: str) -> subprocess.Popen:
    """run.sh's stage 2 in a session of its own (its process group is what a terminal's Ctrl-C reaches)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(["bash", str(RUN_SH), "--stage", "2", "--config", str(cfg), "--name", name, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


def listening(port: int) -> bool:
    import psutil

    return any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in psutil.net_connections("tcp"))


def finish(procs: list[subprocess.Popen], port: int) -> tuple[list[str], bool]:
    """Wait for every launch (3 min cap; 15 s more once one has failed, as the others wait for it at the exit
    barrier), watching whether `port` is listened on meanwhile."""
    seen, deadline = False, time.time() + 180
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        seen = seen or listening(port)
        if any(p.poll() not in (None, 0) for p in procs):
            deadline = min(deadline, time.time() + 15)
        time.sleep(0.1)
    outputs = []
    for p in procs:
        if p.poll() is None:
            p.kill()
        outputs.append(p.communicate()[0])
    return outputs, seen


def check_one_experiment(exp: Path, processes: int, step: int) -> None:
    checkpoints = list_checkpoints(exp / "checkpoint")
    assert checkpoints, "no checkpoint written"
    state = json.loads((checkpoints[-1] / "state.json").read_text())
    assert (state["num_processes"], state["step"]) == (processes, step)
    assert sorted(p.name for p in checkpoints[-1].glob("rng_*.pt")) == [f"rng_{r}.pt" for r in range(processes)]
    assert len(list(exp.glob("events.out.tfevents.*"))) == 1  # one writer
    assert not list((exp / "checkpoint").glob(".tmp-*"))


def test_two_processes_shard_data_save_once_and_use_the_port(corpus: Path, tmp_path: Path) -> None:
    # batch 2: 3 batches an epoch; two processes take one each (the odd one is dropped), so 2 epochs = 2 steps.
    cfg = config(corpus, tmp_path, batch_size=2, max_epoch=2, save_checkpoint_stride=[1], keep_last=[-1])
    port = free_port()
    (out,), seen = finish([launch(cfg, "ddp", "--gpu", "0,1", "--main_process_port", str(port))], port)
    assert f"process group: backend gloo, world size 2, rendezvous port {port}" in out, out[-3000:]
    assert "accelerate config" not in out  # its warning of defaults: the trainer sets precision and compiling itself
    assert seen, f"nothing listened on port {port} during training"
    exp = tmp_path / "ckpts" / "ddp"
    check_one_experiment(exp, 2, 2)
    assert [json.loads((p / "state.json").read_text())["step"] for p in list_checkpoints(exp / "checkpoint")] == [1, 2]
    assert out.count("INFO models.vocoders.diffusion.checkpointing: saved") == 2  # rank 0 only


def test_two_processes_stop_together_at_a_wall_time_budget(corpus: Path, tmp_path: Path) -> None:
    # the processes agree through a reduction read one check late: both stop, one final checkpoint, no hang
    cfg = config(corpus, tmp_path, batch_size=1, max_steps=100000, max_minutes=0.002, save_checkpoint_stride=[0])
    port = free_port()
    (out,), _seen = finish([launch(cfg, "budget", "--gpu", "0,1", "--main_process_port", str(port))], port)
    folder = tmp_path / "ckpts" / "budget" / "checkpoint"
    records = json.loads((folder / "ckpts.json").read_text())["checkpoints"]
    assert records[-1]["kinds"] == ["final"] and 1 <= records[-1]["step"] < 100000, out[-3000:]
    assert "Traceback" not in out and out.count("INFO models.vocoders.diffusion.checkpointing: saved") == 1


def test_ctrl_c_stops_two_processes_with_one_checkpoint_and_no_traceback(corpus: Path, tmp_path: Path) -> None:
    """The terminal's SIGINT reaches the launcher and both processes, and the launcher passes it on once more: that
    echo is no second Ctrl-C (which stops at once, unsaved); the launcher ended in torchrun's traceback, exit 1."""
    cfg = config(corpus, tmp_path, batch_size=1, max_steps=100000, save_checkpoint_stride=[0])
    proc = launch(cfg, "ctrl_c", "--gpu", "0,1", "--main_process_port", str(free_port()))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "epoch 3:" in line:
            break
    os.killpg(proc.pid, signal.SIGINT)
    try:
        out = "".join(lines) + proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, out[-3000:]
    assert "Traceback" not in out and "stage 2: the launcher got SIGINT and passed it on" in out, out[-3000:]
    folder = tmp_path / "ckpts" / "ctrl_c" / "checkpoint"
    records = json.loads((folder / "ckpts.json").read_text())["checkpoints"]
    assert len(records) == 1 and records[0]["kinds"] == ["final"] and records[0]["step"] >= 3
    assert out.count("after saving a checkpoint; finished work is kept") == 2


ONE_PROCESS = "compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_processes: 1\nuse_cpu: true\n"


@pytest.mark.parametrize("processes", [2, 1])
def test_a_failing_process_ends_the_launch_in_one_line(corpus: Path, tmp_path: Path, processes: int) -> None:
    """The error, once (every process met it: the main one says it), then one line from the launcher where torchrun
    (several processes) or accelerate (one, through an --accelerate_config) printed a traceback."""
    missing = tmp_path / "no_such_experiment" / "checkpoint"
    accelerate_config = tmp_path / "one.yaml"
    accelerate_config.write_text(ONE_PROCESS)
    how = ("--gpu", "0,1") if processes == 2 else ("--accelerate_config", str(accelerate_config))
    proc = launch(config(corpus, tmp_path), "failing", *how, "--main_process_port", str(free_port()),
                  "--resume_type", "resume", "--checkpoint", str(missing))
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, out[-3000:]
    assert "Traceback" not in out and out.count(f"error: {missing}") == 1, out[-3000:]  # said once, not once a process
    assert out.rstrip().endswith("exited with status 1 (its error is above)"), out[-3000:]


STAND_IN = """import sys, time
sys.path.insert(0, sys.argv[1])
from utils.stop_request import StopRequest
print("ready", flush=True)
try:
    with StopRequest() as stop:
        end = time.monotonic() + 60  # never left behind by a failing test
        while stop.signum is None and time.monotonic() < end:
            time.sleep(0.05)
        time.sleep(3)  # saving
except KeyboardInterrupt:
    print("stopped at once", flush=True)
    sys.exit(130)
sys.exit(128 + stop.signum)
"""


def launch_stand_in(tmp_path: Path, processes: int, *prefix: str) -> tuple[subprocess.Popen, str]:
    """The launcher over STAND_IN, in a session of its own; returned once every process is ready, with its output."""
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    accelerate_config = tmp_path / "one.yaml"
    accelerate_config.write_text(ONE_PROCESS)
    how = ["--multi_gpu", "--num_processes", "2"] if processes == 2 else ["--config_file", str(accelerate_config)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([*prefix, sys.executable, str(REPO / "bins" / "vocoder" / "launch.py"), *how,
                             "--main_process_port", str(free_port()), str(script), str(REPO)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    out = ""
    while out.count("ready") < processes:
        line = proc.stdout.readline()
        assert line, out
        out += line
    time.sleep(0.3)
    return proc, out


@pytest.mark.parametrize("processes", [2, 1])
@pytest.mark.parametrize("second", ["SIGINT", "SIGTERM"])
def test_the_launcher_passes_each_stop_signal_on_as_the_processes_await_it(tmp_path: Path, processes: int,
                                                                          second: str) -> None:
    """A second Ctrl-C stops each process at once, as without a launcher: torchrun's agent sent SIGTERM instead (a
    stopping process takes it for the same request) and killed them 30 s later. accelerate's one-process launch
    ended in a KeyboardInterrupt traceback at a Ctrl-C; a SIGTERM to the launcher alone ended it and left the training
    running. (A stand-in for train.py, with its stop handling, takes 3 s to save.)"""
    proc, out = launch_stand_in(tmp_path, processes)
    stop = signal.SIGINT if second == "SIGINT" else signal.SIGTERM
    if second == "SIGINT":
        os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C reaches its process group
    else:
        os.kill(proc.pid, signal.SIGTERM)  # `kill <pid>` or a scheduler: the launcher alone
    time.sleep(1.5)  # past the window in which a process takes a SIGINT for the first one passed on again
    if second == "SIGINT":
        os.killpg(proc.pid, signal.SIGINT)
    try:
        out += proc.communicate(timeout=20)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the one process shares the launcher's group
    assert "Traceback" not in out and proc.returncode == 128 + stop, out[-3000:]
    assert out.count("stopped at once") == (processes if second == "SIGINT" else 0), out[-3000:]
    assert out.count(f"{second} received: stopping after this step") == processes, out[-3000:]


@pytest.mark.parametrize(("processes", "nohup"), [(1, False), (2, True)], ids=["kill-HUP", "nohup"])
def test_a_sighup_reaches_the_training_unless_it_was_ignored_from_the_start(tmp_path: Path, processes: int,
                                                                            nohup: bool) -> None:
    """A SIGHUP to a one-process launcher alone (`kill -HUP`) was swallowed: the training ran on and the launcher waited.
    Under nohup, a closed terminal's SIGHUP (the shell sends it to each job's group) stopped the run it was meant not
    to stop: the launcher and the training caught the SIGHUP nohup ignores."""
    proc, out = launch_stand_in(tmp_path, processes, *(["nohup"] if nohup else []))
    (os.killpg if nohup else os.kill)(proc.pid, signal.SIGHUP)
    try:
        if nohup:
            time.sleep(2)
            assert proc.poll() is None
            os.kill(proc.pid, signal.SIGTERM)
        out += proc.communicate(timeout=20)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    stop = signal.SIGTERM if nohup else signal.SIGHUP
    assert "Traceback" not in out and proc.returncode == 128 + stop, out[-3000:]
    assert "SIGHUP received" not in out if nohup else out.count("SIGHUP received") == processes, out[-3000:]


@pytest.mark.parametrize("zeros", ["", "0"])
def test_busy_port_gives_a_clear_error(corpus: Path, tmp_path: Path, zeros: str) -> None:
    """A leading zero is the same port (it was pasted into the bind probe's Python, where 08 does not parse)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(["bash", str(RUN_SH), "--stage", "2", "--config", str(config(corpus, tmp_path)),
                                 "--name", "busy", "--gpu", "0,1", "--main_process_port", f"{zeros}{port}"],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"--main_process_port {port} is already in use" in result.stderr


@pytest.mark.parametrize("port", ["abc", "99999", "-5", "0", "", "123456"])
def test_a_port_that_is_no_port_number_is_named_as_such(tmp_path: Path, port: str) -> None:
    """Not "already in use", which the bind check said of every failure."""
    result = subprocess.run(["bash", str(RUN_SH), "--stage", "2", "--name", "p", "--gpu", "0,1", "--main_process_port",
                             port], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "already in use" not in result.stderr
    expected = "--main_process_port needs a value (given empty)" if not port else \
        f"--main_process_port must be a port number from 1 to 65535, got '{port}'"
    assert expected in result.stderr


@pytest.mark.parametrize(("gpu", "words"), [("abc", "'abc' is no device id"), ("", "--gpu needs a value (given empty)"),
                                           (",", "must list device ids"), ("0,,1", "must list device ids"),
                                           ("0,0", "names device '0' twice"), ("GPU-", "'GPU-' is no device id"),
                                           ("0\t1", "must list device ids"), ("*", "'*' is no device id")])
def test_a_gpu_list_without_device_ids_is_refused(gpu: str, words: str) -> None:
    """These started a CPU run (or one process per empty entry) instead of the GPUs meant."""
    result = subprocess.run(["bash", str(RUN_SH), "--stage", "2", "--name", "g", "--gpu", gpu], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("flags", "words"), [
    (["--num_machines", "2", "--machine_rank", "1"], "--num_machines 2 needs --main_process_ip"),
    (["--machine_rank", "1"], "--machine_rank 1 is no machine of --num_machines 1 (ranks 0 to 0)"),
    (["--num_machines", "2", "--machine_rank", "2", "--main_process_ip", "127.0.0.1"], "ranks 0 to 1"),
    (["--num_machines", "0"], "--num_machines must be a whole number from 1, got '0'"),
    (["--num_machines", "two"], "--num_machines must be a whole number from 1, got 'two'"),
    (["--machine_rank", "-1"], "--machine_rank must be a whole number from 0, got '-1'")])
def test_machines_that_could_never_meet_are_refused(flags: list[str], words: str) -> None:
    """These waited for a rendezvous that never came (machine 1 without machine 0's address), beyond a SIGTERM."""
    result = subprocess.run(["bash", str(RUN_SH), "--stage", "2", "--name", "m", *flags], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_two_nodes_on_one_machine_share_steps_and_one_checkpoint(corpus: Path, tmp_path: Path) -> None:
    cfg = config(corpus, tmp_path, batch_size=2, max_epoch=2, save_checkpoint_stride=[2])
    exp = tmp_path / "ckpts" / "nodes"
    for attempt in range(2):
        port = free_port()
        node = ("--gpu", "0", "--num_machines", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port))
        procs = [launch(cfg, "nodes", *node, "--machine_rank", str(rank)) for rank in range(2)]
        outputs, _ = finish(procs, port)
        if attempt or [p.returncode for p in procs] == [0, 0] or not any(GLOO_EXIT_ABORT in o for o in outputs):
            break
        shutil.rmtree(exp, ignore_errors=True)  # gloo's rare abort at exit, after the work was saved: once more, from the start
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "2 processes on 2 machines" in outputs[0]
    check_one_experiment(exp, 2, 2)
    assert len(list_checkpoints(exp / "checkpoint")) == 1


def test_a_process_whose_launcher_is_killed_outright_stops_as_on_a_sigterm(tmp_path: Path) -> None:
    """torchrun's agent gives each process a session of its own: a SIGKILL to the launcher (or the OOM killer) left
    them training on as orphans, holding the experiment's lock. A stand-in launcher sets what launch.py sets."""
    child = ("import time\nfrom utils.stop_request import StopRequest, stop_when_the_launcher_dies\n"
             "import os\nassert stop_when_the_launcher_dies(0.05)\nwith StopRequest() as stop:\n"
             "    print('ready', os.getpid(), flush=True)\n"
             "    while stop.signum is None:\n        time.sleep(0.01)\nprint('stopped by', stop.signum, flush=True)\n")
    launcher = ("import os, subprocess, sys, time\nfrom utils.stop_request import LAUNCHER_ENV\n"
                "os.environ[LAUNCHER_ENV] = str(os.getpid())\n"
                f"subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True)\ntime.sleep(60)\n")
    out = tmp_path / "out"
    with out.open("w") as handle:
        stand_in = subprocess.Popen([sys.executable, "-c", launcher], cwd=REPO, stdout=handle,
                                    env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        for _ in range(600):
            if "ready" in out.read_text():
                break
            time.sleep(0.05)
        stand_in.kill()
        stand_in.wait()
        for _ in range(200):
            if "stopped by" in out.read_text():
                break
            time.sleep(0.05)
        words = out.read_text().split()
        assert words[:1] + words[2:] == ["ready", "stopped", "by", str(int(signal.SIGTERM))]
    finally:
        stand_in.kill()
        words = out.read_text().split()
        if len(words) > 1 and words[1].isdigit():  # an orphan that did not stop
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(words[1]), signal.SIGKILL)


LATE_RANK_1 = """import os, runpy, sys, time
sys.path.insert(0, sys.argv[1])
from models.vocoders.diffusion import experiment
found = experiment.Experiment.__init__
def late(self, root):  # process 1 looks at the experiment after the main process has locked (made) it
    if os.environ.get("RANK") == "1":
        time.sleep(2)
    found(self, root)
experiment.Experiment.__init__ = late
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_resume_into_a_name_never_trained_is_refused_by_every_process(corpus: Path, tmp_path: Path) -> None:
    """A process that looked after the main one had made the lock file took it for a run stopped in its setup: it
    warned "starting it again from step 0" and trained on alone into a gloo traceback, as the main process refused."""
    script = tmp_path / "late_rank_1.py"
    script.write_text(LATE_RANK_1)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, str(REPO / "bins" / "vocoder" / "launch.py"), "--multi_gpu",
                             "--num_processes", "2", "--main_process_port", str(free_port()), str(script), str(REPO),
                             str(REPO / "bins" / "vocoder" / "train.py"), "--config", str(config(corpus, tmp_path)),
                             "--exp_name", "never", "--resume_type", "resume"],
                            capture_output=True, text=True, env=env, timeout=120)
    out = result.stdout + result.stderr
    assert result.returncode == 1 and "no experiment of this name to resume" in out, out[-3000:]
    assert "Traceback" not in out and "starting it again" not in out, out[-3000:]
