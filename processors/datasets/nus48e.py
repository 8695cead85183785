"""NUS-48E: twelve singers, each song both sung and read.

Reads `<root>/<ID>/{read,sing}/<NN>.wav` (the .txt labels are not read) and cuts each recording
at silences (RMS slicer, -40 dB, up to 4 s of silence kept) into
`<work_dir>/clips/<ID>/<style>/<NN>/<NNNN>.wav`.
Uid `<ID>_<style>#<NN>#<NNNN>` (`ADIZ_read#01#0000`); Singer `<ID>`, one label per person for
reading and singing (the original gives each person two). Test: every clip of (ADIZ_read, 01),
(MCUR_sing, 10), (JLEE_read, 08), (SAMF_sing, 18).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from processors.datasets.clips import cut_clips
from processors.datasets.common import entry, require_found, sorted_files, split_by, subdirs
from processors.datasets.slicer import slice_spans

TEST = {"ADIZ_read#01#", "MCUR_sing#10#", "JLEE_read#08#", "SAMF_sing#18#"}
SLICE = partial(slice_spans, threshold_db=-40, max_sil_kept_ms=4000)


def parse(root: Path, dataset: str, work_dir: Path) -> tuple[list[dict], list[dict]]:
    entries = []
    for singer in subdirs(root):
        for style in ("read", "sing"):
            for wav in sorted_files(singer / style, "*.wav"):
                clips = cut_clips(wav, work_dir / "clips" / singer.name / style / wav.stem, SLICE)
                uid = f"{singer.name}_{style}#{wav.stem}#"
                entries += [entry(dataset, uid + clip.stem, clip, singer.name) for clip in clips]
    require_found(entries, root, "<root>/<ID>/{read,sing}/<NN>.wav")
    return split_by(entries, lambda e: e["Uid"][: e["Uid"].rindex("#") + 1] in TEST)
