"""Stage 1: metadata and features for every dataset in the config."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, as run.sh sets PYTHONPATH: `python bins/...` works

from processors.preprocess import preprocess
from utils.cli import add_common_args, positive_int, run
from utils.config import load_config
from utils.config_schema import validate


def main(args: argparse.Namespace) -> None:
    cfg = load_config(args.config)
    validate(cfg, "preprocess")
    preprocess(cfg, args.num_workers)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_args(parser)
    parser.add_argument("--num_workers", type=positive_int, default=None,
                        help="extraction processes (default: the CPUs this job may use)")
    run(main, parser)
