"""`accelerate launch` for stage 2's several processes, or an --accelerate_config (run.sh), ending in one line where
torchrun's agent or accelerate end in a traceback: on a stop signal (each process has saved its work and says so
above) or a failed process (whose own error is above). A stop signal reaches each process as it would without a
launcher (a second Ctrl-C stops at once). Arguments are `accelerate launch`'s."""

import os
import signal
import subprocess
import sys
from contextlib import suppress
from pathlib import Path
from types import FrameType

import psutil
import torch.distributed.elastic.multiprocessing.api as elastic
from accelerate.commands.launch import launch_command, launch_command_parser
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, as train.py: `python bins/...` works
from utils.stop_request import LAUNCHER_ENV, SIGNALS, wanted_signals

STOPPED = {128 + s for s in SIGNALS}  # a process's exit status after a stop at a safe point


def named(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def status(exitcode: int) -> int:
    """A process's exit code as the shell's status: the agent reports a process ended by signal N as -N."""
    return 128 - exitcode if exitcode < 0 else min(exitcode, 255) or 1


def ended(who: str, exitcode: int) -> int:
    """Say in one line how `who` ended (its own words are above); the launch's exit status."""
    code = status(exitcode)
    if code in STOPPED:
        print(f"stage 2: {who} stopped by {named(code - 128)}; see above what it saved", file=sys.stderr)
    elif exitcode < 0:
        print(f"stage 2: {who} was killed by {named(-exitcode)}", file=sys.stderr)
    else:
        print(f"stage 2: {who} exited with status {code} (its error is above)", file=sys.stderr)
    return code


class Relay:
    """The launcher's stop-signal handler: the first signal is torchrun's (passed on to each process, which stops at
    a safe point); a later Ctrl-C is passed on as a Ctrl-C, so each process stops at once as without a launcher.
    torchrun's own sent SIGTERM instead, which a stopping process takes for the same request, and killed them 30 s
    later. The processes are in sessions of their own: the terminal's Ctrl-C reaches the launcher alone."""

    def __init__(self, wanted: tuple[int, ...]) -> None:
        self.first, self.wanted = elastic._terminate_process_handler, wanted

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if signum not in self.wanted:  # a SIGHUP under nohup: torchrun's would stop every process
            return
        first, self.first = self.first, None
        if first is not None:
            first(signum, frame)  # raises SignalException
        if signum == signal.SIGINT:  # more than ECHO_S after the first reaches a process as a second Ctrl-C
            for child in psutil.Process().children():
                with suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGINT)


def to_the_training(signum: int, _frame: FrameType | None) -> None:
    """Until torchrun's agent takes the stop signals over, and for accelerate's one-process launch, which waits for its
    process: a stop signal is passed on to it and the launch waits for its save (a Ctrl-C printed a KeyboardInterrupt
    traceback, and a SIGTERM ended the launcher, leaving the training running on, unwatched). A Ctrl-C is not passed
    to a process of this one's group: the terminal's reached it too (a SIGTERM or SIGHUP that reached it too is the same
    request again, and one sent to the launcher alone, `kill -HUP`, was swallowed). Before any process starts, the
    launch ends."""
    pids = [child.pid for child in psutil.Process().children()]
    if not pids:
        print(f"stage 2: the launcher got {named(signum)} before the training started", file=sys.stderr)
        sys.exit(128 + signum)
    for pid in pids:
        with suppress(ProcessLookupError):
            if signum != signal.SIGINT or os.getpgid(pid) != os.getpgrp():
                os.kill(pid, signum)


def main() -> int:
    args = launch_command_parser().parse_args(sys.argv[1:])
    wanted = wanted_signals()
    if hasattr(elastic, "_terminate_process_handler"):  # torch's private name: where it is gone, torchrun's own
        elastic._terminate_process_handler = Relay(wanted)  # what torchrun's agent installs for SIGINT, SIGTERM, ...
    for signum in wanted:
        signal.signal(signum, to_the_training)
    os.environ[LAUNCHER_ENV] = str(os.getpid())  # each process stops when this one is killed outright
    try:
        launch_command(args)
    except SignalException as stop:
        print(f"stage 2: the launcher got {stop.sigval.name} and passed it on; see above what each process saved",
              file=sys.stderr)
        return 128 + int(stop.sigval)
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        return ended(f"process {rank}", failure.exitcode)
    except subprocess.CalledProcessError as failed:  # one process (an --accelerate_config for one)
        return ended("the training", failed.returncode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
