"""Look at a Llama checkpoint without loading its weights: architecture, parameters, bytes, memory.

    python inspect_checkpoint.py CKPT_DIR            # a Meta checkpoint directory
    python inspect_checkpoint.py path/to/params.json # just the architecture: counts from the shapes

What it prints, and where each number comes from:

1. **Architecture**: params.json in words (layers, heads, KV heads, head dim, FFN hidden size,
   vocabulary, RoPE theta and scaling). Derived sizes come from `model.ModelArgs`, the same code
   that sizes the real model, so they cannot drift from it.
2. **Parameters** per component (embedding, attention, feed-forward, norms, head) and the total.
   For a directory they are counted from the tensors' shapes in the shards; for a bare
   params.json, from `checkpoint.expected_shapes`, the shapes a `Transformer` of those args has
   (computed, not built: nothing is allocated, even for 405B).
3. **On disk**: bytes per dtype, and each shard file with what it holds.
4. **Memory to run** at a dtype (and `--quantize`) / max_seq_len / batch size: the weights, the
   KV cache (two tensors per layer, (batch, n_kv_heads, max_seq_len, head_dim) each, as
   `model.KVCache` allocates them) and the activations, from `memory.plan_memory`: the same
   plan `LLaMa.build` checks before it loads anything.

## The tensor index (which tensor is in which shard)
Meta's shards are pickled state dicts. Learning their tensors' names, shapes and dtypes means
unpickling each shard's header (cheap with `mmap=True`: no tensor data is read, but still one
file open per shard). We do that once and cache the answer next to the checkpoint as
`tensor_index.json`; a shard whose size or modification time changed makes the cache stale, and
it is rebuilt. The file is written atomically (atomic.py: a temporary name, then a rename), and in
a read-only directory it is simply not written. The index only describes the shards: merged
shapes follow checkpoint.py's one rule (`stored_layout`), and tensors are read through its reader
(`ShardedCheckpoint`). `interpret.py` uses the same index to load only a range of layers.

## Llama 2's "vocab_size": -1
Meta's Llama 2 params.json leaves the vocabulary to the tokenizer. We resolve it, in order, from
`--vocab-size`, from the weights' shapes (a checkpoint directory), or from the `tokenizer.model`
next to params.json. If none is there (a bare preset such as params/llama-2-7b.json), it is Llama
2's 32,000: -1 is Llama 2's convention (Llama 3 and our converter write the size), and every Llama
2 model shares Meta's one tokenizer. Not silently: the report's "vocabulary" line says that this is
where the number came from, and `--vocab-size` overrides it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Union

import torch

from atomic import write_text_atomically
from checkpoint import (
    EMBEDDING_KEY,
    OUTPUT_KEY,
    PARAMS_FILE,
    CheckpointError,
    ShardedCheckpoint,
    check_checkpoint_dir,
    choose_dtype,
    expected_shapes,
    list_shards,
    model_args_from_params,
    open_shard,
    read_params,
    read_params_file,
    stored_layout,
    vocab_size_from_shard_shapes,
)
from inference import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_SEQ_LEN
from memory import plan_memory
from model import ModelArgs
from quantize import SCHEMES

INDEX_FILE = "tensor_index.json"
INDEX_FORMAT = "llama-from-scratch tensor index"
INDEX_VERSION = 1
# params.json's "vocab_size": -1 is Llama 2's convention (Llama 3 writes its size), and all Llama 2
# models (7B to 70B, base and chat) share Meta's SentencePiece tokenizer.model of 32,000 pieces.
LLAMA2_VOCAB_SIZE = 32000
LLAMA2_VOCAB_SOURCE = "Llama 2's tokenizer: params.json says -1, Llama 2's convention, and nothing is next to it"
TOKENIZER_FILE = "tokenizer.model"


# Parameter components, in the order a token meets them.
COMPONENTS = ("embedding", "attention", "feed-forward", "norms", "head")
COMPONENT_LABELS = {
    "embedding": "embedding (tok_embeddings)",
    "attention": "attention (wq wk wv wo)",
    "feed-forward": "feed-forward (w1 w2 w3)",
    "norms": "norms (RMSNorm weights)",
    "head": "head (output)",
    "other": "other tensors",
}


# --------------------------------------------------------------------------------------------
# The tensor index: names, shapes and dtypes of every shard, cached next to the checkpoint
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One tensor (or one model-parallel slice of it) as stored in one shard."""

    dtype: str  # "bfloat16", "float32", ... (torch's name without "torch.")
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_from_name(self.dtype).itemsize


@dataclass(frozen=True)
class ShardInfo:
    file: str  # name inside the checkpoint dir, e.g. "consolidated.00.pth"
    bytes: int  # file size: with mtime_ns, tells whether a cached index is still valid
    mtime_ns: int
    tensors: dict[str, TensorInfo]  # in the shard's own order


@dataclass(frozen=True)
class TensorIndex:
    ckpt_dir: Path
    shards: list[ShardInfo]

    @property
    def shard_paths(self) -> list[Path]:
        return [self.ckpt_dir / shard.file for shard in self.shards]

    def names(self) -> list[str]:
        """Every tensor name, in the order of the first shard that holds it."""
        seen: dict[str, None] = {}
        for shard in self.shards:
            seen.update(dict.fromkeys(shard.tensors))
        return list(seen)

    def shards_holding(self, name: str) -> list[int]:
        """Indices of the shards that hold (a slice of) `name`. All of them, in Meta's layout."""
        return [i for i, shard in enumerate(self.shards) if name in shard.tensors]

    def merged_shape(self, name: str, dim: int) -> tuple[int, ...]:
        """The shape of `name` once its slices are put together (checkpoint.stored_layout's rule)."""
        holders = self.shards_holding(name)
        if not holders:
            raise KeyError(name)
        shard_shape = torch.Size(self.shards[holders[0]].tensors[name].shape)
        return tuple(stored_layout(name, shard_shape, len(holders), dim).shape)


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown dtype name {name!r} in a tensor index")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def shard_fingerprint(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def read_shard_info(path: Path) -> ShardInfo:
    """Unpickle one shard's header (mmap: no tensor data is read) and note every tensor in it."""
    size, mtime_ns = shard_fingerprint(path)
    state_dict = open_shard(path)
    tensors = {name: TensorInfo(dtype_name(t.dtype), tuple(t.shape)) for name, t in state_dict.items()}
    return ShardInfo(path.name, size, mtime_ns, tensors)


def index_to_json(index: TensorIndex) -> dict:
    return {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "shards": [
            {
                "file": shard.file,
                "bytes": shard.bytes,
                "mtime_ns": shard.mtime_ns,
                "tensors": {name: {"dtype": t.dtype, "shape": list(t.shape)} for name, t in shard.tensors.items()},
            }
            for shard in index.shards
        ],
    }


def index_from_json(data: object, ckpt_dir: Path) -> Optional[TensorIndex]:
    """The index in `data`, or None if it is not one we wrote (another version, edited, truncated)."""
    try:
        if data["format"] != INDEX_FORMAT or data["version"] != INDEX_VERSION:
            return None
        shards = [
            ShardInfo(
                file=str(shard["file"]),
                bytes=int(shard["bytes"]),
                mtime_ns=int(shard["mtime_ns"]),
                tensors={
                    str(name): TensorInfo(str(t["dtype"]), tuple(int(n) for n in t["shape"]))
                    for name, t in shard["tensors"].items()
                },
            )
            for shard in data["shards"]
        ]
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return TensorIndex(ckpt_dir, shards)


def read_cached_index(ckpt_dir: Path, shard_paths: list[Path]) -> Optional[TensorIndex]:
    """The cached index if it describes exactly these shard files as they are now, else None."""
    path = ckpt_dir / INDEX_FILE
    try:
        index = index_from_json(json.loads(path.read_text()), ckpt_dir)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if index is None or [s.file for s in index.shards] != [p.name for p in shard_paths]:
        return None
    for shard, shard_path in zip(index.shards, shard_paths):
        if (shard.bytes, shard.mtime_ns) != shard_fingerprint(shard_path):
            return None
    return index


def write_index_atomically(index: TensorIndex) -> bool:
    """Write tensor_index.json atomically; False if the directory is not writable (a cache we cannot
    keep is no error)."""
    try:
        write_text_atomically(index.ckpt_dir / INDEX_FILE, json.dumps(index_to_json(index)))
    except OSError:
        return False
    return True


def tensor_index(ckpt_dir: Union[str, Path], cache: bool = True) -> TensorIndex:
    """Which tensors (names, shapes, dtypes) each shard of a Meta checkpoint dir holds.

    Read from `tensor_index.json` when it is up to date, else built from the shards and cached there.
    """
    ckpt_dir = check_checkpoint_dir(ckpt_dir)
    shard_paths = list_shards(ckpt_dir)
    if cache:
        cached = read_cached_index(ckpt_dir, shard_paths)
        if cached is not None:
            return cached
    index = TensorIndex(ckpt_dir, [read_shard_info(path) for path in shard_paths])
    if cache:
        write_index_atomically(index)
    return index


# --------------------------------------------------------------------------------------------
# Architecture and parameter counts
# --------------------------------------------------------------------------------------------


def component_of(name: str) -> str:
    """Which part of the model a tensor belongs to, from its Meta name."""
    if name == EMBEDDING_KEY:
        return "embedding"
    if name == OUTPUT_KEY:
        return "head"
    if name.endswith("norm.weight"):  # attention_norm, ffn_norm, and the final norm
        return "norms"
    if ".attention.w" in name:
        return "attention"
    if ".feed_forward.w" in name:
        return "feed-forward"
    return "other"


model_shapes = expected_shapes  # the name interpret.py imports


def count_by_component(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for name, shape in shapes.items():
        counts[component_of(name)] += int(torch.Size(shape).numel())
    return dict(counts)


def checkpoint_shapes(index: TensorIndex, dim: int) -> dict[str, tuple[int, ...]]:
    return {name: index.merged_shape(name, dim) for name in index.names()}


def vocab_size_from_shapes(index: TensorIndex, dim: int) -> int:
    """Rows of the head (or of the embedding if there is no head): the vocabulary size."""
    first = {name: torch.Size(t.shape) for name, t in index.shards[0].tensors.items()}
    return vocab_size_from_shard_shapes(first, len(index.shards), dim, index.shard_paths[0])


@dataclass
class Resolved:
    """params.json made concrete: ModelArgs with a real vocab_size, and where that size came from."""

    args: ModelArgs
    params_path: Path
    vocab_source: str
    index: Optional[TensorIndex]  # None when given only a params.json


def resolve(
    path: Union[str, Path],
    vocab_size: Optional[int] = None,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
) -> Resolved:
    """Read a checkpoint dir or a params.json; fill in a vocab_size of -1 (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: give a checkpoint directory or a params.json")
    if path.is_dir():
        params, params_path = read_params(path), path / PARAMS_FILE
        index = tensor_index(path)
    else:
        params, params_path, index = read_params_file(path), path, None
    args = model_args_from_params(params, params_path, max_seq_len=max_seq_len, max_batch_size=max_batch_size)

    if args.vocab_size is not None:
        if vocab_size is not None and vocab_size != args.vocab_size:
            raise CheckpointError(
                f"--vocab-size {vocab_size} disagrees with vocab_size {args.vocab_size} in {params_path}"
            )
        return Resolved(args, params_path, "params.json", index)
    if vocab_size is not None:
        if vocab_size < 1:
            raise CheckpointError(f"--vocab-size must be >= 1, got {vocab_size}")
        return Resolved(replace(args, vocab_size=vocab_size), params_path, "--vocab-size", index)
    if index is not None:
        return Resolved(replace(args, vocab_size=vocab_size_from_shapes(index, args.dim)), params_path,
                        "the weights' shapes", index)
    tokenizer_path = params_path.with_name(TOKENIZER_FILE)
    if tokenizer_path.is_file():
        from tokenizer import Tokenizer  # only needed for this fallback

        n_words = Tokenizer(tokenizer_path).n_words
        return Resolved(replace(args, vocab_size=n_words), params_path, f"the tokenizer {tokenizer_path}", index)
    # A bare params.json (e.g. params/llama-2-7b.json) with nothing next to it: -1 is Llama 2's way
    # of writing it, and every Llama 2 model shares Meta's one tokenizer, so its size is known.
    return Resolved(replace(args, vocab_size=LLAMA2_VOCAB_SIZE), params_path, LLAMA2_VOCAB_SOURCE, index)


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def describe_architecture(resolved: Resolved) -> list[str]:
    a = resolved.args
    if a.n_kv_heads == a.n_heads:
        kv = f"{a.n_kv_heads} (multi-head attention: one K/V head per query head)"
    elif a.n_kv_heads == 1:
        kv = f"{a.n_kv_heads} (multi-query attention: all query heads share it)"
    else:
        kv = f"{a.n_kv_heads} (grouped-query attention: {a.n_rep} query heads share each K/V head)"
    ffn = f"{a.ffn_hidden_dim} (SwiGLU: 2/3 of 4 x dim"
    ffn += f", x {a.ffn_dim_multiplier}" if a.ffn_dim_multiplier is not None else ""
    ffn += f", rounded up to a multiple of {a.multiple_of})"
    if a.rope_scaling_args is None:
        scaling = "none"
    else:
        s = a.rope_scaling_args
        scaling = (f"Llama 3.1 frequency scaling: factor {s.factor:g}, low/high freq factors "
                   f"{s.low_freq_factor:g}/{s.high_freq_factor:g}, original context {s.original_max_position_embeddings}")
    rows = [
        ("layers (blocks)", str(a.n_layers)),
        ("model dim", str(a.dim)),
        ("query heads", str(a.n_heads)),
        ("key/value heads", kv),
        ("head dim", f"{a.head_dim} (= dim / query heads)"),
        ("FFN hidden size", ffn),
        ("vocabulary", f"{a.vocab_size:,} (from {resolved.vocab_source})"),
        ("RoPE theta", f"{a.rope_theta:g}"),
        ("RoPE scaling", scaling),
        ("context", "not in params.json (see the model card); the memory estimate uses --max-seq-len"),
        ("norm eps", f"{a.norm_eps:g}"),
    ]
    width = max(len(k) for k, _ in rows)
    return [f"Architecture ({resolved.params_path})"] + [f"  {k:<{width}}  {v}" for k, v in rows]


def describe_parameters(counts: dict[str, int], args: ModelArgs, source: str) -> list[str]:
    total = sum(counts.values())
    per_layer = {"attention": args.n_layers, "feed-forward": args.n_layers}
    lines = [f"Parameters (counted from {source})"]
    names = [c for c in COMPONENTS if c in counts] + [c for c in counts if c not in COMPONENTS]
    labels = {c: COMPONENT_LABELS[c] + (f" x {per_layer[c]} layers" if c in per_layer else "") for c in names}
    width = max(len(label) for label in labels.values())
    for c in names:
        lines.append(f"  {labels[c]:<{width}}  {counts[c]:>17,}  {100 * counts[c] / total:5.1f}%")
    lines.append(f"  {'total':<{width}}  {total:>17,}")
    return lines


def describe_tying(shapes: dict[str, tuple[int, ...]], tied: Optional[bool], can_check: bool) -> list[str]:
    """Meta's format stores the head even when the model ties it to the embedding (Llama 3.2, SmolLM2)."""
    if shapes.get(OUTPUT_KEY) is None or shapes.get(OUTPUT_KEY) != shapes.get(EMBEDDING_KEY):
        return []
    shared = int(torch.Size(shapes[EMBEDDING_KEY]).numel())
    unique = sum(int(torch.Size(s).numel()) for s in shapes.values()) - shared
    if tied is None:
        check = " (--check-tied compares them)" if can_check else ""
        return [f"  if output is tied to tok_embeddings (Llama 3.2, SmolLM2): {unique:,} distinct parameters{check}"]
    if tied:
        return [f"  output.weight equals tok_embeddings.weight (tied): {unique:,} distinct parameters"]
    return ["  output.weight differs from tok_embeddings.weight: not tied"]


def describe_disk(index: TensorIndex, dim: int) -> list[str]:
    by_dtype: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # dtype -> [elements, bytes]
    for shard in index.shards:
        for t in shard.tensors.values():
            by_dtype[t.dtype][0] += t.numel
            by_dtype[t.dtype][1] += t.nbytes
    lines = ["On disk"]
    for dtype, (numel, nbytes) in sorted(by_dtype.items()):
        lines.append(f"  {dtype:<9} {numel:>17,} values  {human_bytes(nbytes):>9}")
    lines.append(f"  {len(index.shards)} shard(s):")
    n_shards = len(index.shards)
    for shard in index.shards:
        split = [n for n, t in shard.tensors.items() if stored_layout(n, torch.Size(t.shape), n_shards, dim).split_dim is not None]
        if n_shards == 1:
            held = f"{len(shard.tensors)} tensors, whole"
        else:
            held = (f"{len(shard.tensors)} tensors: a 1/{n_shards} slice of {len(split)} split ones, "
                    f"{len(shard.tensors) - len(split)} whole (replicated)")
        lines.append(f"    {shard.file}  {human_bytes(shard.bytes):>9}  {held}")
    return lines


def describe_memory(args: ModelArgs, dtype: torch.dtype, quantize: Optional[str]) -> list[str]:
    """memory.plan_memory's plan (the one `LLaMa.build` checks before loading), explained."""
    plan = plan_memory(args, dtype, quantize, torch.device("cpu"))
    b, s = args.max_batch_size, args.max_seq_len
    weights = f"{dtype_name(dtype)}" + (f", linear layers {quantize}" if quantize else "")
    rows = [
        ("weights", weights, plan.weights),
        ("KV cache", f"keys and values x {args.n_layers} layers x batch {b} x {s} positions x {args.n_kv_heads} "
                     f"KV heads x head dim {args.head_dim} x {dtype.itemsize} bytes", plan.kv_cache),
        ("activations", "the largest temporaries of a full-length prefill (an estimate)", plan.activations),
    ]
    lines = [f"Memory to run ({weights}, max_seq_len {s}, batch {b})"]
    for name, how, nbytes in rows:
        lines.append(f"  {name:<12} {human_bytes(nbytes):>9}  {how}")
    lines.append(f"  {'total':<12} {human_bytes(plan.total):>9}")
    if plan.available is not None:
        verdict = "fits" if plan.fits() else "does NOT fit"
        lines.append(f"  {'this machine':<12} {human_bytes(plan.available):>9}  available now: it {verdict}")
    return lines


def describe_tensors(index: TensorIndex) -> list[str]:
    lines = ["Tensors (per shard: dtype and shape of what that shard holds)"]
    for shard in index.shards:
        lines.append(f"  {shard.file}")
        for name, t in shard.tensors.items():
            lines.append(f"    {name:<40} {t.dtype:<9} {tuple(t.shape)}")
    return lines


def check_tied(ckpt_dir: Path, args: ModelArgs) -> bool:
    """Compare the head with the embedding, streaming both from the memory-mapped shards."""
    checkpoint = ShardedCheckpoint(ckpt_dir, args)
    return torch.equal(checkpoint.read(OUTPUT_KEY), checkpoint.read(EMBEDDING_KEY))


def parameter_counts(resolved: Resolved) -> tuple[dict[str, tuple[int, ...]], str]:
    """Shapes to count: the checkpoint's tensors if there are any, else the model's from params.json."""
    if resolved.index is not None:
        return checkpoint_shapes(resolved.index, resolved.args.dim), "the tensors in the shards"
    return model_shapes(resolved.args), "the shapes params.json implies"


def shape_mismatches(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> list[str]:
    problems = [f"missing {n}" for n in expected if n not in found]
    problems += [f"unexpected {n}" for n in found if n not in expected]
    problems += [f"{n} is {found[n]}, params.json implies {expected[n]}" for n in expected if n in found and found[n] != expected[n]]
    return problems


def report(
    path: Union[str, Path],
    vocab_size: Optional[int] = None,
    dtype: Union[str, torch.dtype] = "bfloat16",
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    list_tensors: bool = False,
    compare_tied: bool = False,
    quantize: Optional[str] = None,
) -> str:
    """The whole inspection report, as text."""
    resolved = resolve(path, vocab_size, max_seq_len, max_batch_size)
    args = resolved.args
    run_dtype = choose_dtype(dtype, torch.device("cpu"))
    shapes, source = parameter_counts(resolved)
    counts = count_by_component(shapes)

    lines = describe_architecture(resolved) + [""] + describe_parameters(counts, args, source)
    if resolved.index is not None:
        problems = shape_mismatches(shapes, model_shapes(args))
        if problems:
            lines.append(f"  warning: the tensors disagree with params.json: {'; '.join(problems[:5])}")
    tied = check_tied(resolved.index.ckpt_dir, args) if compare_tied and resolved.index is not None else None
    lines += describe_tying(shapes, tied, can_check=resolved.index is not None)
    if resolved.index is not None:
        lines += [""] + describe_disk(resolved.index, args.dim)
    lines += [""] + describe_memory(args, run_dtype, quantize)
    if list_tensors and resolved.index is not None:
        lines += [""] + describe_tensors(resolved.index)
    return "\n".join(lines)


def total_parameters(path: Union[str, Path], vocab_size: Optional[int] = None) -> int:
    """The total parameter count: every tensor in the checkpoint, or every weight params.json implies."""
    shapes, _ = parameter_counts(resolve(path, vocab_size))
    return sum(count_by_component(shapes).values())


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Describe a Llama checkpoint without loading its weights: architecture, parameter "
        "counts per component and in total, bytes on disk, shards, and memory needed to run it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("path", help="a Meta checkpoint directory, or a params.json on its own")
    parser.add_argument("--vocab-size", type=int,
                        help="vocabulary size when params.json says -1 (Llama 2) and neither weights nor a "
                        "tokenizer.model are next to it")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the weights and KV cache for the memory estimate")
    parser.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN,
                        help="positions the KV cache holds, for the memory estimate")
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                        help="sequences run together, for the memory estimate")
    parser.add_argument("--quantize", choices=SCHEMES, help="weight-only quantization, for the memory estimate")
    parser.add_argument("--tensors", action="store_true", help="also list every tensor of every shard")
    parser.add_argument("--check-tied", action="store_true",
                        help="read output.weight and tok_embeddings.weight to tell whether they are tied")
    parser.add_argument("--total-only", action="store_true", help="print only the total parameter count")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        for name in ("max_seq_len", "max_batch_size"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.total_only:
            print(total_parameters(args.path, args.vocab_size))
        else:
            print(report(args.path, args.vocab_size, args.dtype, args.max_seq_len, args.max_batch_size,
                         list_tensors=args.tensors, compare_tied=args.check_tied, quantize=args.quantize))
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# Names this module had before atomic.py became the one way to write a file.
MOVED_NAMES = {"FILE_MODE": "atomic.FILE_MODE", "current_umask": "atomic.current_umask"}


def __getattr__(name: str):
    """PEP 562: a name that moved says where it went, in one line."""
    where = MOVED_NAMES.get(name)
    raise AttributeError(f"inspect_checkpoint.{name} moved: use {where}" if where else
                         f"module 'inspect_checkpoint' has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
