"""checkpoint.py: multi-shard Meta checkpoints load into one model; bad checkpoints are clear errors;
params.json -> ModelArgs (with Llama 2's -1), `expected_shapes` and the sharded-checkpoint reader.

The multi-shard checkpoints are made here by splitting a one-shard checkpoint the way Meta's
fairscale layers split it: column-parallel weights (wq wk wv w1 w3 output) on dim 0, row-parallel
(wo w2) on dim 1, norms replicated, the embedding on dim 1 (Llama 2) or dim 0 (Llama 3).
"""

import ast
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from checkpoint import (
    CheckpointError,
    ShardedCheckpoint,
    expected_shapes,
    load_model_args,
    load_transformer,
    model_args_from_params,
    open_shard,
    read_params_file,
    release_mapped_part,
)
from conftest import LLAMA2_TOKENIZER
from inference import LLaMa
from model import ModelArgs, Transformer
from tiny import LLAMA2_VOCAB_SIZE, TINY, hf_model, meta_state_dict, write_checkpoint
from tokenizer import TokenizerFileError

PARAMS_DIR = Path(__file__).resolve().parent.parent / "params"
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
    (lambda d: write_params(d, dim="64"), CheckpointError, r'params\.json: dim is "64", expected an integer$'),
    (lambda d: write_params(d, n_heads=4.0), CheckpointError, r"params\.json: n_heads is 4\.0, expected an integer$"),
    (lambda d: write_params(d, use_scaled_rope="yes"), CheckpointError,
     r'params\.json: use_scaled_rope is "yes", expected true or false$'),
    (lambda d: write_params(d, vocab_size=0), CheckpointError, r"params\.json: ModelArgs\.vocab_size must be >= 1"),
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


# ---- params.json -> ModelArgs: Llama 2's -1 resolved once ------------------------------------


def params_only_copy(one_shard, tmp_path):
    """The checkpoint's params.json (vocab_size -1) and tokenizer, without the weights."""
    d = tmp_path / "params-only"
    d.mkdir()
    shutil.copy(one_shard / "params.json", d / "params.json")
    return d


def test_vocab_size_minus_one_is_read_from_the_shards_first(one_shard, tmp_path):
    assert json.loads((one_shard / "params.json").read_text())["vocab_size"] == -1
    assert load_model_args(one_shard, 16, 1).vocab_size == LLAMA2_VOCAB_SIZE
    assert load_model_args(one_shard, 16, 1, vocab_size=7).vocab_size == LLAMA2_VOCAB_SIZE  # the weights win
    for embedding_dim in (1, 0):  # Llama 2's and Llama 3's embedding layouts, 2 shards
        two = copy_split(one_shard, tmp_path / f"two-{embedding_dim}", 2, embedding_dim)
        assert load_model_args(two, 16, 1).vocab_size == LLAMA2_VOCAB_SIZE
        headless = tmp_path / f"headless-{embedding_dim}"  # no output.weight: the embedding tells
        shutil.copytree(two, headless)
        for shard in headless.glob("consolidated.*.pth"):
            state = torch.load(shard, weights_only=True)
            state.pop("output.weight", None)
            torch.save(state, shard)
        assert load_model_args(headless, 16, 1).vocab_size == LLAMA2_VOCAB_SIZE


def test_vocab_size_minus_one_without_shards_comes_from_the_caller_or_is_an_error(one_shard, tmp_path):
    d = params_only_copy(one_shard, tmp_path)
    assert load_model_args(d, 16, 1, vocab_size=LLAMA2_VOCAB_SIZE).vocab_size == LLAMA2_VOCAB_SIZE
    with pytest.raises(CheckpointError, match=r"params\.json says vocab_size -1 .* no consolidated\.\*\.pth files "
                                              r"in .*: pass --vocab-size"):
        load_model_args(d, 16, 1)


def test_inside_the_engine_an_unknown_vocab_size_is_none():
    params = read_params_file(PARAMS_DIR / "llama-2-7b.json")
    assert params["vocab_size"] == -1
    assert model_args_from_params(params, Path("llama-2-7b.json"), 16, 1).vocab_size is None
    with pytest.raises(ValueError, match=r"ModelArgs\.vocab_size is None"):
        Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4))


# ---- expected_shapes: the one statement of every tensor's shape -------------------------------


def real_shapes(args: ModelArgs) -> list[tuple[str, tuple[int, ...]]]:
    with torch.device("meta"):
        return [(name, tuple(t.shape)) for name, t in Transformer(args).state_dict().items()]


@pytest.mark.parametrize("params", [
    dict(dim=64, n_layers=2, n_heads=4, vocab_size=100, multiple_of=32),  # multi-head
    dict(dim=96, n_layers=3, n_heads=12, n_kv_heads=6, vocab_size=384, multiple_of=96),  # grouped-query
    dict(dim=64, n_layers=1, n_heads=4, n_kv_heads=1, vocab_size=50, ffn_dim_multiplier=1.3),  # multi-query
], ids=["mha", "gqa", "mqa"])
def test_expected_shapes_are_a_real_transformers_state_dict_shapes(params):
    args = ModelArgs(**params, max_seq_len=16, max_batch_size=1)
    assert list(expected_shapes(args).items()) == real_shapes(args)  # the same names, order and shapes


def test_expected_shapes_of_llama2_with_the_vocab_size_from_the_shards_or_the_tokenizer(one_shard, tmp_path):
    from_shards = load_model_args(one_shard, 16, 1)
    from_tokenizer = load_model_args(params_only_copy(one_shard, tmp_path), 16, 1, vocab_size=LLAMA2_VOCAB_SIZE)
    assert from_shards == from_tokenizer
    assert list(expected_shapes(from_shards).items()) == real_shapes(from_shards)
    state = torch.load(one_shard / "consolidated.00.pth", weights_only=True)
    state.pop("rope.freqs")
    assert expected_shapes(from_shards) == {name: tuple(t.shape) for name, t in state.items()}


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3-8b", "llama-3.1-405b"])
def test_expected_shapes_of_meta_presets(name):
    params = read_params_file(PARAMS_DIR / f"{name}.json")
    args = model_args_from_params(params, PARAMS_DIR / f"{name}.json", max_seq_len=16, max_batch_size=1)
    if args.vocab_size is None:
        args = dataclasses.replace(args, vocab_size=LLAMA2_VOCAB_SIZE)
    assert list(expected_shapes(args).items()) == real_shapes(args)


# ---- the reader: the same tensors, whatever the shard count ----------------------------------


@pytest.mark.parametrize("n_shards, embedding_dim", [(1, None), (2, 1), (2, 0)],
                         ids=["one-shard", "two-shards-llama2-embedding", "two-shards-llama3-embedding"])
def test_reader_reads_the_tensors_of_the_original_checkpoint(one_shard, tmp_path, n_shards, embedding_dim):
    original = torch.load(one_shard / "consolidated.00.pth", weights_only=True)
    original.pop("rope.freqs")  # Meta's extra key: dropped by name
    ckpt = one_shard if n_shards == 1 else copy_split(one_shard, tmp_path / "split", n_shards, embedding_dim)
    reader = ShardedCheckpoint(ckpt)
    assert reader.n_shards == n_shards and reader.args.vocab_size == LLAMA2_VOCAB_SIZE
    assert reader.names() == list(original)
    for name, tensor in original.items():
        assert torch.equal(reader.read(name), tensor), name
        rows = tensor.shape[0]
        assert torch.equal(reader.read(name, 0, rows // 2 - 3, 5), tensor[rows // 2 - 3: rows // 2 + 2]), name


def test_reader_of_one_shard_reads_without_copying(one_shard):
    reader = ShardedCheckpoint(one_shard)
    name = "layers.0.attention.wq.weight"
    assert reader.read(name).data_ptr() == reader.pieces(name)[0].data_ptr()  # a view into the memory map


# ---- the import rule: the loading files stand on the model, never on a tool -----------------

REPO = Path(__file__).resolve().parent.parent
ALLOWED_LOCAL_IMPORTS = {  # ours only; reading order: model, cpu, bf16_layers, quantize, memory, smoothing, checkpoint, ...
    "model": set(),
    "cpu": set(),
    "bf16_layers": {"cpu"},
    "quantize": {"cpu", "bf16_layers"},
    "memory": {"model", "quantize"},
    "smoothing": {"model", "quantize"},
    "checkpoint": {"model", "quantize", "memory", "smoothing"},
    "tensor_parallel": {"checkpoint", "model"},
    "reshard": {"atomic", "checkpoint", "model"},
}


def local_imports(module: str) -> set[str]:
    ours = {path.stem for path in REPO.glob("*.py")}
    tree = ast.parse((REPO / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):  # every import, lazy ones inside functions included
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & ours


@pytest.mark.parametrize("module", ALLOWED_LOCAL_IMPORTS)
def test_loading_files_import_only_what_stands_before_them(module):
    assert local_imports(module) <= ALLOWED_LOCAL_IMPORTS[module]


# --------------------------------------------------------------------------------------------
# The dtype, chosen per device, CPU and quantization
# --------------------------------------------------------------------------------------------

from checkpoint import choose_dtype, load_model_args  # noqa: E402
from cpu import CpuFeatures  # noqa: E402
from bf16_layers import prepacking_helps  # noqa: E402
from quantize import HALF, PREPACKED, WIDENED, QuantizationError, linear_storage  # noqa: E402

BF16_CPU = CpuFeatures(name="x86_64: AVX512 (amx_bf16)", native_bf16=True, int8_dot=True)
NO_BF16_CPU = CpuFeatures(name="x86_64: AVX512 (avx512_vnni)", native_bf16=False, int8_dot=True)  # and no FBGEMM
ICE_LAKE = CpuFeatures(name="x86_64: AVX512 (avx512_vnni)", native_bf16=False, int8_dot=True, fp16_weight_matmul=True)
CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")  # only asked about


@pytest.mark.parametrize("device, quantize, expected", [
    (CPU, None, torch.bfloat16),  # the design card's CPU default, on every CPU (the layers differ: below)
    (CPU, "int8", torch.bfloat16),
    (CUDA, None, torch.float16),
    (CUDA, "int8", torch.float16),
    (CUDA, "int4", torch.bfloat16),  # the CUDA int4 kernel takes bf16 only
    (MPS, None, torch.float16),
])
def test_default_dtype_is_chosen_per_device_and_quantization(device, quantize, expected):
    assert choose_dtype(None, device, quantize) == expected


@pytest.mark.parametrize("features, expected", [
    (BF16_CPU, PREPACKED if prepacking_helps(CPU, torch.bfloat16) else "plain"),  # eager and compiled alike
    (ICE_LAKE, HALF),  # emulated bf16, and FBGEMM (x86 PyTorch): float16 weights, float32 arithmetic
    (NO_BF16_CPU, WIDENED),  # emulated bf16 without FBGEMM: prompts in float32, decoding in bf16
    (dataclasses.replace(BF16_CPU, fp16_weight_matmul=True), PREPACKED if prepacking_helps(CPU, torch.bfloat16) else "plain"),
])
def test_bf16_layers_are_prepacked_where_the_cpu_has_bf16_and_held_in_float16_or_widened_where_it_does_not(
        features, expected):
    assert linear_storage(CPU, torch.bfloat16, features=features) == expected
    assert linear_storage(CPU, torch.float32, features=features) == "plain"
    assert linear_storage(CPU, torch.bfloat16, needs_gradients=True, features=features) == "plain"


def test_an_asked_dtype_is_always_honoured():
    assert choose_dtype("float32", CPU, None) == torch.float32
    assert choose_dtype("float16", CUDA, "int4") == torch.float16  # and then refused by linear_storage, below


def test_int4_on_cuda_needs_ampere_and_bfloat16_and_is_refused_on_mps_naming_what_works():
    assert linear_storage(CUDA, torch.bfloat16, "int4", cuda_capability=(8, 0)) == "int4"
    with pytest.raises(QuantizationError, match=r"--quantize int4 on CUDA needs .* 8.0 .* sm75: use --quantize int8"):
        linear_storage(CUDA, torch.bfloat16, "int4", cuda_capability=(7, 5))
    with pytest.raises(QuantizationError, match=r"int4 on CUDA computes in bfloat16 .* not float16: use --dtype bfloat16"):
        linear_storage(CUDA, torch.float16, "int4", cuda_capability=(9, 0))
    with pytest.raises(QuantizationError, match=r"--quantize int4 has no MPS kernel.*use --quantize int8"):
        linear_storage(MPS, torch.float16, "int4")


def test_the_loader_gives_back_file_pages_only_for_parts_of_the_memory_mapped_file(tmp_path, monkeypatch):
    import checkpoint
    from memory import release_file_pages

    released = []

    def recording(tensors):
        released.extend(t.data_ptr() for t in tensors)
        release_file_pages(tensors)

    monkeypatch.setattr(checkpoint, "release_file_pages", recording)
    weight = torch.randn(4096, 64)  # 1 MB: whole pages in every part of 1024 rows
    torch.save({"w": weight}, tmp_path / "shard.pth")
    mapped = open_shard(tmp_path / "shard.pth")["w"]
    copy = mapped.clone()  # ordinary memory: released pages would read back as zeros
    for part in copy.split(1024):
        release_mapped_part(part, [mapped])
    assert released == [] and torch.equal(copy, weight)
    for part in mapped.split(1024):
        release_mapped_part(part, [mapped])
    assert released == [part.data_ptr() for part in mapped.split(1024)]
    assert torch.equal(mapped, weight)  # the file's pages come back from the file
