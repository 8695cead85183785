"""Without a GPU, Triton kernels run under Triton's CPU interpreter (set before anything imports Triton).

`fake_gpus` stands in for CUDA GPUs of given names and compute capabilities, for the per-device choices.
Run locks a test leaves held (a trainer set up and never trained) are released after it.
"""

import os
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Shared memory a block may take (cudaDevAttrMaxSharedMemoryPerBlockOptin) by compute capability; 48 KiB elsewhere.
SHARED_MEMORY = {(7, 0): 98304, (7, 5): 65536, (8, 0): 166912, (8, 6): 101376, (8, 9): 101376, (9, 0): 232448,
                 (12, 0): 101376}


@pytest.fixture(autouse=True)
def _release_run_locks() -> Iterator[None]:
    yield
    from utils import file_lock

    file_lock.release_all()


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """`fake_gpus(("Tesla T4", (7, 5)), ...)`: these GPUs are what torch.cuda reports, cuda:0 first, their properties
    with the shared memory a block may take on that architecture."""

    def install(*gpus: tuple[str, tuple[int, int]]) -> None:
        def index(device: object = None) -> int:
            return 0 if device is None else device if isinstance(device, int) else torch.device(device).index or 0

        monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(gpus))
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpus[index(device)][0])
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpus[index(device)][1])
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(
            name=gpus[index(device)][0], major=gpus[index(device)][1][0], minor=gpus[index(device)][1][1],
            shared_memory_per_block_optin=SHARED_MEMORY.get(gpus[index(device)][1], 49152)))

    return install
