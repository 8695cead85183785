#!/usr/bin/env bash
# The whole recipe on a synthetic corpus with a tiny model, on CPU, in a few minutes:
# install, generate the corpus, then stage 1 (preprocess), 2 (train), 3 (vocode in all three modes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
start=$(date +%s)
bash install.sh
recipe=egs/vocoder/diffusion/diffwave/run.sh
config=egs/vocoder/diffusion/diffwave/demo/demo_config.json
out=demo_out
rm -rf "$out"
echo "== synthetic corpus: $out/corpus"
PYTHONPATH=. python -c "from utils.synthetic import write_corpus; write_corpus('$out/corpus', speakers=2, per_speaker=12)"
echo "== stage 1: preprocess"
sh $recipe --stage 1 --config $config
echo "== stage 2: train (600 steps)"
sh $recipe --stage 2 --config $config --name demo
expt=$out/ckpts/demo
echo "== stage 3: infer_from_dataset"
sh $recipe --stage 3 --config $config --infer_mode infer_from_dataset --infer_datasets demo --infer_expt_dir $expt
echo "== stage 3: infer_from_feature"
mkdir -p $out/features/mels
cp $out/data/demo/mels/spk0_spk0_00[0-2].npy $out/features/mels/
sh $recipe --stage 3 --config $config --infer_mode infer_from_feature --infer_feature_dir $out/features \
   --infer_expt_dir $expt --infer_output_dir $out/from_feature
echo "== stage 3: infer_from_audio"
sh $recipe --stage 3 --config $config --infer_mode infer_from_audio --infer_audio_dir $out/corpus/spk1 \
   --infer_expt_dir $expt --infer_output_dir $out/from_audio
echo
echo "demo finished in $(( $(date +%s) - start )) s. Vocoded wavs:"
echo "  $expt/result/pred/       (test split, ground truth in $expt/result/gt/)"
echo "  $out/from_feature/pred/  (from mels)"
echo "  $out/from_audio/pred/    (from audio, ground truth in $out/from_audio/gt/)"
echo "TensorBoard: tensorboard --logdir $expt"
