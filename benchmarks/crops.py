"""What one training crop costs the loader: the whole feature files read, or only the crop's pages mapped.

    python -m benchmarks.crops [--seconds 3 60 240] [--repeats 50]

Writes a random mel and audio of each length (24 kHz, hop 256, 100 mels) as .npy files, then
times the safe loader plus `crop_pair` (32 frames) per item, reading the files whole and with
`mmap` (what `CropDataset` asks for: files over utils.io.MAP_ABOVE_BYTES are mapped). Both read
from the page cache.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from models.vocoders.diffusion.diffusion_vocoder_dataset import crop_pair
from utils.io import load_npy

RATE, HOP, MELS, FRAMES = 24000, 256, 100, 32


def ms_per_crop(mel_path: Path, audio_path: Path, mmap: bool, repeats: int) -> float:
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(repeats):
        crop_pair(load_npy(mel_path, mmap), load_npy(audio_path, mmap), FRAMES, HOP, rng)
    return 1e3 * (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.crops", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, nargs="+", default=[3, 60, 240])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench_crops_") as tmp:
        for seconds in args.seconds:
            samples = int(seconds * RATE) // HOP * HOP
            mel_path, audio_path = Path(tmp) / "mel.npy", Path(tmp) / "audio.npy"
            np.save(mel_path, rng.standard_normal((MELS, samples // HOP)).astype(np.float32))
            np.save(audio_path, rng.standard_normal(samples).astype(np.float32))
            rounds = [(ms_per_crop(mel_path, audio_path, False, args.repeats),
                       ms_per_crop(mel_path, audio_path, True, args.repeats)) for _ in range(5)]
            read, mapped = (min(r[i] for r in rounds) for i in (0, 1))  # alternated, best of 5: less noise
            print(f"{seconds:6.0f} s of audio: whole files {read:6.2f} ms per crop, mapped {mapped:5.2f} ms "
                  f"({read / mapped:.1f}x)")


if __name__ == "__main__":
    main()
