"""Score vocoded audio against ground truth: `python bins/vocoder/evaluate.py --ref_dir R --pred_dir P --output_dir D`.

Runs from any folder, with or without PYTHONPATH=. (run.sh --stage 4 sets it). The mel settings come from
--config, or from the args.json of --expt_dir (an experiment, its checkpoint/ folder or one
checkpoint), and are checked before any scoring. Usage errors exit with code 2 and a one-line
message on stderr (a traceback only with --log_level debug).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, as run.sh sets PYTHONPATH: `python bins/...` works

from evaluation.evaluate import BASELINES, DEFAULT_CONFIG, EvaluationError, evaluate_dirs
from models.vocoders.diffusion.experiment import Experiment, locate_experiment
from utils.cli import add_common_args, setup_logging
from utils.config import ConfigError, load_config
from utils.config_schema import validate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Objective evaluation of vocoded audio against ground truth.")
    parser.add_argument("--ref_dir", required=True, help="ground-truth audio folder")
    parser.add_argument("--pred_dir", required=True, help="vocoded audio folder; files matched by name")
    parser.add_argument("--output_dir", required=True, help="where metrics.csv, summary.json and plots/ go")
    parser.add_argument("--sample_rate", type=int, default=None, help="score at this rate (default: each reference's)")
    parser.add_argument("--plot", action="store_true", help="write plots/<name>.png: mels and F0 contours")
    parser.add_argument("--baseline", choices=BASELINES, default=None, help="also score a signal-processing vocoder")
    parser.add_argument("--expt_dir", default=None,
                        help="score with this experiment's mel (its args.json), instead of --config")
    add_common_args(parser, config_required=False)
    return parser.parse_args(argv)


def config_path(args: argparse.Namespace) -> str:
    """The config whose mel settings score: --config, the experiment's args.json, or the toolkit's default."""
    if args.expt_dir is None:
        return args.config or str(DEFAULT_CONFIG)
    if args.config:
        raise EvaluationError("give --config or --expt_dir, not both")
    if not os.path.isdir(args.expt_dir):
        what = "not a folder (give the experiment folder)" if os.path.exists(args.expt_dir) else "does not exist"
        raise EvaluationError(f"{args.expt_dir}: experiment folder {what}")
    expt_dir, _ = locate_experiment(args.expt_dir)
    if not Experiment(expt_dir).args.is_file():
        raise EvaluationError(f"{args.expt_dir}: not an experiment of stage 2 (no args.json in it, nor in the "
                              "experiment above a checkpoint/ folder or one checkpoint)")
    return str(Experiment(expt_dir).args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    try:
        if args.sample_rate is not None and args.sample_rate <= 0:
            raise EvaluationError(f"--sample_rate must be positive, got {args.sample_rate}")
        cfg = load_config(config_path(args))
        validate(cfg, "evaluation")
        if args.expt_dir is not None and not os.path.isdir(args.ref_dir):
            raise EvaluationError(f"{args.ref_dir}: folder does not exist; run stage 3 with --infer_mode infer_from_dataset "
                                  "or infer_from_audio first (with the same --infer_output_dir), which write the ground "
                                  "truth there")
        pre = cfg.preprocess
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
