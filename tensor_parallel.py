"""Tensor parallelism: one model spread over N processes, each holding 1/N of every big matrix.

    torchrun --nproc_per_node N inference.py --ckpt-dir DIR ...          # N processes, one machine

A model too big for one device is cut the way Megatron-LM cuts it (Shoeybi et al. 2019, sec. 3),
which is also how Meta's checkpoints are cut (see checkpoint.py). Every rank keeps the whole
residual stream (B, T, C) and a slice of the work:

* attention: rank r owns H/N query heads and the K/N key/value heads they read. ``wq wk wv`` are
  *column-parallel* (rank r keeps the output rows of its heads) and need no communication: each
  head attends on its own. ``wo`` is *row-parallel* (rank r keeps the input columns of its heads),
  so each rank gets a partial sum of the output, and one **all-reduce** (sum over ranks) completes it;
* feed-forward: the same with F/N hidden units: ``w1 w3`` column-parallel, ``w2`` row-parallel and
  one all-reduce;
* embedding: rank r owns a range of the vocabulary; a token outside it looks up zeros, and an
  all-reduce adds the one rank's row that is not zero (Meta's VocabParallelEmbedding);
* output head: rank r scores its range of the vocabulary; an **all-gather** puts the logits together;
* RMSNorm weights are tiny and copied to every rank.

So a forward pass costs two all-reduces of (B, T, C) per layer, plus one for the embedding and an
all-gather of (B, T, V) logits. N must divide n_kv_heads (a K/V head is not cut); the FFN and
vocabulary may split unevenly (rank sizes then differ by one), which is why this works with any
such N whatever shard count the checkpoint has: each rank reads only its own slice of every tensor
straight from the shard files (`checkpoint.ShardedCheckpoint.read`, memory-mapped).

torchrun starts the N processes and sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address;
`init_from_torchrun` joins them into a process group: NCCL between CUDA GPUs, gloo on CPU. Without
torchrun (WORLD_SIZE unset or 1) nothing here runs and no process group is made.

The model code is untouched: after building the full-size model on the "meta" device (shapes
only, no memory), `parallelize` swaps its layers for smaller ones, in the spirit of gpt-fast's
tp.py. Weight names stay Meta's, so loading stays `strict=True`.
"""

import argparse
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from checkpoint import (
    EMBEDDING_KEY,
    OUTPUT_KEY,
    PARAMS_FILE,
    CheckpointError,
    HostToDevice,
    ShardedCheckpoint,
    choose_device,
    model_args_from_params,
    read_params_file,
)
from model import ModelArgs, Transformer, expected_shapes

# Where torchrun tells each process who it is.
WORLD_SIZE_ENV, RANK_ENV, LOCAL_RANK_ENV = "WORLD_SIZE", "RANK", "LOCAL_RANK"
MAIN_RANK = 0  # the rank whose sampled tokens all ranks take, and the only one that prints

COLUMN_DIM = 0  # nn.Linear weights are (out_features, in_features): output rows are dim 0
ROW_DIM = 1  # ... and input columns dim 1


# --------------------------------------------------------------------------------------------
# Who is who: the process group
# --------------------------------------------------------------------------------------------


@dataclass
class TensorParallel:
    """This process's place in a tensor-parallel group, and the device it computes on."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == MAIN_RANK

    def broadcast_from_main(self, tokens: torch.Tensor) -> torch.Tensor:
        """Every rank continues with the main rank's tokens, so all ranks stay in lockstep.

        The logits are the same on every rank (they come out of one all-gather), and a seed gives
        the same draws; this makes sure of it even without a seed.
        """
        tokens = tokens.contiguous()
        dist.broadcast(tokens, src=MAIN_RANK)
        return tokens

    def load_transformer(self, ckpt_dir: Union[str, Path], args: ModelArgs, dtype: torch.dtype,
                         progress: bool = True) -> Transformer:
        """This rank's slice of the model (`load_tensor_parallel_transformer`); `LLaMa.build` calls it,
        so that the engine needs no import of this file."""
        return load_tensor_parallel_transformer(ckpt_dir, args, self, dtype, progress)

    def check_args(self, args: ModelArgs) -> None:
        """Whether this model can be cut over this many ranks; `LLaMa.build` asks as soon as params.json
        is read, before the tokenizer's size is compared or any weight is touched."""
        check_world_size(args, self.world_size)

    def close(self, finished: bool = True) -> None:
        """Leave the group. After a finished run, all ranks leave together: a barrier first, so that no
        rank tears its connections down while a peer's last messages are still in flight (with gloo, a
        rank that was left behind so was seen to abort: "terminate called without an active exception").
        After an error the others may never reach the barrier, so then each rank leaves at once."""
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def init_from_torchrun(device: Union[str, torch.device, None] = None) -> Optional[TensorParallel]:
    """Join the process group torchrun set up; None when running as a single process."""
    world_size = launcher_int(WORLD_SIZE_ENV, "1")
    if world_size == 1:
        return None
    rank, local_rank = launcher_int(RANK_ENV, None), launcher_int(LOCAL_RANK_ENV, "0")
    device = choose_device(device)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"{LOCAL_RANK_ENV}={local_rank}, but this machine shows {torch.cuda.device_count()} "
                             f"CUDA GPU(s): start at most that many processes per node (--nproc_per_node)")
        device = torch.device("cuda", local_rank)  # one GPU per process on each machine
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"tensor parallel runs on CUDA (NCCL) or CPU (gloo), not {device.type}: use --device cpu")
    dist.init_process_group(backend)
    return TensorParallel(rank, world_size, device)


def launcher_int(name: str, default: Optional[str]) -> int:
    """An integer torchrun sets in the environment, or an error naming the variable."""
    value = os.environ.get(name, default)
    if value is None:
        raise ValueError(f"{name} is not set: start several processes with torchrun, which sets it")
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise ValueError(f"{name}={value!r} in the environment is not a count: torchrun sets it (do not set it by hand)")
    return number


@contextmanager
def main_rank_first(tp: Optional[TensorParallel]):
    """Run the body on the main rank, then on the others (e.g. a download the others then reuse)."""
    if tp is not None and not tp.is_main:
        dist.barrier()
    yield
    if tp is not None and tp.is_main:
        dist.barrier()


def rank_part(length: int, world_size: int, rank: int) -> tuple[int, int]:
    """(start, size) of rank's share of `length` items: as even as possible, sizes differ by at most 1."""
    base, extra = divmod(length, world_size)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


def check_world_size(args: ModelArgs, world_size: int) -> None:
    if args.n_kv_heads % world_size != 0:
        divisors = [d for d in range(1, args.n_kv_heads + 1) if args.n_kv_heads % d == 0]
        raise ValueError(
            f"world size {world_size} does not divide n_kv_heads={args.n_kv_heads}: every rank must hold whole "
            f"key/value heads; use a world size (nodes x --nproc_per_node) in {divisors}"
        )


# --------------------------------------------------------------------------------------------
# Parallel layers: nn.Linear / nn.Embedding with a collective after them
# --------------------------------------------------------------------------------------------


class RowParallelLinear(nn.Linear):
    """Reads this rank's slice of the input features; the ranks' partial outputs are summed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = super().forward(x)  # (B, T, C): this rank's share of the sum
        dist.all_reduce(partial)  # sum over ranks, in place: now the full output on every rank
        return partial


class VocabParallelEmbedding(nn.Embedding):
    """Rows [vocab_start, vocab_start + num_embeddings) of the embedding; other ids look up zeros."""

    def __init__(self, vocab_start: int, num_embeddings: int, embedding_dim: int):
        super().__init__(num_embeddings, embedding_dim)
        self.vocab_start = vocab_start

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local_ids = tokens - self.vocab_start
        elsewhere = (local_ids < 0) | (local_ids >= self.num_embeddings)  # another rank's token
        h = F.embedding(local_ids.masked_fill(elsewhere, 0), self.weight)  # (B, T, C)
        h = h.masked_fill(elsewhere.unsqueeze(-1), 0.0)
        dist.all_reduce(h)  # exactly one rank contributes each token's row
        return h


class VocabParallelOutput(nn.Linear):
    """Logits of this rank's vocabulary range; an all-gather assembles the full (B, T, V)."""

    def __init__(self, in_features: int, out_features: int, part_sizes: list[int]):
        super().__init__(in_features, out_features, bias=False)
        self.part_sizes = part_sizes  # every rank's out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = super().forward(x)  # (B, T, V_r)
        # all_gather needs equal sizes: pad the smaller parts, then cut the padding off again.
        padded = F.pad(local, (0, max(self.part_sizes) - local.shape[-1])).contiguous()
        parts = [torch.empty_like(padded) for _ in self.part_sizes]
        dist.all_gather(parts, padded)
        return torch.cat([part[..., :size] for part, size in zip(parts, self.part_sizes)], dim=-1)  # (B, T, V)


# --------------------------------------------------------------------------------------------
# Cutting the model, and which slice of each weight a rank loads
# --------------------------------------------------------------------------------------------


@dataclass
class RankPlan:
    """Rank r's share of each dimension that is cut: (start, size) along it."""

    heads: tuple[int, int]  # query heads
    kv_heads: tuple[int, int]  # key/value heads
    ffn: tuple[int, int]  # feed-forward hidden units
    vocab: tuple[int, int]  # vocabulary entries
    vocab_part_sizes: list[int]  # every rank's vocabulary share, for the all-gather


def rank_plan(args: ModelArgs, world_size: int, rank: int) -> RankPlan:
    check_world_size(args, world_size)
    return RankPlan(
        heads=rank_part(args.n_heads, world_size, rank),
        kv_heads=rank_part(args.n_kv_heads, world_size, rank),
        ffn=rank_part(args.ffn_hidden_dim, world_size, rank),
        vocab=rank_part(args.vocab_size, world_size, rank),
        vocab_part_sizes=[rank_part(args.vocab_size, world_size, r)[1] for r in range(world_size)],
    )


def parallelize(model: Transformer, plan: RankPlan) -> None:
    """Swap the model's layers, in place, for this rank's smaller ones (call on the "meta" device)."""
    args = model.args
    dim, head_dim = args.dim, args.head_dim
    n_heads, n_kv_heads, ffn = plan.heads[1], plan.kv_heads[1], plan.ffn[1]
    for layer in model.layers:
        attention = layer.attention
        attention.n_heads, attention.n_kv_heads = n_heads, n_kv_heads  # n_rep is unchanged
        attention.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        attention.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        attention.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        attention.wo = RowParallelLinear(n_heads * head_dim, dim, bias=False)
        feed_forward = layer.feed_forward
        feed_forward.w1 = nn.Linear(dim, ffn, bias=False)
        feed_forward.w3 = nn.Linear(dim, ffn, bias=False)
        feed_forward.w2 = RowParallelLinear(ffn, dim, bias=False)
    model.tok_embeddings = VocabParallelEmbedding(plan.vocab[0], plan.vocab[1], dim)
    model.output = VocabParallelOutput(dim, plan.vocab[1], plan.vocab_part_sizes)


def weight_slice(name: str, plan: RankPlan, head_dim: int) -> Optional[tuple[int, int, int]]:
    """(dim, start, size) of the full weight `name` that this rank holds; None for a whole copy."""
    if name == EMBEDDING_KEY or name == OUTPUT_KEY:
        return (COLUMN_DIM, *plan.vocab)
    kind = name.split(".")[-2]  # "layers.3.attention.wq.weight" -> "wq"
    heads = (plan.heads[0] * head_dim, plan.heads[1] * head_dim)
    kv_heads = (plan.kv_heads[0] * head_dim, plan.kv_heads[1] * head_dim)
    slices = {
        "wq": (COLUMN_DIM, *heads), "wk": (COLUMN_DIM, *kv_heads), "wv": (COLUMN_DIM, *kv_heads),
        "wo": (ROW_DIM, *heads),
        "w1": (COLUMN_DIM, *plan.ffn), "w3": (COLUMN_DIM, *plan.ffn), "w2": (ROW_DIM, *plan.ffn),
    }
    return slices.get(kind)  # norms: every rank holds the whole (small) vector


def rank_shapes(args: ModelArgs, plan: RankPlan) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor this rank holds: `expected_shapes` with each cut dim made its share."""
    shapes = {}
    for name, shape in expected_shapes(args).items():
        where = weight_slice(name, plan, args.head_dim)
        if where is not None:
            dim, _, size = where
            shape = shape[:dim] + (size,) + shape[dim + 1:]
        shapes[name] = shape
    return shapes


def load_tensor_parallel_transformer(
    ckpt_dir: Union[str, Path],
    args: ModelArgs,
    tp: TensorParallel,
    dtype: torch.dtype,
    progress: bool = True,
) -> Transformer:
    """This rank's part of the model in `ckpt_dir`, on tp.device in `dtype`, whatever the shard count.

    The layers are plain nn.Linear subclasses with a collective after them (quantize.py's PLAIN
    storage): quantizing or prepacking them is not supported with tensor parallel yet.
    """
    checkpoint = ShardedCheckpoint(ckpt_dir, args)  # checks every tensor's full shape
    args = checkpoint.args
    plan = rank_plan(args, tp.world_size, tp.rank)
    with torch.device("meta"):
        model = Transformer(args)
        parallelize(model, plan)

    state_dict = {}
    to_device = HostToDevice(tp.device)  # to a GPU through pinned buffers; elsewhere a plain .to
    names = tqdm(checkpoint.names(), desc=f"loading {checkpoint.dir.name} (rank {tp.rank} of {tp.world_size})",
                 unit="tensor", disable=not progress)
    for name in names:
        where = weight_slice(name, plan, args.head_dim)
        tensor = checkpoint.read(name) if where is None else checkpoint.read(name, *where)
        state_dict[name] = to_device.to(tensor).to(dtype).contiguous()  # cast on the device
    to_device.close()
    model.load_state_dict(state_dict, strict=True, assign=True)  # strict: also every slice's shape
    model.setup_caches(tp.device, dtype)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Planning: what one rank holds, and what crosses the network per token
# --------------------------------------------------------------------------------------------

GIGABYTE = 1e9
MEGABYTE = 1e6
BYTES_BF16, BYTES_INT8 = 2, 1  # per weight; int8 ignores its per-channel scales (under 0.1%)


@dataclass
class RankCost:
    """The largest rank's share of a model on `world_size` ranks (rank 0: uneven splits favour it)."""

    weights: int  # parameters held
    kv_cache_per_position: int  # K and V elements per position of context, per sequence
    collectives_per_step: int  # all-reduces and all-gathers per forward pass, one after the other
    all_reduce_elements: int  # elements per all-reduce, per token
    all_gather_elements: int  # elements of the gathered logits, per token

    def network_bytes_per_token(self, world_size: int, bytes_per_element: int) -> float:
        """Bytes each rank sends (and receives) per token, with ring algorithms.

        A ring all-reduce of S bytes moves 2 (N-1)/N * S per rank, an all-gather of S (N-1)/N * S.
        """
        share = (world_size - 1) / world_size
        all_reduces = (self.collectives_per_step - 1) * self.all_reduce_elements * 2 * share
        return (all_reduces + self.all_gather_elements * share) * bytes_per_element


def rank_cost(args: ModelArgs, world_size: int) -> RankCost:
    plan = rank_plan(args, world_size, MAIN_RANK)
    return RankCost(
        weights=sum(torch.Size(shape).numel() for shape in rank_shapes(args, plan).values()),
        kv_cache_per_position=2 * args.n_layers * plan.kv_heads[1] * args.head_dim,
        collectives_per_step=2 * args.n_layers + 2,  # wo and w2 per layer, the embedding, the logits
        all_reduce_elements=args.dim,
        all_gather_elements=args.vocab_size,
    )


def describe_plan(name: str, args: ModelArgs, world_size: int) -> str:
    cost = rank_cost(args, world_size)
    kv_bytes = cost.kv_cache_per_position * args.max_seq_len * args.max_batch_size * BYTES_BF16
    network = cost.network_bytes_per_token(world_size, BYTES_BF16)
    return (
        f"{name} on {world_size} rank(s):\n"
        f"  weights per rank: {cost.weights:,} parameters = {cost.weights * BYTES_BF16 / GIGABYTE:.1f} GB in bf16, "
        f"{cost.weights * BYTES_INT8 / GIGABYTE:.1f} GB in int8\n"
        f"  KV cache per rank: {kv_bytes / GIGABYTE:.2f} GB in bf16 for {args.max_batch_size} sequence(s) of "
        f"{args.max_seq_len} positions\n"
        f"  per token and sequence, each rank sends and receives {network / MEGABYTE:.2f} MB (bf16 activations) "
        f"in {cost.collectives_per_step} collectives, one after the other"
    )


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="What each rank holds, and what crosses the network per token, for a model on N ranks. "
        "(To run a model on N ranks: torchrun --nproc_per_node N inference.py --ckpt-dir DIR.)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("params", type=Path, help="a params.json (e.g. params/llama-3.1-70b.json) or a checkpoint dir")
    parser.add_argument("--nproc", type=int, required=True, help="number of ranks (processes, one per GPU)")
    parser.add_argument("--vocab-size", type=int, help="needed when params.json says -1 (Llama 2's tokenizer: 32000)")
    parser.add_argument("--max-seq-len", type=int, default=8192, help="context to reserve KV cache for")
    parser.add_argument("--max-batch-size", type=int, default=1, help="sequences decoded together")
    options = parser.parse_args(argv)
    params_path = options.params / PARAMS_FILE if options.params.is_dir() else options.params
    try:
        params = read_params_file(params_path)
        if options.vocab_size is not None:
            params = {**params, "vocab_size": options.vocab_size}
        args = model_args_from_params(params, params_path, max_seq_len=options.max_seq_len,
                                      max_batch_size=options.max_batch_size)
        if args.vocab_size is None:
            raise ValueError(f"{params_path} says vocab_size -1 (the tokenizer's size): pass --vocab-size")
        if options.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {options.nproc}")
        print(describe_plan(params_path.name, args, options.nproc))
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
