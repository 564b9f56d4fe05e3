"""Memory: will the model fit before we load it, and handing memory back while we do.

1. **The plan.** Everything a model will hold on its device is known from `ModelArgs` before a byte
   is read: the weights (`model.expected_shapes`, each linear layer at the bytes of its storage in
   quantize.py), the KV cache (two (B, K, max_seq_len, D) tensors per layer, as `model.KVCache`
   allocates them) and an estimate of the largest temporaries of a forward pass. `check_memory`
   compares the total with what the device has free and refuses a model that will not fit, with
   the single change (shorter context, batch of 1, int8/int4, bf16) that would make it fit.

2. **Handing memory back.** Loading copies each tensor out of a memory-mapped shard (cast, moved,
   quantized). `release_file_pages` lets the OS take back the file pages we no longer need, and
   `release_scratch_memory` returns the float32 working copies of quantization to the OS, so the
   peak while loading stays near one copy of the model. Both are Linux/glibc calls that do nothing
   elsewhere.

3. **Copying to a GPU.** `HostToDevice` moves each tensor through two reused page-locked
   ("pinned") buffers, so the GPU's copy engine reads host memory directly while the CPU fills the
   other buffer.
"""

import ctypes
import mmap
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from model import EMBEDDING_KEY, ModelArgs, expected_shapes
from quantize import (DEFAULT_INT4_GROUP_SIZE, HALF, INT4, INT8, PLAIN, PREPACKED, W8A8, WIDENED, float16_columns,
                      layer_storage, linear_storage)

GIB = 1024**3
MEMINFO = Path("/proc/meminfo")  # Linux: MemAvailable counts free memory plus reclaimable caches
LOGITS_DTYPE = torch.float32  # the model returns float32 logits

# The C library, for madvise and malloc_trim; only used on Linux.
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


class MemoryPlanError(ValueError):
    """The model will not fit in the memory available; the message suggests what to change."""


# --------------------------------------------------------------------------------------------
# The plan: bytes of weights, KV cache and activations
# --------------------------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    """Bytes a model will take on its device, computed from ModelArgs before anything is loaded."""

    weights: int  # every parameter (quantized or not), as it will sit in memory
    kv_cache: int  # keys and values for max_batch_size x max_seq_len positions, every layer
    activations: int  # an estimate of the largest temporaries of one forward pass
    available: Optional[int]  # free memory on the device now (None: unknown, nothing is checked)
    device: torch.device
    attention_scores: int = 0  # CUDA: the score matrices a padded batch's prefill stores (see below)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.attention_scores

    def fits(self) -> bool:
        return self.available is None or self.total <= self.available


def linear_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """(N, K) of every linear layer, by its name in the model: the matrices quantization applies to.

    From `expected_shapes`: every matrix but the embedding table is a linear layer's weight."""
    return {
        name.removesuffix(".weight"): shape
        for name, shape in expected_shapes(args).items()
        if len(shape) == 2 and name != EMBEDDING_KEY
    }


def linear_bytes(out_features: int, in_features: int, storage: Optional[str], dtype: torch.dtype) -> int:
    """Bytes of one (N, K) linear layer's tensors, stored as `storage` (None: PLAIN) in `dtype`.

    A prepacked weight takes the bytes of the plain one: oneDNN's blocked layout only reorders it.
    A bf16 weight held in float16 (bf16_layers.HalfLinear) takes 2 bytes a weight in FBGEMM's blocks
    and 4 for the columns beyond them."""
    itemsize = dtype.itemsize
    if storage in (None, PLAIN, PREPACKED, WIDENED):
        return out_features * in_features * itemsize
    if storage == HALF:  # float16 for whole FBGEMM blocks of K, the remaining columns in float32
        packed_columns = float16_columns(in_features)
        return out_features * (packed_columns * torch.float16.itemsize + (in_features - packed_columns) * torch.float32.itemsize)
    if storage == INT8:
        return out_features * in_features + out_features * itemsize  # 1 byte per weight + scales
    if storage == W8A8:
        return out_features * in_features + 2 * out_features * torch.float32.itemsize  # + scales, weight sums
    n_groups = in_features // DEFAULT_INT4_GROUP_SIZE
    return out_features * in_features // 2 + n_groups * out_features * 2 * itemsize  # + scales and zeros


def weights_bytes(args: ModelArgs, dtype: torch.dtype, quantize: Optional[str],
                  device: Optional[torch.device] = None) -> int:
    """Bytes of the model's weights in `dtype`, quantized as asked, on `device` (which can decide a
    layer's storage: `layer_storage`)."""
    linears = linear_shapes(args)
    # Unquantized, the layers' storage is the device's and CPU's (HALF takes other bytes than bf16's).
    unquantized = linear_storage(device, dtype) if device is not None else None
    total = 0
    for name, shape in expected_shapes(args).items():
        module_name = name.removesuffix(".weight")
        if module_name in linears:
            storage = layer_storage(module_name, quantize, device) if quantize else unquantized
            total += linear_bytes(*shape, storage, dtype)
        else:  # the embedding and the norms stay in `dtype`
            total += torch.Size(shape).numel() * dtype.itemsize
    return total


def kv_cache_bytes(args: ModelArgs, dtype: torch.dtype, max_seq_len: int) -> int:
    positions = args.max_batch_size * max_seq_len
    return 2 * args.n_layers * positions * args.n_kv_heads * args.head_dim * dtype.itemsize  # 2: keys, values


def activations_bytes(args: ModelArgs, dtype: torch.dtype, max_seq_len: int) -> int:
    """The largest temporaries of a prefill over a full-length batch: the residual stream, a norm's and
    attention's outputs (3 x C per token), the two FFN hidden vectors (2 x F per token), and the last
    position's float32 logits. (Asking for every position's logits, as logprobs with echo does,
    needs B x T x V x 4 bytes more.)"""
    tokens = args.max_batch_size * max_seq_len
    per_token = (3 * args.dim + 2 * args.ffn_hidden_dim) * dtype.itemsize
    return tokens * per_token + args.max_batch_size * args.vocab_size * LOGITS_DTYPE.itemsize


# The math attention kernel holds the float32 scores and their softmax at once.
SCORE_MATRICES = 2


def attention_scores_bytes(args: ModelArgs, device: torch.device, max_seq_len: int) -> int:
    """A padded batch's prefill on CUDA: with a padding mask PyTorch's fused kernels fall back to the
    math one, which stores float32 (B, H, T, S) scores (the unpadded prompt uses the causal flash path,
    model.Attention, and stores none). On a CPU the fused kernel takes the mask and stores none either."""
    if device.type != "cuda" or args.max_batch_size == 1:
        return 0
    scores = args.max_batch_size * args.n_heads * max_seq_len * max_seq_len * torch.float32.itemsize
    return SCORE_MATRICES * scores


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes free on `device` now, or None where we cannot tell."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu" and MEMINFO.is_file():
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the value is in kB
    return None


def plan_memory(
    args: ModelArgs, dtype: torch.dtype, quantize: Optional[str], device: torch.device,
    available: Optional[int] = None,
) -> MemoryPlan:
    """The memory plan for loading `args` in `dtype` (and `quantize`) on `device`.

    available: bytes to plan against; None asks the device (see `available_memory`).
    """
    return MemoryPlan(
        weights=weights_bytes(args, dtype, quantize, device),
        kv_cache=kv_cache_bytes(args, dtype, args.max_seq_len),
        activations=activations_bytes(args, dtype, args.max_seq_len),
        attention_scores=attention_scores_bytes(args, device, args.max_seq_len),
        available=available if available is not None else available_memory(device),
        device=device,
    )


def longest_fitting_seq_len(args: ModelArgs, dtype: torch.dtype, quantize: Optional[str], available: int,
                            device: Optional[torch.device] = None) -> int:
    """The largest max_seq_len whose plan fits in `available` bytes (0 if even the weights do not fit)."""
    fixed = weights_bytes(args, dtype, quantize, device) + activations_bytes(args, dtype, max_seq_len=0)
    per_position = kv_cache_bytes(args, dtype, 1) + activations_bytes(args, dtype, 1) - activations_bytes(args, dtype, 0)
    return max(0, (available - fixed) // per_position)


def check_memory(plan: MemoryPlan, args: ModelArgs, dtype: torch.dtype, quantize: Optional[str]) -> None:
    """Refuse a plan that does not fit, saying what it needs and which single change would fit."""
    if plan.fits():
        return

    def gib(n: int) -> str:
        return f"{n / GIB:.2f} GiB"

    def needs(new_args: ModelArgs, new_dtype: torch.dtype, new_quantize: Optional[str]) -> MemoryPlan:
        return plan_memory(new_args, new_dtype, new_quantize, plan.device, plan.available)

    candidates = []  # (what to change, its plan)
    seq_len = longest_fitting_seq_len(args, dtype, quantize, plan.available, plan.device)
    if seq_len >= 1:
        candidates.append((f"max_seq_len={seq_len} (--max-seq-len {seq_len})", needs(replace(args, max_seq_len=seq_len), dtype, quantize)))
    if args.max_batch_size > 1:
        candidates.append(("max_batch_size=1 (--max-batch-size 1)", needs(replace(args, max_batch_size=1), dtype, quantize)))
    for scheme in (INT8, INT4):
        if quantize is None or (quantize, scheme) == (INT8, INT4):
            candidates.append((f"quantize={scheme!r} (--quantize {scheme})", needs(args, dtype, scheme)))
    if dtype == torch.float32:
        candidates.append(("dtype='bfloat16' (--dtype bfloat16)", needs(args, torch.bfloat16, quantize)))
    fitting = [f"{change}: needs {gib(p.total)}" for change, p in candidates if p.fits()]
    advice = "Try " + "; or ".join(fitting) if fitting else (
        "No single change (shorter max_seq_len, batch of 1, int8/int4, bfloat16) makes it fit: combine them, "
        "or use a smaller model or a machine with more memory")
    quantized = f", quantized to {quantize}" if quantize else ""
    raise MemoryPlanError(
        f"the model will not fit in memory: it needs about {gib(plan.total)} on {plan.device} "
        f"(weights {gib(plan.weights)} in {str(dtype).removeprefix('torch.')}{quantized}, KV cache {gib(plan.kv_cache)} "
        f"for max_batch_size {args.max_batch_size} x max_seq_len {args.max_seq_len}, activations about "
        f"{gib(plan.activations)}), but only {gib(plan.available)} is available. {advice}"
    )


# --------------------------------------------------------------------------------------------
# Handing memory back while loading
# --------------------------------------------------------------------------------------------


def byte_range(tensor: torch.Tensor) -> tuple[int, int]:
    """The addresses [start, end) of a contiguous tensor's bytes."""
    start = tensor.data_ptr()
    return start, start + tensor.numel() * tensor.element_size()


def release_file_pages(mapped: list[torch.Tensor]) -> None:
    """Let the OS take back the file pages behind tensors memory-mapped by `checkpoint.open_shard`.

    Reading a memory-mapped tensor pulls its pages into our resident memory (RSS), where they stay
    while the mapping lives, even after the values were copied out (cast to another dtype, moved to a
    GPU, quantized). Without this, converting a checkpoint would hold the whole file *and* the
    converted model in RSS at once. `madvise(MADV_DONTNEED)` drops our claim on the pages; the file
    is unchanged (the mapping is private and never written), so touching them again just reads them
    back. Only whole pages inside each tensor are released: a neighbour that stays in use keeps its
    pages. Linux only (elsewhere this does nothing); it must only ever see tensors from `open_shard`,
    since on ordinary memory MADV_DONTNEED would zero the values.
    """
    if _libc is None:
        return
    for tensor in mapped:
        if tensor.device.type != "cpu":
            continue
        start, end = byte_range(tensor)
        first_page = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # round up
        end_page = end // mmap.PAGESIZE * mmap.PAGESIZE  # down
        if end_page > first_page:
            _libc.madvise(ctypes.c_void_p(first_page), ctypes.c_size_t(end_page - first_page), mmap.MADV_DONTNEED)


def release_scratch_memory(device: Optional[torch.device] = None) -> None:
    """Return the heap memory freed after quantizing (or packing) one layer to the OS (and, for a
    layer quantized on a GPU, PyTorch's cached GPU blocks: its caching allocator would keep the
    float32 working copies' blocks reserved, and the memory plan does not count them).

    Quantizing a weight makes float32 working copies of it. Once they are freed, glibc's malloc keeps
    the memory for reuse in the arena of whichever thread allocated it, and which arenas PyTorch's
    worker threads pick changes from run to run: without this, the peak RSS of loading the demo
    model as int4 was 0.5 GB in some runs and 0.9 GB in others. `malloc_trim(0)` hands every free
    page back. glibc only (elsewhere this does nothing); it costs well under a millisecond a layer.
    """
    if _libc is not None and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Copying to a GPU through pinned buffers
# --------------------------------------------------------------------------------------------

# Bytes per staging buffer: a tensor larger than this (a Llama 3 70B embedding is 2 GB in bf16) goes
# over in pieces, so the page-locked memory stays 2 x this whatever the model.
STAGING_BYTES = 64 * 2**20
N_STAGING_BUFFERS = 2  # one filled by the CPU while the GPU copies from the other


class HostToDevice:
    """Copies host tensors to `device` through N_STAGING_BUFFERS reused page-locked buffers.

    A copy from ordinary (pageable) host memory to a GPU is synchronous and goes through the
    driver's own small bounce buffer at a fraction of the bus's speed. From page-locked memory the
    GPU's copy engine reads directly, asynchronously (`non_blocking=True`). Each piece of a tensor is
    copied by the CPU into a staging buffer (reading the memory-mapped file), then by the GPU from
    there; before a buffer is filled again, its last copy must be done (a CUDA event).
    Page-locked memory is scarce, hence two fixed buffers and not a pinned copy of every tensor.

    On any device other than CUDA, `to` is a plain `tensor.to(device)`. `staged=True` forces the
    staged path anywhere, with ordinary buffers off CUDA: how the tests check the pieces on a CPU.
    """

    def __init__(self, device: torch.device, staged: Optional[bool] = None, staging_bytes: int = STAGING_BYTES):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.staged = self.cuda if staged is None else staged
        self.staging_bytes = staging_bytes
        self.buffers: list[torch.Tensor] = []  # allocated on first use: uint8, staging_bytes each
        self.copied: list[Optional["torch.cuda.Event"]] = [None] * N_STAGING_BUFFERS  # each buffer's last copy
        self.turn = 0  # which buffer the next piece goes through

    def to(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` on the device, same dtype and shape (a new tensor; the source is only read)."""
        if not self.staged or tensor.device.type != "cpu":
            return tensor.to(self.device)
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
        source = tensor.contiguous().reshape(-1).view(torch.uint8)  # its bytes, no copy if contiguous
        target = out.view(-1).view(torch.uint8)
        for start in range(0, source.numel(), self.staging_bytes):
            piece = source[start : start + self.staging_bytes]
            buffer = self.next_buffer()[: piece.numel()]
            buffer.copy_(piece)  # the CPU reads the file into page-locked memory
            target[start : start + piece.numel()].copy_(buffer, non_blocking=self.cuda)  # the GPU reads it
            if self.cuda:
                self.copied[self.turn] = torch.cuda.Event()
                self.copied[self.turn].record()
        return out

    def next_buffer(self) -> torch.Tensor:
        """The next staging buffer in turn, once the GPU has finished its previous copy from it."""
        if not self.buffers:
            self.buffers = [torch.empty(self.staging_bytes, dtype=torch.uint8, pin_memory=self.cuda)
                            for _ in range(N_STAGING_BUFFERS)]
        self.turn = (self.turn + 1) % N_STAGING_BUFFERS
        if self.copied[self.turn] is not None:
            self.copied[self.turn].synchronize()
        return self.buffers[self.turn]

    def close(self) -> None:
        """Wait for the last copies and let the page-locked memory go."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.buffers, self.copied = [], [None] * N_STAGING_BUFFERS
