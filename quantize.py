"""How a linear layer is stored: plain, prepacked bf16, widened bf16, int8, int4 or w8a8. The one place that decides.

Every loader asks `linear_storage(device, dtype, quantize, needs_gradients)` which of the
storages the model's linear layers get, and builds each layer with `make_linear`:

    storage      layer            when
    PLAIN        nn.Linear        float32/float16, GPUs, and whenever gradients are needed
    PREPACKED    PackedLinear     bf16 on a CPU with native bf16 (the default there; compiled steps call
                                  it through an operator: bf16_layers.packed_linear_op)
    HALF         HalfLinear       bf16 on a CPU without native bf16 where PyTorch has FBGEMM (x86: the
                                  default there): the bf16 weights held exactly in float16, multiplied
                                  in float32 by FBGEMM; compiled steps call it as PREPACKED's
    WIDENED      WidenedLinear    bf16 on a CPU without native bf16 nor FBGEMM (arm64 before BF16): few
                                  rows in bf16, many in float32 (a layer whose weights are not all
                                  finite gets it too where HALF is chosen: FBGEMM would clip infinities)
    INT8         Int8Linear       quantize="int8"
    INT4         Int4Linear       quantize="int4" (the output head stays 8-bit: W8A8Linear where the
                                  CPU has int8 dot products, else Int8Linear: `layer_storage`)
    W8A8         W8A8Linear       quantize="w8a8": int8 weights *and* activations (CPUs with VNNI/AMX);
                                  the head and the FFN's w2 stay Int8Linear (`layer_storage`)

A new way to store weights (say, one chosen per CPU) is one more constant here, one more branch
in `linear_storage`, `make_linear` and the memory planner's `memory.linear_bytes`; no loader changes.

Why quantized layers make decoding faster. Generating one token multiplies one vector by every weight matrix of
the model: each weight is fetched from memory once and used for a single multiply-add. A CPU can do
many multiply-adds per byte it fetches, so this step waits on memory, and its time is about
(bytes of weights) / (memory bandwidth). Fewer bits per weight means fewer bytes: int8 halves
bf16's traffic, int4 quarters it. The activations stay in the model's dtype ("weight-only"
quantization); the kernels widen each weight on the fly. (gpt-fast's quantize.py uses the same two
schemes; Dettmers et al. 2022 and Frantar et al. 2022 study why weights tolerate it.)

* **int8**, symmetric, one scale per output channel (row n of W):

      s[n] = max_k |W[n, k]| / 127,    q[n, k] = round(W[n, k] / s[n]) in [-127, 127],    W ~ q * s

  Kernel: ``torch._weight_int8pack_mm(x, q, s) = x @ (q * s[:, None])^T``.

* **int4**, asymmetric, per group of G consecutive weights of a row (G = 32, llama.cpp's block
  size). Each group's [min, max] range is cut into 16 levels around its midpoint ``zero``:

      scale = (max - min) / 15,   zero = min + 8 * scale,   q = round((W - min) / scale) in [0, 15],
      W ~ (q - 8) * scale + zero

  which is the form PyTorch's kernels take: ``torch._convert_weight_to_int4pack_for_cpu`` tiles q
  into the CPU kernel's layout once, at load; ``torch._weight_int4pack_mm_for_cpu(x, packed, G,
  scales_and_zeros)`` runs per call. (On CUDA, ``_convert_weight_to_int4pack`` takes two 4-bit
  values per byte and ``_weight_int4pack_mm`` multiplies.) The int4 scheme keeps the output head in
  int8: its errors go straight into the logits, and llama.cpp's Q4 files keep it at 8 bits too.

The quantized layers hold their tensors as buffers under the linear layer's name (``wq.weight``
int8 plus ``wq.scales``), so a quantized model still has Meta's names and loads strictly.

* **w8a8**: int8 weights as above, and the *activations* quantized too, per row of x (each token on
  its own), at run time. Then the matmul itself runs on integers: CPUs with int8 dot-product
  instructions (AVX-512 VNNI, AVX-VNNI, AMX) multiply-add 8-bit numbers several times faster than
  floats, and this is how llama.cpp gets its speed on CPUs. Each row m of x gets an asymmetric
  8-bit code (uint8: the kernel's fast case is unsigned x signed):

      lo = min(0, min_k x[m, k]),  hi = max(0, max_k x[m, k]),  a[m] = (hi - lo) / 255,
      z[m] = round(-lo / a[m]),   u[m, k] = round(x[m, k] / a[m]) + z[m] in [0, 255],   x ~ (u - z) * a

  and the product, with the integer part summed exactly in int32 by ``torch._int_mm``:

      y[m, n] = a[m] * s[n] * (sum_k u[m, k] q[n, k]  -  z[m] * sum_k q[n, k])

  ``sum_k q[n, k]`` is a constant of the weight, computed once at load. (lo <= 0 <= hi makes 0 exact,
  so padding and ReLU-like zeros stay exact; Jacob et al. 2018 give the scheme, Dettmers et al. 2022
  why per-token scales matter.)

Use it while loading (``checkpoint.load_transformer(..., quantize="int8")``: each weight is
quantized as it is read, so the model never exists in full precision), or on a model already in
memory (``quantize_model(model, "int4")``).

Prompts: many rows at once. The weight-only kernels (int8, int4) are built for decoding, a few rows of x
per call: they widen each weight as they go, once per row. A prompt of M = 512 rows makes that the
slow part (5-8x slower than a float matmul on the same CPU, measured), so from `DEQUANTIZED_ROWS`
rows on, a layer widens its weight once, to floats, a chunk of output rows at a time, and calls the
float matmul (`dequantized_linear`): the same numbers up to float rounding, at float-matmul speed.

Unquantized bf16 on a CPU has layers of its own (bf16_layers.py): with native bf16, `PackedLinear`
keeps the weight in oneDNN's blocked layout (PREPACKED); where bf16 is emulated,
`HalfLinear` holds the bf16 weights in float16 for FBGEMM's float32 matmul (HALF) and, without FBGEMM,
`WidenedLinear` keeps the bf16 weight and multiplies many rows in float32 (WIDENED).

Shape legend: N output features (rows of W), K input features, G group size, M rows of x.
"""

import functools
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from bf16_layers import (HalfLinear, PackedLinear, WidenedLinear, bf16_is_emulated, chunked_linear,
                         float16_columns, float16_exponent, prepacking_helps)
from cpu import CpuFeatures, cpu_features, float_matmul_dtype

# The storages of a linear layer (see the table above). A quantization scheme's name is also the
# name of its storage.
PLAIN = "plain"  # nn.Linear, its weight in the model's dtype: the reference, and differentiable
PREPACKED = "prepacked"  # PackedLinear: bf16 in oneDNN's blocked layout (CPU)
WIDENED = "widened"  # WidenedLinear: bf16, prompts multiplied by the weight widened to float32 (CPU)
HALF = "half"  # HalfLinear: bf16 weights held in float16, multiplied in float32 by FBGEMM (x86 CPU)
INT8 = "int8"
INT4 = "int4"
W8A8 = "w8a8"
SCHEMES = (INT8, INT4, W8A8)
STORAGES = (PLAIN, PREPACKED, HALF, WIDENED, *SCHEMES)
CPU_ONLY_SCHEMES = (W8A8,)

INT8_MAX = 127  # symmetric: -127 ... 127, so that +x and -x round to opposite values
UINT8_MAX = 255  # w8a8 activations: 0 ... 255 around a per-row zero point
INT4_LEVELS = 16  # q in 0 ... 15
INT4_MIDPOINT = 8  # the kernels compute (q - 8) * scale + zero
DEFAULT_INT4_GROUP_SIZE = 32  # llama.cpp's Q4 block size; the demo model's weights come in these blocks
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what PyTorch's int4 kernels accept
INT4_ROWS_MULTIPLE = 16  # the CPU packing works on tiles of 16 output rows
# The CUDA packing splits K into tiles of 16 * inner_k_tiles (2, 4 or 8); the CPU kernel ignores it.
INT4_INNER_K_TILES = 2
# Scales of all-zero rows or groups would be 0 (and 0/0 = NaN): any tiny positive number works, as
# long as the dtype the scale is stored in holds it (1e-10 is 0 in float16, whose smallest normal
# number is 6e-5): see `min_scale`.
MIN_SCALE = 1e-10


def min_scale(dtype: torch.dtype) -> float:
    """The smallest scale stored in `dtype`: MIN_SCALE, or the dtype's smallest normal number if larger."""
    return max(MIN_SCALE, torch.finfo(dtype).tiny)
# Quantize (or dequantize) this many rows at a time: bounds the float32 working copy (Llama 3's
# 128256-row output head would need 2 GB at once). A multiple of the int4 CPU layout's 64-row blocks.
ROWS_PER_CHUNK = 4096
# From this many rows of x, a quantized layer multiplies by its dequantized weight (`dequantized_linear`)
# rather than with the weight-only kernel. Measured on 2 cores of a Xeon (Sapphire Rapids) for the
# demo model's layers: the int8 kernel costs ~25 us a row, widening the weight once ~0.5 ms, so they
# cross at ~24 rows; int4's kernel costs about as much a row, its unpacking ~1 ms. Decoding (8 rows,
# or 11 with drafts) stays on the kernels; prompts go to the float matmul. (bf16: bf16_layers.WidenedLinear.)
DEQUANTIZED_ROWS = {INT8: 32, INT4: 64}
OUTPUT_HEAD = "output"  # Meta's name of the final linear layer
# w8a8 rounds each token's activations to 256 levels. Two layers read activations where that is too
# coarse: the feed-forward's w2 (silu(w1 x) * w3 x has a few entries far larger than the rest, and
# the rest fall into a handful of levels), and the output head, whose errors go straight into the
# logits. On the demo model with every layer in w8a8, perplexity rose 2-3% over bf16 and top-1
# agreement with bf16 was 89-91%; with these two weight-only (int8 weights, float activations),
# perplexity equals bf16's within 0.5% and agreement is 92% (tests/test_quantize.py).
DOWN_PROJECTION = "feed_forward.w2"


class QuantizationError(ValueError):
    """A model or layer that cannot be quantized as asked; the message says what to do instead."""


# PyTorch's CUDA int4 kernel (`_weight_int4pack_mm`) needs Ampere (compute capability 8.0) or newer.
INT4_MIN_CUDA_CAPABILITY = (8, 0)
# torch._int_mm takes uint8 activations on a CPU from PyTorch 2.12 (before: int8 only); the rest of
# the engine runs on older releases (requirements.txt), so w8a8 alone asks for it.
W8A8_MIN_TORCH = (2, 12)


def torch_release(version: str = torch.__version__) -> tuple[int, int]:
    """(major, minor) of a torch version string such as "2.13.0+cpu"."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def check_scheme_runs_here(
    scheme: Optional[str], device: torch.device, dtype: torch.dtype, features: Optional[CpuFeatures] = None,
    cuda_capability: Optional[tuple[int, int]] = None,
) -> None:
    """Refuse a scheme this device cannot run, naming what to use instead. `features` (a CPU's) and
    `cuda_capability` (a GPU's): None asks the hardware; tests pass others."""
    if scheme == INT4 and device.type == "mps":
        raise QuantizationError("--quantize int4 has no MPS kernel in PyTorch's int4 layout here: use --quantize int8")
    if scheme == INT4 and device.type == "cuda":
        capability = cuda_capability if cuda_capability is not None else torch.cuda.get_device_capability(device)
        if tuple(capability) < INT4_MIN_CUDA_CAPABILITY:
            raise QuantizationError(
                f"--quantize int4 on CUDA needs a GPU of compute capability 8.0 (Ampere) or newer; this one is "
                f"sm{capability[0]}{capability[1]}: use --quantize int8")
        if dtype != torch.bfloat16:
            raise QuantizationError(
                f"--quantize int4 on CUDA computes in bfloat16 (PyTorch's int4 kernel takes bf16 activations and "
                f"scales), not {str(dtype).removeprefix('torch.')}: use --dtype bfloat16 (the default with int4)")
    if scheme not in CPU_ONLY_SCHEMES:
        return
    if device.type != "cpu":
        raise QuantizationError(f"--quantize {scheme} runs on CPUs only (integer matmuls with oneDNN): "
                                f"on {device.type} use --quantize int8 or int4")
    if torch_release() < W8A8_MIN_TORCH:
        raise QuantizationError(
            f"--quantize {scheme} needs PyTorch {'.'.join(map(str, W8A8_MIN_TORCH))} or newer (uint8 activations "
            f"in torch._int_mm); this is {torch.__version__}: upgrade torch, or use --quantize int8")
    features = features if features is not None else cpu_features()
    if not features.int8_dot:
        raise QuantizationError(
            f"--quantize {scheme} needs a CPU with int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or "
            f"AMX); this one ({features.name}) has none, so it would be slower than weight-only int8: use "
            f"--quantize int8")


def check_scheme(scheme: Optional[str]) -> Optional[str]:
    """None (no quantization) or one of SCHEMES; anything else is an error naming the choices."""
    if scheme is not None and scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization {scheme!r}: use one of {', '.join(SCHEMES)} (or none)")
    return scheme


def integer_matmul_runs_here(device: Union[str, torch.device], features: Optional[CpuFeatures] = None) -> bool:
    """Whether W8A8Linear's integer matmul runs (and is fast) on `device`: wherever `--quantize w8a8`
    would be accepted (`check_scheme_runs_here` holds the conditions: a CPU with int8 dot products, a
    PyTorch that takes uint8 activations). The activations' dtype does not enter into it."""
    try:
        check_scheme_runs_here(W8A8, torch.device(device), torch.float32, features)
    except QuantizationError:
        return False
    return True


# int4's output head. At 4 bits its errors go straight into the logits: on the demo model a 4-bit head
# raised perplexity 6.5% over bf16 and its top-1 agreement with bf16 fell to 83% (the tests ask for
# +3% and 90%); llama.cpp's Q4 files keep it at 8 bits too. So it keeps int8 weights. Which kernel
# multiplies them matters: the head is a third of an int4 model's bytes (49152 x 576 on the demo), and
# one decoded token through it took 2.9 ms with `torch._weight_int8pack_mm` against 1.3 ms with
# `torch._int_mm` (activations quantized per token as in w8a8; 2 cores of an AMD EPYC, Zen 4). With
# the head in w8a8 the int4 demo model's perplexity was +1.3% over bf16 and top-1 agreement 96%,
# through the decode kernels.
def layer_storage(
    module_name: str, storage: str, device: Union[str, torch.device, None] = None,
    features: Optional[CpuFeatures] = None,
) -> str:
    """The storage of one linear layer on `device` (None: where no integer matmul runs) when the
    model's is `storage`: w8a8 keeps the output head and the feed-forward's down projection in
    weight-only int8; int4 keeps the output head at 8 bits, multiplied by w8a8's integer matmul where
    that runs, else by the weight-only int8 kernel (the note above)."""
    if storage == INT4 and module_name == OUTPUT_HEAD:
        return W8A8 if device is not None and integer_matmul_runs_here(device, features) else INT8
    if storage == W8A8 and (module_name == OUTPUT_HEAD or module_name.endswith(DOWN_PROJECTION)):
        return INT8
    return storage


# --------------------------------------------------------------------------------------------
# int8: one scale per output channel
# --------------------------------------------------------------------------------------------


def quantize_int8(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """W (N, K) -> q int8 (N, K) and scales (N,) in `dtype`, with W ~ q * scales[:, None]."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=dtype, device=weight.device)
    for start in range(0, weight.shape[0], ROWS_PER_CHUNK):
        rows = weight[start : start + ROWS_PER_CHUNK].float()
        # Round the scale to its storage dtype *first*, and divide by the rounded value: q is then the
        # best integer for the scale the kernel will actually multiply by.
        row_scales = (rows.abs().amax(dim=1) / INT8_MAX).clamp(min=min_scale(dtype)).to(dtype)
        scales[start : start + ROWS_PER_CHUNK] = row_scales
        q[start : start + ROWS_PER_CHUNK] = (rows / row_scales.float()[:, None]).round().clamp(-INT8_MAX, INT8_MAX)
    return q, scales


def dequantized_linear(rows: torch.Tensor, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """rows (M, K) @ W^T for a quantized `layer`, with W dequantized to `dtype` (`layer.dequantize_rows`)
    ROWS_PER_CHUNK output rows at a time (a whole Llama 3 head at once would be a 1 GB copy), by the
    float matmul (`chunked_linear`); the result in rows' dtype. For prompts: see DEQUANTIZED_ROWS."""

    def dequantized_chunk(start: int, stop: int) -> torch.Tensor:
        return layer.dequantize_rows(start, stop, dtype)  # (n, K)

    return chunked_linear(rows, layer.out_features, ROWS_PER_CHUNK, dequantized_chunk, dtype)


class Int8Linear(nn.Module):
    """Stands in for nn.Linear(K, N, bias=False): y = x @ (q * scales)^T."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # (N, K) int8
        self.register_buffer("scales", scales)  # (N,) in the activations' dtype
        self.float_dtype = float_matmul_dtype(scales.dtype, weight.device)  # for prompts: DEQUANTIZED_ROWS

    @classmethod
    def from_float(cls, weight: torch.Tensor, dtype: torch.dtype) -> "Int8Linear":
        return cls(*quantize_int8(weight, dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, K): the kernel takes a matrix
        if rows.shape[0] >= DEQUANTIZED_ROWS[INT8]:
            y = dequantized_linear(rows, self, self.float_dtype)
        else:
            y = torch._weight_int8pack_mm(rows, self.weight, self.scales)  # (M, N)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows start ... stop of the float weight this layer multiplies by, (stop - start, K) in `dtype`."""
        return self.weight[start:stop].to(dtype) * self.scales[start:stop, None].to(dtype)

    def dequantize(self) -> torch.Tensor:
        """The float weight (N, K) this layer multiplies by, in float32 (for tests and inspection)."""
        return self.weight.float() * self.scales.float()[:, None]


# --------------------------------------------------------------------------------------------
# w8a8: int8 weights, and activations quantized per token as they arrive
# --------------------------------------------------------------------------------------------


def quantize_activations(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) -> u uint8 (M, K), scales a (M, 1) and zero points z (M, 1) in float32: x ~ (u - z) * a."""
    rows = rows.float()
    low = rows.amin(dim=1, keepdim=True).clamp(max=0)  # (M, 1): the range always holds 0
    high = rows.amax(dim=1, keepdim=True).clamp(min=0)
    scales = ((high - low) / UINT8_MAX).clamp(min=MIN_SCALE)  # (M, 1)
    zeros = (-low / scales).round()  # (M, 1), in 0 ... 255
    codes = (rows / scales).round().add(zeros).clamp(0, UINT8_MAX).to(torch.uint8)  # (M, K)
    return codes, scales, zeros


def row_sums(weight: torch.Tensor) -> torch.Tensor:
    """q (N, K) int8 -> sum_k q[n, k] (N,) in float32: exact, since |sum| <= 127 * K is far below 2^24
    for any Llama. ROWS_PER_CHUNK rows at a time: summing into int32 widens its input first, and a
    whole head's int32 copy (113 MB on the demo model) raised the peak while loading."""
    sums = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], ROWS_PER_CHUNK):
        sums[start : start + ROWS_PER_CHUNK] = weight[start : start + ROWS_PER_CHUNK].sum(dim=1, dtype=torch.int32)
    return sums


class W8A8Linear(nn.Module):
    """Stands in for nn.Linear(K, N, bias=False): int8 weights, activations quantized per row of x,
    the matmul in integers (`torch._int_mm`, oneDNN's VNNI/AMX kernels on a CPU)."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # (N, K) int8, as Int8Linear's
        self.register_buffer("scales", scales)  # (N,) float32
        self.register_buffer("weight_sums", row_sums(weight))  # (N,) float32
        # Prompts (DEQUANTIZED_ROWS rows or more) on a CPU with native bf16: the integer matmul is no
        # faster there than AMX's bf16 one, and quantizing x and the formula's corrections cost more
        # again; a bf16 matmul by the dequantized weight is faster, and exact in its activations.
        self.float_prompts = cpu_features().native_bf16

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "W8A8Linear":
        return cls(*quantize_int8(weight, torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, K)
        if self.float_prompts and rows.shape[0] >= DEQUANTIZED_ROWS[INT8]:
            y = dequantized_linear(rows, self, rows.dtype)
        else:
            y = self.integer_matmul(rows)
        return y.reshape(*x.shape[:-1], self.out_features)

    def integer_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (M, K) -> (M, N) in rows' dtype, by the integer matmul and the formula above."""
        codes, x_scales, x_zeros = quantize_activations(rows)  # (M, K) uint8, (M, 1), (M, 1)
        # (M, K) @ (K, N): the transposed view of q, which oneDNN reads in place.
        sums = torch._int_mm(codes, self.weight.t())  # (M, N) int32
        y = sums.float()  # (M, N)
        y.addr_(x_zeros.view(-1), self.weight_sums, alpha=-1)  # - z[m] * sum_k q[n, k], in place
        y.mul_(x_scales).mul_(self.scales)  # * a[m] * s[n]
        return y.to(rows.dtype)

    dequantize_rows = Int8Linear.dequantize_rows  # the same int8 weight and per-row scales

    def dequantize(self) -> torch.Tensor:
        """The float weight (N, K), in float32 (the activations' rounding is not in it)."""
        return self.weight.float() * self.scales[:, None]


# --------------------------------------------------------------------------------------------
# int4: a scale and a zero per group of G input weights
# --------------------------------------------------------------------------------------------


def check_int4_shape(weight_shape: torch.Size, group_size: int, name: str = "this layer") -> None:
    out_features, in_features = weight_shape
    if group_size not in INT4_GROUP_SIZES:
        raise QuantizationError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if in_features % group_size != 0 or out_features % INT4_ROWS_MULTIPLE != 0:
        raise QuantizationError(
            f"int4 cannot quantize {name} of shape {tuple(weight_shape)}: PyTorch's kernels need the input "
            f"size to be a multiple of the group size ({group_size}) and the output size a multiple of "
            f"{INT4_ROWS_MULTIPLE}; use int8 for this model"
        )


def quantize_int4(weight: torch.Tensor, group_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """W (N, K) -> q int32 (N, K) in [0, 15] and scales_and_zeros (K/G, N, 2) in `dtype`.

    With s, z = scales_and_zeros[g, n]: W[n, g*G + i] ~ (q[n, g*G + i] - 8) * s + z. The (K/G, N, 2)
    layout (groups first) is the one PyTorch's int4 kernels read.
    """
    out_features, in_features = weight.shape
    n_groups = in_features // group_size
    q = torch.empty(weight.shape, dtype=torch.int32, device=weight.device)
    scales_and_zeros = torch.empty((n_groups, out_features, 2), dtype=dtype, device=weight.device)
    for start in range(0, out_features, ROWS_PER_CHUNK):
        groups = weight[start : start + ROWS_PER_CHUNK].float().reshape(-1, n_groups, group_size)  # (n, K/G, G)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # (n, K/G)
        scales = ((high - low) / (INT4_LEVELS - 1)).clamp(min=min_scale(dtype)).to(dtype)
        zeros = (low + INT4_MIDPOINT * scales.float()).to(dtype)
        # As for int8: quantize against the rounded scale and zero that the kernel will use.
        level0 = zeros.float() - INT4_MIDPOINT * scales.float()  # the value of q = 0
        levels = (groups - level0[..., None]) / scales.float()[..., None]
        q[start : start + ROWS_PER_CHUNK] = levels.round().clamp(0, INT4_LEVELS - 1).reshape(-1, in_features)
        scales_and_zeros[:, start : start + ROWS_PER_CHUNK] = torch.stack([scales, zeros], dim=-1).transpose(0, 1)
    return q, scales_and_zeros


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q int32 (N, K) in [0, 15] -> the int4 kernel's packed layout for q's device."""
    if q.device.type == "cuda":
        two_per_byte = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # (N, K/2): even k in the high half
        return torch._convert_weight_to_int4pack(two_per_byte, INT4_INNER_K_TILES)
    return torch._convert_weight_to_int4pack_for_cpu(q, INT4_INNER_K_TILES)


# PyTorch's CPU int4 layout (`_convert_weight_to_int4pack_for_cpu`), read back by `unpack_int4_cpu`:
# the (N, K) values in blocks of B output rows, each block stored as (K, B/2) bytes whose low
# nibble is row i of the block and high nibble row i + B/2. B follows the vector width PyTorch's
# kernels run at: 64 with AVX-512, 32 with AVX2. The layout is the kernel's own, not a documented
# format, so `int4_cpu_block` finds B once by checking it against the packing itself.
INT4_CPU_BLOCKS = (64, 32)
NIBBLE = 4
LOW_NIBBLE = 0xF


def unpack_int4_cpu(packed: torch.Tensor, start: int, stop: int, block: int) -> torch.Tensor:
    """Rows start ... stop (multiples of `block`, B) of q from the CPU packing: (stop - start, K) uint8."""
    n_blocks, half = (stop - start) // block, block // 2
    blocks = packed[start:stop].reshape(n_blocks, -1, half)  # (n/B, K, B/2) bytes
    blocks = blocks.transpose(1, 2).contiguous()  # (n/B, B/2, K): byte i of each k, rows i and i + B/2
    rows = torch.cat([blocks & LOW_NIBBLE, blocks >> NIBBLE], dim=1)  # (n/B, B, K): rows i, then i + B/2
    return rows.view(stop - start, -1)  # (n, K)


@functools.cache
def int4_cpu_block() -> Optional[int]:
    """The rows per block of this PyTorch's CPU int4 packing as `unpack_int4_cpu` reads it (from packing
    made-up values), or None if it is none of INT4_CPU_BLOCKS: then int4 prompts run on the kernel."""
    shape = (2 * max(INT4_CPU_BLOCKS), INT4_GROUP_SIZES[0])  # two blocks of rows or more, one group
    probe = torch.randint(INT4_LEVELS, shape, generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        packed = torch._convert_weight_to_int4pack_for_cpu(probe, INT4_INNER_K_TILES)
    except RuntimeError:
        return None
    for block in INT4_CPU_BLOCKS:
        if packed.dtype == torch.uint8 and torch.equal(unpack_int4_cpu(packed, 0, shape[0], block).int(), probe):
            return block
    return None


class Int4Linear(nn.Module):
    """Stands in for nn.Linear(K, N, bias=False) with 4-bit weights in groups of G along K."""

    def __init__(self, packed_weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int):
        super().__init__()
        n_groups, self.out_features, _ = scales_and_zeros.shape
        self.in_features = n_groups * group_size
        self.group_size = group_size
        self.register_buffer("weight", packed_weight)  # packed 4-bit values, layout private to the kernel
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # (K/G, N, 2) in the activations' dtype
        # Prompts on a CPU (DEQUANTIZED_ROWS): the weight unpacked to floats, where its layout is one
        # `unpack_int4_cpu` reads (None: the kernel for every call).
        self.cpu_block = int4_cpu_block() if packed_weight.device.type == "cpu" else None  # rows per block
        readable = self.cpu_block is not None and self.out_features % self.cpu_block == 0
        self.float_dtype = float_matmul_dtype(scales_and_zeros.dtype, packed_weight.device) if readable else None

    @classmethod
    def from_float(cls, weight: torch.Tensor, dtype: torch.dtype, group_size: int = DEFAULT_INT4_GROUP_SIZE,
                   name: str = "this layer") -> "Int4Linear":
        check_int4_shape(weight.shape, group_size, name)
        q, scales_and_zeros = quantize_int4(weight, group_size, dtype)
        return cls(pack_int4(q), scales_and_zeros, group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, K)
        if rows.device.type == "cuda":
            y = torch._weight_int4pack_mm(rows, self.weight, self.group_size, self.scales_and_zeros)
        elif rows.shape[0] >= DEQUANTIZED_ROWS[INT4] and self.float_dtype is not None:
            y = dequantized_linear(rows, self, self.float_dtype)
        else:
            y = torch._weight_int4pack_mm_for_cpu(rows, self.weight, self.group_size, self.scales_and_zeros)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows start ... stop (multiples of self.cpu_block) of the float weight, (stop - start, K) in `dtype`."""
        q = unpack_int4_cpu(self.weight, start, stop, self.cpu_block)  # (n, K) in 0 ... 15
        groups = q.view(stop - start, -1, self.group_size).to(dtype)  # (n, K/G, G)
        # (n, K/G, 2), contiguous: broadcasting a transposed view costs 4x more than the copy
        scales_and_zeros = self.scales_and_zeros[:, start:stop].transpose(0, 1).to(dtype).contiguous()
        scales, zeros = scales_and_zeros[..., :1], scales_and_zeros[..., 1:]  # (n, K/G, 1) each
        groups.sub_(INT4_MIDPOINT).mul_(scales).add_(zeros)  # (q - 8) * scale + zero, in place
        return groups.view(stop - start, self.in_features)


# --------------------------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------------------------


def linear_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of every nn.Linear in `model` ("layers.0.attention.wq", ..., "output")."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


# --------------------------------------------------------------------------------------------
# The decision, and building a layer by it
# --------------------------------------------------------------------------------------------


def linear_storage(
    device: Union[str, torch.device],
    dtype: torch.dtype,
    quantize: Optional[str] = None,
    needs_gradients: bool = False,
    features: Optional[CpuFeatures] = None,
    cuda_capability: Optional[tuple[int, int]] = None,
) -> str:
    """How the linear layers of a model on `device` in `dtype` are stored: one of STORAGES.

    quantize: None or one of SCHEMES (asked for by the user: always honoured, or refused where it
    cannot run: w8a8 needs a CPU with int8 dot products, int4 on CUDA an sm80+ GPU and bfloat16;
    `features` and `cuda_capability`, None: this machine's). Eager and compiled models get the
    same storage: a compiled step calls the same layers. needs_gradients: attribution
    (interpret.py) differentiates through every layer, which only nn.Linear allows. This only
    decides: nothing is allocated, so a CUDA device can be asked about on a machine without one.
    """
    check_scheme(quantize)
    if quantize is not None:
        if needs_gradients:
            raise QuantizationError(
                f"quantize={quantize!r} with needs_gradients: quantized layers have no gradients; "
                f"load without quantize to compute attributions"
            )
        check_scheme_runs_here(quantize, torch.device(device), dtype, features, cuda_capability)
        return quantize
    if needs_gradients:
        return PLAIN
    if bf16_is_emulated(torch.device(device), dtype, features):
        features = features if features is not None else cpu_features()
        return HALF if features.fp16_weight_matmul else WIDENED  # FBGEMM's float16 weights, where PyTorch has it
    return PREPACKED if prepacking_helps(torch.device(device), dtype) else PLAIN


def make_linear(
    name: str, weight: torch.Tensor, storage: str, dtype: torch.dtype, device: Optional[torch.device] = None,
    done_with_part: Optional[Callable[[torch.Tensor], None]] = None,
) -> nn.Module:
    """The linear layer `name` (e.g. "layers.0.attention.wq") for the float weight (N, K), stored as
    `storage` (see `linear_storage`) with activations in `dtype`, on `device` (None: the weight's).
    Quantizing starts from the weight's values as given, not first rounded to `dtype`. Storage 'half'
    reads the weight a part of rows at a time and hands each part to `done_with_part` once read (the
    loader lets the file's pages go: the demo's 49,152-row head need not be in memory twice)."""
    storage = layer_storage(name, storage, device if device is not None else weight.device)
    if storage == PLAIN:
        with torch.device("meta"):  # shapes only: no random init of a weight about to be replaced
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        layer.weight = nn.Parameter(weight.to(device=device, dtype=dtype))  # no copy if nothing changes
        return layer
    if storage == PREPACKED:
        return PackedLinear(weight.to(device=device, dtype=dtype))
    if storage == WIDENED:
        return WidenedLinear(weight.to(device=device, dtype=dtype))
    if storage == HALF:
        weight = weight.to(device=device, dtype=dtype)
        # NaN or infinite weights (a broken checkpoint) stay as they are in WidenedLinear, where decoding
        # finds and names them (decoding.py); FBGEMM would clip an infinity to float16's largest number.
        exponent = float16_exponent(weight, float16_columns(weight.shape[1]), done_with_part)  # None: not all finite
        if exponent is None:
            return WidenedLinear(weight)
        return HalfLinear(weight, exponent, done_with_part)
    weight = weight.to(device)  # quantized on the target device
    if storage == INT8:
        return Int8Linear.from_float(weight, dtype)
    if storage == INT4:
        return Int4Linear.from_float(weight, dtype, name=name)
    if storage == W8A8:
        return W8A8Linear.from_float(weight)
    raise ValueError(f"unknown linear storage {storage!r}: use one of {', '.join(STORAGES)}")


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: str) -> nn.Module:
    """Replace every nn.Linear of a loaded model by its `scheme` counterpart, in place; returns the model.

    The activation dtype is the one each layer's weight has now (quantize a bf16 model for bf16 math).
    w8a8 is not smoothed here: `smoothing.smooth_w8a8` does that (the loader calls it).
    """
    if scheme is None:
        raise QuantizationError(f"quantize_model needs a scheme: one of {', '.join(SCHEMES)}")
    some_weight = next(model.parameters())
    storage = linear_storage(some_weight.device, some_weight.dtype, quantize=scheme)
    for name in linear_layer_names(model):
        linear = model.get_submodule(name)
        if linear.bias is not None:
            raise QuantizationError(f"{name} has a bias; these quantized layers have none (Llama's linears have no bias)")
        model.set_submodule(name, make_linear(name, linear.weight, storage, linear.weight.dtype))
    return model


# Names this module had before: `linear_storage` became the one decision of how a layer is stored,
# the CPU's features moved to cpu.py, the bytes of a layer to the memory planner, and the bf16
# layers (PackedLinear, WidenedLinear, which it still imports) to bf16_layers.py.
MOVED_NAMES = {
    "fast_linear": "quantize.make_linear(name, weight, linear_storage(...), dtype)",
    "layer_scheme": "quantize.layer_storage",
    "cpu_flags": "cpu.cpu_flags", "CPUINFO": "cpu.CPUINFO", "INT8_DOT_FLAGS": "cpu.INT8_DOT_FLAGS",
    "NATIVE_BF16_FLAGS": "cpu.NATIVE_BF16_FLAGS", "linear_bytes": "memory.linear_bytes",
    "own_kernel_linear": "F.linear (since 2026-12-05 one bf16 row goes to it on every CPU: bf16_layers.WidenedLinear)",
}


def __getattr__(name: str):
    """PEP 562: a name that moved says where it went, in one line."""
    where = MOVED_NAMES.get(name)
    raise AttributeError(f"quantize.{name} moved: use {where}" if where else
                         f"module 'quantize' has no attribute {name!r}")
