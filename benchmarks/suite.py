"""The GPU suite's case runner: each case within a time budget, its figures saved as it ends, a failing case
recorded without costing the others (unless it lost the CUDA context)."""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from utils.config import REPO_ROOT

CONFIG = REPO_ROOT / "egs/vocoder/diffusion/diffwave/exp_config.json"


class CudaLost(Exception):
    """A case's fault (an illegal memory access, say) lost the process's CUDA context."""


def cuda_alive() -> bool:
    try:
        torch.cuda.synchronize()
        return True
    except Exception:  # torch.AcceleratorError after a fault
        return False


class Suite:
    def __init__(self, budget_s: float, out: Path) -> None:
        self.start, self.budget_s, self.out = time.perf_counter(), budget_s, out
        self.results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "cases": [], "skipped": [], "failed": []}

    def case(self, name: str, fn: Callable[[], dict[str, Any]], format_line: Callable[[dict], str],
             expect_s: float = 10.0) -> dict | None:
        """Run a case that usually takes `expect_s` (on an H200), unless it would end past the budget."""
        started = time.perf_counter()
        if started - self.start + expect_s > self.budget_s:
            self.results["skipped"].append(name)
            print(f"SKIPPED (budget) {name}", flush=True)
            return None
        try:
            result = fn()
            result["case_s"] = time.perf_counter() - started
        except Exception as error:  # one failing case must not cost the lease the others
            self.results["failed"].append({"case": name, "error": f"{type(error).__name__}: {error}"})
            print(f"FAILED {name}: {type(error).__name__}: {error}\n{traceback.format_exc(limit=3)}", flush=True)
            if not cuda_alive():  # unless it lost the process's CUDA context, which every later call then fails on
                self.results["cuda_lost_in"] = name
                self.save()
                raise CudaLost(name) from error
            torch.cuda.empty_cache()
            return None
        torch.cuda.empty_cache()
        result = {"case": name, **{k: v for k, v in result.items() if k != "audio"}}
        self.results["cases"].append(result)
        print(f"{name:<44} {format_line(result)}", flush=True)
        self.save()
        return result

    def save(self) -> None:
        self.results["elapsed_s"] = time.perf_counter() - self.start
        self.out.write_text(json.dumps(self.results, indent=1, default=float))


def profile_lines(r: dict) -> str:
    """The GPU's busy fraction and its top five kernels (per step), where the case was profiled."""
    if r.get("gpu_busy") is None:
        return ""
    return f"  GPU busy {r['gpu_busy']:.0%}" + "".join(f"\n      {k['ms_per_step']:6.2f} ms {k['share']:4.0%}  {k['name']}"
                                                     for k in r["top_kernels"][:5])
