"""DiffWave's denoiser as one fused Triton kernel per residual layer (inference, CUDA).

A residual layer reads its 64-channel input three times (the dilated taps), the upsampled mel
once, and writes its output and the running skip sum once; the 128-channel intermediates (taps
plus conditioner, gate, output projection) stay on chip. Activations are channels-last
(B, T, C); the step bias, the length mask and the zero padding are applied as the taps are
loaded, exactly as `ResidualBlock.forward` does. Inputs and outputs are fp32, bf16 or fp16;
every dot product accumulates in fp32, the skip sum is kept in fp32 (or, to measure what that costs,
`skip_dtype`).

Triton is optional (the `gpu` extra). Under `TRITON_INTERPRET=1` the kernel runs on the CPU
for tests; that interpreter mis-handles bf16 dot products, so there the already-rounded
operands are widened to fp32 before each dot, which gives the same numbers up to summation order.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from models.vocoders.diffusion.diffwave.diffwave import DiffWave
from models.vocoders.diffusion.kernel_errors import KernelError, refused

try:
    import triton
    import triton.language as tl
except ImportError:  # the gpu extra is not installed
    triton = None


def triton_major(version: str) -> int:
    """Triton's major version (0 where unreadable)."""
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


if triton is not None and triton_major(triton.__version__) < 3:  # torch 2.1-2.3 bring Triton 2.x: no maxnreg, older
    triton = None  # language; the plain forward runs (the gpu extra asks for triton>=3.0)

INTERPRET = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on")  # as Triton reads it
MAX_CHANNELS = 128
log = logging.getLogger(__name__)
_fallen_back: set[tuple[str, bool]] = set()  # (I/O dtype, projected) whose tuned variants did not compile: "plain"


def _run(family: str, grid: Any, args: tuple, meta: dict) -> None:
    """Launch; Triton's refusal to build the kernel on this GPU becomes a KernelError (see kernel_errors)."""
    try:
        KERNELS[family][grid](*args, **meta)
    except Exception as error:
        if not refused(error):
            raise
        first = str(error).splitlines()[0] if str(error) else ""
        raise KernelError(f"the fused kernel failed on this GPU ({type(error).__name__}: {first})") from error


def size_class(samples: int) -> int:
    """Short and long inputs (batch x samples) are tuned apart."""
    return int(samples >= 1 << 18)


def available(device: torch.device) -> bool:
    """Whether the fused kernel can run on `device` (CUDA with Triton, or any device under the interpreter)."""
    return triton is not None and (device.type == "cuda" or (INTERPRET and device.type == "cpu"))


def tensor_core_dots(device: torch.device) -> bool:
    """Whether Triton's dot products use this GPU's tensor cores: from Ampere (8.0) on. Before it Triton 3 lowers them
    to scalar FMAs: compiled for a T4 (sm_75), every tuned variant lost its matrix instructions and spilled 3-9 KB a
    thread (`python -m benchmarks.kernel_resources --arch 75`), where cuDNN still has tensor cores for the plain
    forward."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def too_wide(model: DiffWave, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> str | None:
    """Why the kernel cannot run this model, if it cannot: past 128 residual channels no variant's tiles fit in a
    multiprocessor's shared memory, and ptxas takes minutes to say so (docs/benchmarks.md). On a CUDA `device`, one
    dot's weights (the padded channels by twice them, in the I/O `dtype`) must also fit in the shared memory a block
    may take there: 128 channels in fp32 take 128 KiB, where GPUs of compute capability 7.5, 8.6, 8.9 and 12.x offer
    64-99 KiB (compiled for sm_86, every variant asked for 145-161 KiB: `python -m benchmarks.kernel_resources --arch 86
    --dtypes fp32 --channels 128`), and each variant failed only at its launch, after its compilation."""
    channels = model.residual_layers[0].dilated_conv.in_channels
    if channels > MAX_CHANNELS:
        return f"the fused kernel takes at most {MAX_CHANNELS} residual channels; this model has {channels}"
    if device is None or device.type != "cuda":
        return None
    properties = torch.cuda.get_device_properties(device)
    offered = getattr(properties, "shared_memory_per_block_optin", None)  # a torch without it: not checked
    weights = _padded(channels) * 2 * _padded(channels) * dtype.itemsize
    if offered is None or weights < offered:
        return None
    than = "more than" if weights > offered else "all of"  # the kernel's other tiles need room besides
    half = " (16-bit precisions take half)" if dtype.itemsize > 2 else ""  # no help where 16 bits do not fit either
    return (f"a model of {channels} residual channels in {str(dtype).removeprefix('torch.')} needs {weights // 1024} KiB "
            f"of shared memory a block for one dot's weights, {than} the {offered // 1024} KiB {properties.name} "
            f"offers{half}")


def family(dtype: torch.dtype, projected: bool) -> str:
    """Which of KERNELS runs this I/O dtype and conditioner kind: "tuned", or "plain" once a tuned variant failed
    to compile for them (a GPU may reject one precision, e.g. bf16 before Ampere, and run the others tuned)."""
    return "plain" if (str(dtype), projected) in _fallen_back else "tuned"


def kernel_in_use(dtype: torch.dtype, projected: bool) -> str:
    """Which kernel family runs and the configuration its tuner chose last (for benchmark reports)."""
    name = family(dtype, projected)
    tuner = KERNELS[name] if triton is not None else None
    return f"{name} {getattr(tuner, 'best_config', None)}"


def _padded(n: int) -> int:
    """tl.dot needs power-of-two blocks of at least 16."""
    return max(16, 1 << (int(n) - 1).bit_length())


def mel_row(n_mel: int) -> int:
    """The upsampled mel's row length in memory: zero-padded to a multiple of 16 bins, so that the kernel's mask
    is constant over 16 columns and its loads are 16-byte vectors (100 bins in rows of 100 were read 2 bytes at a
    time); 12% more bytes of conditioner at 100 bins, none at 80 or 128."""
    return -(-int(n_mel) // 16) * 16


def projected_row(channels: int) -> int:
    """A projected conditioner's row: a layer's 2 x channels (padded for tl.dot), interleaved as its accumulator."""
    return 2 * _padded(channels)


def kernel_constants(channels: int, n_mel: int, widen: bool, projected: bool = False) -> dict:
    """The kernel's compile-time shapes: channels padded for tl.dot; the mel row (a multiple of 16) as dots over
    power-of-two chunks that cover it exactly, 64 bins at most: W64 of 64, then one of 32 and one of 16 where
    needed (100 mels: 64 + 32 + 16 = 112, where a power-of-two padding multiplied 128 zero-padded bins).
    PROJECTED: the conditioner comes projected (`FusedDiffWave.projected`), and there are no mel dots."""
    row = mel_row(n_mel)
    return {"CP": _padded(channels), "W64": row // 64, "W32": row % 64 // 32, "W16": row % 32 // 16, "WIDEN": widen,
            "PROJECTED": projected}


if triton is not None:

    def _config(block: int, merged: bool, warps: int, registers: int | None = None) -> triton.Config:
        """`registers` caps each thread's registers, so that more programs share a multiprocessor."""
        return triton.Config({"BLOCK_T": block, "MERGED": merged}, num_warps=warps, num_stages=1,  # no loop to pipeline
                             maxnreg=registers)

    def pinned(config: triton.Config) -> dict:
        """A tuner's variant as `FusedDiffWave`'s `config`, which runs it without tuning."""
        return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages,
                "maxnreg": config.maxnreg}

    # Tried in turn on a new shape; MERGED does the gate/filter and residual/skip halves as one N = 2C dot each.
    # `python -m benchmarks.kernel_resources` compiles them for Hopper on any machine: with Triton 3.6, 164-168
    # registers a thread at 64 rows and 4 warps, no spills, 3 programs a multiprocessor (the kernel before the
    # in-place accumulators: 255 and 160 spilled bytes, 2). On an H200 the 168 cap won in 16 bits (4.46 ms a 10 s
    # step against 4.64 uncapped); the others lost there but have no spills on sm_80/89, and the split dots (30 ms)
    # stay only as the fallback. (Programs that looped over several row tiles, reusing the weights and pipelining
    # the loads, never won on an H200, and the one wrong result a GPU test showed came from one of them: removed.)
    # Two variants made illegal memory accesses on an H200 (run 8, Triton of torch 2.11) with the mel dots (the
    # conditioner not projected), each pinned in a process of its own: 128 rows on 4 warps (255 registers) in fp16,
    # 64 rows on 8 warps capped at 128 registers in fp32. The tuner tries every variant, so either crashed stage 3
    # wherever the mel dots ran: removed. The four left ran there pinned, with the mel dots, in fp16 and fp32.
    TUNED = [_config(64, True, 4), _config(64, True, 4, 168), _config(128, True, 8), _config(32, True, 4)]
    # The split-dot variants: what the first GPU measurements ran; kept as the fallback.
    PLAIN = [_config(32, False, 4), _config(64, False, 4), _config(128, False, 4), _config(128, False, 8)]

    @triton.jit
    def _tap(x_base, shift, t, c, cm, length, C, DOT: tl.constexpr):
        """One dilated tap: (x + step bias) where 0 <= t < length, zero elsewhere (padding and mask)."""
        ok = (t >= 0) & (t < length)
        x = tl.load(x_base + t[:, None] * C + c[None, :], mask=ok[:, None] & cm[None, :], other=0.0)
        return tl.where(ok[:, None], x.to(tl.float32) + shift[None, :], 0.0).to(x_base.dtype.element_ty).to(DOT)

    @triton.jit
    def _zeros(rows: tl.constexpr, CP: tl.constexpr, MERGED: tl.constexpr):
        """The fp32 accumulator of a (rows, 2 CP) product: one interleaved tile, or its two halves apart."""
        if MERGED:
            return tl.zeros((rows, 2 * CP), dtype=tl.float32)
        else:
            return tl.zeros((rows, CP), dtype=tl.float32), tl.zeros((rows, CP), dtype=tl.float32)

    @triton.jit
    def _project(y, w_ptr, rows, c, acc, CP: tl.constexpr, MERGED: tl.constexpr, DOT: tl.constexpr):
        """acc + y @ W for a (rows, 2 CP) weight whose columns interleave two halves. The tensor cores add into
        the accumulator in place: a separate sum per tap held a second copy and spilled registers."""
        if MERGED:
            n = tl.arange(0, 2 * CP)
            return tl.dot(y, tl.load(w_ptr + rows[:, None] * (2 * CP) + n[None, :]).to(DOT), acc)
        else:
            first, second = acc
            first = tl.dot(y, tl.load(w_ptr + rows[:, None] * (2 * CP) + 2 * c[None, :]).to(DOT), first)
            second = tl.dot(y, tl.load(w_ptr + rows[:, None] * (2 * CP) + 2 * c[None, :] + 1).to(DOT), second)
            return first, second

    @triton.jit
    def _condition(cond_base, w_cond_ptr, first, t, inside, M, c, acc, SIZE: tl.constexpr, CP: tl.constexpr,
                   MERGED: tl.constexpr, DOT: tl.constexpr):
        """acc + the conditioner's bins [first, first + SIZE) @ their weight rows; the row is padded, so only the
        rows past the input's end are masked (16-byte vector loads)."""
        m = first + tl.arange(0, SIZE)
        cond = tl.load(cond_base + t[:, None] * M + m[None, :], mask=inside[:, None], other=0.0).to(DOT)
        return _project(cond, w_cond_ptr, m, c, acc, CP, MERGED, DOT)

    @triton.jit
    def _projected(cond_base, t, inside, c, M, CP: tl.constexpr, MERGED: tl.constexpr):
        """The accumulator's start where the conditioner comes projected: this layer's rows of 2 CP columns,
        interleaved as the accumulator's."""
        if MERGED:
            n = tl.arange(0, 2 * CP)
            return tl.load(cond_base + t[:, None] * M + n[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
        else:
            row = cond_base + t[:, None] * M + 2 * c[None, :]
            return (tl.load(row, mask=inside[:, None], other=0.0).to(tl.float32),
                    tl.load(row + 1, mask=inside[:, None], other=0.0).to(tl.float32))

    @triton.jit
    def _halves(acc, bias_ptr, c, CP: tl.constexpr, MERGED: tl.constexpr):
        """The accumulator plus its (interleaved) bias, as its two halves."""
        if MERGED:
            n = tl.arange(0, 2 * CP)
            first, second = tl.split(tl.reshape(acc + tl.load(bias_ptr + n)[None, :], (acc.shape[0], CP, 2)))
        else:
            first, second = acc
            first += tl.load(bias_ptr + 2 * c)[None, :]
            second += tl.load(bias_ptr + 2 * c + 1)[None, :]
        return first, second

    @triton.jit
    def _residual_layer(
        x_ptr, cond_ptr, skip_ptr, out_ptr, shift_ptr, len_ptr, w_tap_ptr, w_cond_ptr, w_out_ptr, b_in_ptr, b_out_ptr,
        T, C, M, dilation, shift_stride, size_class,
        CP: tl.constexpr, W64: tl.constexpr, W32: tl.constexpr, W16: tl.constexpr, BLOCK_T: tl.constexpr,
        MERGED: tl.constexpr, WIDEN: tl.constexpr, PROJECTED: tl.constexpr,
    ):
        b = tl.program_id(1)
        c = tl.arange(0, CP)
        cm = c < C
        io = x_ptr.dtype.element_ty
        DOT = tl.float32 if WIDEN else io
        length = tl.minimum(tl.load(len_ptr + b), T)  # a length past the batch's end reads no other item's rows
        shift = tl.load(shift_ptr + b * shift_stride + c, mask=cm, other=0.0)
        x_base = x_ptr + b * T * C
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cond_base = cond_ptr + b * T * M
        acc = _projected(cond_base, t, t < T, c, M, CP, MERGED) if PROJECTED else _zeros(BLOCK_T, CP, MERGED)
        for k in tl.static_range(3):
            y = _tap(x_base, shift, t + (k - 1) * dilation, c, cm, length, C, DOT)
            acc = _project(y, w_tap_ptr + k * CP * 2 * CP, c, c, acc, CP, MERGED, DOT)
        inside = t < T
        if not PROJECTED:
            for j in tl.static_range(W64):  # chunks: a (128, 2 CP) weight tile took 32 KiB of shared memory
                acc = _condition(cond_base, w_cond_ptr, j * 64, t, inside, M, c, acc, 64, CP, MERGED, DOT)
            if W32:
                acc = _condition(cond_base, w_cond_ptr, W64 * 64, t, inside, M, c, acc, 32, CP, MERGED, DOT)
            if W16:
                acc = _condition(cond_base, w_cond_ptr, W64 * 64 + W32 * 32, t, inside, M, c, acc, 16, CP, MERGED, DOT)
        gate, filt = _halves(acc, b_in_ptr, c, CP, MERGED)
        z = (tl.sigmoid(gate) * (2.0 * tl.sigmoid(2.0 * filt) - 1.0)).to(io).to(DOT)
        out = _project(z, w_out_ptr, c, c, _zeros(BLOCK_T, CP, MERGED), CP, MERGED, DOT)
        residual, skip = _halves(out, b_out_ptr, c, CP, MERGED)
        rows = inside[:, None] & cm[None, :]
        offsets = b * T * C + t[:, None] * C + c[None, :]
        x = tl.load(x_ptr + offsets, mask=rows, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, ((x + residual) * 0.7071067811865476).to(io), mask=rows)  # / sqrt 2
        total = tl.load(skip_ptr + offsets, mask=rows, other=0.0).to(tl.float32)
        tl.store(skip_ptr + offsets, (total + skip).to(skip_ptr.dtype.element_ty), mask=rows)

    def _tuner(configs: list) -> triton.runtime.Autotuner:
        """Tuned once per key (shapes, size class, projected or not: up to 4 runs a model and precision, about 20 s
        each on an H200); Triton 3.2+ keeps the winners on disk, so a later process starts without them."""
        if INTERPRET:
            configs = [_config(32, True, 4)]
        on_disk = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
        return triton.autotune(configs=configs, key=["C", "M", "CP", "size_class", "PROJECTED"], restore_value=["skip_ptr"],
                               **on_disk)(_residual_layer)

    KERNELS = {"tuned": _tuner(TUNED), "plain": _tuner(PLAIN)}


class FusedDiffWave:
    """`window(audio, step, cond, lengths)`: the DiffWave noise prediction with fused residual layers.

    `cond` is the upsampled mel, channels-last (B, T, mel_row) in `dtype` (see `conditioner`), or every layer's
    projection of it (see `projected`); either is computed once per utterance and reused at every denoising step.
    """

    def __init__(self, model: DiffWave, dtype: torch.dtype = torch.float32, config: dict | None = None,
                 skip_dtype: torch.dtype = torch.float32) -> None:
        """`config` ({"BLOCK_T", "MERGED"}, optional "num_warps", "num_stages", "maxnreg") skips the tuning.
        `skip_dtype` other than fp32 is for the GPU suite: a 16-bit skip sum halves 52% of the bytes a layer moves,
        at a larger rounding error (`python -m benchmarks.rounding`)."""
        if triton is None:
            raise RuntimeError("the fused kernel needs Triton: pip install triton (the gpu extra)")
        self.model, self.dtype, self.config, self.skip_dtype = model, dtype, config, skip_dtype
        layers = list(model.residual_layers)
        self.dilations = [layer.dilated_conv.dilation[0] for layer in layers]
        self.channels = layers[0].dilated_conv.in_channels
        self.n_mel = layers[0].conditioner_projection.in_channels
        self.mel_row = mel_row(self.n_mel)
        self.cp = _padded(self.channels)
        self._pack(layers)

    @torch.no_grad()
    def _pack(self, layers: list) -> None:
        """Per layer: zero-padded (in, 2 out) weights whose columns interleave the two halves, in the I/O dtype."""
        C, cp, dt = self.channels, self.cp, self.dtype

        def block(weight: Tensor, rows: int) -> Tensor:  # weight: (2C, in) -> (rows, 2 cp): column 2j, 2j + 1
            out = torch.zeros(rows, cp, 2, dtype=torch.float32, device=weight.device)
            out[: weight.shape[1], :C, 0] = weight[:C].t()
            out[: weight.shape[1], :C, 1] = weight[C:].t()
            return out.reshape(rows, 2 * cp).to(dt)

        def bias(vector: Tensor) -> Tensor:
            out = torch.zeros(cp, 2, dtype=torch.float32, device=vector.device)
            out[:C, 0], out[:C, 1] = vector[:C], vector[C:]
            return out.reshape(-1)

        self.w_tap = [torch.stack([block(layer.dilated_conv.weight[:, :, k], cp) for k in range(3)]).contiguous()
                      for layer in layers]
        self.w_cond = [block(layer.conditioner_projection.weight[:, :, 0], self.mel_row).contiguous() for layer in layers]
        self.w_out = [block(layer.output_projection.weight[:, :, 0], cp).contiguous() for layer in layers]
        self.b_in = [bias(layer.dilated_conv.bias + layer.conditioner_projection.bias) for layer in layers]
        self.b_out = [bias(layer.output_projection.bias) for layer in layers]
        self.w_step = torch.cat([layer.diffusion_projection.weight for layer in layers])
        self.b_step = torch.cat([layer.diffusion_projection.bias for layer in layers])
        self.w_skip = (self.model.skip_projection.weight[:, :, 0] / math.sqrt(len(layers))).t().contiguous()

    def _launch(self, grid: Any, args: tuple, projected: bool) -> None:
        """The tuned kernels, or the proven split-dot ones where this GPU's compiler rejects a tuned variant."""
        meta = kernel_constants(self.channels, self.n_mel, INTERPRET and self.dtype != torch.float32, projected)
        if self.config is not None:
            _residual_layer[grid](*args, **meta, **self.config)
            return
        name = family(self.dtype, projected)
        try:
            _run(name, grid, args, meta)
        except KernelError as error:
            if name == "plain":
                raise
            log.warning("fused kernel: the tuned variants failed for %s (%s); using the split-dot variant", self.dtype,
                        error.__cause__)
            _fallen_back.add((str(self.dtype), projected))
            _run("plain", grid, args, meta)

    @torch.no_grad()
    def conditioner(self, mel: Tensor, frames: Tensor | None = None) -> Tensor:
        """The upsampled mel, channels-last in the I/O dtype, its rows zero-padded to `mel_row` bins."""
        up = self.model.spectrogram_upsampler(mel.float(), frames).transpose(1, 2).to(self.dtype)
        return F.pad(up, (0, self.mel_row - self.n_mel)).contiguous()

    def projected_bytes(self, samples: int) -> int:
        """The size of `projected` for `samples` (batch x length) audio samples."""
        return len(self.dilations) * samples * projected_row(self.channels) * self.dtype.itemsize

    @torch.no_grad()
    def projected(self, cond: Tensor) -> Tensor:
        """Every layer's projection of `conditioner`'s output, (layers, B, T, 2 cp) in the I/O dtype, without its
        bias (the kernel adds it). It does not change between denoising steps: computed once (by cuBLAS), it spares
        the kernel 30% of its dot products and a third of the weights it reads, for 15 times the conditioner's
        memory (7.5 KiB a sample with the base model in 16 bits, against 224 bytes)."""
        flat = cond.reshape(-1, cond.shape[-1])
        row = projected_row(self.channels)
        out = torch.empty(len(self.w_cond), *cond.shape[:2], row, dtype=self.dtype, device=cond.device)
        for layer, weight in zip(out, self.w_cond, strict=True):
            torch.mm(flat, weight, out=layer.view(-1, row))
        return out

    @torch.no_grad()
    def __call__(self, audio: Tensor, diffusion_step: Tensor, cond: Tensor, lengths: Tensor | None = None) -> Tensor:
        m = self.model
        batch, total = audio.shape
        projected = cond.dim() == 4
        expected = ((len(self.dilations), batch, total, projected_row(self.channels)) if projected
                    else (batch, total, self.mel_row))
        if cond.shape != expected:  # a narrower one would be read past its end
            raise ValueError(f"conditioner of shape {tuple(cond.shape)}: expected {expected} "
                             "(FusedDiffWave.conditioner pads the mel rows; FusedDiffWave.projected projects them)")
        cond = cond.contiguous()  # the kernel reads dense rows (a no-op for what `conditioner` and `projected` return)
        if lengths is None:
            lengths = torch.full((batch,), total, dtype=torch.int32, device=audio.device)
        if lengths.shape != (batch,):  # the kernel reads one a batch item
            raise ValueError(f"lengths of shape {tuple(lengths.shape)} for a batch of {batch}")
        lengths = lengths.to(torch.int32)
        step = m.diffusion_embedding(diffusion_step)
        shifts = F.linear(step, self.w_step, self.b_step).float().contiguous()  # (B, L * C)
        # the input projection in two passes over the activations (computed in fp32, stored in the I/O dtype), and
        # the output tail in three: these run at every step beside the layers
        x = torch.empty(batch, total, self.channels, dtype=self.dtype, device=audio.device)
        torch.addcmul(m.input_projection.bias, audio.unsqueeze(-1), m.input_projection.weight[:, 0, 0], out=x).relu_()
        spare = torch.empty_like(x)
        skip = torch.zeros(batch, total, self.channels, dtype=self.skip_dtype, device=audio.device)

        def grid(meta: dict) -> tuple[int, int]:
            return triton.cdiv(total, meta["BLOCK_T"]), batch

        tuned_as = size_class(batch * total)
        for i, d in enumerate(self.dilations):
            layer_cond = cond[i] if projected else cond
            args = (x, layer_cond, skip, spare, shifts[:, i * self.channels :], lengths, self.w_tap[i], self.w_cond[i],
                    self.w_out[i], self.b_in[i], self.b_out[i], total, self.channels, layer_cond.shape[-1], d,
                    shifts.shape[1], tuned_as)
            self._launch(grid, args, projected)
            x, spare = spare, x
        h = torch.addmm(m.skip_projection.bias, skip.view(-1, self.channels).float(), self.w_skip).relu_()
        return F.linear(h, m.output_projection.weight[:, :, 0], m.output_projection.bias).view(batch, total)
