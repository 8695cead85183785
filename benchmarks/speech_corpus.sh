#!/usr/bin/env bash
# A single-speaker speech corpus for benchmarks/quality.py, made with espeak-ng (Debian's package):
# N sentences (default 120) built from fixed word lists, one wav each, under DIR/<voice>/.
# Usage: bash benchmarks/speech_corpus.sh DIR [N] [VOICE]   (e.g. VOICE en-us, en-gb, de)
set -euo pipefail
out=${1:?usage: speech_corpus.sh DIR [N] [VOICE]}
count=${2:-120}
voice=${3:-en-us}
if ! command -v espeak-ng >/dev/null; then
  apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null
fi
subjects=(the-old-sailor a-quiet-student my-neighbour the-tired-baker our-teacher a-young-painter the-night-guard her-brother)
verbs=(carried painted counted followed opened borrowed measured described)
objects=(seven-heavy-boxes the-silver-kettle a-map-of-the-river the-broken-window four-green-apples the-long-letter a-wooden-chair the-morning-paper)
places=(before-dinner near-the-harbour after-the-storm in-the-garden on-a-cold-morning beside-the-station during-the-concert at-the-end-of-summer)
mkdir -p "$out/$voice"
for ((i = 0; i < count; i++)); do
  s=${subjects[i % 8]} v=${verbs[(i / 8) % 8]} o=${objects[(i * 3 + i / 64) % 8]} p=${places[(i * 5 + 1) % 8]}
  text="${s//-/ } ${v} ${o//-/ } ${p//-/ }."
  espeak-ng -v "$voice" -s $((150 + (i % 5) * 10)) -w "$out/$voice/$(printf 'utt%04d' "$i").wav" "$text"
done
echo "$count utterances of voice $voice in $out/$voice"
