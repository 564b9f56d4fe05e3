"""Resharding: cut a Meta checkpoint into N model-parallel shards, or merge N shards into one.

    python reshard.py SRC OUT --shards N

Meta ships each model cut into as many `consolidated.NN.pth` files as it used GPUs (Llama 2 70B
and Llama 3 70B: 8, Llama 3.1 405B: 8 or 16). How a tensor is cut is explained in checkpoint.py:
column-parallel weights (`wq wk wv w1 w3 output`) on dim 0, row-parallel ones (`wo w2`) on dim 1,
RMSNorm weights copied whole into every shard, the embedding on the model dim (Llama 2) or on the
vocabulary (Llama 3). This file rewrites a checkpoint with another shard count in that same layout,
so Meta's reference code, this project's loader and tensor_parallel.py all read the result.

This file only writes. Reading goes through checkpoint.py's reader (`ShardedCheckpoint.read`: any
slice of a tensor, whatever shard count the checkpoint has), so output shard i of N is a list of
`read(name, dim, i * size, size)` calls.

Memory: shards are memory-mapped, and output shards are made one at a time, tensor by tensor, so
the peak is one output shard (the whole model only when merging into one file), never two copies.
Output is atomic (atomic.py): everything is written into a temporary sibling directory that is
renamed to OUT at the very end, so OUT either does not exist or is complete; an error, Ctrl-C or
`kill` removes the temporary directory (after a `kill -9`, the next write into OUT's parent does).
A progress bar counts the tensors on a terminal (none in a pipe or a log, none with `--quiet`).

Not copied: `checklist.chk` (its checksums are of the source shards and would no longer match) and
Llama 2's `rope.freqs` tensor (a precomputed RoPE table the model recomputes; see checkpoint.py).
"""

import argparse
import shutil
import sys
from pathlib import Path
from typing import Optional, Union

import torch
from tqdm import tqdm

from atomic import atomic_dir
from checkpoint import (
    COLUMN_PARALLEL_DIM,
    EMBEDDING_KEY,
    ROW_PARALLEL_DIM,
    SHARD_NAME,
    SHARD_NUMBER,
    CheckpointError,
    ShardedCheckpoint,
    TensorLayout,
    leaves_vocab_to_tokenizer,
    meta_split_dim,
    read_params,
)
from model import ModelArgs

CHECKLIST_NAME = "checklist.chk"  # md5 sums of the source files: stale after resharding
INTERRUPTED_STATUS = 130  # what a shell reports for a program ended by Ctrl-C (128 + SIGINT)

# How Meta cuts the embedding, by model family (fairscale's layers in Meta's model.py): Llama 2's
# ParallelEmbedding splits the model dim, Llama 3's VocabParallelEmbedding splits the vocabulary.
EMBEDDING_SPLITS = {"model-dim": ROW_PARALLEL_DIM, "vocab": COLUMN_PARALLEL_DIM}


# --------------------------------------------------------------------------------------------
# Writing N shards
# --------------------------------------------------------------------------------------------


def default_embedding_split(src: ShardedCheckpoint) -> str:
    """Keep the source's embedding layout; for a one-shard source, follow the family's convention.

    Meta's Llama 2 params.json has vocab_size -1 and its code splits the model dim; Llama 3 writes
    the vocabulary size and splits the vocabulary. (Our own loader reads either.)
    """
    if src.n_shards > 1:
        split = src.layouts[EMBEDDING_KEY].split_dim
        return next(key for key, value in EMBEDDING_SPLITS.items() if value == split)
    return "model-dim" if leaves_vocab_to_tokenizer(read_params(src.dir)) else "vocab"


def check_shard_count(args: ModelArgs, layouts: dict[str, TensorLayout], n_shards: int, embedding_dim: int) -> None:
    """Every cut tensor must split into n_shards equal parts, each holding whole K/V heads."""
    if n_shards < 1:
        raise ValueError(f"--shards must be >= 1, got {n_shards}")
    if args.n_kv_heads % n_shards != 0:
        divisors = [d for d in range(1, args.n_kv_heads + 1) if args.n_kv_heads % d == 0]
        raise ValueError(
            f"--shards {n_shards} does not divide n_kv_heads={args.n_kv_heads} (params.json): every shard must "
            f"hold whole key/value heads; use one of {divisors}"
        )
    for name, layout in layouts.items():
        dim = meta_split_dim(name, embedding_dim) if n_shards > 1 else None
        if dim is not None and layout.shape[dim] % n_shards != 0:
            raise ValueError(
                f"cannot cut {name} {tuple(layout.shape)} into {n_shards} equal shards: dim {dim} "
                f"({layout.shape[dim]}) is not divisible by {n_shards}"
            )


def shard_state_dict(
    src: ShardedCheckpoint, n_shards: int, index: int, embedding_dim: int, bar: Optional[tqdm] = None
) -> dict[str, torch.Tensor]:
    """Output shard `index` of `n_shards`: each tensor's slice, copied out of the memory map
    (`bar`, if given, moves one step per tensor)."""
    state_dict = {}
    for name, layout in src.layouts.items():
        dim = meta_split_dim(name, embedding_dim) if n_shards > 1 else None
        if dim is None:
            piece = src.read(name)
        else:
            size = layout.shape[dim] // n_shards
            piece = src.read(name, dim, index * size, size)
        # A copy of just this slice: torch.save would write a view's whole underlying storage.
        state_dict[name] = piece.clone(memory_format=torch.contiguous_format)
        if bar is not None:
            bar.update()
    return state_dict


def reshard(
    src_dir: Union[str, Path],
    out_dir: Union[str, Path],
    n_shards: int,
    embedding_split: Optional[str] = None,
    progress: bool = True,
) -> Path:
    """Write the checkpoint in `src_dir` as `n_shards` Meta-layout shards into `out_dir` (created).

    progress=True draws a bar per tensor on a terminal (never into a pipe or a log)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists: remove it or choose another output directory")
    src = ShardedCheckpoint(src_dir)
    if embedding_split is None:
        embedding_split = default_embedding_split(src)
    if embedding_split not in EMBEDDING_SPLITS:
        raise ValueError(f"unknown embedding split {embedding_split!r}: use one of {list(EMBEDDING_SPLITS)}")
    embedding_dim = EMBEDDING_SPLITS[embedding_split]
    check_shard_count(src.args, src.layouts, n_shards, embedding_dim)

    # One step per tensor of each output shard: a 70B shard takes minutes, a tensor seconds at most.
    # disable=None: tqdm draws the bar only when stderr is a terminal.
    with atomic_dir(out_dir, parents=True) as tmp_dir, tqdm(
        total=n_shards * len(src.layouts), desc=f"writing {out_dir.name}", unit="tensor",
        disable=None if progress else True,
    ) as bar:
        for index in range(n_shards):
            bar.set_postfix_str(f"shard {index + 1}/{n_shards}")
            state_dict = shard_state_dict(src, n_shards, index, embedding_dim, bar)
            bar.set_postfix_str(f"saving {SHARD_NAME.format(index)}")
            torch.save(state_dict, tmp_dir / SHARD_NAME.format(index))
            del state_dict  # free this shard before making the next
        copy_side_files(src.dir, tmp_dir)
    return out_dir


def copy_side_files(src_dir: Path, out_dir: Path) -> None:
    """params.json, the tokenizer and anything else beside the shards, except the stale checklist."""
    for path in sorted(src_dir.iterdir()):
        if path.is_file() and not SHARD_NUMBER.fullmatch(path.name) and path.name != CHECKLIST_NAME:
            shutil.copy2(path, out_dir / path.name)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Rewrite a Meta checkpoint dir into N model-parallel shards (N=1 merges). "
        "Streams tensor by tensor; OUT appears only when complete.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("src", type=Path, help="Meta checkpoint dir: params.json, consolidated.*.pth, tokenizer")
    parser.add_argument("out", type=Path, help="directory to create (must not exist)")
    parser.add_argument("--shards", type=int, required=True, help="number of shards to write; must divide n_kv_heads")
    parser.add_argument("--embedding-split", choices=list(EMBEDDING_SPLITS),
                        help="how to cut tok_embeddings (default: as the source does; for a one-shard source, "
                        "model-dim if params.json has vocab_size -1 as Llama 2, else vocab as Llama 3)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar (there is none in a pipe or a log anyway)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        out = reshard(args.src, args.out, args.shards, args.embedding_split, progress=not args.quiet)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: atomic_dir has removed the temporary directory on the way out
        print("interrupted; nothing was written", file=sys.stderr)
        return INTERRUPTED_STATUS
    print(f"wrote {args.shards} shard(s) to {out}", file=sys.stderr)
    return 0


# Names this module had before the sharded-checkpoint reader moved to checkpoint.py.
MOVED_NAMES = {
    "stored_layout": "checkpoint.stored_layout", "check_shard_numbering": "checkpoint.list_shards",
}


def __getattr__(name: str):
    """PEP 562: a name that moved says where it went, in one line."""
    where = MOVED_NAMES.get(name)
    raise AttributeError(f"reshard.{name} moved: use {where}" if where else
                         f"module 'reshard' has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
