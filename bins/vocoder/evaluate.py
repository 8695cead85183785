"""Score vocoded audio against ground truth: `python bins/vocoder/evaluate.py --ref_dir R --pred_dir P --output_dir D`.

Run from the repository root with PYTHONPATH=. (run.sh --stage 4 does). Usage errors exit
with code 2 and a one-line message on stderr (a traceback only with --log_level debug).
"""

from __future__ import annotations

import argparse
import sys

from evaluation.evaluate import BASELINES, DEFAULT_CONFIG, EvaluationError, evaluate_dirs
from utils.cli import add_common_args, setup_logging
from utils.config import ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Objective evaluation of vocoded audio against ground truth.")
    parser.add_argument("--ref_dir", required=True, help="ground-truth audio folder")
    parser.add_argument("--pred_dir", required=True, help="vocoded audio folder; files matched by name")
    parser.add_argument("--output_dir", required=True, help="where metrics.csv, summary.json and plots/ go")
    parser.add_argument("--sample_rate", type=int, default=None, help="score at this rate (default: each reference's)")
    parser.add_argument("--plot", action="store_true", help="write plots/<name>.png: mels and F0 contours")
    parser.add_argument("--baseline", choices=BASELINES, default=None, help="also score a signal-processing vocoder")
    add_common_args(parser, config_required=False)
    parser.set_defaults(config=str(DEFAULT_CONFIG))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    try:
        if args.sample_rate is not None and args.sample_rate <= 0:
            raise EvaluationError(f"--sample_rate must be positive, got {args.sample_rate}")
        pre = load_config(args.config).preprocess
        evaluate_dirs(args.ref_dir, args.pred_dir, args.output_dir, sample_rate=args.sample_rate,
                      plot=args.plot, baseline=args.baseline, pre=pre)
    except (EvaluationError, ConfigError, OSError) as err:
        if args.log_level == "debug":
            raise
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
