"""Which errors from a Triton launch mean "this GPU's compiler cannot build the fused kernel".

Only those become a KernelError, on which the automatic engine goes on with the plain forward.
Anything else (running out of memory, a CUDA fault, a mistake of ours in the arguments or the
kernel) stays what it is: converting every ValueError, RuntimeError or AssertionError silently
moved such runs onto the plain engine.
"""

from __future__ import annotations

try:
    from triton.compiler.errors import CompilationError
    from triton.runtime import errors as runtime_errors
except ImportError:  # no Triton, or one too old for the kernel (fused.py ignores it then)
    REFUSALS: tuple[type[BaseException], ...] = ()
else:  # PTXASError from Triton 3.2 on; before, ptxas failed with a RuntimeError (see PASS_FAILURES)
    REFUSALS = (CompilationError, *(getattr(runtime_errors, name) for name in ("OutOfResources", "PTXASError")
                                    if hasattr(runtime_errors, name)))

# Plain RuntimeErrors Triton raises while compiling: a failed MLIR pass (from its C++), ptxas before Triton 3.2.
PASS_FAILURES = ("PassManager::run failed", "PTX codegen error")


class KernelError(RuntimeError):
    """The fused kernel does not compile or run on this GPU (an old architecture, an old Triton)."""


def refused(error: BaseException) -> bool:
    """Whether `error`, raised by a launch, is Triton's compiler or launcher refusing the kernel on this GPU."""
    if isinstance(error, REFUSALS):
        return True
    return type(error) is RuntimeError and any(mark in str(error) for mark in PASS_FAILURES)
