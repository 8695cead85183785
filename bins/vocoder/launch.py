"""`accelerate launch` for stage 2's several processes (run.sh), ending in one line where torchrun's agent ends in a
traceback: on a stop signal (each process has saved its work and says so above) or a failed process (whose own error
is above). Arguments are `accelerate launch`'s."""

import signal
import subprocess
import sys

from accelerate.commands.launch import launch_command, launch_command_parser
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

STOPPED = {128 + signal.SIGINT, 128 + signal.SIGTERM}  # a process's exit status after a stop at a safe point


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


def main() -> int:
    args = launch_command_parser().parse_args(sys.argv[1:])
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
