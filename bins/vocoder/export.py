"""Export a trained vocoder: TorchScript of the whole synthesis, or ONNX of the denoiser (run it with OnnxVocoder)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, as run.sh sets PYTHONPATH: `python bins/...` works

from models.vocoders.diffusion.ddpm import SAMPLER_NAMES
from models.vocoders.diffusion.diffusion_vocoder_inference import vocoder_from_experiment
from models.vocoders.diffusion.experiment import Experiment, with_recipe_config
from models.vocoders.diffusion.export import FORMATS, compare, export_onnx, export_torchscript
from processors.mel import mel_spectrogram
from utils.cli import add_common_args, positive_int, run, seconds
from utils.config_schema import validate
from utils.synthetic import synthetic_voice
from utils.text import plural


def main(args: argparse.Namespace) -> None:
    # Exports are fp32, traced on the CPU: the config's GPU choices for stage 3 (a fused engine, compiling, CUDA graphs)
    # do not apply to them, nor to --verify's PyTorch reference (the CPU's automatic engine)
    options = {"device": "cpu", "precision": "fp32", "seed": args.seed, "engine": "auto", "compile": False,
               "cuda_graph": False}
    if args.sampler:
        options["sampler"] = args.sampler
    if args.steps is not None:  # 0 too: refused, not taken for "the default"
        options["steps"] = args.steps
    cfg = with_recipe_config(Experiment(args.expt_dir).config(), args.config)  # as stage 3: --config adds its inference
    validate(cfg, "inference")
    vocoder = vocoder_from_experiment(args.expt_dir, args.checkpoint, not args.raw_weights, cfg=cfg, **options)
    if args.format == "torchscript":
        export_torchscript(vocoder, args.output)
    else:
        export_onnx(vocoder, args.output)
    plan = vocoder.plan
    print(f"{args.format} written to {args.output}: {vocoder.sampler} sampler, {plural(plan.steps, 'step')}")
    if args.verify:
        pre = vocoder.cfg.preprocess
        mel = mel_spectrogram(synthetic_voice(args.verify, int(pre.sample_rate), seed=0), pre)
        result = compare(vocoder, args.output, args.format, mel, args.repeats)
        audio = result["audio_s"]
        print(f"check on {audio:.2f} s of audio: max abs difference to PyTorch {result['max_abs_diff']:.2e}; "
              f"PyTorch {result['pytorch_s']:.3f} s (RTF {result['pytorch_s'] / audio:.3f}), "
              f"{args.format} {result['exported_s']:.3f} s (RTF {result['exported_s'] / audio:.3f}), best of {args.repeats}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_args(parser, config_required=False)
    parser.add_argument("--expt_dir", required=True, help="experiment folder written by stage 2")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--output", required=True, help="the file to write (.pt for torchscript, .onnx for onnx)")
    parser.add_argument("--sampler", default=None, help=f"{' | '.join(SAMPLER_NAMES)} (default: config inference.sampler)")
    parser.add_argument("--steps", type=int, default=None, help="ddim steps; for searched, which searched schedule")
    parser.add_argument("--checkpoint", default=None, help="a checkpoint folder (default: the newest)")
    parser.add_argument("--raw_weights", action="store_true", help="use the raw weights even when EMA weights exist")
    parser.add_argument("--seed", type=int, default=1234, help="noise seed of the --verify check")
    parser.add_argument("--verify", type=seconds, default=0.0, metavar="SECONDS",
                        help="vocode this much synthetic audio with both and print the difference and the timings")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timing repeats of --verify (the best is shown)")
    run(main, parser)
