"""RMS silence slicing (nus48e, opera) and edge trimming (pjs), in the spirit of openvpi's audio-slicer.

Works on frame RMS every `hop_ms`; all positions returned are sample spans `(start, end)`.
"""

from __future__ import annotations

import numpy as np


def frame_rms(audio: np.ndarray, hop: int, win: int) -> np.ndarray:
    """RMS of a `win`-sample window centred on every `hop`-th sample (cumulative sums: O(len))."""
    energy = np.concatenate([[0.0], np.cumsum(np.square(audio, dtype=np.float64))])
    centres = np.arange(len(audio) // hop + 1) * hop
    lo = np.clip(centres - win // 2, 0, len(audio))
    hi = np.clip(centres + win // 2, 0, len(audio))
    return np.sqrt((energy[hi] - energy[lo]) / np.maximum(hi - lo, 1))


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of every run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def slice_spans(
    audio: np.ndarray, sr: int, threshold_db: float, max_sil_kept_ms: float,
    min_length_ms: float = 5000, min_silence_ms: float = 300, hop_ms: float = 10,
) -> list[tuple[int, int]]:
    """Cut at silences (RMS below `threshold_db` dBFS for >= `min_silence_ms`) once the current clip
    has >= `min_length_ms` of sound before the silence; at most `max_sil_kept_ms` of a silence stays
    on each side of a cut (a silence up to twice that is cut at its quietest allowed frame, a longer
    one loses its middle). Leading/trailing silence is trimmed to the same amount. No cut: one clip."""
    hop = max(1, round(sr * hop_ms / 1000))
    rms = frame_rms(audio, hop, 4 * hop)
    n = len(rms)
    keep, min_len, min_sil = (round(ms / hop_ms) for ms in (max_sil_kept_ms, min_length_ms, min_silence_ms))
    begin, finish, cuts = 0, n, []
    for a, b in _runs(rms < 10 ** (threshold_db / 20)):
        if b - a < min_sil or (a == 0 and b == n):
            continue
        if a == 0:
            begin = max(0, b - keep)
        elif b == n:
            finish = min(n, a + keep)
        elif a - (cuts[-1][1] if cuts else begin) >= min_len:
            lo, hi = max(a, b - keep), min(b, a + keep)  # cut points leaving <= keep on both sides
            if lo <= hi:
                pos = lo + int(np.argmin(rms[lo:hi + 1]))
                cuts.append((pos, pos))
            else:
                cuts.append((a + keep, b - keep))
    starts = [begin] + [c[1] for c in cuts]
    ends = [c[0] for c in cuts] + [finish]
    return [(s * hop, min(e * hop, len(audio))) for s, e in zip(starts, ends, strict=True) if e > s]


def trim_span(audio: np.ndarray, sr: int, threshold_db: float = -40, margin_ms: float = 50,
              hop_ms: float = 10) -> tuple[int, int]:
    """The span between the first and last frame within `threshold_db` of the loudest frame,
    plus a small margin: a plain energy gate standing in for the original's sox-style VAD."""
    hop = max(1, round(sr * hop_ms / 1000))
    rms = frame_rms(audio, hop, 4 * hop)
    peak = rms.max(initial=0.0)
    if peak == 0:
        return 0, len(audio)
    loud = np.flatnonzero(rms >= peak * 10 ** (threshold_db / 20))
    margin = round(sr * margin_ms / 1000)
    return max(0, loud[0] * hop - margin), min(len(audio), loud[-1] * hop + margin)
