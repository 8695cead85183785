"""Benchmarks: `benchmark.py infer|train|preprocess [options]` runs benchmarks/<name>.py's main."""

import importlib
import sys
from pathlib import Path

BENCHMARKS = {"infer": "inference", "train": "train", "preprocess": "preprocess"}

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, as run.sh's PYTHONPATH
    usage = f"usage: benchmark.py {{{'|'.join(BENCHMARKS)}}} [options]  (--help after the name lists them)"
    if len(sys.argv) >= 2 and sys.argv[1] in ("-h", "--help"):
        print(usage)
        sys.exit(0)
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        sys.exit(usage)
    importlib.import_module(f"benchmarks.{BENCHMARKS[sys.argv[1]]}").main(sys.argv[2:])
