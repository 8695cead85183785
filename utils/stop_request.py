"""SIGINT, SIGTERM and SIGHUP as a request to stop at the next safe point, so a long job saves its work first.

A cluster's time limit (SLURM sends SIGTERM, then SIGKILL after its grace period), a Ctrl-C or a
closed terminal (an ssh session that drops) would otherwise lose every step since the last checkpoint. A
second Ctrl-C stops at once; one within `ECHO_S` of the first is that first one again (a launcher passes
on the Ctrl-C that reached its processes too).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType, TracebackType

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
ECHO_S = 1.0
LAUNCHER_ENV = "STAGE2_LAUNCHER_PID"  # set by bins/vocoder/launch.py for the processes it starts


def wanted_signals() -> tuple[int, ...]:
    """The stop signals to catch: a SIGHUP ignored from the start (`nohup`, `trap '' HUP`) stays ignored, so a run
    started to outlive its terminal does not stop when that terminal closes."""
    return tuple(s for s in SIGNALS if s != signal.SIGHUP or signal.getsignal(s) != signal.SIG_IGN)


class StopRequested(KeyboardInterrupt):
    """The job stopped early at a safe point because of `signum`; its work so far is saved."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # what the shell reports for a process the signal ended


class StopRequest:
    """While entered, the stop signals set `signum` instead of ending the process (main thread only: Python
    runs handlers there; elsewhere nothing changes)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._since = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in wanted_signals()}
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT and time.monotonic() - self._since > ECHO_S:  # the user insists
                raise KeyboardInterrupt
            return
        self.signum, self._since = signum, time.monotonic()
        log.warning("%s received: stopping after this step with a checkpoint (Ctrl-C again stops at once, without one)",
                    signal.Signals(signum).name)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """For data-loader workers: the main process decides when to stop (a worker that a Ctrl-C or a scheduler's SIGTERM
    killed would fail the main process's next batch before it could save); they end with it."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def stop_when_the_launcher_dies(interval_s: float = 1.0) -> bool:
    """In a process that bins/vocoder/launch.py started (torchrun's agent gives each one a session of its own): when
    the launcher is gone, killed outright (SIGKILL, the OOM killer), send this process a SIGTERM, which stops it at
    its next step with a checkpoint. The processes trained on as orphans, holding the experiment's lock, so the job
    looked dead while a new launch was refused. Whether the watch started (only under the launcher that set it)."""
    launcher = os.environ.get(LAUNCHER_ENV, "")
    if not launcher.isdigit() or int(launcher) != os.getppid():
        return False

    def watch() -> None:
        while os.getppid() == int(launcher):
            time.sleep(interval_s)
        log.warning("the launcher (pid %s) is gone: stopping", launcher)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()
    return True
