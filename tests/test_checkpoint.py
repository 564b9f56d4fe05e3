"""checkpoint.py: multi-shard Meta checkpoints load into one model; bad checkpoints are clear errors.

The multi-shard checkpoints are made here by splitting a one-shard checkpoint the way Meta's
fairscale layers split it: column-parallel weights (wq wk wv w1 w3 output) on dim 0, row-parallel
(wo w2) on dim 1, norms replicated, the embedding on dim 1 (Llama 2) or dim 0 (Llama 3).
"""

import json
import shutil

import pytest
import torch

from checkpoint import CheckpointError, load_transformer
from conftest import LLAMA2_TOKENIZER
from inference import LLaMa
from tiny import LLAMA2_VOCAB_SIZE, TINY, hf_model, meta_state_dict, write_checkpoint
from tokenizer import TokenizerFileError

COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output")
ROW_PARALLEL = ("wo", "w2")


def split_like_meta(state_dict: dict, n_shards: int, embedding_dim: int) -> list[dict]:
    shards = [{} for _ in range(n_shards)]
    for name, tensor in state_dict.items():
        kind = name.split(".")[-2]
        if kind in COLUMN_PARALLEL:
            pieces = tensor.chunk(n_shards, dim=0)
        elif kind in ROW_PARALLEL:
            pieces = tensor.chunk(n_shards, dim=1)
        elif kind == "tok_embeddings":
            pieces = tensor.chunk(n_shards, dim=embedding_dim)
        else:
            pieces = [tensor] * n_shards  # norms: every shard has the whole vector
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    return shards


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    hf = hf_model(TINY, LLAMA2_VOCAB_SIZE)
    state_dict = meta_state_dict(hf, TINY)
    state_dict["rope.freqs"] = torch.zeros(8)  # Meta's Llama 2 checkpoints carry this extra key
    return write_checkpoint(tmp_path_factory.mktemp("one"), state_dict, {**TINY, "vocab_size": -1}, LLAMA2_TOKENIZER)


def copy_split(src, dst, n_shards: int, embedding_dim: int):
    shutil.copytree(src, dst)
    (dst / "consolidated.00.pth").unlink()
    state_dict = torch.load(src / "consolidated.00.pth", weights_only=True)
    for i, shard in enumerate(split_like_meta(state_dict, n_shards, embedding_dim)):
        torch.save(shard, dst / f"consolidated.{i:02d}.pth")
    return dst


def logits_of(ckpt_dir) -> torch.Tensor:
    llama = LLaMa.build(ckpt_dir, max_seq_len=32, max_batch_size=1, device="cpu", dtype="float32", progress=False)
    tokens = torch.tensor([llama.tokenizer.encode("Sharded checkpoints merge back", bos=True, eos=False)])
    return llama.model(tokens, start_pos=0)


@pytest.mark.parametrize("embedding_dim", [1, 0], ids=["llama2-embedding-on-model-dim", "llama3-embedding-on-vocab"])
def test_two_shard_checkpoint_gives_the_same_logits_as_one_shard(one_shard, tmp_path, embedding_dim):
    two = copy_split(one_shard, tmp_path / "two", 2, embedding_dim)
    assert len(list(two.glob("consolidated.*.pth"))) == 2
    torch.testing.assert_close(logits_of(two), logits_of(one_shard), rtol=0, atol=0)


def test_load_keeps_one_copy_per_tensor_memory_mapped_when_dtype_matches(one_shard):
    from model import ModelArgs
    args = ModelArgs(**TINY, vocab_size=LLAMA2_VOCAB_SIZE, max_seq_len=16, max_batch_size=1)
    model = load_transformer(one_shard, args, torch.device("cpu"), torch.float32, progress=False)
    # Nothing was left on the meta device: every weight and cache is real memory.
    assert all(not t.is_meta for t in model.state_dict().values())
    assert all(not layer.attention.cache.cache_k.is_meta for layer in model.layers)


# ---- bad checkpoints: one clear error each, naming the culprit ----------------------------


def broken_copy(one_shard, tmp_path, edit):
    dst = tmp_path / "broken"
    shutil.copytree(one_shard, dst)
    edit(dst)
    return dst


def write_params(d, **changes):
    params = json.loads((d / "params.json").read_text())
    params.update(changes)
    (d / "params.json").write_text(json.dumps(params))


def edit_tensor(d, name, new):
    sd = torch.load(d / "consolidated.00.pth", weights_only=True)
    sd[name] = new(sd[name])
    torch.save(sd, d / "consolidated.00.pth")


def drop_tensor(d, name):
    sd = torch.load(d / "consolidated.00.pth", weights_only=True)
    del sd[name]
    torch.save(sd, d / "consolidated.00.pth")


@pytest.mark.parametrize("edit, error, message", [
    (lambda d: shutil.rmtree(d), CheckpointError, "does not exist"),
    (lambda d: (d / "consolidated.00.pth").unlink(), CheckpointError, r"no consolidated\.\*\.pth"),
    (lambda d: (d / "params.json").unlink(), CheckpointError, r"params\.json is missing"),
    (lambda d: (d / "params.json").write_text("{dim: 64"), CheckpointError, r"params\.json is not valid JSON"),
    (lambda d: (d / "params.json").write_text("[1, 2]"), CheckpointError, r"params\.json must hold a JSON object"),
    (lambda d: write_params(d, rope_thetta=1.0), CheckpointError, r"params\.json: unknown key\(s\) \['rope_thetta'\]"),
    (lambda d: write_params(d, n_kv_heads=3), CheckpointError, r"params\.json: .*n_kv_heads"),
    (lambda d: write_params(d, dim=128, n_heads=8), CheckpointError, r"tok_embeddings\.weight in .*consolidated\.00\.pth has shape"),
    (lambda d: edit_tensor(d, "layers.1.feed_forward.w2.weight", lambda t: t[:, :-1]), CheckpointError,
     r"layers\.1\.feed_forward\.w2\.weight in .* has shape \(64, 191\), but params\.json implies \(64, 192\)"),
    (lambda d: drop_tensor(d, "layers.0.attention.wq.weight"), CheckpointError,
     r"consolidated\.00\.pth: tensors do not match params\.json: missing \['layers\.0\.attention\.wq\.weight'\]"),
    (lambda d: (d / "consolidated.00.pth").write_bytes(b"not a checkpoint"), CheckpointError,
     r"consolidated\.00\.pth cannot be read"),
    (lambda d: (d / "tokenizer.model").unlink(), FileNotFoundError, r"tokenizer model not found: .*tokenizer\.model"),
    (lambda d: (d / "tokenizer.model").write_bytes(b"\x00garbage\xff"), TokenizerFileError, r"tokenizer\.model"),
    (lambda d: write_params(d, vocab_size=32001), CheckpointError, r"output\.weight|tok_embeddings\.weight"),
])
def test_bad_checkpoint_is_a_clear_error(one_shard, tmp_path, edit, error, message):
    d = broken_copy(one_shard, tmp_path, edit)
    with pytest.raises(error, match=message):
        LLaMa.build(d, max_seq_len=16, device="cpu", dtype="float32", progress=False)


def test_tokenizer_vocab_different_from_model_vocab_is_an_error(one_shard, tmp_path, llama3_tokenizer_path):
    d = broken_copy(one_shard, tmp_path, lambda d: shutil.copy(llama3_tokenizer_path, d / "tokenizer.model"))
    with pytest.raises(CheckpointError, match=r"tokenizer .* has 128256 tokens but the model's vocab_size is 32000"):
        LLaMa.build(d, max_seq_len=16, device="cpu", dtype="float32", progress=False)


def test_shards_that_disagree_are_an_error(one_shard, tmp_path):
    d = copy_split(one_shard, tmp_path / "two", 2, 1)
    sd = torch.load(d / "consolidated.01.pth", weights_only=True)
    sd["layers.0.attention.wq.weight"] = sd["layers.0.attention.wq.weight"][:-1]
    torch.save(sd, d / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"shards disagree on layers\.0\.attention\.wq\.weight"):
        LLaMa.build(d, max_seq_len=16, device="cpu", dtype="float32", progress=False)
