"""What every entry point shares: logging, and bad input as one line on stderr, not a traceback."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta

import torch
from tqdm import tqdm

from utils.checkpoint import CheckpointError
from utils.config import ConfigError

PEER_GONE = ("Connection closed by peer", "Connection reset by peer")  # gloo's words for a process that ended
EXPECTED_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, ValueError, FloatingPointError, OSError,
                   MemoryError)  # numpy's "Unable to allocate 58.2 TiB ..." for an absurd length is one line


def positive_int(text: str) -> int:
    """An argparse type for counts such as --num_workers: 0 or below is refused, not silently replaced."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seconds(text: str) -> float:
    """An argparse type for a duration such as export's --verify: a negative or non-finite one is refused, not a
    traceback from deep inside."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text}")
    return value


def add_common_args(parser: argparse.ArgumentParser, config_required: bool = True) -> None:
    parser.add_argument("--config", required=config_required, help="JSON5 experiment config")
    parser.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])


class BarAwareHandler(logging.StreamHandler):
    """Each record on a line of its own while a progress bar is drawn: tqdm takes the bar away, the record is written
    and the bar drawn again below it. Written straight to the stream, a record went on after the bar's text, mid-line
    (`scoring:  12%|█▎ | 1/8 [00:04<00:31]04:18:54 WARNING ...`), easy to miss. Other processes (forked workers, whose
    copies of the bars are stale) write as a plain handler does."""

    def __init__(self) -> None:
        super().__init__()
        self.pid = os.getpid()

    def emit(self, record: logging.LogRecord) -> None:
        if os.getpid() != self.pid:
            super().emit(record)
            return
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:
            self.handleError(record)


def setup_logging(level: str) -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=getattr(logging, level.upper()) if rank == "0" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", handlers=[BarAwareHandler()],
    )
    logging.captureWarnings(True)


def one_line(err: BaseException) -> str:
    """The error's message; for one re-raised from a DataLoader worker (its traceback inside), the worker's own line."""
    text = str(err)
    if "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        kind, _, message = last.partition(": ")  # "ValueError: ..." or "utils.config.ConfigError: ..."
        text = message if kind.rsplit(".", 1)[-1] == type(err).__name__ else last
    return text


def out_of_memory(err: BaseException) -> str:
    """CUDA's out-of-memory report is a paragraph; its first sentence and what to change are the line."""
    first = str(err).split(". Of the allocated")[0].split("\n")[0].rstrip(".")
    return (f"the GPU ran out of memory ({first}); lower train.batch_size (stage 2, with gradient_accumulation_step "
            "to keep the effective batch) or --infer_batch_size / inference.gpu_memory_gib (stage 3); saved checkpoints "
            "and written outputs are kept")


def whose(line: str, wait_s: float = 3.0) -> str | None:
    """With several processes (torchrun's, which set WORLD_SIZE, RANK and the rendezvous store's MASTER_ADDR/PORT): who
    should say this error line. The main process always says it (""); another one says nothing where the main one
    raised the same line (a bad checkpoint or a refused resume, which every process meets: the user read it once a
    process), else names itself ("process N"), whether the main process raised another line, none within `wait_s`, or
    its store was out of reach. Alone: "". The lines meet in the launcher's store, which outlives the processes."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1") or 1), int(os.environ.get("RANK", "0") or 0)
    if world <= 1:
        return ""
    try:
        store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                           timeout=timedelta(seconds=wait_s), wait_for_workers=False)
        key = f"error-line/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        store.set(f"{key}{rank}", line)
        if rank == 0:
            return ""
        end = time.monotonic() + wait_s
        while not store.check([f"{key}0"]) and time.monotonic() < end:  # store.wait logs its timeout from C++
            time.sleep(0.05)
        same = store.check([f"{key}0"]) and store.get(f"{key}0").decode(errors="replace") == line
    except (KeyError, ValueError, RuntimeError, OSError):  # no store, or no word from the main process in time
        return "" if rank == 0 else f"process {rank}"
    return None if same else f"process {rank}"


def say_error(line: str) -> None:
    """`error: line` on stderr, once for all processes (see whose), in one write: two processes' lines ran together."""
    who = whose(line)
    if who is not None:
        sys.stderr.write(f"error{f' ({who})' if who else ''}: {line}\n")
        sys.stderr.flush()


def run(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser) -> None:
    """Parse, run, and turn expected failures into `error: ...` with exit status 1."""
    args = parser.parse_args()
    setup_logging(args.log_level)
    try:
        main(args)
    except EXPECTED_ERRORS as err:
        if args.log_level == "debug":
            raise
        say_error(one_line(err))
        sys.exit(1)
    except torch.cuda.OutOfMemoryError as err:
        if args.log_level == "debug":
            raise
        say_error(out_of_memory(err))
        sys.exit(1)
    except RuntimeError as err:  # a collective whose peer had ended: that process's own error (or stop) says why
        if args.log_level == "debug" or not any(words in str(err) for words in PEER_GONE):
            raise
        say_error("another process ended (its own error or stop is above, or the launcher's line below), so this one "
                  "stopped too")
        sys.exit(1)
    except KeyboardInterrupt as err:  # StopRequested says what it saved, and which signal it was
        sys.stderr.write(f"interrupted{f': {err}' if str(err) else ''}; finished work is kept\n")  # one write (see say_error)
        sys.exit(getattr(err, "exit_code", 130))
