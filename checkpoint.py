"""Loading a Meta checkpoint directory: params.json, the sharded weights, one `Transformer`.

A Meta checkpoint directory holds:

    params.json              the architecture (-> ModelArgs)
    consolidated.00.pth      the weights, a flat state dict under Meta's names ...
    consolidated.01.pth      ... split into N "model-parallel" shards for the larger models
    tokenizer.model          the tokenizer (see tokenizer.py)

This file is the one place that reads them, in three steps:

1. **params.json -> ModelArgs** (`load_model_args`): every value's type is checked, and Llama 2's
   ``"vocab_size": -1`` ("take it from the tokenizer") is resolved here, once: from the weights'
   shapes when the shards are there, else from the tokenizer's size the caller passes. Past this
   point a vocabulary size is an int, or None while it is not known yet.
2. **The sharded-checkpoint reader** (`ShardedCheckpoint`): every shard memory-mapped, every
   tensor's layout checked against `expected_shapes(args)`, and `read(name, dim, start, length)`
   for any slice of any tensor, touching only the shards that hold it. The loader below, reshard.py,
   tensor_parallel.py and inspect_checkpoint.py all read through it.
3. **The loader** (`load_transformer`): a short loop over the reader that puts each tensor, cast
   and stored as quantize.py decides, into a model built on the "meta" device.

How Meta cuts a tensor into shards. Meta trained and served with N GPUs, each holding a slice of
every big matrix (Megatron-style tensor parallelism, Shoeybi et al. 2019). The slices are cut so
that each GPU can work alone until one sum at the end of the layer:

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
of the weights (memory.py checks beforehand that it fits, and hands file pages back as it goes).

Device and dtype are decided here, once: CUDA if present (fp16), else Apple's MPS (fp16), else CPU
(bf16).
"""

import json
import math
import os
import pickle
import re
import typing
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional, Union

import torch
from tqdm import tqdm

from memory import (  # noqa: F401  (re-exported: the memory plan's names have always been importable from here)
    HostToDevice,
    MemoryPlan,
    MemoryPlanError,
    available_memory,
    byte_range,
    check_memory,
    linear_shapes,
    longest_fitting_seq_len,
    plan_memory,
    release_file_pages,
    release_scratch_memory,
)
from model import (EMBEDDING_KEY, OUTPUT_KEY, FusedPlace, ModelArgs, RopeScaling, Transformer, expected_shapes,
                   fused_name)
from quantize import INT4, PLAIN, W8A8, linear_layer_names, linear_storage, make_linear
from smoothing import smooth_w8a8

PARAMS_FILE = "params.json"
SHARD_GLOB = "consolidated.*.pth"
SHARD_NAME = "consolidated.{:02d}.pth"
SHARD_NUMBER = re.compile(r"consolidated\.(\d+)\.pth")
# Meta's Llama 2 checkpoints carry a precomputed RoPE table that the model recomputes itself.
KNOWN_EXTRA_KEYS = ("rope.freqs",)
# How torch.load(weights_only=True) begins its message when a pickle holds more than tensors
# (torch/serialization.py); its advice, to load with weights_only=False, we never pass on.
WEIGHTS_ONLY_REFUSAL = "Weights only load failed"
# Meta's Llama 2 params.json writes `"vocab_size": -1`: "take it from the tokenizer". Only
# `model_args_from_params` looks for it; inside the engine an unknown size is None.
PARAMS_VOCAB_FROM_TOKENIZER = -1

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


def choose_dtype(
    dtype: Union[str, torch.dtype, None], device: torch.device, quantize: Optional[str] = None,
) -> torch.dtype:
    """The dtype asked for, or the default for the device and the quantization:

    * GPUs: float16; but bfloat16 for int4 on CUDA, the only activation dtype its kernel takes.
    * CPUs: bfloat16, half of float32's memory. Where the CPU has no native bf16 (e.g. Ice Lake),
      oneDNN emulates bf16 matmuls with float32 arithmetic, which makes prompts 2-2.5x slower than
      in float32; there the linear layers multiply prompts in float32 (bf16_layers.WidenedLinear) and
      decode in bf16, which reads half the bytes (measured faster than float32: README, "Speed").
    """
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if quantize == INT4 else torch.float16
        if device.type != "cpu":
            return torch.float16
        return torch.bfloat16
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES.values():
            raise ValueError(f"unsupported dtype {dtype}: use float32, bfloat16 or float16")
        return dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[dtype]


# --------------------------------------------------------------------------------------------
# params.json -> ModelArgs
# --------------------------------------------------------------------------------------------


def check_checkpoint_dir(ckpt_dir: Union[str, Path]) -> Path:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.exists():
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist")
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint path {ckpt_dir} is not a directory (expected a Meta checkpoint dir)")
    return ckpt_dir


def read_params_file(path: Path) -> dict:
    """A params.json (any file name) as a dict, with a clear error if it is not a JSON object."""
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(params, dict):
        raise CheckpointError(f"{path} must hold a JSON object of model hyperparameters")
    return params


def read_params(ckpt_dir: Union[str, Path]) -> dict:
    """params.json of a checkpoint dir as a dict, with a clear error if it is missing or not a JSON object."""
    path = check_checkpoint_dir(ckpt_dir) / PARAMS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a Meta checkpoint dir needs params.json")
    return read_params_file(path)


def params_types() -> dict[str, tuple[type, ...]]:
    """Every key params.json may hold, with the types ModelArgs declares for it (Optional: + NoneType)."""
    return declared_types(ModelArgs)


def declared_types(cls: type) -> dict[str, tuple[type, ...]]:
    """Every init field of the dataclass `cls`, with the types it declares (Optional[X]: X and NoneType)."""
    hints = typing.get_type_hints(cls)
    return {f.name: typing.get_args(hints[f.name]) or (hints[f.name],) for f in fields(cls) if f.init}


# How a type is spelled to someone writing JSON.
JSON_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
                   dict: "an object", type(None): "null"}
# rope_scaling's keys: RopeScaling's fields, plus Hugging Face's name for the scheme.
ROPE_SCALING_TYPES = {**declared_types(RopeScaling), "rope_type": (str,)}


def has_type(value: object, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # JSON's true is no number, though Python's True is an int
        return bool in allowed
    if isinstance(value, int) and float in allowed:  # JSON may write 10000.0 as 10000
        return True
    if isinstance(value, float) and not math.isfinite(value):  # Python's json reads NaN and Infinity
        return False
    return isinstance(value, allowed)


def check_types(values: dict, known: dict[str, tuple[type, ...]], where: str) -> None:
    """Every key of `values` known and every value of its declared type, or one line naming the key,
    the value (as JSON writes it) and the type expected."""
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise CheckpointError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    for key, value in values.items():
        if not has_type(value, known[key]):
            expected = " or ".join(JSON_TYPE_NAMES.get(t, t.__name__) for t in known[key])
            raise CheckpointError(f"{where}: {key} is {json.dumps(value)}, expected {expected}")


def check_params_types(params: dict, params_path: Path) -> None:
    """Every key known and every value of the type ModelArgs expects (rope_scaling's too), or an
    error naming the key."""
    check_types(params, params_types(), str(params_path))
    if isinstance(params.get("rope_scaling"), dict):
        check_types(params["rope_scaling"], ROPE_SCALING_TYPES, f"{params_path}: rope_scaling")


def check_size_argument(name: str, value: object) -> int:
    """A run-time size (max_seq_len, max_batch_size) that is an integer >= 1, or an error that starts
    with its name: it is the caller's argument (a command-line flag), not params.json's."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_path_argument(name: str, value: object, optional: bool = False) -> None:
    """A file or directory argument that is a path (str or os.PathLike), or an error naming it."""
    if value is None and optional:
        return
    if not isinstance(value, (str, os.PathLike)):
        also = " or None" if optional else ""
        raise TypeError(f"{name} must be a path (str or pathlib.Path){also}, got {type(value).__name__} {value!r}")


def check_build_arguments(
    ckpt_dir: object, tokenizer_path: object, max_seq_len: object, max_batch_size: object, **flags: object
) -> None:
    """LLaMa.build's arguments checked where they come in: each error starts with the argument's name."""
    check_path_argument("ckpt_dir", ckpt_dir)
    check_path_argument("tokenizer_path", tokenizer_path, optional=True)
    check_size_argument("max_seq_len", max_seq_len)
    check_size_argument("max_batch_size", max_batch_size)
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")


def leaves_vocab_to_tokenizer(params: dict) -> bool:
    """Whether params.json leaves the vocabulary size to the tokenizer (Llama 2 writes -1)."""
    return params.get("vocab_size", PARAMS_VOCAB_FROM_TOKENIZER) == PARAMS_VOCAB_FROM_TOKENIZER


def model_args_from_params(params: dict, params_path: Path, max_seq_len: int, max_batch_size: int) -> ModelArgs:
    """ModelArgs from params.json plus the run-time sizes; Llama 2's -1 becomes vocab_size None."""
    check_size_argument("max_seq_len", max_seq_len)
    check_size_argument("max_batch_size", max_batch_size)
    check_params_types(params, params_path)
    if leaves_vocab_to_tokenizer(params):
        params = {**params, "vocab_size": None}
    try:
        return ModelArgs(**{**params, "max_seq_len": max_seq_len, "max_batch_size": max_batch_size})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{params_path}: {e}") from None


def load_model_args(
    ckpt_dir: Union[str, Path], max_seq_len: int, max_batch_size: int, vocab_size: Optional[int] = None
) -> ModelArgs:
    """ModelArgs of a checkpoint dir, with a vocabulary size that is an int.

    Where params.json says -1 the size comes from the weights' shapes if the shards are there, else
    from `vocab_size` (the tokenizer's size), else it is an error.
    """
    ckpt_dir = check_checkpoint_dir(ckpt_dir)
    args = model_args_from_params(read_params(ckpt_dir), ckpt_dir / PARAMS_FILE, max_seq_len, max_batch_size)
    if args.vocab_size is not None:
        return args
    if any(ckpt_dir.glob(SHARD_GLOB)):
        shards = list_shards(ckpt_dir)
        first = {name: t.shape for name, t in open_shard(shards[0]).items()}
        vocab_size = vocab_size_from_shard_shapes(first, len(shards), args.dim, shards[0])
    if vocab_size is None:
        raise CheckpointError(
            f"{ckpt_dir / PARAMS_FILE} says vocab_size -1 (\"take it from the tokenizer\") and there are no "
            f"{SHARD_GLOB} files in {ckpt_dir} to read it from: pass --vocab-size N (vocab_size=, the tokenizer's size)"
        )
    return replace(args, vocab_size=vocab_size)


# --------------------------------------------------------------------------------------------
# The shard files, and how Meta cut each tensor across them
# --------------------------------------------------------------------------------------------


def list_shards(ckpt_dir: Union[str, Path]) -> list[Path]:
    """consolidated.00.pth ... consolidated.NN.pth, in order and without a gap (a missing one is named)."""
    ckpt_dir = check_checkpoint_dir(ckpt_dir)
    shards = sorted(ckpt_dir.glob(SHARD_GLOB))
    if not shards:
        raise CheckpointError(f"no {SHARD_GLOB} files in {ckpt_dir}: not a Meta checkpoint dir")
    numbers = []
    for path in shards:
        match = SHARD_NUMBER.fullmatch(path.name)
        if match is None:
            raise CheckpointError(f"{path}: unexpected file name; shards are named like {SHARD_NAME.format(0)}")
        numbers.append(int(match.group(1)))
    for expected, number in enumerate(numbers):
        if number != expected:
            raise CheckpointError(
                f"{ckpt_dir}: found shards {numbers}, so {SHARD_NAME.format(expected)} is missing "
                f"(shards must be numbered 00, 01, ... without a gap)"
            )
    return shards


def first_line_of(error: Exception) -> str:
    """The first line of an error's message (torch's can run to several, with advice we do not give)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def open_shard(path: Path) -> dict[str, torch.Tensor]:
    """A shard's state dict, memory-mapped (nothing read until used) and loaded as data only."""
    try:
        state_dict = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        if WEIGHTS_ONLY_REFUSAL in str(e):  # weights_only's unpickler met something that is not a tensor
            raise CheckpointError(
                f"{path} contains objects other than tensors: it will not be loaded, because loading it "
                f"could run code (a Meta checkpoint holds only tensors)"
            ) from None
        raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint: {first_line_of(e)}") from None
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint: {first_line_of(e)}") from None
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path} holds a {type(state_dict).__name__}, expected a state dict")
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: {name!r} holds a {type(value).__name__}, expected a tensor")
    for name in KNOWN_EXTRA_KEYS:
        state_dict.pop(name, None)
    return state_dict


@dataclass
class TensorLayout:
    """How one tensor is stored: its full shape, and the dim its shards cut (None: not cut)."""

    shape: torch.Size
    split_dim: Optional[int]


def embedding_split_dim(shard_shape: torch.Size, n_shards: int, dim: int) -> int:
    """Llama 2 splits the embedding on the model dim (dim 1), Llama 3 on the vocabulary (dim 0)."""
    return ROW_PARALLEL_DIM if shard_shape[1] * n_shards == dim else COLUMN_PARALLEL_DIM


def meta_split_dim(name: str, embedding_dim: Optional[int]) -> Optional[int]:
    """The dim Meta cuts `name` on in a multi-shard checkpoint, given the embedding's; None: replicated."""
    if name == EMBEDDING_KEY:
        return embedding_dim
    return SPLIT_DIMS.get(name.split(".")[-2])  # "layers.3.attention.wq.weight" -> "wq"


def stored_layout(name: str, shard_shape: torch.Size, n_shards: int, dim: int) -> TensorLayout:
    """The full shape of `name` and the dim Meta cut it on, from the shape of one of its n_shards slices."""
    if n_shards == 1:
        return TensorLayout(torch.Size(shard_shape), None)
    embedding_dim = embedding_split_dim(shard_shape, n_shards, dim) if name == EMBEDDING_KEY else None
    split = meta_split_dim(name, embedding_dim)
    if split is None:  # replicated: every shard holds the whole tensor
        return TensorLayout(torch.Size(shard_shape), None)
    full = list(shard_shape)
    full[split] *= n_shards
    return TensorLayout(torch.Size(full), split)


def vocab_size_from_shard_shapes(
    shapes: dict[str, torch.Size], n_shards: int, dim: int, where: Union[str, Path]
) -> int:
    """The vocabulary size from one shard's tensor shapes: the rows of the (merged) output head,
    or of the embedding if there is no head."""
    for name in (OUTPUT_KEY, EMBEDDING_KEY):
        if name in shapes:
            return stored_layout(name, shapes[name], n_shards, dim).shape[0]
    raise CheckpointError(f"{where}: neither {OUTPUT_KEY} nor {EMBEDDING_KEY} is there to tell the vocabulary size")


# --------------------------------------------------------------------------------------------
# The reader: any slice of any tensor, whatever the shard count
# --------------------------------------------------------------------------------------------


class ShardedCheckpoint:
    """A Meta checkpoint dir opened for reading: every shard memory-mapped, every layout checked.

    args: the model's (any run-time sizes will do); None reads params.json. A vocab_size of None
    is read from the weights. Nothing is read from disk until `read` touches it. Every tensor's
    layout is checked against `expected_shapes(args)` first, so a missing shard or a params.json
    of another model is reported by name before anything is loaded.
    """

    def __init__(self, ckpt_dir: Union[str, Path], args: Optional[ModelArgs] = None):
        self.dir = check_checkpoint_dir(ckpt_dir)
        self.paths = list_shards(self.dir)
        if args is None:
            args = model_args_from_params(read_params(self.dir), self.dir / PARAMS_FILE, 1, 1)
        self.shards = [open_shard(path) for path in self.paths]
        if args.vocab_size is None:  # Llama 2's params.json says -1: the weights know
            shapes = {name: t.shape for name, t in self.shards[0].items()}
            args = replace(args, vocab_size=vocab_size_from_shard_shapes(shapes, self.n_shards, args.dim, self.paths[0]))
        self.args = args
        self.layouts = self._check_layouts()

    @property
    def n_shards(self) -> int:
        return len(self.paths)

    def names(self) -> list[str]:
        """Every tensor's name, in the order of the first shard."""
        return list(self.layouts)

    def pieces(self, name: str) -> list[torch.Tensor]:
        """The slices of `name` as stored, one per shard (memory-mapped)."""
        return [shard[name] for shard in self.shards]

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, length: Optional[int] = None) -> torch.Tensor:
        """The slice [start, start + length) along `dim` of the full tensor `name` (dim None: all of it).

        Only the shards that hold part of the slice are touched. The result may be a view into a
        memory-mapped shard (no copy, nothing read yet); `torch.save` of a view writes its whole
        underlying tensor, so clone a slice before saving it.
        """
        layout = self.layouts[name]
        pieces = self.pieces(name)
        if dim is None:
            dim, start, length = 0, 0, layout.shape[0]
        if length is None:
            length = layout.shape[dim] - start
        if not (0 <= start and 0 < length and start + length <= layout.shape[dim]):
            raise ValueError(f"{name}: slice [{start}, {start + length}) is outside dim {dim} of {tuple(layout.shape)}")
        if layout.split_dim is None:  # every shard holds the whole tensor
            return pieces[0].narrow(dim, start, length)
        if layout.split_dim != dim:  # cut across the shards' own cut: a slab of each, glued back
            return torch.cat([piece.narrow(dim, start, length) for piece in pieces], dim=layout.split_dim)
        # Same dim: shard i holds [i * size, (i + 1) * size); keep the overlap of each with the slice.
        size = pieces[0].shape[dim]
        overlaps = []
        for i, piece in enumerate(pieces):
            lo, hi = max(start, i * size), min(start + length, (i + 1) * size)
            if lo < hi:
                overlaps.append(piece.narrow(dim, lo - i * size, hi - lo))
        return overlaps[0] if len(overlaps) == 1 else torch.cat(overlaps, dim=dim)

    def copy(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """All of `name` copied out of the file in `dtype`; the file's pages behind it are released."""
        tensor = self.read(name).to(dtype, copy=True)
        release_file_pages(self.pieces(name))
        return tensor

    def _check_layouts(self) -> dict[str, TensorLayout]:
        """Every shard holds the same tensors with the same shapes, and together they make params.json's."""
        expected = expected_shapes(self.args)
        first_path, first_shard = self.paths[0], self.shards[0]
        for path, shard in zip(self.paths[1:], self.shards[1:]):
            if set(shard) != set(first_shard):
                diff = sorted(set(first_shard).symmetric_difference(shard))[:5]
                raise CheckpointError(f"shards disagree: {path.name} and {first_path.name} differ in tensors {diff}")
        missing, unexpected = sorted(set(expected) - set(first_shard)), sorted(set(first_shard) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"{first_path}: tensors do not match params.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        layouts = {}
        for name, first in first_shard.items():
            for path, shard in zip(self.paths[1:], self.shards[1:]):
                if shard[name].shape != first.shape or shard[name].dtype != first.dtype:
                    raise CheckpointError(
                        f"shards disagree on {name}: {first_path.name} has {tuple(first.shape)} {first.dtype}, "
                        f"{path.name} has {tuple(shard[name].shape)} {shard[name].dtype}"
                    )
            layout = stored_layout(name, first.shape, self.n_shards, self.args.dim)
            if tuple(layout.shape) != expected[name]:
                raise CheckpointError(self._shape_error(name, first.shape, layout.shape, expected[name]))
            layouts[name] = layout
        return layouts

    def _shape_error(self, name: str, stored: torch.Size, full: torch.Size, expected: tuple[int, ...]) -> str:
        if self.n_shards == 1:
            return f"{name} in {self.paths[0]} has shape {tuple(full)}, but params.json implies {expected}"
        return (
            f"{name}: {self.n_shards} shard(s) of {tuple(stored)} in {self.dir} make {tuple(full)}, but params.json "
            f"implies {expected}: the shard count ({self.n_shards}) or params.json does not belong to this model "
            f"(is a shard missing?)"
        )


# --------------------------------------------------------------------------------------------
# Loading: the reader's tensors into one Transformer on one device
# --------------------------------------------------------------------------------------------


def load_transformer(
    ckpt_dir: Union[str, Path],
    args: ModelArgs,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
    quantize: Optional[str] = None,
    needs_gradients: bool = False,
    available_bytes: Optional[int] = None,
    fuse_projections: bool = False,
) -> Transformer:
    """Build a Transformer from every consolidated.NN.pth shard of `ckpt_dir`, on `device` in `dtype`.

    How the linear layers are stored is `quantize.linear_storage`'s decision: quantize (None,
    "int8" or "int4") quantizes each weight as soon as it is read, so the full-precision model
    never exists in memory; bf16 on a CPU is prepacked for oneDNN where the CPU has native bf16,
    widened for prompts where it has not
    (bf16_layers.WidenedLinear), and plain nn.Linear when differentiated (`needs_gradients=True`). Before
    anything is loaded, the memory plan (weights + KV cache) is checked against `available_bytes`
    (None: what the device has free now), and a model that will not fit is refused with suggestions.
    w8a8: smoothed once loaded (smoothing.py), re-reading the weights that follow each RMSNorm.
    fuse_projections: join wq|wk|wv and w1|w3 into one layer each as they are read
    (`ModelArgs.fused_projections`); the checkpoint is still read, and checked, under Meta's names.
    """
    storage = linear_storage(device, dtype, quantize, needs_gradients)
    checkpoint = ShardedCheckpoint(ckpt_dir, args)
    args = checkpoint.args
    check_memory(plan_memory(args, dtype, quantize, device, available_bytes), args, dtype, quantize)

    with torch.device("meta"):
        model = Transformer(replace(args, fused_projections=fuse_projections))
    linear_layers = set(linear_layer_names(model))
    loaded = {}
    fusing = FusedWeights() if fuse_projections else None
    to_device = HostToDevice(device)  # to a GPU through pinned buffers; elsewhere a plain .to
    for name in tqdm(checkpoint.names(), desc=f"loading {checkpoint.dir.name}", unit="tensor", disable=not progress):
        tensor = checkpoint.read(name)
        tensor = to_device.to(tensor)  # as stored (cast, and quantized, on the device); on a CPU the same tensor
        module_name = name.removesuffix(".weight")
        pieces = checkpoint.pieces(name)
        place = fused_name(name) if fusing is not None else None
        if place is not None:
            joined = fusing.add(place, tensor, pieces)
            if joined is None:
                continue  # the fused layer still waits for another of its parts
            module_name, tensor, pieces = joined
        if module_name in linear_layers:
            # The layer as `storage` says, on the target device, in place of the (shapes-only)
            # nn.Linear; its tensors join the state dict under the layer's name.
            layer = make_linear(module_name, tensor, storage, dtype, device,
                                done_with_part=lambda part, pieces=pieces: release_mapped_part(part, pieces))
            if storage != PLAIN:
                release_scratch_memory(device)
            model.set_submodule(module_name, layer)
            kept = {f"{module_name}.{key}": t for key, t in layer.state_dict().items()}
        else:
            kept = {name: tensor.to(device=device, dtype=dtype)}  # no copy if nothing changes
        loaded.update(kept)
        if not any(shares_memory(t, pieces) for t in kept.values()):
            release_file_pages(pieces)  # copied out: the file's pages need not stay in our memory
    to_device.close()
    model.load_state_dict(loaded, strict=True, assign=True)
    del loaded  # the model holds its tensors now; the layers smoothing replaces must not stay alive here
    model.setup_caches(device, dtype)
    if storage == W8A8:  # its layers after each RMSNorm, quantized again from smoothed weights (smoothing.py)
        smooth_w8a8(model, lambda name: checkpoint.copy(name, torch.float32), lambda: release_scratch_memory(device))
    return model.eval()


class FusedWeights:
    """Collects the weights of a fused projection as the loader reads them (model.FUSED_PROJECTIONS).

    `add` keeps each part until its fused layer has them all, then hands back the layer's name, its
    weight (the parts' rows, in order: wq, wk, wv or w1, w3) and the file pieces they came from.
    """

    def __init__(self):
        self.waiting: dict[str, dict[int, tuple[torch.Tensor, list[torch.Tensor]]]] = {}

    def add(self, place: FusedPlace, tensor: torch.Tensor, pieces: list[torch.Tensor]):
        parts = self.waiting.setdefault(place.module, {})
        parts[place.index] = (tensor, pieces)
        if len(parts) < place.n_parts:
            return None
        del self.waiting[place.module]
        ordered = [parts[i] for i in range(place.n_parts)]
        weight = torch.cat([t for t, _ in ordered])  # (sum of the parts' N, K)
        return place.module, weight, [piece for _, part_pieces in ordered for piece in part_pieces]


def release_mapped_part(part: torch.Tensor, mapped: list[torch.Tensor]) -> None:
    """Give back the file pages behind `part`, rows of a weight being converted, if it lies inside one
    of the memory-mapped `mapped` (a converted copy, e.g. a float32 file's weight cast to bf16, is
    ordinary memory: left alone, as release_file_pages must never see it). The mapping is private and
    never written, so the pages read back from the file as they were."""
    if part.device.type != "cpu" or part.layout != torch.strided or not part.is_contiguous():
        return
    start, end = byte_range(part)
    for piece in mapped:
        if piece.device.type != "cpu" or not piece.is_contiguous():
            continue
        piece_start, piece_end = byte_range(piece)
        if piece_start <= start and end <= piece_end:
            release_file_pages([part])
            return


def shares_memory(tensor: torch.Tensor, mapped: list[torch.Tensor]) -> bool:
    """Whether `tensor` still points into one of the memory-mapped `mapped` (nothing was copied)."""
    if tensor.layout != torch.strided:  # e.g. a prepacked oneDNN weight: always a new buffer
        return False
    return any(tensor.data_ptr() == piece.data_ptr() for piece in mapped)


def check_vocab_matches(tokenizer_n_words: int, tokenizer_path: Path, args: ModelArgs) -> None:
    if tokenizer_n_words != args.vocab_size:
        raise CheckpointError(
            f"tokenizer {tokenizer_path} has {tokenizer_n_words} tokens but the model's vocab_size is "
            f"{args.vocab_size}: they belong to different models"
        )


# Names this module had before the memory plan got memory.py and the shards one reader.
MOVED_NAMES = {
    "GIB": "memory.GIB", "LOGITS_DTYPE": "memory.LOGITS_DTYPE", "MEMINFO": "memory.MEMINFO",
    "activations_bytes": "memory.activations_bytes", "kv_cache_bytes": "memory.kv_cache_bytes",
    "weights_bytes": "memory.weights_bytes", "merge_slices": "checkpoint.ShardedCheckpoint (read, pieces, layouts)",
    "split_dim": "checkpoint.ShardedCheckpoint (read, pieces, layouts)",
    "infer_vocab_size": "checkpoint.ShardedCheckpoint (read, pieces, layouts)",
    "check_same_tensor_names": "checkpoint.ShardedCheckpoint (read, pieces, layouts)",
    "usable_cpus": "cpu.usable_cpus", "choose_threads": "cpu.choose_threads",
    "fit_default_dtype": "checkpoint.choose_dtype (bf16 on every CPU: bf16_layers.WidenedLinear where it is emulated)",
    "dtype_note": "cli.how_it_runs (the linear layers' storage says how a CPU computes)",
}


def __getattr__(name: str):
    """PEP 562: a name that moved says where it went, in one line."""
    where = MOVED_NAMES.get(name)
    raise AttributeError(f"checkpoint.{name} moved: use {where}" if where else
                         f"module 'checkpoint' has no attribute {name!r}")
