"""reshard.py: 1 -> 3 -> 1 is byte-identical, shards match Meta's layout, logits are unchanged.

The reference for "Meta's layout" is `split_like_meta` in test_checkpoint.py, written from Meta's
fairscale layers independently of reshard.py. The tiny model has 12 query / 6 key-value heads, an
FFN of 288 and a vocabulary of 384, so it can be cut into 1, 2, 3 or 6 shards.
"""


import pytest
import torch

import reshard as reshard_module
from checkpoint import CheckpointError, ShardedCheckpoint, load_transformer
from conftest import LLAMA2_TOKENIZER
from model import ModelArgs
from reshard import main, reshard
from test_checkpoint import split_like_meta
from tiny import hf_model, meta_state_dict, write_checkpoint

PARAMS = dict(dim=96, n_layers=2, n_heads=12, n_kv_heads=6, multiple_of=96, norm_eps=1e-5, rope_theta=10000.0)
VOCAB_SIZE = 384  # divisible by 2, 3 and 6 (the tokenizer file is only copied, never used here)
LLAMA2_EMBEDDING_DIM, LLAMA3_EMBEDDING_DIM = 1, 0
TOKENS = torch.tensor([[1, 17, 42, 99, 250, 383, 5, 64]])


def make_one_shard(out_dir, llama2_style: bool):
    """A one-shard checkpoint; Llama 2 style writes vocab_size -1 as Meta's Llama 2 params.json does."""
    state_dict = meta_state_dict(hf_model(PARAMS, VOCAB_SIZE), PARAMS)
    params = {**PARAMS, "vocab_size": -1 if llama2_style else VOCAB_SIZE}
    ckpt = write_checkpoint(out_dir, state_dict, params, LLAMA2_TOKENIZER)
    (ckpt / "checklist.chk").write_text("d41d8cd98f00b204e9800998ecf8427e  consolidated.00.pth\n")
    return ckpt


@pytest.fixture(scope="module", params=[True, False], ids=["llama2-layout", "llama3-layout"])
def one_shard(request, tmp_path_factory):
    return make_one_shard(tmp_path_factory.mktemp("one"), llama2_style=request.param), request.param


def shard_files(ckpt):
    return sorted(ckpt.glob("consolidated.*.pth"))


def load(path):
    return torch.load(path, weights_only=True)


def logits_of(ckpt) -> torch.Tensor:
    args = ModelArgs(**{**PARAMS, "vocab_size": VOCAB_SIZE}, max_seq_len=16, max_batch_size=1)
    model = load_transformer(ckpt, args, torch.device("cpu"), torch.float32, progress=False)
    return model(TOKENS, start_pos=0)


def test_one_to_three_to_one_is_byte_identical(one_shard, tmp_path):
    src, _ = one_shard
    three = reshard(src, tmp_path / "three", 3, progress=False)
    back = reshard(three, tmp_path / "back", 1, progress=False)
    assert len(shard_files(three)) == 3
    assert (back / "consolidated.00.pth").read_bytes() == (src / "consolidated.00.pth").read_bytes()


def test_three_shards_are_cut_as_meta_cuts_them(one_shard, tmp_path):
    src, llama2_style = one_shard
    three = reshard(src, tmp_path / "three", 3, progress=False)
    embedding_dim = LLAMA2_EMBEDDING_DIM if llama2_style else LLAMA3_EMBEDDING_DIM
    expected = split_like_meta(load(src / "consolidated.00.pth"), 3, embedding_dim)
    for path, want in zip(shard_files(three), expected):
        got = load(path)
        assert list(got) == list(want)
        for name in want:
            assert torch.equal(got[name], want[name]), (path.name, name)


def test_three_shard_checkpoint_gives_the_same_logits_as_one_shard(one_shard, tmp_path):
    src, _ = one_shard
    three = reshard(src, tmp_path / "three", 3, progress=False)
    torch.testing.assert_close(logits_of(three), logits_of(src), rtol=0, atol=0)


def test_any_shard_count_to_any_other(one_shard, tmp_path):
    """2 -> 3 -> 6 -> 1: counts that do not divide each other; every tensor comes back unchanged."""
    src, _ = one_shard
    ckpt = src
    for n in (2, 3, 6, 1):
        ckpt = reshard(ckpt, tmp_path / f"mp{n}", n, progress=False)
        assert len(shard_files(ckpt)) == n
    original, final = load(src / "consolidated.00.pth"), load(ckpt / "consolidated.00.pth")
    assert list(final) == list(original)
    assert all(torch.equal(final[name], original[name]) for name in original)


def test_side_files_are_copied_but_not_the_stale_checklist(one_shard, tmp_path):
    src, _ = one_shard
    out = reshard(src, tmp_path / "two", 2, progress=False)
    assert (out / "params.json").read_bytes() == (src / "params.json").read_bytes()
    assert (out / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    assert not (out / "checklist.chk").exists()


def test_read_takes_any_slice_across_shard_boundaries(one_shard, tmp_path):
    """ShardedCheckpoint.read: slices on the cut dim, across it, and of replicated tensors."""
    src, _ = one_shard
    full = load(src / "consolidated.00.pth")
    three = ShardedCheckpoint(reshard(src, tmp_path / "three", 3, progress=False))
    for name in ("layers.0.attention.wq.weight", "layers.1.feed_forward.w2.weight", "tok_embeddings.weight",
                 "norm.weight"):
        for dim in range(full[name].dim()):
            length = full[name].shape[dim]
            for start, size in ((0, length), (length // 3 - 5, 11), (length - 7, 7)):
                want = full[name].narrow(dim, start, size)
                assert torch.equal(three.read(name, dim, start, size), want), (name, dim, start, size)


# ---- bad input: one clear error each ------------------------------------------------------


def test_shard_count_that_does_not_divide_n_kv_heads_is_an_error(one_shard, tmp_path):
    src, _ = one_shard
    with pytest.raises(ValueError, match=r"--shards 4 does not divide n_kv_heads=6 .* use one of \[1, 2, 3, 6\]"):
        reshard(src, tmp_path / "four", 4, progress=False)
    assert not (tmp_path / "four").exists()


def test_tensor_that_cannot_be_cut_evenly_is_named(tmp_path):
    params = {**PARAMS, "vocab_size": 32000}  # Llama 2's vocabulary: not divisible by 3
    src = write_checkpoint(tmp_path / "src", meta_state_dict(hf_model(PARAMS, 32000), PARAMS), params,
                           LLAMA2_TOKENIZER)
    with pytest.raises(ValueError, match=r"cannot cut tok_embeddings\.weight \(32000, 96\) into 3 equal shards: "
                                         r"dim 0 \(32000\) is not divisible by 3"):
        reshard(src, tmp_path / "three", 3, progress=False)


def test_missing_shard_is_named(one_shard, tmp_path):
    src, _ = one_shard
    three = reshard(src, tmp_path / "three", 3, progress=False)
    (three / "consolidated.01.pth").unlink()
    with pytest.raises(CheckpointError, match=r"found shards \[0, 2\], so consolidated\.01\.pth is missing"):
        reshard(three, tmp_path / "out", 1, progress=False)


def test_shard_count_that_does_not_match_params_json_is_an_error(one_shard, tmp_path):
    src, _ = one_shard
    three = reshard(src, tmp_path / "three", 3, progress=False)
    (three / "consolidated.02.pth").unlink()  # the last shard lost: numbering has no gap
    with pytest.raises(CheckpointError, match=r"\.weight: 2 shard\(s\) of \(\d+, \d+\) in .*three make \(\d+, \d+\), but "
                                              r"params\.json implies \(\d+, \d+\): the shard count \(2\) or params\.json"):
        reshard(three, tmp_path / "out", 1, progress=False)


def test_existing_output_is_not_touched(one_shard, tmp_path):
    src, _ = one_shard
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"out already exists: remove it or choose another"):
        reshard(src, tmp_path / "out", 2, progress=False)
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"


def test_failure_half_way_leaves_no_output_and_no_temporary_files(one_shard, tmp_path, monkeypatch):
    src, _ = one_shard
    real_save, saved = torch.save, []

    def save_then_fail(obj, path):
        if saved:
            raise OSError("disk full")
        saved.append(path)
        real_save(obj, path)

    monkeypatch.setattr(reshard_module.torch, "save", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        reshard(src, tmp_path / "out", 3, progress=False)
    assert saved  # one shard was written before the failure ...
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # ... and nothing is left of it


def test_command_line(one_shard, tmp_path, capsys):
    src, _ = one_shard
    assert main([str(src), str(tmp_path / "two"), "--shards", "2"]) == 0
    assert len(shard_files(tmp_path / "two")) == 2
    assert main([str(src), str(tmp_path / "five"), "--shards", "5"]) == 2
    assert "error: --shards 5 does not divide n_kv_heads=6" in capsys.readouterr().err
