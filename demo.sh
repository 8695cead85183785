#!/usr/bin/env bash
# The whole recipe on a synthetic corpus with a small model, on CPU, in a few minutes: install (into the
# active virtual environment, or .venv), generate the corpus, then stages 1 (features), 2 (train),
# 3 (vocode in all three modes) and 4 (score against the ground truth and Griffin-Lim), and a summary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
start=$(date +%s)
bash install.sh
# shellcheck source=utils/venv.sh
. utils/venv.sh
use_venv
recipe=egs/vocoder/diffusion/diffwave/run.sh
config=egs/vocoder/diffusion/diffwave/demo/demo_config.json
out=demo_out
expt=$out/ckpts/demo
rm -rf "$out"
echo "== synthetic corpus: $out/corpus"
PYTHONPATH=. python -c "from utils.synthetic import write_corpus; write_corpus('$out/corpus', speakers=2, per_speaker=40, sample_rate=8000)"
echo "== stage 1: preprocess"
sh $recipe --stage 1 --config $config
echo "== stage 2: train (1500 steps)"
sh $recipe --stage 2 --config $config --name demo
echo "== stage 3: infer_from_dataset"
sh $recipe --stage 3 --config $config --infer_mode infer_from_dataset --infer_datasets demo --infer_expt_dir $expt
echo "== stage 3: infer_from_feature"
mkdir -p $out/features/mels
cp $out/data/demo/mels/spk0_00[0-2].npy $out/features/mels/
sh $recipe --stage 3 --config $config --infer_mode infer_from_feature --infer_feature_dir $out/features \
   --infer_expt_dir $expt --infer_output_dir $out/from_feature
echo "== stage 3: infer_from_audio"
sh $recipe --stage 3 --config $config --infer_mode infer_from_audio --infer_audio_dir $out/corpus/spk1 \
   --infer_expt_dir $expt --infer_output_dir $out/from_audio
echo "== stage 4: score the test split against its ground truth, with Griffin-Lim as the baseline"
sh $recipe --stage 4 --infer_expt_dir $expt --baseline griffinlim --plot >/dev/null  # its table is in the summary

tensorboard=tensorboard
[ "$VIRTUAL_ENV" = "$PWD/.venv" ] && tensorboard=.venv/bin/tensorboard
echo
echo "== summary: the demo model and Griffin-Lim, each vocoding the test split's mels"
PYTHONPATH=. python -c "import sys; from evaluation.evaluate import summary_table; print(summary_table(sys.argv[1]))" \
  "$expt/result/eval/summary.json"
echo "plots (mels, F0):  $expt/result/eval/plots/"
echo "vocoded wavs:      $expt/result/pred/ (ground truth in $expt/result/gt/), $out/from_feature/pred/, $out/from_audio/pred/"
echo "TensorBoard:       $tensorboard --logdir $expt"
echo "demo finished in $(( $(date +%s) - start )) s"
