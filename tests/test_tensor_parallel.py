"""tensor_parallel.py: N processes (torchrun, gloo on CPU) give the same greedy tokens as one.

Unit tests check, without any process group, that each rank loads exactly its slice of every
weight from checkpoints of any shard count. The end-to-end tests start real torchrun jobs:
- the demo model, SmolLM2-135M (9 heads, 3 K/V heads), on 3 ranks: the same greedy tokens and
  logits as one process, on every rank, each rank holding a third of the weights;
- the inference.py command line on 3 ranks, on a tiny random model (12 heads, 6 K/V heads, FFN 256,
  Llama 2 vocabulary of 32,000) stored as 2 shards: FFN and vocabulary split unevenly, shard count
  != world size; it prints once, the same text as one process.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import LLAMA2_TOKENIZER
import tensor_parallel
from cli import main
from inference import LLaMa
from model import ModelArgs
from reshard import reshard
from sampling import SamplingParams
from tensor_parallel import (
    TensorParallel, load_tensor_parallel_transformer, parallelize, rank_cost, rank_part, rank_plan, rank_shapes,
    weight_slice,
)
from model import Transformer
from tiny import LLAMA2_VOCAB_SIZE, hf_model, meta_state_dict, write_checkpoint
from tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "tp_worker.py"
PARAMS = dict(dim=96, n_layers=2, n_heads=12, n_kv_heads=6, multiple_of=32, norm_eps=1e-5, rope_theta=10000.0)
PROMPTS = ["Hello, my name is", "The quick brown fox jumps over the lazy dog because", "1 2 3"]
MAX_GEN_LEN = 8
TORCHRUN_TIMEOUT_SECONDS = 300


@pytest.fixture(scope="module")
def tiny_one_shard(tmp_path_factory):
    state_dict = meta_state_dict(hf_model(PARAMS, LLAMA2_VOCAB_SIZE), PARAMS)
    return write_checkpoint(tmp_path_factory.mktemp("tp1"), state_dict, {**PARAMS, "vocab_size": -1}, LLAMA2_TOKENIZER)


@pytest.fixture(scope="module")
def tiny_two_shards(tiny_one_shard, tmp_path_factory):
    return reshard(tiny_one_shard, tmp_path_factory.mktemp("tp2") / "mp2", 2, progress=False)


@pytest.fixture
def one_thread():
    """The one-process reference runs on one thread, as torchrun runs each rank (OMP_NUM_THREADS=1).

    Like for like, and on a busy 2-core machine threads fighting over cores slow it down tenfold.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_SECONDS)


def run_worker(ckpt, prompt_tokens: list[list[int]], nproc: int, tmp_path) -> list[dict]:
    prefix = tmp_path / "out"
    result = torchrun(nproc, str(WORKER), str(ckpt), str(prefix), json.dumps(prompt_tokens), str(MAX_GEN_LEN))
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(f"{prefix}.rank{rank}.pt", weights_only=True) for rank in range(nproc)]


def single_process(ckpt, prompt_tokens):
    llama = LLaMa.build(ckpt, max_seq_len=64, max_batch_size=4, device="cpu", dtype="float32", progress=False)
    tokens = [g.tokens for g in llama.generate(prompt_tokens, max_gen_len=MAX_GEN_LEN, sampling=SamplingParams(temperature=0))]
    logits = llama.model(torch.tensor([prompt_tokens[0]]), start_pos=0)
    return llama, tokens, logits


def check_ranks_agree_with_one_process(ranks: list[dict], tokens, logits, n_params: int):
    for rank, out in enumerate(ranks):
        assert out["tokens"] == tokens, f"rank {rank}"
        # The all-reduce adds the partial sums in another order: float32 rounding, nothing more.
        torch.testing.assert_close(out["logits"], logits, rtol=1e-4, atol=1e-4)
    # Each rank holds about 1/N of the weights (norms are copied whole): nobody holds the model.
    shares = [out["n_params"] / n_params for out in ranks]
    assert all(share < 1.05 / len(ranks) for share in shares), shares


# ---- unit: which slice each rank holds ----------------------------------------------------


def test_rank_parts_cover_the_length_once_and_differ_by_at_most_one():
    for length in (6, 256, 32000, 49152):
        for world_size in (1, 2, 3, 7):
            parts = [rank_part(length, world_size, rank) for rank in range(world_size)]
            assert parts[0][0] == 0 and sum(size for _, size in parts) == length
            assert all(a[0] + a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(s for _, s in parts) - min(s for _, s in parts) <= 1


@pytest.mark.parametrize("n_shards", [1, 2])
@pytest.mark.parametrize("world_size", [2, 3, 6])
def test_each_rank_loads_exactly_its_slice_whatever_the_shard_count(tiny_one_shard, tiny_two_shards, n_shards, world_size):
    ckpt = tiny_one_shard if n_shards == 1 else tiny_two_shards
    full = torch.load(tiny_one_shard / "consolidated.00.pth", weights_only=True)
    args = ModelArgs(**PARAMS, vocab_size=LLAMA2_VOCAB_SIZE, max_seq_len=16, max_batch_size=1)
    rank_models = [
        load_tensor_parallel_transformer(ckpt, args, TensorParallel(rank, world_size, torch.device("cpu")),
                                         torch.float32, progress=False)
        for rank in range(world_size)
    ]
    for name, tensor in full.items():
        pieces = [model.state_dict()[name] for model in rank_models]
        where = weight_slice(name, rank_plan(args, world_size, 0), args.head_dim)
        if where is None:
            assert all(torch.equal(piece, tensor) for piece in pieces), name  # norms: a whole copy each
        else:
            assert torch.equal(torch.cat(pieces, dim=where[0]), tensor), name  # slices tile the weight
    for model in rank_models:
        attention = model.layers[0].attention
        assert (attention.n_heads, attention.n_kv_heads) == (12 // world_size, 6 // world_size)
        assert attention.cache.cache_k.shape[1] == 6 // world_size  # each rank caches only its K/V heads


@pytest.mark.parametrize("world_size", [1, 2, 3, 6])
def test_rank_shapes_are_the_parallelized_models_shapes(world_size):
    """The rank's shapes come from `expected_shapes` (one statement of them) cut by `weight_slice`."""
    args = ModelArgs(**PARAMS, vocab_size=LLAMA2_VOCAB_SIZE, max_seq_len=16, max_batch_size=1)
    for rank in range(world_size):
        plan = rank_plan(args, world_size, rank)
        with torch.device("meta"):
            model = Transformer(args)
            parallelize(model, plan)
        assert rank_shapes(args, plan) == {name: tuple(t.shape) for name, t in model.state_dict().items()}


def test_world_size_that_does_not_divide_n_kv_heads_is_an_error_before_loading(tiny_one_shard):
    tp = TensorParallel(rank=0, world_size=4, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"world size 4 does not divide n_kv_heads=6: every rank must hold whole "
                                         r"key/value heads; use a world size \(nodes x --nproc_per_node\) in \[1, 2, 3, 6\]"):
        LLaMa.build(tiny_one_shard, max_seq_len=16, dtype="float32", progress=False, tensor_parallel=tp)


# ---- end to end: torchrun ----------------------------------------------------------------


def test_three_ranks_on_the_demo_model_give_the_same_greedy_tokens_as_one_process(demo_ckpt, tmp_path, one_thread):
    tokenizer = Tokenizer(demo_ckpt / "tokenizer.model")
    prompt_tokens = [tokenizer.encode(p, bos=tokenizer.add_bos, eos=False)
                     for p in ("The capital of France is", "def fibonacci(n):")]
    llama, tokens, logits = single_process(demo_ckpt, prompt_tokens)
    ranks = run_worker(demo_ckpt, prompt_tokens, 3, tmp_path)
    check_ranks_agree_with_one_process(ranks, tokens, logits, sum(p.numel() for p in llama.model.parameters()))
    assert ranks[0]["n_params"] == rank_cost(llama.args, 3).weights  # the planner counts what rank 0 loaded


def test_command_line_on_three_ranks_with_two_shards_prints_once_the_same_as_one_process(tiny_two_shards, capsys,
                                                                                       one_thread):
    """FFN (256) and vocabulary (32,000) split unevenly over 3 ranks, from a checkpoint cut in 2."""
    cli = ["--ckpt-dir", str(tiny_two_shards), *[arg for p in PROMPTS for arg in ("--prompt", p)],
           "--temperature", "0", "--max-gen-len", str(MAX_GEN_LEN), "--device", "cpu", "--dtype", "float32"]
    assert main(cli) == 0
    single = capsys.readouterr().out
    parallel = torchrun(3, "inference.py", *cli)
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    assert parallel.stdout == single
    assert parallel.stderr.count("loaded ") == 1 and "3 ranks" in parallel.stderr


# ---- the planner: python tensor_parallel.py PARAMS --nproc N ------------------------------


def test_planner_prints_weights_kv_cache_and_network_per_rank(capsys):
    assert tensor_parallel.main([str(REPO / "params" / "llama-3-70b.json"), "--nproc", "8"]) == 0
    out = capsys.readouterr().out
    assert "weights per rank: 8,820,367,360 parameters = 17.6 GB in bf16, 8.8 GB in int8" in out
    assert "4.84 MB (bf16 activations) in 162 collectives" in out  # (2 * 80 + 1) all-reduces of 8192, 1 gather


@pytest.mark.parametrize("argv, message", [
    (["llama-2-7b.json", "--nproc", "2"], r"llama-2-7b\.json says vocab_size -1 .*: pass --vocab-size"),
    (["llama-3-8b.json", "--nproc", "3"], r"world size 3 does not divide n_kv_heads=8"),
    (["no-such-model.json", "--nproc", "1"], r"no-such-model\.json"),
])
def test_planner_bad_input(capsys, argv, message):
    assert tensor_parallel.main([str(REPO / "params" / argv[0]), *argv[1:]]) == 2
    assert re.search(message, capsys.readouterr().err)
