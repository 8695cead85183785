"""How the stages use their device: precision, CUDA's math modes, torch.compile, the CPU's threads.

"auto" precisions are half on a GPU and fp32 on the CPU: stage 2 trains in bf16 where the GPU
computes it natively, stage 3 vocodes in fp16 where it has tensor cores. On CUDA, TF32 and cuDNN's
algorithm search are set as the config says, and the model is compiled in place (its parameter
names and checkpoints unchanged). On the CPU, the torch threads follow the machine's load, so a
neighbour's job does not stall every op (see utils/threads).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from typing import Any

import torch

from utils.config import ConfigError, bool_or_auto
from utils.threads import fair_threads

log = logging.getLogger(__name__)
THREAD_CHECK_STEPS = 50
TRAIN_PRECISIONS = ("auto", "no", "fp16", "bf16")
CPU_MEMORY_FALLBACK = 16 << 30  # where the host does not say what it has available; inference.gpu_memory_gib sets it
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs
NATIVE_BF16 = (8, 0)  # Ampere: the first GPUs with bf16 tensor cores
TRITON_GPUS = TENSOR_CORES = (7, 0)  # Volta: the oldest GPUs Inductor's Triton backend compiles for, with fp16 tensor cores


def launch_gpus() -> list[int]:
    """The CUDA devices this launch trains on: one per local process (accelerate and torchrun set
    LOCAL_WORLD_SIZE; a lone process uses device 0)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return list(range(min(count, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))


def lacking(capability: tuple[int, int], devices: list[int]) -> int | None:
    """The first of `devices` below this compute capability, or None."""
    return next((i for i in devices if torch.cuda.get_device_capability(i) < capability), None)


def training_precision(setting: str, cuda: bool, source: str = "config") -> str:
    """`train.mixed_precision`: "auto" is bf16 on GPUs that compute it natively (compute capability 8.0+: A100,
    RTX 30xx, H100 and later) and fp32 ("no") elsewhere; fp16 needs a grad scaler, so auto never picks it."""
    if setting not in TRAIN_PRECISIONS:
        raise ConfigError(f"{source}: train.mixed_precision must be one of {TRAIN_PRECISIONS}, got {setting!r}")
    if setting == "fp16" and not cuda:
        raise ConfigError(f"{source}: train.mixed_precision 'fp16' needs a CUDA GPU (no fp16 grad scaling on CPU); "
                          "use 'bf16' or 'no'")
    gpus = launch_gpus() if cuda else []
    old = lacking(NATIVE_BF16, gpus) if gpus else None
    if setting == "auto":
        return "bf16" if gpus and old is None else "no"
    if setting == "bf16" and old is not None:
        log.warning("train.mixed_precision 'bf16' on %s (cuda:%d, compute capability %d.%d) is emulated and slower than "
                    "fp32; 'fp16' or 'no' train faster there", torch.cuda.get_device_name(old), old,
                    *torch.cuda.get_device_capability(old))
    return setting


@functools.cache  # once a process: stage 2 builds a Vocoder at every evaluation
def _warn_emulated_bf16(name: str, index: int, capability: tuple[int, int]) -> None:
    log.warning("inference.precision 'bf16' on %s (cuda:%d, compute capability %d.%d) is emulated and slower than fp16, "
                "which is also closer to the exact result; 'fp16' or 'auto' vocode faster there", name, index, *capability)


def inference_precision(setting: str, device: torch.device) -> str:
    """Stage 3's precision: "auto" is fp16 on CUDA GPUs with tensor cores (compute capability 7.0+; 2.3x faster
    than fp32 on an H200, and closer to the exact result than fp32's TF32 dot products: 1.6e-3 vs 5.7e-3 relative
    error), fp32 elsewhere (older GPUs compute fp16 slowly, if at all; the CPU)."""
    if device.type != "cuda":
        return "fp32" if setting == "auto" else setting
    index = torch.cuda.current_device() if device.index is None else device.index
    capability = torch.cuda.get_device_capability(index)
    if setting == "bf16" and capability < NATIVE_BF16:  # as train.mixed_precision
        _warn_emulated_bf16(torch.cuda.get_device_name(index), index, capability)
    if setting != "auto":
        return setting
    return "fp16" if capability >= TENSOR_CORES else "fp32"


def channels_last(setting: bool | str, cuda: bool, channels: int, graphed: bool = False) -> bool:
    """`train.channels_last`: "auto" is on for models of 32+ residual channels on the CPU (the base model trains 15%
    faster in fp32, 48% in bf16 on 2 threads, the same on one; smaller models lose on one thread) and on CUDA under
    CUDA graphs (`graphed`: a compile mode that replays them). On an H200 it drops cuDNN's layout transposes (a
    quarter of the compiled bf16 step at batch 32): 42.1 -> 33.7 ms a step with graphs, but 43.3 -> 48.8 ms without
    them, where the host could not keep up with the extra launches."""
    return bool_or_auto(setting, "train.channels_last", channels >= 32 and (not cuda or graphed))


def free_memory(device: torch.device) -> int:
    """Bytes a new allocation on `device` could take: on CUDA the GPU's free memory plus what PyTorch's caching
    allocator holds reserved but unused (nothing empties that cache, so the free memory alone shrank batch after
    batch); on the CPU the host memory the kernel reports available (free plus reclaimable caches)."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    try:
        with open("/proc/meminfo") as info:
            return next(int(line.split()[1]) * 1024 for line in info if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):  # not Linux, or a kernel that words it otherwise
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # the pages nothing holds
        except (AttributeError, ValueError, OSError):  # macOS has no SC_AVPHYS_PAGES, Windows no sysconf
            return CPU_MEMORY_FALLBACK


def set_cuda_math(tcfg: Any) -> None:
    torch.backends.cuda.matmul.allow_tf32 = bool(tcfg.get("tf32", True))
    torch.backends.cudnn.allow_tf32 = bool(tcfg.get("tf32", True))
    # Crops have one shape, so timing cuDNN's algorithms once pays; off by default: the choice may vary by run.
    torch.backends.cudnn.benchmark = bool(tcfg.get("cudnn_benchmark", False))


def compile_model(setting: bool | str, device: torch.device) -> bool:
    """`train.compile`: true, false, or "auto" (on CUDA when Triton is there and supports the GPUs, as
    torch.compile needs)."""
    cuda = device.type == "cuda"
    auto = cuda and importlib.util.find_spec("triton") is not None and lacking(TRITON_GPUS, launch_gpus()) is None
    return bool_or_auto(setting, "train.compile", auto)


def refuse_graphed_accumulation(mode: str, accum: int, device: torch.device, source: str) -> None:
    """CUDA graphs hand the backward's output buffers to `.grad`, and the next micro-batch's replay overwrites
    them: accumulated gradients come out wrong or the run stops mid-window (pytorch/pytorch#169545)."""
    if device.type == "cuda" and accum > 1 and mode in CUDA_GRAPH_MODES:
        raise ConfigError(f"{source}: train.compile_mode '{mode}' replays CUDA graphs, which cannot accumulate "
                          f"gradients (gradient_accumulation_step {accum}): a later micro-batch overwrites them; use "
                          "'default' or 'max-autotune-no-cudagraphs', or accumulation 1")


def compile_mode(tcfg: Any, device: torch.device, processes: int) -> str | None:
    """The torch.compile mode the trainer runs (`train.compile`, `train.compile_mode`), None when it does not
    compile: decided once, since channels-last's `auto` depends on it too.

    `auto` (the default) replays CUDA graphs ("reduce-overhead", and so channels-last) where that was measured: on
    CUDA, one process, no gradient accumulation. On an H200 stage 2 then trained the base model at batch 16 at 53
    steps a second against 19 in fp32 eager, validation each epoch included (`benchmarks.quality`). Elsewhere it is
    "default": graphs cannot accumulate gradients (see refuse_graphed_accumulation), and no multi-GPU run with them
    has been measured."""
    if not compile_model(tcfg.get("compile", "auto"), device):
        return None
    mode = tcfg.get("compile_mode", "auto")
    if mode != "auto":
        return mode
    accum = max(1, int(tcfg.get("gradient_accumulation_step", 1)))
    return "reduce-overhead" if device.type == "cuda" and processes == 1 and accum == 1 else "default"


def compile_in_place(model: torch.nn.Module, mode: str | None, accum: int, device: torch.device, source: str) -> bool:
    """Compile `model` in `mode` (see compile_mode); whether it was."""
    if mode is None:
        return False
    refuse_graphed_accumulation(mode, accum, device, source)
    model.compile(dynamic=False, mode=mode)
    return True


class CpuThreads:
    """CPU: `train.num_threads` torch threads, or (0 or absent) as many as the load leaves, checked again every
    THREAD_CHECK_STEPS steps. Nothing on CUDA."""

    def __init__(self, tcfg: Any, cuda: bool) -> None:
        fixed = int(tcfg.get("num_threads", 0) or 0)
        self.ceiling = 0 if cuda else fixed or torch.get_num_threads()
        self.adaptive = not cuda and not fixed
        if not cuda:
            torch.set_num_threads(fixed or fair_threads(self.ceiling))

    def after_step(self, step: int) -> None:
        """Fewer threads while other jobs hold cores, more when they leave."""
        if not self.adaptive or step % THREAD_CHECK_STEPS:
            return
        current = torch.get_num_threads()
        wanted = fair_threads(self.ceiling, own_busy=current)
        if wanted != current:
            torch.set_num_threads(wanted)
            log.info("torch threads %d -> %d (load average %.1f on %d cores)", current, wanted, os.getloadavg()[0],
                     len(os.sched_getaffinity(0)))
