"""What each variant of the fused kernel costs a GPU's multiprocessor, compiled on any machine.

    python -m benchmarks.kernel_resources [--arch 90] [--dtypes bf16 fp16 fp32] [--channels 64 --n_mel 100] [--projected]

Compiles every variant the tuner tries, and the fallback's, for a CUDA architecture with the
installed Triton, specialised as the launcher specialises them (aligned pointers and channel
counts, the mel rows padded to 16 bins), and prints for each: registers a thread, spilled bytes (the stack frame), shared
memory, the matrix instructions (HGMMA is Hopper's asynchronous tensor-core path, HMMA the older
one) and how many programs fit on one multiprocessor. Needs no GPU: Triton's NVIDIA backend
carries ptxas and cuobjdump. A design aid: a variant that spills, or fits few warps on a
multiprocessor, waits on memory with nothing else to run. Run it without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from io import StringIO as io_buffer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import triton

# Per multiprocessor: registers, threads, shared memory (bytes a block may use, bytes in all).
MULTIPROCESSORS = {75: (65536, 1024, 65536, 65536), 80: (65536, 2048, 166912, 167936), 86: (65536, 1536, 101376, 102400),
                   89: (65536, 1536, 101376, 102400), 90: (65536, 2048, 232448, 233472)}
FLOAT_ARGS = ("skip_ptr", "shift_ptr", "b_in_ptr", "b_out_ptr")  # kept in fp32 whatever the I/O precision


@dataclass
class Resources:
    registers: int
    stack: int
    shared: int
    mma: str
    programs: int


def _tool(name: str) -> str:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    found = bundled if os.path.exists(bundled) else shutil.which(name)
    if found is None:
        raise SystemExit(f"kernel_resources: {name} not found (Triton's NVIDIA backend carries it)")
    return found


def programs_per_multiprocessor(arch: int, warps: int, registers: int, shared: int) -> int:
    """Occupancy from the three limits (registers are handed out in 256s a warp)."""
    regs, threads, per_block, per_sm = MULTIPROCESSORS[arch]
    if shared > per_block:
        return 0
    by_registers = regs // (-(-registers * 32 // 256) * 256 * warps)
    return min(by_registers, threads // (32 * warps), per_sm // (shared + 1024), 32)


def compile_variant(config: triton.Config, io: str, channels: int, n_mel: int, arch: int, projected: bool) -> Any:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from models.vocoders.diffusion import fused

    kernel = fused._residual_layer
    constants = {**fused.kernel_constants(channels, n_mel, False, projected), **config.kwargs}
    signature, aligned = {}, []
    for i, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            signature[name] = "*fp32" if name in FLOAT_ARGS else "*i32" if name == "len_ptr" else f"*{io}"
        else:
            signature[name] = "i32"
        if name.endswith("_ptr") or name == "M" or (name in ("C", "shift_stride") and channels % 16 == 0):
            aligned.append(i)
    source = ASTSource(kernel, signature, constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()},
                       attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if config.maxnreg:
        options["maxnreg"] = config.maxnreg
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def resources(config: triton.Config, io: str, channels: int = 64, n_mel: int = 100, arch: int = 90,
              projected: bool = False) -> Resources:
    """Compile one of the tuner's configs (for the mel rows, or `projected` conditioners) and read its binary."""
    with contextlib.redirect_stdout(io_buffer()):  # Triton prints a failed variant's whole PTX
        compiled = compile_variant(config, io, channels, n_mel, arch, projected)
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), cubin], capture_output=True, text=True, check=True).stdout
    registers, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
    mma = "HGMMA" if "HGMMA" in sass else "HMMA" if "HMMA" in sass else "none"
    shared = compiled.metadata.shared
    return Resources(registers, stack, shared, mma, programs_per_multiprocessor(arch, config.num_warps, registers, shared))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_resources", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(MULTIPROCESSORS), help="compute capability x 10")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"], choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--channels", type=int, default=64, help="residual channels (base config: 64)")
    parser.add_argument("--n_mel", type=int, default=100, help="mel bins (base config: 100)")
    parser.add_argument("--projected", action="store_true",
                        help="the kernel for projected conditioners (one window, room to keep them), not mel rows")
    args = parser.parse_args(argv)
    from models.vocoders.diffusion import fused

    if fused.INTERPRET:
        raise SystemExit("kernel_resources: unset TRITON_INTERPRET (the interpreter compiles nothing)")

    if fused.triton is None:
        raise SystemExit("kernel_resources: Triton is not installed (pip install triton)")
    if not 1 <= args.channels <= fused.MAX_CHANNELS or args.n_mel < 1:
        raise SystemExit(f"kernel_resources: --channels must be 1-{fused.MAX_CHANNELS} (stage 3 runs wider models with "
                         "the plain forward: their tiles exceed shared memory, and ptxas takes minutes to say so) and "
                         "--n_mel at least 1")
    print(f"sm_{args.arch}, Triton {fused.triton.__version__}, {args.channels} channels, {args.n_mel} mels"
          f"{', projected conditioners' if args.projected else ''}")
    print("family  dtype  rows  merged  warps  cap  registers  spilled B  shared KiB  mma    programs/SM")
    for family, configs in (("tuned", fused.TUNED), ("plain", fused.PLAIN)):
        for io in args.dtypes:
            for config in configs:
                head = (f"{family:7} {io:6} {config.kwargs['BLOCK_T']:4}  {config.kwargs['MERGED']!s:6}  "
                        f"{config.num_warps:5}  {config.maxnreg or '-':>3}  ")
                try:
                    r = resources(config, io, args.channels, args.n_mel, args.arch, args.projected)
                except Exception as error:  # a compiler's refusal (too many registers, too much shared memory)
                    fatal = [line for line in str(error).splitlines() if "fatal" in line or "Error" in line]
                    print(f"{head}does not compile: {(fatal or [type(error).__name__])[0].strip()}", flush=True)
                    continue
                print(f"{head}{r.registers:9}  {r.stack:9}  {r.shared / 1024:10.0f}  {r.mma:5}  {r.programs:11}",
                      flush=True)


if __name__ == "__main__":
    main()
