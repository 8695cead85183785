"""Stage 2: train DiffWave with DDPM through accelerate (one or many processes)."""

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, as run.sh sets PYTHONPATH: `python bins/...` works

from models.vocoders.diffusion.diffusion_vocoder_trainer import DiffusionVocoderTrainer
from models.vocoders.diffusion.experiment import ARGS_FILE, Experiment, trained_config
from utils.checkpoint import CHECKPOINT_DIR, list_checkpoints, resolve_checkpoint
from utils.cli import add_common_args, run
from utils.config import ConfigError, load_config
from utils.config_schema import validate
from utils.stop_request import stop_when_the_launcher_dies

log = logging.getLogger(__name__)


def saved_config(args: argparse.Namespace) -> Any:
    """A resume without --config goes on with the config its checkpoint was trained under (the checkpoint's own
    copy; args.json beside the checkpoint/ folder for checkpoints older than that copy).

    It trains where that experiment now lies (a copied or moved one too, not where its args.json says it was made),
    and an experiment stopped before its first checkpoint is named by its empty checkpoint/ folder. A checkpoint
    outside an experiment (a backup) trains where its config says: beside the backup, it went to a folder of no
    experiment (the backup's grandparent's parent)."""
    if args.resume_type != "resume" or not args.checkpoint:
        raise ConfigError("--config is required; only a resume with --checkpoint may leave it out "
                          "(it then reads the config that checkpoint was trained under)")
    path = Path(os.path.abspath(args.checkpoint))  # not resolved: a symlinked experiment stays where it is named
    folder = None
    if (path / ARGS_FILE).is_file() and not list_checkpoints(path / CHECKPOINT_DIR):
        expt_dir = path
    elif path.name == CHECKPOINT_DIR and (path.parent / ARGS_FILE).is_file() and not list_checkpoints(path):
        expt_dir = path.parent
    else:
        folder = resolve_checkpoint(path)
        expt_dir = folder.parent.parent
    try:
        cfg = (trained_config(folder) if folder is not None else None) or Experiment(expt_dir).config()
    except ConfigError as err:
        raise ConfigError(f"{err}; or pass --config to resume under a config of your own") from None
    log.info("resuming with the config it was trained under, %s", cfg.config_path)
    if folder is None or (folder.parent.name == CHECKPOINT_DIR and (expt_dir / ARGS_FILE).is_file()):
        cfg.log_dir = str(expt_dir.parent)
    return cfg


def main(args: argparse.Namespace) -> None:
    stop_when_the_launcher_dies()
    cfg = load_config(args.config) if args.config else saved_config(args)
    validate(cfg, "train")
    if args.max_steps is not None:
        if args.max_steps < 0:
            raise ConfigError(f"--max_steps must be 0 (no bound) or more, got {args.max_steps}")
        cfg.train.max_steps = args.max_steps
    DiffusionVocoderTrainer(cfg, args.exp_name, args.resume_type, args.checkpoint).train()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_args(parser, config_required=False)
    parser.add_argument("--exp_name", required=True, help="experiment name: output goes to <log_dir>/<exp_name>")
    parser.add_argument("--resume_type", choices=["resume", "finetune"], default=None)
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder, or an experiment's checkpoint/ folder")
    parser.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    run(main, parser)
