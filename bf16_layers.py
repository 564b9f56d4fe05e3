"""bf16 linear layers on a CPU: prepacked where the CPU computes bf16, held in float16 for FBGEMM (x86)
or widened where it emulates it.

A linear layer computes y = x W^T for x (M, K) and W (N, K): M·N·K multiply-adds over N·K weights.
Two regimes decide how to run it fast on a CPU:

* **Few rows** (decoding: M = 1 per sequence) use each weight once. The time is the weight's bytes
  over the memory bandwidth, so bf16 (2 bytes) beats float32 (4 bytes), whoever does the arithmetic.
* **Many rows** (a prompt: M = 512) use each weight M times. The time is the arithmetic, and that
  depends on whether the CPU has bf16 instructions.

Where it has them (AVX-512 BF16, AMX: Sapphire Rapids, Zen 4 and later; BF16 on arm64) oneDNN
multiplies bf16 natively, and `PackedLinear` lays the weight out in oneDNN's tiles once, at load,
for eager and compiled steps alike (compiled, through an operator Inductor does not look into).

Where it has not, the kernel wanted reads each 16-bit weight once and widens it to float32 in a
register as it multiplies, so that any number of rows costs one pass over bf16's bytes. PyTorch
has that kernel for float16 weights, not bf16 ones: FBGEMM's, on x86 (`torch.ops.quantized.
linear_dynamic_fp16`, AVX2 or AVX-512 FMA). A bf16 model's weights are float16 numbers after
scaling each matrix by a power of two, so `HalfLinear` holds them so, exactly, and every row count
is multiplied in float32 at bf16's memory traffic: on a Sapphire Rapids under an Ice Lake's
instructions a batch-8 step took 0.59x the time of the widened layers below, one row 0.88x.

Without FBGEMM (arm64 CPUs without BF16, an x86 PyTorch built without it; until 2026-12-05 every
CPU without native bf16), a bf16 matmul is *emulated*: both operands are widened to float32 as
they are read, and multiplied in float32. With AVX-512 (Ice Lake, Skylake-SP) oneDNN emulates it, at about
a float32 matmul's speed for one row and slower from a few rows on; with AVX2 only (Zen 2 and 3,
Alder Lake) PyTorch hands bf16 matmuls not to oneDNN but to its own loops, which pay for every row
again. Many rows are then 2-4x slower than a float32 matmul. So `WidenedLinear` keeps the weight
in bf16 (half of float32's memory), multiplies one row or a few in bf16, as F.linear does, and from
`widen_from_rows` rows on widens the weight to float32 a chunk at a time and multiplies in float32:

    y = x (float32)  @  widen(W[chunk])^T  (float32),   chunk by chunk of output rows,

then rounds y to bf16. The product is float32's, slightly more exact than bf16's, at float32's
speed; the memory is bf16's plus one chunk. Who multiplies the widened chunk is chosen too: where
PyTorch runs bf16 in its own loops (x86 with AVX2 only), oneDNN's float32 matmul, which took 0.66-0.94x
the time of PyTorch's usual one (MKL's) for 6-64 rows on a Zen 3 (`onednn_linear`); for a batch of 8,
16 or 24 rows it multiplies the transposed product, W x^T, whose columns are then x's rows, a whole
number of AVX2 registers (`onednn_linear_transposed`). The same loop, chunk by chunk, multiplies
quantized layers' prompts by their dequantized weight (`chunked_linear`, quantize.py).

Shape legend: M rows of x, K input features, N output features (rows of W), n rows of a chunk.
"""

import itertools
import math
import platform
import weakref
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cpu import CpuFeatures, float_matmul_dtype

# From how many rows of x a widened layer multiplies in float32, whoever emulates its bf16 matmuls.
# Measured on the demo's layers (docs/benchmarks.md). oneDNN's emulation (AVX-512 without BF16: Intel's
# Skylake-SP to Ice Lake), on a Sapphire Rapids under an Ice Lake's instructions: widened took 0.92x
# the time at 3 rows, 0.83x at 6 and 8, 0.62x at 16, and a whole batch-8 step 0.84x, an 11-row
# speculation pass 0.82x. (On an AMD Zen 4 under the same cap the two had crossed at ~16 rows; an
# Intel core stands in better for an Ice Lake.) PyTorch's own loops (AVX2, a real Zen 3) cross at 5-6.
# So a batch of 8 and 11 draft rows are widened on both.
WIDENED_ROWS = 6
# A widened chunk holds at most this many float32 weights (8 MiB): a chunk of whole rows of W.
WIDEN_CHUNK_ELEMENTS = 2 * 1024 * 1024
# For at most FEW_ROWS rows of x multiplied by F.linear (MKL), a chunk of 2 MB instead: each core's
# half stays in its L2 cache (1.25-2 MB) from its widening to its matmul, where the matmul of a few
# rows is quick and waits on memory. On a Sapphire Rapids under an Ice Lake's instructions, a token's
# 121 widened matmuls of the demo took 0.84x the time at 8 rows, 0.82x at 11, 0.92x at 16, 0.97x at
# 32, but 1.06x at 64 and 1.16x at 512 (docs/benchmarks.md). oneDNN's chunks (AVX2) stay 8 MiB: 2 MB
# ones took 1.12x the time at 8 rows on a Zen 3.
FEW_ROWS = 32
FEW_ROWS_CHUNK_ELEMENTS = 512 * 1024
# An AVX2 register holds 8 float32 numbers. With x's rows as oneDNN's columns, (W x^T)^T, a widened
# chunk's matmul took 0.87x the time of x W^T for 8 rows on a Zen 3 (a batch-8 step: 0.84-0.90x), 0.84x
# for 16, 0.95x for 24; with a register part-filled, 1.13-1.18x for 11 and 1.0x for 6; from 32 rows on
# x W^T is as fast (docs/benchmarks.md).
AVX2_FLOATS = 8
TRANSPOSED_ROWS_BELOW = 32
# The names platform.machine() gives x86 CPUs (Linux, macOS; Windows): where oneDNN's float32 matmul
# was measured against MKL's (`onednn_linear`).
X86_MACHINES = ("x86_64", "AMD64")


def bf16_linear_reaches_onednn() -> bool:
    """Whether PyTorch hands bf16 matmuls (F.linear, and Inductor's calls) to oneDNN (mkldnn) on this
    CPU. PyTorch's own test, which Inductor's freezing also asks before it packs a bf16 weight: AVX-512
    or AVX-NE-CONVERT on x86 (plain AVX2 gets PyTorch's own loops), BF16 on arm64; oneDNN's cap counts."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def prepacking_helps(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `PackedLinear` applies: bf16 on a CPU where PyTorch hands bf16 matmuls to oneDNN."""
    return device.type == "cpu" and dtype == torch.bfloat16 and bf16_linear_reaches_onednn()


# Every packed layer of this process (PackedLinear, HalfLinear) by its number (`key`), for the operators
# below (`packed_linear_op`, `half_columns_op`), which compiled steps call with the number: a packed
# weight is opaque, so a graph cannot take it as an input.
# Weak references: a layer goes when its model does.
PACKED_LAYERS: "weakref.WeakValueDictionary[int, nn.Module]" = weakref.WeakValueDictionary()
PACKED_LAYER_KEYS = itertools.count()


class PackedLinear(nn.Module):
    """nn.Linear(K, N, bias=False) in bf16 with its weight stored in oneDNN's blocked layout.

    `F.linear` on a CPU hands the weight to oneDNN (the kernel library PyTorch uses for bf16) in
    PyTorch's row-major layout, and oneDNN rearranges it into the tiles its kernel reads, on every
    call. Rearranging it once, at load, makes a decode step's matmuls about 1.6x faster; the result
    is bit-for-bit the same.

    The packed weight is opaque: torch.compile cannot trace it. A compiled step calls the layer through
    `packed_linear_op` instead, an operator Inductor does not look into, given the layer's number
    (`key`). (Inductor's own way, "freezing", packs a copy of every weight into each graph it compiles:
    measured, +616 MB for the 270 MB demo with its one-row and batch graphs, and twice the compile time.)
    """

    # oneDNN picks its blocking for an expected number of rows of x; decoding sends one per sequence.
    EXPECTED_ROWS = 1

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight, self.EXPECTED_ROWS))
        self.key = next(PACKED_LAYER_KEYS)
        PACKED_LAYERS[self.key] = self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return onednn_linear(x, self.weight)
        rows = x.reshape(-1, self.in_features)  # (M, K)
        y = packed_linear_op(rows, self.key, self.out_features)  # (M, N)
        return y.reshape(*x.shape[:-1], self.out_features)

    def packed_product(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (M, K) @ W^T: (M, N), for `packed_linear_op`."""
        return onednn_linear(rows, self.weight)


def packed_layer_linear(rows: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    """rows (M, K) @ W^T for the PackedLinear numbered `key`: (M, out_features)."""
    return PACKED_LAYERS[key].packed_product(rows)


# The same as an operator torch.compile treats as one opaque call (as `widened_linear_op`
# below): a compiled step multiplies by the weight its layer packed at load, and holds no copy of it.
# On a Sapphire Rapids (AMX), compiled steps took 0.72x (one row) and 0.73x (8 rows) the time of the
# same steps with nn.Linear, whose weight oneDNN rearranges on every call (docs/benchmarks.md).
packed_linear_op = torch.library.custom_op(
    "llama_from_scratch::packed_linear", packed_layer_linear, mutates_args=())


@packed_linear_op.register_fake
def packed_linear_shape(rows: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    """What the operator returns, as torch.compile traces it: (M, out_features) in rows' dtype."""
    return rows.new_empty(rows.shape[0], out_features)


def bf16_is_emulated(device: torch.device, dtype: torch.dtype, features: Optional[CpuFeatures] = None) -> bool:
    """Whether bf16 weights need a layer of their own here (`HalfLinear`, else `WidenedLinear`): bf16 on
    a CPU without native bf16 (`features`, None: this CPU's)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and float_matmul_dtype(dtype, device, features) != dtype


# The float32 buffer each device's widened layers widen their weights into, shared by every layer and
# call (one forward pass at a time, as the engine runs them), rather than a fresh 8 MB tensor per
# chunk: a token's widened matmuls of 8-11 rows ~10% faster on a Zen 3 (docs/benchmarks.md).
WIDENING_BUFFERS: dict[torch.device, torch.Tensor] = {}


def widening_buffer(device: torch.device, elements: int) -> torch.Tensor:
    """At least `elements` float32 numbers of `device`'s shared widening buffer (made, or grown, once)."""
    buffer = WIDENING_BUFFERS.get(device)
    if buffer is None or buffer.numel() < elements:
        buffer = WIDENING_BUFFERS[device] = torch.empty(max(elements, WIDEN_CHUNK_ELEMENTS), device=device)
    return buffer


def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear by oneDNN, with the weight as given: plain, or packed by oneDNN (`PackedLinear`).
    For float32, PyTorch's F.linear calls MKL's matmul (sgemm) instead, which
    on a Zen 3 took 1.06-1.5x oneDNN's time for 6-64 rows of x (11 rows: 1.4x; a 512-row prompt: the
    same), on the demo's layers with the weight freshly widened (docs/benchmarks.md)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def onednn_linear_transposed(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ weight (n, K)^T computed as (weight @ x^T)^T by oneDNN: the weight's n rows become
    oneDNN's rows and x's M rows its columns, which its AVX2 kernel holds 8 floats to a register."""
    return onednn_linear(weight, x).t()  # (n, M) -> (M, n)


def chunk_multiply(rows: int, in_onednn: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Who multiplies `rows` rows of x by a widened chunk: F.linear (MKL), or, `in_onednn` (AVX2),
    oneDNN, as (W x^T)^T where x's rows fill whole AVX2 registers and are few (TRANSPOSED_ROWS_BELOW)."""
    if not in_onednn:
        return F.linear
    if rows % AVX2_FLOATS == 0 and rows < TRANSPOSED_ROWS_BELOW:
        return onednn_linear_transposed
    return onednn_linear


def widened_in_onednn(bf16_in_onednn: bool) -> bool:
    """Whether widened chunks are multiplied by `onednn_linear` rather than F.linear (MKL): where PyTorch
    runs bf16 matmuls in its own loops (not `bf16_in_onednn`: x86 with AVX2 only), as measured on a
    Zen 3. Where oneDNN emulates bf16 (AVX-512: Ice Lake), F.linear, as measured there."""
    x86 = platform.machine() in X86_MACHINES
    return x86 and not bf16_in_onednn and torch.backends.mkldnn.is_available()


def chunked_linear(rows: torch.Tensor, out_features: int, chunk_rows: int,
                   float_chunk: Callable[[int, int], torch.Tensor], dtype: torch.dtype,
                   multiply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear) -> torch.Tensor:
    """rows (M, K) @ W^T for a weight W (N, K) stored in fewer bits than the float `dtype` it is
    multiplied in, and never made float whole: `float_chunk(start, stop)` gives rows start ... stop
    of W in `dtype` (widened from bf16 here, dequantized from int8 or int4 in quantize.py), and
    `multiply` multiplies them chunk by chunk of `chunk_rows` output rows; the result in rows' dtype."""
    x = rows.to(dtype)  # (M, K)
    output = torch.empty(rows.shape[0], out_features, dtype=rows.dtype, device=rows.device)  # (M, N)
    for start in range(0, out_features, chunk_rows):
        stop = min(start + chunk_rows, out_features)
        output[:, start:stop] = multiply(x, float_chunk(start, stop))  # (M, n)
    return output


def widen_chunk_elements(rows: int, in_onednn: bool) -> int:
    """How many float32 weights a widened chunk holds at most, for `rows` rows of x multiplied by
    oneDNN (`in_onednn`) or F.linear: small chunks that stay in L2 for F.linear's few rows."""
    if not in_onednn and rows <= FEW_ROWS:
        return FEW_ROWS_CHUNK_ELEMENTS
    return WIDEN_CHUNK_ELEMENTS


def widened_linear(rows: torch.Tensor, weight: torch.Tensor, in_onednn: bool) -> torch.Tensor:
    """rows (M, K) @ weight (N, K)^T in float32, the weight widened a chunk of rows at a time into
    the shared buffer, each chunk multiplied by oneDNN (`in_onednn`) or F.linear (`chunk_multiply`);
    the result rounded to rows' dtype."""
    n_rows, in_features = weight.shape
    chunk_rows = max(1, widen_chunk_elements(rows.shape[0], in_onednn) // in_features)
    buffer = widening_buffer(rows.device, chunk_rows * in_features)

    def widened_chunk(start: int, stop: int) -> torch.Tensor:
        chunk = buffer[: (stop - start) * in_features].view(stop - start, in_features)  # (n, K)
        return chunk.copy_(weight[start:stop])  # widened: bf16 -> float32

    multiply = chunk_multiply(rows.shape[0], in_onednn)
    return chunked_linear(rows, n_rows, chunk_rows, widened_chunk, torch.float32, multiply)


# `widened_linear` as an operator that torch.compile treats as one opaque call, so that a compiled
# step widens as the eager one does: traced, the chunk loop would become hundreds of graph nodes, and
# Inductor's freezing would store each widened chunk as a float32 constant (three times the bf16
# weight's memory). Eager code calls the function itself: the operator's dispatch costs some
# microseconds a call (20-30 us here).
widened_linear_op = torch.library.custom_op(
    "llama_from_scratch::widened_linear", widened_linear, mutates_args=())


@widened_linear_op.register_fake
def widened_linear_shape(rows: torch.Tensor, weight: torch.Tensor, in_onednn: bool) -> torch.Tensor:
    """What the operator returns, as torch.compile traces it: (M, N) in rows' dtype."""
    return rows.new_empty(rows.shape[0], weight.shape[0])


class WidenedLinear(nn.Module):
    """nn.Linear(K, N, bias=False) with a bf16 weight, for a CPU without native bf16 (module docstring):
    * one row (decoding one sequence) or a few, below `widen_from_rows`: F.linear's bf16 matmul,
      oneDNN's emulation with AVX-512, PyTorch's own loops with AVX2 (compiled: Inductor calls it).
      Until 2026-12-05 one row went to PyTorch's own loops on AVX-512 too (oneDNN switched off),
      as measured on an AMD Zen 4 made to emulate bf16; on an Intel core so made, the CPUs that
      really emulate bf16 with AVX-512 being Intel's, oneDNN's emulation took 0.95x the time a
      token eager and 0.81x compiled (the demo, same process, 10 rounds: docs/benchmarks.md);
    * from `widen_from_rows` on: in float32, the weight widened a chunk at a time (`widened_linear`),
      multiplied by oneDNN where PyTorch's own loops multiply bf16 (`widened_in_onednn`; compiled:
      through `widened_linear_op`).
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # A parameter, as nn.Linear's (the few rows of an emulated bf16 matmul are Inductor's to call).
        self.weight = nn.Parameter(weight, requires_grad=False)  # (N, K) bf16
        in_onednn = prepacking_helps(weight.device, weight.dtype)  # PyTorch's test: bf16 matmuls to oneDNN
        self.widen_from_rows = WIDENED_ROWS
        self.widened_in_onednn = widened_in_onednn(in_onednn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, K)
        if rows.shape[0] < self.widen_from_rows:
            y = F.linear(rows, self.weight)  # (M, N) in bf16
        elif not torch.compiler.is_compiling():
            y = widened_linear(rows, self.weight, self.widened_in_onednn)  # (M, N)
        else:
            y = widened_linear_op(rows, self.weight, self.widened_in_onednn)
        return y.reshape(*x.shape[:-1], self.out_features)


# --------------------------------------------------------------------------------------------
# bf16 weights held in float16, for FBGEMM's float16-weight matmul
# --------------------------------------------------------------------------------------------

# float16's largest finite number, 65504: a weight scaled beyond it would be clipped.
FLOAT16_MAX = torch.finfo(torch.float16).max
# FBGEMM packs a weight from a float32 copy of the whole matrix. Packing parts of at most this many
# output rows bounds that copy (4096 x 576 floats, 9 MB, for the demo; its 49,152-row head at once took
# the load's peak RSS from ~650 MB to ~950 here; Llama 3's 128,256-row head would need 2 GB), and so
# do the checks below, a part at a time. The head's 12 parts cost 12 kernel calls a step instead of one.
PART_ROWS = 4096
# FBGEMM packs the input dimension K in blocks of 512 and pads the last block with zeros: the demo's
# K of 576 would take the memory of 1024 (1.78x; its loading peaked at 783 MB, over the 704 allowed).
# So the layer packs the first whole blocks and keeps the remaining columns (64 of 576) in float32.
FBGEMM_K_BLOCK = 512


def row_parts(weight: torch.Tensor) -> list[torch.Tensor]:
    """`weight` (N, K) as views of at most PART_ROWS rows each."""
    return list(weight.split(PART_ROWS))


def float16_columns(in_features: int) -> int:
    """P: how many of a weight's K input columns HalfLinear holds in float16 for FBGEMM (whole blocks)."""
    return in_features - in_features % FBGEMM_K_BLOCK


# The largest s for 2^s: 2^s and 2^-s both normal float32 numbers, so that scaling and unscaling are exact.
FLOAT32_MAX_SHIFT = 126


def float16_exponent(weight: torch.Tensor, columns: Optional[int] = None,
                     done_with_part: Optional[Callable[[torch.Tensor], None]] = None) -> Optional[int]:
    """The power of two, 2^s, that the first `columns` (None: all) of a bf16 `weight` (N, K) are
    multiplied by before they are stored in float16; None where some weight (of any column) is not
    finite (NaN or infinite: such a layer is not held in float16).

    A bf16 number has 8 significant bits and 8 exponent bits; float16 has 11 and 5. So every bf16
    number from 2^-17 (a little below 1e-5) up to 65504 is a float16 number exactly, and smaller
    ones keep the bits that fall on float16's smallest step, 2^-24. s = 0 where every weight
    converts exactly (all 163 million of the demo's do); else the largest s that keeps the largest
    weight within float16's range (at most FLOAT32_MAX_SHIFT): a weight then rounds only if it is
    below 2^-17-s, by at most 2^-25-s, about 2^-40 of the largest weight, far below float32's own
    rounding of the sum (2^-24 of it). One pass, a part of PART_ROWS rows at a time, each handed to
    `done_with_part` once read (the loader gives the file's pages back)."""
    columns = weight.shape[1] if columns is None else columns
    exact, largest = True, 0.0
    for part in row_parts(weight):
        as_float = part.float()  # (n, K)
        low, high = torch.aminmax(as_float)
        if not math.isfinite(torch.maximum(-low, high).item()):  # NaN or infinite if some weight is
            return None
        held = as_float[:, :columns]  # (n, P): the columns held in float16
        exact = exact and torch.equal(held.half().float(), held)
        largest = max(largest, held.abs().max().item() if columns > 0 else 0.0)
        if done_with_part is not None:
            done_with_part(part)
    if exact:
        return 0
    return min(math.floor(math.log2(FLOAT16_MAX / largest)), FLOAT32_MAX_SHIFT)


class HalfLinear(nn.Module):
    """nn.Linear(K, N, bias=False) for a bf16 weight on a CPU without native bf16, by FBGEMM.

    FBGEMM (the x86 kernel library behind PyTorch's quantized operators) has the kernel that a CPU
    without bf16 instructions needs: it multiplies float32 rows of x by a weight stored in 16 bits,
    widening each weight into a float32 register as it streams past (one `vcvtph2ps` per 8 or 16
    weights) and never writing a float32 copy. The weight's bytes are read once, as bf16's would be,
    and the arithmetic is float32's. Its 16-bit format is float16, not bf16; after scaling the matrix
    by a power of two (`float16_exponent`), every weight of a bf16 model is a float16 number but
    those far below the largest (under 2^-17-s: rounded by at most about 2^-40 of it), so the layer
    holds W·2^s in float16 in FBGEMM's packed layout, in parts of at most PART_ROWS
    output rows. FBGEMM pads K to whole blocks of FBGEMM_K_BLOCK, so only the first P columns,
    a whole number of blocks, are packed; the other K - P (the demo's 64 of 576) stay in float32:

        y = (x[:, :P] (float32) @ (W[:, :P]·2^s)^T) · 2^-s  +  x[:, P:] @ W[:, P:]^T,   rounded to x's dtype,

    which is the float32 product of the bf16 weights (the power-of-two scalings are exact). On a
    Sapphire Rapids under an Ice Lake's instructions, a token's 121 matmuls of the demo took 14 ms
    against 18 for oneDNN's emulated bf16 at one row, 22 against 46 widened at 8 rows, and the same
    as widened at 512 (docs/benchmarks.md). Memory: bf16's (2 bytes a weight), and 4 for the K - P
    columns in float32 (the demo: 1.11x bf16's). A compiled step calls FBGEMM's part through
    `half_columns_op`: the packed weight is opaque to torch.compile.
    """

    def __init__(self, weight: torch.Tensor, exponent: Optional[int] = None,
                 done_with_part: Optional[Callable[[torch.Tensor], None]] = None):
        """`exponent`: float16_exponent(weight, float16_columns(K)), where the caller has it (None:
        found here). Each part of PART_ROWS rows of `weight` is handed to `done_with_part` once held."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed_columns = float16_columns(self.in_features)  # P
        if exponent is None:
            exponent = float16_exponent(weight, self.packed_columns)
        if exponent is None:
            raise ValueError("HalfLinear: some weights are not finite (NaN or infinite); float16 cannot hold them")
        self.exponent = exponent
        # Every part packed from one float32 scratch tensor (fresh copies, freed between FBGEMM's own
        # allocations, left the heap in pieces: the demo's load peaked 170 MB higher). FBGEMM packs on
        # one thread, ~14 ns a weight: 0.9 s for the demo's 163 million.
        scratch = torch.empty(min(PART_ROWS, self.out_features), self.packed_columns)  # (n, P) float32
        rest = torch.empty(self.in_features - self.packed_columns, self.out_features)  # (K - P, N) float32
        self.packed_parts = []  # opaque FBGEMM objects, (n, P) float16 each
        first_row = 0
        for part in row_parts(weight):  # (n, K)
            rows = part.shape[0]
            if self.packed_columns > 0:
                scaled = scratch[:rows].copy_(part[:, : self.packed_columns]).mul_(2.0 ** self.exponent)  # (n, P): W·2^s, exact
                self.packed_parts.append(torch.ops.quantized.linear_prepack_fp16(scaled, None))
            rest[:, first_row : first_row + rows].copy_(part[:, self.packed_columns :].T)  # (K - P, n)
            first_row += rows
            if done_with_part is not None:
                done_with_part(part)
        self.register_buffer("rest", rest)  # (K - P, N), float32: x[:, P:] @ rest
        self.key = next(PACKED_LAYER_KEYS)
        PACKED_LAYERS[self.key] = self

    def packed_bytes(self) -> int:
        """The bytes FBGEMM holds for the packed columns: float16, 2 a weight (N and P fill its blocks)."""
        return self.out_features * self.packed_columns * torch.float16.itemsize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, K)
        y = self.packed_product(rows)  # (M, N)
        return y.reshape(*x.shape[:-1], self.out_features)

    def packed_product(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (M, K) @ W^T: (M, N) in rows' dtype, multiplied in float32."""
        x = rows.float()  # (M, K)
        if not self.packed_parts:  # K below one block: all of it in float32
            return (x @ self.rest).to(rows.dtype)
        x_packed = x[:, : self.packed_columns].contiguous()  # (M, P)
        if torch.compiler.is_compiling():
            # The packed weight is opaque to torch.compile: FBGEMM's product goes through an operator,
            # and the rest of this function stays in the graph, where Inductor fuses the casts into
            # its kernels before and after (a batch-8 step 0.95x the time, one row 0.97x, against the
            # whole function in the operator, under an Ice Lake's instructions; docs/benchmarks.md).
            y = half_columns_op(x_packed, self.key, self.out_features)  # (M, N) float32
        else:
            y = self.packed_columns_product(x_packed)  # (M, N) float32
        if self.rest.shape[0] > 0:
            y = y.addmm_(x[:, self.packed_columns :], self.rest)  # + x[:, P:] @ W[:, P:]^T
        return y.to(rows.dtype)

    def packed_columns_product(self, x_packed: torch.Tensor) -> torch.Tensor:
        """x[:, :P] (M, P) in float32 @ W[:, :P]^T: (M, N) in float32, by FBGEMM, part by part."""
        parts = [torch.ops.quantized.linear_dynamic_fp16(x_packed, packed) for packed in self.packed_parts]  # (M, n) each
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # (M, N) float32
        if self.exponent != 0:
            y = y.mul_(2.0 ** -self.exponent)  # undo the weight's scaling: exact
        return y


def half_columns(x_packed: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    """x_packed (M, P) float32 @ W[:, :P]^T for the HalfLinear numbered `key`: (M, out_features) float32."""
    return PACKED_LAYERS[key].packed_columns_product(x_packed)


# FBGEMM's part of a HalfLinear's product as one opaque call in a compiled step (as `packed_linear_op`).
half_columns_op = torch.library.custom_op("llama_from_scratch::half_columns", half_columns, mutates_args=())


@half_columns_op.register_fake
def half_columns_shape(x_packed: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    """What the operator returns, as torch.compile traces it: (M, out_features) in float32."""
    return x_packed.new_empty(x_packed.shape[0], out_features)
