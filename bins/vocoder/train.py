"""Stage 2: train DiffWave with DDPM through accelerate (one or many processes)."""

import argparse

from models.vocoders.diffusion.diffusion_vocoder_trainer import DiffusionVocoderTrainer
from utils.cli import add_common_args, run
from utils.config import load_config, validate


def main(args: argparse.Namespace) -> None:
    cfg = load_config(args.config)
    validate(cfg, "train")
    if args.max_steps is not None:
        cfg.train.max_steps = args.max_steps
    DiffusionVocoderTrainer(cfg, args.exp_name, args.resume_type, args.checkpoint).train()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_args(parser)
    parser.add_argument("--exp_name", required=True, help="experiment name: output goes to <log_dir>/<exp_name>")
    parser.add_argument("--resume_type", choices=["resume", "finetune"], default=None)
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder, or an experiment's checkpoint/ folder")
    parser.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    run(main, parser)
