"""inspect_checkpoint.py: parameter counts against published numbers and the tensors themselves,
memory estimates against what the engine allocates, the cached tensor index, bad input."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import atomic
import inspect_checkpoint
from bf16_layers import HalfLinear
from checkpoint import CheckpointError, plan_memory
from conftest import LLAMA2_TOKENIZER
from inference import LLaMa
from inspect_checkpoint import INDEX_FILE, main, resolve, tensor_index, total_parameters
from test_checkpoint import copy_split
from tiny import LLAMA2_VOCAB_SIZE, write_tiny_llama2_checkpoint

# Meta's params.json files (the repository's presets) and the parameter counts Meta publishes.
PARAMS_DIR = Path(__file__).resolve().parent.parent / "params"
LLAMA2_7B = PARAMS_DIR / "llama-2-7b.json"  # {"dim": 4096, ..., "vocab_size": -1}
LLAMA2_7B_PARAMS = 6_738_415_616
LLAMA3_8B = PARAMS_DIR / "llama-3-8b.json"
LLAMA3_8B_PARAMS = 8_030_261_248
LLAMA32_1B = PARAMS_DIR / "llama-3.2-1b.json"
LLAMA32_1B_PARAMS = 1_235_814_400  # published with the head tied to the embedding: counted once


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return write_tiny_llama2_checkpoint(tmp_path_factory.mktemp("tiny"), LLAMA2_TOKENIZER)


def write_params(tmp_path, params: dict, name: str = "params.json"):
    path = tmp_path / name
    path.write_text(json.dumps(params))
    return path


def total_line(text: str) -> int:
    """The number on the report's `total` line (thousands separators allowed)."""
    (number,) = re.findall(r"^\s+total\s+([\d,]+)\s*$", text, flags=re.MULTILINE)
    return int(number.replace(",", ""))


# --------------------------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted((Path(__file__).parent.parent / "params").glob("*.json")), ids=lambda p: p.name)
def test_every_preset_is_inspectable_as_it_is(preset, capsys):
    assert main([str(preset)]) == 0, capsys.readouterr().err
    assert "vocabulary" in capsys.readouterr().out


def test_llama2_7b_params_json_counts_the_published_total(capsys):
    path = LLAMA2_7B
    assert json.loads(path.read_text())["vocab_size"] == -1
    assert total_parameters(path, vocab_size=32000) == LLAMA2_7B_PARAMS
    assert main([str(path), "--vocab-size", "32000"]) == 0
    out = capsys.readouterr().out
    assert total_line(out) == LLAMA2_7B_PARAMS
    assert "6,738,415,616" in out and "from --vocab-size" in out
    assert main([str(path), "--vocab-size", "32000", "--total-only"]) == 0
    assert capsys.readouterr().out.strip() == str(LLAMA2_7B_PARAMS)


def test_vocab_size_minus_one_comes_from_the_tokenizer_next_to_it_or_is_llama_2s(tmp_path, capsys):
    path = tmp_path / "llama-2-7b.json"
    shutil.copy(LLAMA2_7B, path)
    assert main([str(path)]) == 0  # a bare preset is inspectable as it is
    out = capsys.readouterr().out
    assert total_line(out) == LLAMA2_7B_PARAMS and "32,000 (from Llama 2's tokenizer" in out
    shutil.copy(LLAMA2_TOKENIZER, tmp_path / "tokenizer.model")
    resolved = resolve(path)
    assert resolved.args.vocab_size == LLAMA2_VOCAB_SIZE and "tokenizer" in resolved.vocab_source
    assert total_parameters(path) == LLAMA2_7B_PARAMS


def test_other_published_counts(capsys):
    assert total_parameters(LLAMA3_8B) == LLAMA3_8B_PARAMS
    assert main([str(LLAMA32_1B)]) == 0
    out = capsys.readouterr().out
    assert f"{LLAMA32_1B_PARAMS:,} distinct parameters" in out  # the tying note
    assert "Llama 3.1 frequency scaling: factor 8" in out


def test_demo_model_count_is_the_sum_of_its_tensors(demo_ckpt, capsys):
    state = torch.load(demo_ckpt / "consolidated.00.pth", mmap=True, weights_only=True)
    expected = sum(t.numel() for t in state.values())
    assert total_parameters(demo_ckpt) == expected
    assert main([str(demo_ckpt), "--check-tied"]) == 0
    out = capsys.readouterr().out
    assert total_line(out) == expected
    # SmolLM2 ties its head to the embedding; the published count (README) counts it once.
    assert "output.weight equals tok_embeddings.weight (tied): 134,515,008 distinct parameters" in out
    assert "float32" in out and "30" in out


# --------------------------------------------------------------------------------------------
# Shards, bytes and memory
# --------------------------------------------------------------------------------------------


def test_two_shards_count_as_one_and_are_listed(tiny_ckpt, tmp_path, capsys):
    two = copy_split(tiny_ckpt, tmp_path / "two", 2, 1)
    assert total_parameters(two) == total_parameters(tiny_ckpt)
    assert main([str(two), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "2 shard(s)" in out
    assert "consolidated.00.pth" in out and "consolidated.01.pth" in out
    assert "a 1/2 slice of" in out
    assert "layers.1.feed_forward.w2.weight" in out  # --tensors lists them
    # Bytes on disk per dtype: every value of every shard (norms are stored in each shard).
    shards = [torch.load(p, weights_only=True) for p in sorted(two.glob("consolidated.*.pth"))]
    n_values = sum(t.numel() for sd in shards for t in sd.values() if t.dtype == torch.float32)
    assert re.search(rf"float32\s+{n_values:,} values", out)


def test_memory_plan_equals_what_the_engine_allocates(tiny_ckpt, capsys):
    """The weights and KV cache in the report are what LLaMa.build allocates, byte for byte."""
    max_seq_len, max_batch_size = 48, 3
    resolved = resolve(tiny_ckpt, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    plan = plan_memory(resolved.args, torch.bfloat16, None, torch.device("cpu"))
    llama = LLaMa.build(tiny_ckpt, max_seq_len=max_seq_len, max_batch_size=max_batch_size, device="cpu",
                        dtype="bfloat16", progress=False)
    state = {**dict(llama.model.named_parameters()), **dict(llama.model.named_buffers())}  # prepacked weights are buffers
    caches = {name for name in state if ".cache." in name}
    assert plan.kv_cache == sum(state[n].numel() * state[n].element_size() for n in caches)
    # FBGEMM's packed float16 weights (bf16_layers.HalfLinear, CPUs without native bf16) are not tensors.
    packed = sum(m.packed_bytes() for m in llama.model.modules() if isinstance(m, HalfLinear))
    assert plan.weights == packed + sum(t.numel() * t.element_size() for n, t in state.items() if n not in caches)
    assert main([str(tiny_ckpt), "--max-seq-len", "48", "--max-batch-size", "3", "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    assert "Memory to run (bfloat16, linear layers int8, max_seq_len 48, batch 3)" in out
    int8_plan = plan_memory(resolved.args, torch.bfloat16, "int8", torch.device("cpu"))
    assert re.search(rf"weights\s+{re.escape(inspect_checkpoint.human_bytes(int8_plan.weights))}", out)


# --------------------------------------------------------------------------------------------
# The tensor index
# --------------------------------------------------------------------------------------------


def test_index_is_cached_used_and_rebuilt_when_a_shard_changes(tiny_ckpt, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    (ckpt / INDEX_FILE).unlink(missing_ok=True)
    first = tensor_index(ckpt)
    cached = json.loads((ckpt / INDEX_FILE).read_text())
    assert cached["shards"][0]["file"] == "consolidated.00.pth"
    assert cached["shards"][0]["tensors"]["layers.0.attention.wq.weight"] == {"dtype": "float32", "shape": [64, 64]}
    assert not list(ckpt.glob(f".{INDEX_FILE}.*"))  # no temporary file left behind

    def no_reading(path):
        raise AssertionError(f"read {path} although the index is cached")

    with monkeypatch.context() as m:
        m.setattr(inspect_checkpoint, "read_shard_info", no_reading)
        assert tensor_index(ckpt) == first

    state = torch.load(ckpt / "consolidated.00.pth", weights_only=True)
    state["layers.0.attention.wq.weight"] = state["layers.0.attention.wq.weight"].to(torch.bfloat16)
    torch.save(state, ckpt / "consolidated.00.pth")
    rebuilt = tensor_index(ckpt)
    assert rebuilt.shards[0].tensors["layers.0.attention.wq.weight"].dtype == "bfloat16"

    (ckpt / INDEX_FILE).write_text("{not json")  # a damaged cache is rebuilt, not an error
    assert tensor_index(ckpt) == rebuilt


def test_read_only_directory_gets_no_index_but_works(tiny_ckpt, tmp_path, monkeypatch):
    ckpt = tmp_path / "ro"
    shutil.copytree(tiny_ckpt, ckpt)
    (ckpt / INDEX_FILE).unlink(missing_ok=True)  # other tests may have cached one in tiny_ckpt

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)  # where the index's temporary file is made
    assert total_parameters(ckpt) == total_parameters(tiny_ckpt)
    assert not (ckpt / INDEX_FILE).exists()


def test_index_file_is_readable_by_others_like_the_checkpoint(tiny_ckpt, tmp_path):
    ckpt = tmp_path / "perm"
    shutil.copytree(tiny_ckpt, ckpt)
    (ckpt / INDEX_FILE).unlink(missing_ok=True)
    tensor_index(ckpt)
    umask = os.umask(0)
    os.umask(umask)
    assert (ckpt / INDEX_FILE).stat().st_mode & 0o777 == 0o666 & ~umask


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "nope", "does not exist"),
    (lambda d: d, r"params\.json is missing"),
    (lambda d: write_params(d, {"dim": 64, "n_layerz": 2}), r"unknown key\(s\) \['n_layerz'\]"),
    (lambda d: (d / "p.json").write_text("{oops") and d / "p.json", "not valid JSON"),
    (lambda d: write_params(d, [1, 2]), "must hold a JSON object"),
])
def test_bad_paths_are_one_clear_line(tmp_path, capsys, make, message):
    path = make(tmp_path)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert re.search(message, err), err


def test_a_checkpoint_dir_without_shards_is_an_error(tmp_path, capsys):
    shutil.copy(LLAMA2_7B, tmp_path / "params.json")
    assert main([str(tmp_path)]) == 2
    assert "no consolidated.*.pth files" in capsys.readouterr().err


def test_vocab_size_flag_that_contradicts_params_json_is_an_error():
    with pytest.raises(CheckpointError, match=r"--vocab-size 100 disagrees with vocab_size 128256"):
        resolve(LLAMA3_8B, vocab_size=100)
