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

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional, Union

import torch
from tqdm import tqdm

from model import ModelArgs, Transformer

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
) -> Transformer:
    """Build a Transformer from every consolidated.NN.pth shard of `ckpt_dir`, on `device` in `dtype`."""
    shards = list_shards(ckpt_dir)
    state_dicts = [open_shard(path) for path in shards]
    if not args.has_vocab_size:
        args = replace(args, vocab_size=infer_vocab_size(state_dicts, len(shards), args.dim))

    with torch.device("meta"):
        model = Transformer(args)
    expected_shapes = {name: t.shape for name, t in model.state_dict().items()}

    names = list(state_dicts[0])
    check_same_tensor_names(shards, state_dicts, expected_shapes)
    merged = {}
    for name in tqdm(names, desc=f"loading {Path(ckpt_dir).name}", unit="tensor", disable=not progress):
        tensor = merge_slices(name, [sd[name] for sd in state_dicts], shards, args.dim)
        if tensor.shape != expected_shapes[name]:
            where = shards[0] if len(shards) == 1 else f"{shards[0]} .. {shards[-1].name} (merged)"
            raise CheckpointError(
                f"{name} in {where} has shape {tuple(tensor.shape)}, "
                f"but params.json implies {tuple(expected_shapes[name])}"
            )
        merged[name] = tensor.to(device=device, dtype=dtype)
    model.load_state_dict(merged, strict=True, assign=True)
    model.setup_caches(device, dtype)
    return model.eval()


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
