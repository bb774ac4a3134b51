"""A CPU kernel that multiplies by a quantized weight straight from its packed codes.

``QuantLinear`` used to dequantize its whole weight on every call, which made a packed model
slower than the float one. For the few-token calls of decoding, ``packed_matmul`` computes
``x @ dequantize(q).T`` from the stored bytes themselves (the ``packing.py`` layout, fp16
scales and zero points): per row it walks the row's groups, decodes one group's codes into a
small float buffer and takes dot products with the inputs,

    y[t, n] = sum over groups g of row n:  s_g * (sum_k code_k * x[t, k]  -  offset_g * sum_k x[t, k])

so nothing larger than one group is ever expanded and the weight stays at its stored bits in
memory. Groups are consecutive row-major elements (they may straddle rows; the kernel follows
them). The sums run in float32 in another order than ``F.linear`` on the dequantized weight,
so results agree to float32 rounding, not bit for bit.

Why C and not torch: measured on this project's 2-core AVX2 machine (torch 2.13),
``torch.ops.aten._weight_int4pack_mm_for_cpu`` was 17x slower than a float32 ``F.linear`` for
one token in float32 and still about 2x slower in bfloat16, and torch's int8 kernel only takes
one scale per row. The kernel (``packed_kernel.c`` beside this module) is compiled once with the system C compiler
(``cc -O3 -fopenmp``) into the workbench cache and loaded with ``ctypes``; where no compiler
works, ``available()`` is False and ``QuantLinear`` keeps the pure-torch path.

Integer formats of every width the workbench stores (2, 3, 4, 5, 6 and 8 bits; symmetric or not,
fp16 or double-quantized scales) are supported, and fp16 pass-through (a tied LM head kept in
fp16: converting the whole weight to float32 on every token made such packages decode at half
speed); mixed formats (a masked high-precision subset) are not (``supports`` says which). 5- and 6-bit codes straddle bytes, as 3-bit
ones do: their chunks (8 codes in 5 bytes, 4 in 3) are read whole. Double-quantized scales
(``scale_bits``) are decoded once into a float32 buffer (``quant.scales_of``, 32 bits a group in
memory) that the kernel reads instead of the fp16 scales: their exact values, which fp16 cannot hold.
Lookup-table formats (``w{b}-g{G}-lut``, ``uqcit.tensor.lut``) pass their table to the same loop:
the table's ``2**b`` levels are decoded to floats once per call and each code is looked up,
``y[t, n] = sum over groups g: s_g * sum_k table[code_k] * x[t, k]``; it reads codes at any
alignment, without the phase layout. Vector codebook formats (``w{b}-g{G}-vq{d}``, ``uqcit.tensor.vq``)
have a loop of their own (``uq_matmul_vq``, portable C): per vector one ``d * b``-bit code picks a point
of the codebook (decoded to floats once per call), whose ``d`` coordinates meet the next ``d`` inputs,
``y[t, n] = sum over groups g: s_g * sum over vectors: sum_j point[code][j] * x[t, k + j]``. Measured
for one token on a 576 x 1536 weight, one thread: 0.3-0.4 ms (w2-g64-lut's vector loop: 0.09 ms;
dequantizing and ``F.linear``: 2-5 ms).

With AVX2 the common layouts run a whole row at a time: 8 codes are decoded into one vector (2-4-bit
codes from a chunk of ``bits`` bytes, table levels picked with a permute), each group's products and
input sums stay in vector registers, scaled into a row total there, and one horizontal sum ends the
row. Summing each group horizontally, as the generic loop does, cost as much as the products at
groups of 24-64 (``benchmarks/kernel_speed.py`` measures every format against float32).

>>> import torch
>>> from uqcit.tensor.formats import QuantFormat
>>> from uqcit.tensor.quant import quantize, dequantize
>>> q = quantize(torch.randn(48, 80), QuantFormat(bits=4, group_size=32))
>>> x = torch.randn(2, 80)
>>> not available() or torch.allclose(packed_matmul(x, q), x @ dequantize(q).T, atol=1e-4)
True
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from uqcit.core.io import atomic_write_with
from uqcit.core.paths import home
from uqcit.tensor.formats import FLOAT_BITS
from uqcit.tensor.quant import QuantizedTensor, scales_of, zero_points

_C_FILE = Path(__file__).with_name("packed_kernel.c")  # the kernel's C source, shipped as package data

_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None
_ERROR: str | None = None
ENV_DISABLE = "UQCIT_NO_KERNEL"  # set to 1 to force the pure-torch path (for comparisons)
KERNEL_BITS = (2, 3, 4, 5, 6, 8)  # the code widths seg_dot has a branch for (all of formats.INT_BITS)


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler (cc/gcc) on PATH")
    # Reassociation lets the compiler vectorize the dot products; -ffast-math is avoided on
    # purpose (it may flush denormals process-wide when the library loads).
    flags = ["-O3", "-march=native", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
             "-fopenmp", "-fPIC", "-shared"]
    source = _C_FILE.read_text()
    key = hashlib.sha256((source + " ".join(flags) + cc).encode()).hexdigest()[:16]
    folder = home() / "kernels"
    folder.mkdir(parents=True, exist_ok=True)
    lib_path = folder / f"uq_packed_{key}.so"
    if not lib_path.is_file():
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            src = Path(tmp) / "uq_packed.c"
            src.write_text(source)

            def compile_to(out: Path) -> None:
                proc = subprocess.run([cc, *flags, str(src), "-o", str(out)], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise OSError(f"{cc} failed to build the packed kernel: {proc.stderr.strip()[:500]}")

            # Atomic: a concurrent build never sees half a library. 0o755, as the linker writes it.
            atomic_write_with(lib_path, compile_to, mode=0o755)
    lib = ctypes.CDLL(str(lib_path))
    lib.uq_init.restype = None
    lib.uq_init()
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.uq_matmul.argtypes = [p, ctypes.c_int, p, p, p, ctypes.c_float, p, i64, i64, i64, p, ctypes.c_int, i64, p,
                              ctypes.c_int]
    lib.uq_matmul.restype = ctypes.c_int
    lib.uq_matmul_f16.argtypes = [p, i64, i64, p, i64, p, ctypes.c_int]
    lib.uq_matmul_f16.restype = ctypes.c_int
    lib.uq_matmul_vq.argtypes = [p, ctypes.c_int, ctypes.c_int, p, p, i64, i64, i64, p, i64, p, ctypes.c_int]
    lib.uq_matmul_vq.restype = ctypes.c_int
    return lib


def _lib() -> ctypes.CDLL | None:
    global _LIB, _ERROR
    if _LIB is not None or _ERROR is not None:
        return _LIB
    with _LOCK:
        if _LIB is None and _ERROR is None:
            try:
                _LIB = _build()
            except OSError as exc:  # no compiler, or it failed: the torch path still works
                _ERROR = str(exc)
    return _LIB


def available() -> bool:
    """Whether the compiled kernel can be used here (builds it on first call, ~1 s)."""
    if os.environ.get(ENV_DISABLE, "") not in ("", "0"):
        return False
    return _lib() is not None


def unavailable_reason() -> str | None:
    """Why ``available()`` is False (None when it is True)."""
    if os.environ.get(ENV_DISABLE, "") not in ("", "0"):
        return f"disabled by ${ENV_DISABLE}"
    return None if _lib() is not None else _ERROR


def supports(q: QuantizedTensor) -> bool:
    """Whether ``packed_matmul`` handles ``q``'s format (plain integer, lookup-table, vector codebook and
    fp16 pass-through formats, on CPU)."""
    return (q.fmt.bits in KERNEL_BITS + (FLOAT_BITS,) and not q.fmt.mixed and len(q.shape) == 2
            and q.device.type == "cpu")


class PackedKernel:
    """``packed_matmul`` for one tensor with its arguments prepared once (for ``QuantLinear``).

    Holds raw pointers into ``q``'s tensors, so it must be rebuilt whenever they move or are
    replaced (``QuantLinear`` drops it on ``.to()`` and ``load_state_dict``); it keeps ``q``
    alive meanwhile.
    """

    def __init__(self, q: QuantizedTensor):
        lib = _lib()
        if lib is None:
            raise RuntimeError(f"the packed kernel is unavailable: {_ERROR}")
        if not supports(q):
            widths = "/".join(map(str, KERNEL_BITS))
            raise ValueError(f"the packed kernel handles plain {widths}-bit and fp16 CPU tensors, "
                             f"not {q.fmt.name} on {q.device}")
        fmt, t = q.fmt, q.tensors
        self.q = q
        self.out_features, self.in_features = q.shape
        self._fn = lib.uq_matmul
        if fmt.bits == FLOAT_BITS:  # fp16 pass-through: its own loop, no groups
            self._fn = lib.uq_matmul_f16
            self._head = (t["values"].data_ptr(), self.out_features, self.in_features)
            self._phased = None
            return
        if fmt.vq:  # one code per vector into a codebook: its own loop
            self._fn = lib.uq_matmul_vq
            self._head = (t["codes"].data_ptr(), fmt.vq * fmt.bits, fmt.vq, t["scales"].data_ptr(),
                          t["table"].data_ptr(), self.out_features, self.in_features, fmt.group_size)
            self._phased = None
            return
        if fmt.lut:  # table lookups at any alignment: no phase layout, no offsets
            self._head = (t["codes"].data_ptr(), fmt.bits, t["scales"].data_ptr(), None, None, 0.0,
                          t["table"].data_ptr(), self.out_features, self.in_features, fmt.group_size)
            self._phased = 0
            return
        per = 8 // (fmt.bits & -fmt.bits)  # codes per packed chunk, lcm(bits, 8) / bits (as the C code)
        # The phase layout (packed_kernel.c) needs every row and group to start on a chunk boundary.
        phased = self.in_features % per == 0 and fmt.group_size % per == 0
        scales16 = scales32 = None
        if fmt.scale_bits is None:
            scales16 = t["scales"].data_ptr()
        else:  # decoded once; c * super needs more digits than fp16 has
            self._scales32 = scales_of(q).contiguous()
            scales32 = self._scales32.data_ptr()
        zeros = None
        if not fmt.symmetric:
            # The kernel reads fp16 zero points; packed integer ones are widened once here.
            self._zeros = t["zeros"] if not fmt.int_zeros else zero_points(q).to(torch.float16)
            zeros = self._zeros.data_ptr()
        self._head = (t["codes"].data_ptr(), fmt.bits, scales16, scales32, zeros,
                      float(1 << (fmt.bits - 1)), None, self.out_features, self.in_features, fmt.group_size)
        self._phased = int(phased)

    def __reduce__(self):  # copies and pickles rebuild from the tensors, never copy raw pointers
        return (PackedKernel, (self.q,))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ dequantize(q).T`` for float32 CPU ``x`` of shape ``[..., in]``; float32 ``[..., out]``."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features, the weight {self.q.shape} expects {self.in_features}")
        xs = x.reshape(-1, self.in_features)
        if xs.dtype != torch.float32 or not xs.is_contiguous():
            xs = xs.to(torch.float32).contiguous()
        rows = xs.shape[0]
        y = torch.empty(x.shape[:-1] + (self.out_features,), dtype=torch.float32)
        phased = () if self._phased is None else (self._phased,)
        if self._fn(*self._head, xs.data_ptr(), *phased, rows, y.data_ptr(), torch.get_num_threads()):
            raise MemoryError(f"packed kernel: no memory for a [{rows}, {self.in_features}] input copy "
                              "(vq: for its decoded codebook)")
        return y


def packed_matmul(x: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """``x @ dequantize(q).T`` computed from ``q``'s packed codes; ``x`` is ``[..., in]``.

    Returns float32 ``[..., out]``. Meant for few rows of ``x`` (decoding): each row costs one
    pass over the codes, so for long prompts dequantizing once and calling ``F.linear`` is faster.
    """
    return PackedKernel(q)(x)
