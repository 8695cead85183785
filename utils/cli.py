"""What every entry point shares: logging, and bad input as one line on stderr, not a traceback."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable

import torch
from tqdm import tqdm

from utils.checkpoint import CheckpointError
from utils.config import ConfigError

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


def run(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser) -> None:
    """Parse, run, and turn expected failures into `error: ...` with exit status 1."""
    args = parser.parse_args()
    setup_logging(args.log_level)
    try:
        main(args)
    except EXPECTED_ERRORS as err:
        if args.log_level == "debug":
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(1)
    except torch.cuda.OutOfMemoryError as err:
        if args.log_level == "debug":
            raise
        print(f"error: {out_of_memory(err)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as err:  # StopRequested says what it saved, and which signal it was
        print(f"interrupted{f': {err}' if str(err) else ''}; finished work is kept", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 130))
