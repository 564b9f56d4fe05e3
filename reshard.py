"""Resharding: cut a Meta checkpoint into N model-parallel shards, or merge N shards into one.

    python reshard.py SRC OUT --shards N

Meta ships each model cut into as many `consolidated.NN.pth` files as it used GPUs (Llama 2 70B
and Llama 3 70B: 8, Llama 3.1 405B: 8 or 16). How a tensor is cut is explained in checkpoint.py:
column-parallel weights (`wq wk wv w1 w3 output`) on dim 0, row-parallel ones (`wo w2`) on dim 1,
RMSNorm weights copied whole into every shard, the embedding on the model dim (Llama 2) or on the
vocabulary (Llama 3). This file rewrites a checkpoint with another shard count in that same layout,
so Meta's reference code, this project's loader and tensor_parallel.py all read the result.

It also holds the one routine both resharding and tensor-parallel loading need: read *any* slice of
a tensor, whatever shard count the checkpoint has, touching only the shards that hold it
(`ShardedCheckpoint.read`). tensor_parallel.py uses it so that each rank loads only its own part.

Memory: shards are memory-mapped, and output shards are made one at a time, tensor by tensor, so
the peak is one output shard (the whole model only when merging into one file), never two copies.
Output is atomic: everything is written into a temporary sibling directory that is renamed to OUT
at the very end, so OUT either does not exist or is complete.

Not copied: `checklist.chk` (its checksums are of the source shards and would no longer match) and
Llama 2's `rope.freqs` tensor (a precomputed RoPE table the model recomputes; see checkpoint.py).
"""

import argparse
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Union

import torch
from tqdm import tqdm

from checkpoint import (
    COLUMN_PARALLEL_DIM,
    EMBEDDING_KEY,
    ROW_PARALLEL_DIM,
    SPLIT_DIMS,
    CheckpointError,
    check_same_tensor_names,
    embedding_split_dim,
    infer_vocab_size,
    list_shards,
    load_model_args,
    open_shard,
    read_params,
)
from model import VOCAB_SIZE_FROM_TOKENIZER, ModelArgs, Transformer

SHARD_NAME = "consolidated.{:02d}.pth"
SHARD_NUMBER = re.compile(r"consolidated\.(\d+)\.pth")
CHECKLIST_NAME = "checklist.chk"  # md5 sums of the source files: stale after resharding

# How Meta cuts the embedding, by model family (fairscale's layers in Meta's model.py): Llama 2's
# ParallelEmbedding splits the model dim, Llama 3's VocabParallelEmbedding splits the vocabulary.
EMBEDDING_SPLITS = {"model-dim": ROW_PARALLEL_DIM, "vocab": COLUMN_PARALLEL_DIM}


# --------------------------------------------------------------------------------------------
# Reading any slice of a sharded checkpoint
# --------------------------------------------------------------------------------------------


@dataclass
class TensorLayout:
    """How one tensor is stored: its full shape, and the dim its shards cut (None: not cut)."""

    shape: torch.Size
    split_dim: Optional[int]


class ShardedCheckpoint:
    """A Meta checkpoint dir opened for reading: params.json checked, every shard memory-mapped.

    Nothing is read from disk until `read` touches it. Every tensor's layout is checked against
    params.json first, so a missing shard or a params.json of another model is reported by name.
    """

    def __init__(self, ckpt_dir: Union[str, Path]):
        self.dir = Path(ckpt_dir)
        self.paths = list_shards(self.dir)
        check_shard_numbering(self.dir, self.paths)
        self.params = read_params(self.dir)
        args = load_model_args(self.dir, max_seq_len=1, max_batch_size=1)
        self.shards = [open_shard(path) for path in self.paths]
        if not args.has_vocab_size:  # Llama 2's params.json says -1: the weights know
            args = replace(args, vocab_size=infer_vocab_size(self.shards, self.n_shards, args.dim))
        self.args = args
        self.layouts = self._check_layouts()

    @property
    def n_shards(self) -> int:
        return len(self.paths)

    def names(self) -> list[str]:
        return list(self.layouts)

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, length: Optional[int] = None) -> torch.Tensor:
        """The slice [start, start + length) along `dim` of the full tensor `name` (dim None: all of it).

        Only the shards that hold part of the slice are touched. The result may be a view into a
        memory-mapped shard (no copy, nothing read yet); `torch.save` of a view writes its whole
        underlying tensor, so clone a slice before saving it.
        """
        layout = self.layouts[name]
        pieces = [shard[name] for shard in self.shards]
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

    def _check_layouts(self) -> dict[str, TensorLayout]:
        """Every shard holds the same tensors with the same shapes, and together they make params.json's."""
        with torch.device("meta"):
            expected = {name: t.shape for name, t in Transformer(self.args).state_dict().items()}
        check_same_tensor_names(self.paths, self.shards, expected)
        layouts = {}
        for name in self.shards[0]:
            first = self.shards[0][name]
            for path, shard in zip(self.paths[1:], self.shards[1:]):
                if shard[name].shape != first.shape or shard[name].dtype != first.dtype:
                    raise CheckpointError(
                        f"shards disagree on {name}: {self.paths[0].name} has {tuple(first.shape)} {first.dtype}, "
                        f"{path.name} has {tuple(shard[name].shape)} {shard[name].dtype}"
                    )
            layout = stored_layout(name, first.shape, self.n_shards, self.args.dim)
            if layout.shape != expected[name]:
                raise CheckpointError(
                    f"{name}: {self.n_shards} shard(s) of {tuple(first.shape)} in {self.dir} make "
                    f"{tuple(layout.shape)}, but params.json implies {tuple(expected[name])}: the shard count "
                    f"({self.n_shards}) or params.json does not belong to this model (is a shard missing?)"
                )
            layouts[name] = layout
        return layouts


def stored_layout(name: str, shard_shape: torch.Size, n_shards: int, dim: int) -> TensorLayout:
    """The full shape of `name` and the dim Meta cut it on, from the shape of one of its shards."""
    if n_shards == 1:
        return TensorLayout(shard_shape, None)
    if name == EMBEDDING_KEY:
        split = embedding_split_dim(shard_shape, n_shards, dim)
    else:
        split = SPLIT_DIMS.get(name.split(".")[-2])  # "layers.3.attention.wq.weight" -> "wq"
    if split is None:
        return TensorLayout(shard_shape, None)
    full = list(shard_shape)
    full[split] *= n_shards
    return TensorLayout(torch.Size(full), split)


def check_shard_numbering(ckpt_dir: Path, paths: list[Path]) -> None:
    """consolidated.00.pth ... consolidated.NN.pth with no gap: a missing file is named."""
    numbers = []
    for path in paths:
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


# --------------------------------------------------------------------------------------------
# Writing N shards
# --------------------------------------------------------------------------------------------


def meta_split_dim(name: str, embedding_dim: int) -> Optional[int]:
    """The dim Meta cuts `name` on in a multi-shard checkpoint; None for the replicated norms."""
    if name == EMBEDDING_KEY:
        return embedding_dim
    return SPLIT_DIMS.get(name.split(".")[-2])


def default_embedding_split(src: ShardedCheckpoint) -> str:
    """Keep the source's embedding layout; for a one-shard source, follow the family's convention.

    Meta's Llama 2 params.json has vocab_size -1 and its code splits the model dim; Llama 3 writes
    the vocabulary size and splits the vocabulary. (Our own loader reads either.)
    """
    if src.n_shards > 1:
        split = src.layouts[EMBEDDING_KEY].split_dim
        return next(key for key, value in EMBEDDING_SPLITS.items() if value == split)
    return "model-dim" if src.params.get("vocab_size") == VOCAB_SIZE_FROM_TOKENIZER else "vocab"


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


def shard_state_dict(src: ShardedCheckpoint, n_shards: int, index: int, embedding_dim: int) -> dict[str, torch.Tensor]:
    """Output shard `index` of `n_shards`: each tensor's slice, copied out of the memory map."""
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
    return state_dict


def reshard(
    src_dir: Union[str, Path],
    out_dir: Union[str, Path],
    n_shards: int,
    embedding_split: Optional[str] = None,
    progress: bool = True,
) -> Path:
    """Write the checkpoint in `src_dir` as `n_shards` Meta-layout shards into `out_dir` (created)."""
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

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for index in tqdm(range(n_shards), desc=f"writing {out_dir.name}", unit="shard", disable=not progress):
            state_dict = shard_state_dict(src, n_shards, index, embedding_dim)
            torch.save(state_dict, tmp_dir / SHARD_NAME.format(index))
            del state_dict  # free this shard before making the next
        copy_side_files(src.dir, tmp_dir)
        os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
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
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        out = reshard(args.src, args.out, args.shards, args.embedding_split)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.shards} shard(s) to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
