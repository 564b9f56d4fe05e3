"""Loading a Meta checkpoint directory into one `Transformer`, on one device.

A Meta checkpoint directory holds:

    params.json              the architecture (-> ModelArgs)
    consolidated.00.pth      the weights, a flat state dict under Meta's names ...
    consolidated.01.pth      ... split into N "model-parallel" shards for the larger models
    tokenizer.model          the tokenizer (see tokenizer.py)

Meta trained and served with N GPUs, each holding a slice of every big matrix (Megatron-style
tensor parallelism, Shoeybi et al. 2019). The slices are cut so that each GPU can work alone
until one sum at the end of the layer:

* column-parallel (split the *output* rows, dim 0): ``wq wk wv`` (each GPU owns some heads),
  ``w1 w3`` (some FFN units), and ``output`` (some of the vocabulary);
* row-parallel (split the *input* columns, dim 1): ``wo`` and ``w2``, which read those heads /
  units back into the model dim;
* replicated (every shard holds the whole tensor): the RMSNorm weights;
* the embedding is split on the model dim (dim 1) in Llama 2 and on the vocabulary (dim 0) in
  Llama 3, so we infer its dim from the shard shapes and params.json.

To run on one device we concatenate each tensor's slices along that dim. Shards are opened with
``mmap=True`` (the OS pages weights in on demand, nothing is read twice) and ``weights_only=True``
(a checkpoint is data: it must not be able to run code). Tensors are merged and cast one at a time
into a model built on the "meta" device (shapes without memory), so the peak stays near one copy
of the weights.

Device and dtype are decided here, once: CUDA if present (fp16), else Apple's MPS (fp16), else CPU
(bf16).
"""

import ctypes
import json
import mmap
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Union

import torch
from tqdm import tqdm

from model import ModelArgs, Transformer
from quantize import (
    INT4,
    INT8,
    check_scheme,
    fast_linear,
    layer_scheme,
    linear_bytes,
    linear_layer_names,
    prepacking_helps,
)

PARAMS_FILE = "params.json"
SHARD_GLOB = "consolidated.*.pth"
# Meta's Llama 2 checkpoints carry a precomputed RoPE table that the model recomputes itself.
KNOWN_EXTRA_KEYS = ("rope.freqs",)

# Which dim each weight's model-parallel slices are concatenated on (fairscale's Column- and
# RowParallelLinear in Meta's model.py). Norms are absent: they are replicated. The embedding is
# inferred from its shapes (see `embedding_split_dim`).
COLUMN_PARALLEL_DIM = 0
ROW_PARALLEL_DIM = 1
SPLIT_DIMS = {
    "wq": COLUMN_PARALLEL_DIM,
    "wk": COLUMN_PARALLEL_DIM,
    "wv": COLUMN_PARALLEL_DIM,
    "w1": COLUMN_PARALLEL_DIM,
    "w3": COLUMN_PARALLEL_DIM,
    "output": COLUMN_PARALLEL_DIM,
    "wo": ROW_PARALLEL_DIM,
    "w2": ROW_PARALLEL_DIM,
}
EMBEDDING_KEY = "tok_embeddings.weight"
OUTPUT_KEY = "output.weight"


# The C library, for madvise (see `release_file_pages`); only used on Linux.
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and what is wrong."""


# --------------------------------------------------------------------------------------------
# Device and dtype: decided in one place
# --------------------------------------------------------------------------------------------

DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def choose_device(device: Union[str, torch.device, None] = None) -> torch.device:
    """The device asked for, or the best one present: cuda, then mps, then cpu."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps ({e})") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this PyTorch sees no CUDA GPU: use --device cpu")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} asked for, but MPS is not available here: use --device cpu")
    if chosen.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {device!r}: use cpu, cuda, cuda:N or mps")
    return chosen


def choose_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """The dtype asked for, or the default for the device: fp16 on GPUs, bf16 on CPU."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cpu" else torch.float16
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES.values():
            raise ValueError(f"unsupported dtype {dtype}: use float32, bfloat16 or float16")
        return dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[dtype]


# --------------------------------------------------------------------------------------------
# params.json and the shard files
# --------------------------------------------------------------------------------------------


def check_checkpoint_dir(ckpt_dir: Union[str, Path]) -> Path:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.exists():
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist")
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint path {ckpt_dir} is not a directory (expected a Meta checkpoint dir)")
    return ckpt_dir


def read_params(ckpt_dir: Union[str, Path]) -> dict:
    """params.json as a dict, with a clear error if it is missing or not a JSON object."""
    path = check_checkpoint_dir(ckpt_dir) / PARAMS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a Meta checkpoint dir needs params.json")
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(params, dict):
        raise CheckpointError(f"{path} must hold a JSON object of model hyperparameters")
    return params


def model_args_from_params(params: dict, params_path: Path, **run_sizes) -> ModelArgs:
    """ModelArgs from params.json plus run-time sizes (max_seq_len, max_batch_size)."""
    known = set(ModelArgs.__dataclass_fields__) - {"head_dim", "n_rep", "ffn_hidden_dim", "rope_scaling_args"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise CheckpointError(f"{params_path}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    try:
        return ModelArgs(**{**params, **run_sizes})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{params_path}: {e}") from None


def list_shards(ckpt_dir: Union[str, Path]) -> list[Path]:
    ckpt_dir = check_checkpoint_dir(ckpt_dir)
    shards = sorted(ckpt_dir.glob(SHARD_GLOB))
    if not shards:
        raise CheckpointError(f"no {SHARD_GLOB} files in {ckpt_dir}: not a Meta checkpoint dir")
    return shards


def open_shard(path: Path) -> dict[str, torch.Tensor]:
    """A shard's state dict, memory-mapped (nothing read until used) and loaded as data only."""
    try:
        state_dict = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint: {e}") from None
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path} holds a {type(state_dict).__name__}, expected a state dict")
    for name in KNOWN_EXTRA_KEYS:
        state_dict.pop(name, None)
    return state_dict


# --------------------------------------------------------------------------------------------
# Merging model-parallel slices
# --------------------------------------------------------------------------------------------


def embedding_split_dim(shard_shape: torch.Size, n_shards: int, dim: int) -> int:
    """Llama 2 splits the embedding on the model dim (dim 1), Llama 3 on the vocabulary (dim 0)."""
    return ROW_PARALLEL_DIM if shard_shape[1] * n_shards == dim else COLUMN_PARALLEL_DIM


def split_dim(name: str, shard_shape: torch.Size, n_shards: int, dim: int) -> Optional[int]:
    """The dim along which `name` was sliced across shards, or None if it is replicated."""
    if n_shards == 1:
        return None
    if name == EMBEDDING_KEY:
        return embedding_split_dim(shard_shape, n_shards, dim)
    weight_kind = name.split(".")[-2]  # "layers.3.attention.wq.weight" -> "wq"
    return SPLIT_DIMS.get(weight_kind)


def merge_slices(name: str, slices: list[torch.Tensor], shards: list[Path], dim: int) -> torch.Tensor:
    """One full tensor from its slices in every shard."""
    first = slices[0]
    for path, piece in zip(shards[1:], slices[1:]):
        if piece.shape != first.shape or piece.dtype != first.dtype:
            raise CheckpointError(
                f"shards disagree on {name}: {shards[0].name} has {tuple(first.shape)} {first.dtype}, "
                f"{path.name} has {tuple(piece.shape)} {piece.dtype}"
            )
    concat_dim = split_dim(name, first.shape, len(slices), dim)
    if concat_dim is None:
        return first  # replicated: every shard holds the same tensor
    return torch.cat(slices, dim=concat_dim)


def infer_vocab_size(state_dicts: list[dict], n_shards: int, dim: int) -> int:
    """Vocabulary size from the output head's rows (column-parallel: split on the vocabulary)."""
    if OUTPUT_KEY in state_dicts[0]:
        return sum(sd[OUTPUT_KEY].shape[0] for sd in state_dicts)
    shape = state_dicts[0][EMBEDDING_KEY].shape
    return shape[0] * (n_shards if embedding_split_dim(shape, n_shards, dim) == COLUMN_PARALLEL_DIM else 1)


# --------------------------------------------------------------------------------------------
# Memory planning: will the model fit?
# --------------------------------------------------------------------------------------------

GIB = 1024**3
MEMINFO = Path("/proc/meminfo")  # Linux: MemAvailable counts free memory plus reclaimable caches
LOGITS_DTYPE = torch.float32  # the model returns float32 logits


class MemoryPlanError(CheckpointError):
    """The model will not fit in the memory available; the message suggests what to change."""


@dataclass
class MemoryPlan:
    """Bytes a model will take on its device, computed from ModelArgs before anything is loaded."""

    weights: int  # every parameter (quantized or not), as it will sit in memory
    kv_cache: int  # keys and values for max_batch_size x max_seq_len positions, every layer
    activations: int  # an estimate of the largest temporaries of one forward pass
    available: Optional[int]  # free memory on the device now (None: unknown, nothing is checked)
    device: torch.device

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    def fits(self) -> bool:
        return self.available is None or self.total <= self.available


def linear_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """(N, K) of every linear layer, by its name in the model: the matrices quantization applies to."""
    query_size, kv_size = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes = {}
    for i in range(args.n_layers):
        attention, feed_forward = f"layers.{i}.attention", f"layers.{i}.feed_forward"
        shapes.update({
            f"{attention}.wq": (query_size, args.dim), f"{attention}.wk": (kv_size, args.dim),
            f"{attention}.wv": (kv_size, args.dim), f"{attention}.wo": (args.dim, query_size),
            f"{feed_forward}.w1": (args.ffn_hidden_dim, args.dim), f"{feed_forward}.w3": (args.ffn_hidden_dim, args.dim),
            f"{feed_forward}.w2": (args.dim, args.ffn_hidden_dim),
        })
    shapes["output"] = (args.vocab_size, args.dim)
    return shapes


def weights_bytes(args: ModelArgs, dtype: torch.dtype, quantize: Optional[str]) -> int:
    embedding_and_norms = args.vocab_size * args.dim + (2 * args.n_layers + 1) * args.dim
    total = embedding_and_norms * dtype.itemsize
    for name, (out_features, in_features) in linear_shapes(args).items():
        scheme = layer_scheme(name, quantize) if quantize else None
        total += linear_bytes(out_features, in_features, scheme, dtype)
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
        weights=weights_bytes(args, dtype, quantize),
        kv_cache=kv_cache_bytes(args, dtype, args.max_seq_len),
        activations=activations_bytes(args, dtype, args.max_seq_len),
        available=available if available is not None else available_memory(device),
        device=device,
    )


def longest_fitting_seq_len(args: ModelArgs, dtype: torch.dtype, quantize: Optional[str], available: int) -> int:
    """The largest max_seq_len whose plan fits in `available` bytes (0 if even the weights do not fit)."""
    fixed = weights_bytes(args, dtype, quantize) + activations_bytes(args, dtype, max_seq_len=0)
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
    seq_len = longest_fitting_seq_len(args, dtype, quantize, plan.available)
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
# Loading
# --------------------------------------------------------------------------------------------


def load_model_args(
    ckpt_dir: Union[str, Path], max_seq_len: int, max_batch_size: int, vocab_size: Optional[int] = None
) -> ModelArgs:
    """ModelArgs of a checkpoint dir; `vocab_size` fills in Llama 2's "-1" (the tokenizer's size)."""
    params = read_params(ckpt_dir)
    args = model_args_from_params(
        params, Path(ckpt_dir) / PARAMS_FILE, max_seq_len=max_seq_len, max_batch_size=max_batch_size
    )
    if not args.has_vocab_size and vocab_size is not None:
        args = replace(args, vocab_size=vocab_size)
    return args


def load_transformer(
    ckpt_dir: Union[str, Path],
    args: ModelArgs,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
    quantize: Optional[str] = None,
    prepack: bool = False,
    available_bytes: Optional[int] = None,
) -> Transformer:
    """Build a Transformer from every consolidated.NN.pth shard of `ckpt_dir`, on `device` in `dtype`.

    quantize: None, "int8" or "int4" (see quantize.py): each linear weight is quantized as soon as it
    is read, so the full-precision model never exists in memory. prepack (bf16 on CPU, no quantize):
    store the linear weights in oneDNN's layout instead (`quantize.PackedLinear`). Before anything
    is loaded, the memory plan (weights + KV cache) is checked against `available_bytes` (None:
    what the device has free now), and a model that will not fit is refused with suggestions.
    """
    check_scheme(quantize)
    if prepack and (quantize is not None or not prepacking_helps(device, dtype)):
        raise ValueError(f"prepack is for unquantized bfloat16 on a CPU with oneDNN, not {quantize or dtype} on {device}")
    shards = list_shards(ckpt_dir)
    state_dicts = [open_shard(path) for path in shards]
    if not args.has_vocab_size:
        args = replace(args, vocab_size=infer_vocab_size(state_dicts, len(shards), args.dim))
    check_memory(plan_memory(args, dtype, quantize, device, available_bytes), args, dtype, quantize)

    with torch.device("meta"):
        model = Transformer(args)
    expected_shapes = {name: t.shape for name, t in model.state_dict().items()}
    linear_layers = set(linear_layer_names(model)) if quantize or prepack else set()

    names = list(state_dicts[0])
    check_same_tensor_names(shards, state_dicts, expected_shapes)
    loaded = {}
    for name in tqdm(names, desc=f"loading {Path(ckpt_dir).name}", unit="tensor", disable=not progress):
        slices = [sd[name] for sd in state_dicts]
        tensor = merge_slices(name, slices, shards, args.dim)
        if tensor.shape != expected_shapes[name]:
            where = shards[0] if len(shards) == 1 else f"{shards[0]} .. {shards[-1].name} (merged)"
            raise CheckpointError(
                f"{name} in {where} has shape {tuple(tensor.shape)}, "
                f"but params.json implies {tuple(expected_shapes[name])}"
            )
        module_name, _, _ = name.rpartition(".")
        if module_name in linear_layers:
            # Quantize (or prepack) on the target device, then put the new layer in place of the
            # (shapes-only) nn.Linear; its tensors join the state dict under the layer's name.
            layer = fast_linear(module_name, tensor.to(device), quantize, dtype)
            release_scratch_memory()
            model.set_submodule(module_name, layer)
            loaded.update({f"{module_name}.{key}": t for key, t in layer.state_dict().items()})
            kept = None
        else:
            kept = loaded[name] = tensor.to(device=device, dtype=dtype)  # no copy if nothing changes
        if kept is None or all(kept.data_ptr() != piece.data_ptr() for piece in slices):
            release_file_pages(slices)  # copied out: the file's pages need not stay in our memory
    model.load_state_dict(loaded, strict=True, assign=True)
    model.setup_caches(device, dtype)
    return model.eval()


def release_file_pages(mapped: list[torch.Tensor]) -> None:
    """Let the OS take back the file pages behind tensors memory-mapped by `open_shard`.

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
        start = tensor.data_ptr()
        first_page = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # round up
        end_page = (start + tensor.numel() * tensor.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE  # down
        if end_page > first_page:
            _libc.madvise(ctypes.c_void_p(first_page), ctypes.c_size_t(end_page - first_page), mmap.MADV_DONTNEED)


def release_scratch_memory() -> None:
    """Return the heap memory freed after quantizing (or packing) one layer to the OS.

    Quantizing a weight makes float32 working copies of it. Once they are freed, glibc's malloc keeps
    the memory for reuse in the arena of whichever thread allocated it, and which arenas PyTorch's
    worker threads pick changes from run to run: without this, the peak RSS of loading the demo
    model as int4 was 0.5 GB in some runs and 0.9 GB in others. `malloc_trim(0)` hands every free
    page back. glibc only (elsewhere this does nothing); it costs well under a millisecond a layer.
    """
    if _libc is not None and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


def check_same_tensor_names(shards: list[Path], state_dicts: list[dict], expected_shapes: dict) -> None:
    """Every shard holds the same tensors, and they are exactly the model's."""
    names = set(state_dicts[0])
    for path, sd in zip(shards[1:], state_dicts[1:]):
        if set(sd) != names:
            diff = sorted(names.symmetric_difference(sd))[:5]
            raise CheckpointError(f"shards disagree: {path.name} and {shards[0].name} differ in tensors {diff}")
    missing = sorted(set(expected_shapes) - names)
    unexpected = sorted(names - set(expected_shapes))
    if missing or unexpected:
        raise CheckpointError(
            f"{shards[0]}: tensors do not match params.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def check_vocab_matches(tokenizer_n_words: int, tokenizer_path: Path, args: ModelArgs) -> None:
    if tokenizer_n_words != args.vocab_size:
        raise CheckpointError(
            f"tokenizer {tokenizer_path} has {tokenizer_n_words} tokens but the model's vocab_size is "
            f"{args.vocab_size}: they belong to different models"
        )
