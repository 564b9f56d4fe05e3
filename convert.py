"""Convert a Llama checkpoint from GGUF or Hugging Face format into Meta's format.

Our engine reads exactly what Meta publishes: a directory with

    consolidated.00.pth   a flat state dict (Meta's names: tok_embeddings, layers.N.attention.wq, ...)
    params.json           the hyperparameters (dim, n_layers, n_heads, ...; nothing else)
    tokenizer.model       SentencePiece (Llama 2) or tiktoken ranks (Llama 3 style)

Other formats hold the same numbers under other names and, sometimes, in another order:

- A **GGUF** file (llama.cpp) stores each tensor quantized and with its shape listed fastest
  dimension first. We dequantize with the `gguf` package. Its q/k rows are already in Meta's
  interleaved RoPE layout, because llama.cpp's converter undoes Hugging Face's permutation.
- A **Hugging Face** directory (`config.json` + safetensors) permutes the rows of wq/wk so that
  each head's rotary pairs are (i, i + head_dim/2) -- "rotate half" -- instead of Meta's
  neighbouring pairs (2i, 2i+1). We apply the inverse of the permutation in HF's
  `convert_llama_weights_to_hf.py`.

The tokenizer travels too. A SentencePiece vocabulary becomes a SentencePiece `tokenizer.model`.
A GPT-2 style byte-level BPE vocabulary becomes a tiktoken `tokenizer.model` (the rank of a
token is its id, which is its merge order) plus `tokenizer_spec.json`, a sidecar naming the
pre-tokenizer regex, the special tokens and the chat template.

The output appears atomically: we write into a temporary directory next to OUT_DIR and rename
it at the end, so a failed conversion leaves nothing behind.

    python convert.py SmolLM2-135M-Instruct.Q4_1.gguf checkpoints/smollm2 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from model import RopeScaling, feed_forward_hidden_dim
from tokenizer import LLAMA3_PAT_STR
from tokenizer_files import write_tiktoken_model, write_tokenizer_spec  # the formats tokenizer.py reads

# --------------------------------------------------------------------------------------------
# Names of things in the output directory
# --------------------------------------------------------------------------------------------

CHECKPOINT_NAME = "consolidated.00.pth"  # Meta's name for shard 0 (we always write one shard)
PARAMS_NAME = "params.json"
TOKENIZER_NAME = "tokenizer.model"
TOKENIZER_SPEC_NAME = "tokenizer_spec.json"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConversionError(Exception):
    """Bad input to the converter; `main()` prints the message as one line, without traceback."""


# --------------------------------------------------------------------------------------------
# Hyperparameters: Meta's params.json
# --------------------------------------------------------------------------------------------

META_DEFAULT_ROPE_THETA = 10000.0  # Llama 2's theta; also LlamaConfig's default

# Meta's FFN width rule (llama/model.py, FeedForward.__init__) rounds up to a multiple of
# `multiple_of`; 256 is what Llama 2 7B uses, so we try it first for the most familiar params.json.
MULTIPLE_OF_CANDIDATES = (256, 1024, 512, 128, 64, 32, 16, 8, 4, 2, 1)

# Llama 3.1's `use_scaled_rope: true` stands for these fixed values (llama-models, model.py,
# apply_scaling). Any other llama3-type scaling goes into params.json as an explicit override.
META_ROPE_SCALING = dataclasses.asdict(RopeScaling())


def find_ffn_params(dim: int, hidden_dim: int) -> tuple[int, Optional[float]]:
    """Find (multiple_of, ffn_dim_multiplier) for which Meta's rule gives `hidden_dim` exactly.

    params.json cannot state the FFN width directly, only the inputs of Meta's rule. We prefer
    no multiplier; otherwise the multiplier hidden_dim / base, nudged up by a few ulps so that
    int() does not round it one below, with the largest `multiple_of` that still works.
    """
    base = int(2 * (4 * dim) / 3)
    ratio = hidden_dim / base
    multipliers: list[Optional[float]] = [None, ratio]
    for _ in range(4):
        multipliers.append(math.nextafter(multipliers[-1], math.inf))
    for multiplier in multipliers:
        for multiple_of in MULTIPLE_OF_CANDIDATES:
            if feed_forward_hidden_dim(dim, multiple_of, multiplier) == hidden_dim:
                return multiple_of, multiplier
    raise ConversionError(
        f"cannot express FFN width {hidden_dim} (dim {dim}) with Meta's multiple_of/ffn_dim_multiplier rule"
    )


def float32_repr(x: float) -> float:
    """A float stored as float32 (GGUF) printed as its shortest float32 form: 1e-05, not 9.99e-06."""
    return float(str(np.float32(x)))


def build_params(
    *,
    dim: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    vocab_size: int,
    hidden_dim: int,
    norm_eps: float,
    rope_theta: float,
    rope_scaling: Optional[dict] = None,
) -> dict:
    """Meta's params.json; `rope_scaling` holds llama3-type factors (None: no scaling)."""
    if dim % n_heads != 0 or n_heads % n_kv_heads != 0:
        raise ConversionError(f"inconsistent heads: dim {dim}, n_heads {n_heads}, n_kv_heads {n_kv_heads}")
    multiple_of, ffn_dim_multiplier = find_ffn_params(dim, hidden_dim)
    params = {
        "dim": dim,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "vocab_size": vocab_size,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": ffn_dim_multiplier,
        "norm_eps": norm_eps,
        "rope_theta": rope_theta,
        "use_scaled_rope": rope_scaling is not None,
    }
    if rope_scaling is not None and rope_scaling != META_ROPE_SCALING:
        params["rope_scaling"] = rope_scaling
    return params


def expected_shapes(params: dict, hidden_dim: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Meta checkpoint with its shape, from the hyperparameters."""
    dim, vocab = params["dim"], params["vocab_size"]
    head_dim = dim // params["n_heads"]
    kv_dim = params["n_kv_heads"] * head_dim
    shapes = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,), "output.weight": (vocab, dim)}
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        shapes |= {
            p + "attention.wq.weight": (dim, dim),
            p + "attention.wk.weight": (kv_dim, dim),
            p + "attention.wv.weight": (kv_dim, dim),
            p + "attention.wo.weight": (dim, dim),
            p + "feed_forward.w1.weight": (hidden_dim, dim),
            p + "feed_forward.w3.weight": (hidden_dim, dim),
            p + "feed_forward.w2.weight": (dim, hidden_dim),
            p + "attention_norm.weight": (dim,),
            p + "ffn_norm.weight": (dim,),
        }
    return shapes


# --------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE (GPT-2 style) -> tiktoken ranks + sidecar
# --------------------------------------------------------------------------------------------

# Pre-tokenizer regexes by llama.cpp's `tokenizer.ggml.pre` name.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Meta's Llama 3 pattern (llama_models/llama3/tokenizer.py), kept in one place: tokenizer.py.
LLAMA3_PATTERN = LLAMA3_PAT_STR
# SmolLM2 (HF: Sequence[Digits(individual_digits=True), ByteLevel(GPT-2 regex)]) as one regex:
# every digit is its own piece; and since the Digits step cuts the text before a digit, a run of
# whitespace in front of a digit ends its segment and stays whole (`\s+(?=\p{N})`), where GPT-2's
# `\s+(?!\S)` would leave its last space to the next piece.
SMOLLM_PATTERN = (
    r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""
)
PRE_TOKENIZER_PATTERNS = {"gpt2": GPT2_PATTERN, "smollm": SMOLLM_PATTERN, "llama-bpe": LLAMA3_PATTERN}

# Tokens that end a turn, by name, in the chat formats we know (ChatML, Llama 3).
KNOWN_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (openai/gpt-2, encoder.py).

    Byte-level BPE vocabularies spell every token with these characters; printable bytes map to
    themselves, the other 68 bytes to code points from 256 up.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


def bpe_token_bytes(token: str, unicode_to_byte: dict[str, int]) -> bytes:
    try:
        return bytes(unicode_to_byte[ch] for ch in token)
    except KeyError as e:
        raise ConversionError(f"token {token!r} is not spelled in GPT-2 byte-level characters") from e


def check_ranks_follow_merges(ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]]) -> None:
    """tiktoken merges the pair whose result has the lowest rank; HF/llama.cpp merge by merge
    order. They agree when the ids of merge results increase with the merge order."""
    previous = -1
    for i, (left, right) in enumerate(merges):
        rank = ranks.get(left + right)
        if rank is None or rank <= previous:
            raise ConversionError(
                f"merge {i} ({left!r} + {right!r}) breaks id order; this vocabulary cannot be expressed as tiktoken ranks"
            )
        previous = rank


def byte_level_bpe_ranks(
    tokens: list[str], special_ids: set[int], merges: list[tuple[str, str]]
) -> dict[bytes, int]:
    """tiktoken's mergeable ranks: raw bytes of each ordinary token -> its id."""
    unicode_to_byte = {ch: b for b, ch in gpt2_bytes_to_unicode().items()}
    ranks = {bpe_token_bytes(t, unicode_to_byte): i for i, t in enumerate(tokens) if i not in special_ids}
    byte_merges = [(bpe_token_bytes(a, unicode_to_byte), bpe_token_bytes(b, unicode_to_byte)) for a, b in merges]
    check_ranks_follow_merges(ranks, byte_merges)
    return ranks


def stop_tokens(eos_token: str, special_tokens: dict[str, int]) -> list[str]:
    stops = [eos_token]
    stops += [t for t in KNOWN_STOP_TOKENS if t in special_tokens and t not in stops]
    return stops


def tokenizer_spec(
    *,
    pattern: str,
    special_tokens: dict[str, int],
    bos_token: Optional[str],
    eos_token: str,
    pad_token: Optional[str],
    add_bos: bool,
    chat_template: Optional[str],
) -> dict:
    """The sidecar next to a tiktoken tokenizer.model (schema shared with tokenizer.py)."""
    return {
        "pattern": pattern,
        "special_tokens": special_tokens,
        "bos_token": bos_token,
        "eos_token": eos_token,
        "pad_token": pad_token,
        "stop_tokens": stop_tokens(eos_token, special_tokens),
        "add_bos": add_bos,
        "chat_template": chat_template,
    }


# --------------------------------------------------------------------------------------------
# Tokenizer: SentencePiece from a GGUF vocabulary
# --------------------------------------------------------------------------------------------

NO_TOKEN_ID = -1  # SentencePiece's "this special token does not exist"


def sentencepiece_model_bytes(
    tokens: list[str],
    scores: list[float],
    token_types: list[int],
    *,
    unk_id: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    add_dummy_prefix: bool,
) -> bytes:
    """A SentencePiece ModelProto set up like Llama 2's: BPE with byte fallback, identity
    normalizer, whitespace kept. GGUF token types use SentencePiece's numbering (1 normal,
    2 unknown, 3 control, 4 user defined, 5 unused, 6 byte), so they carry over directly."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    model = sp_pb2.ModelProto()
    for piece, score, kind in zip(tokens, scores, token_types):
        model.pieces.add(piece=piece, score=score, type=kind)
    spec = model.trainer_spec
    spec.model_type = sp_pb2.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = sp_pb2.ModelProto.SentencePiece.BYTE in token_types
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = unk_id, bos_id, eos_id, pad_id
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = add_dummy_prefix
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return model.SerializeToString()


def is_sentencepiece_model(path: Path) -> bool:
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError):
        return False
    return True


# --------------------------------------------------------------------------------------------
# Sources: what a reader hands to `convert()`
# --------------------------------------------------------------------------------------------


@dataclass
class Source:
    params: dict
    hidden_dim: int
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]  # (Meta name, tensor), one at a time
    write_tokenizer: Optional[Callable[[Path], None]]  # None: the source holds no tokenizer


# --------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"

# llama.cpp tensor names -> Meta names (blk.N.<name> -> layers.N.<name>)
GGUF_GLOBAL_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
GGUF_LAYER_NAMES = {
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3",
    "ffn_down": "feed_forward.w2",
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
}

GGUF_NORMAL_TOKEN = 1  # tokenizer.ggml.token_type: 1 normal, 3 control, 4 user defined, ...


def is_gguf_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def gguf_to_meta_name(name: str) -> str:
    stem, dot, suffix = name.rpartition(".")
    if suffix != "weight":
        raise ConversionError(f"unexpected GGUF tensor {name!r}")
    if stem in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[stem] + ".weight"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in GGUF_LAYER_NAMES:
        return f"layers.{parts[1]}.{GGUF_LAYER_NAMES[parts[2]]}.weight"
    raise ConversionError(f"unexpected GGUF tensor {name!r} (not part of a Llama model)")


class GGUFMetadata:
    """Typed access to a GGUFReader's key/value fields."""

    def __init__(self, reader):
        self.fields = reader.fields

    def get(self, key: str, default=None):
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str):
        if key not in self.fields:
            raise ConversionError(f"GGUF metadata lacks {key!r}")
        return self.fields[key].contents()


def gguf_tensor_to_torch(tensor) -> torch.Tensor:
    """Dequantize one GGUF tensor to float32, in numpy/torch shape order (slowest dim first)."""
    import gguf

    try:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ConversionError(
            f"tensor {tensor.name!r} uses quantization {tensor.tensor_type.name}, which gguf cannot dequantize"
        ) from e
    # GGUF lists dimensions fastest first (ggml's ne[0] is the row length): reverse them.
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return torch.from_numpy(np.array(array, dtype=np.float32).reshape(shape))


def read_gguf(path: Path) -> Source:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:  # truncated or corrupt file
        raise ConversionError(f"cannot read GGUF file {path}: {e}") from e
    meta = GGUFMetadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConversionError(f"{path}: architecture {arch!r} is not 'llama'; only Llama models can be converted")
    tokens = meta.require("tokenizer.ggml.tokens")
    hidden_dim = int(meta.require("llama.feed_forward_length"))
    dim = int(meta.require("llama.embedding_length"))
    n_heads = int(meta.require("llama.attention.head_count"))
    rope_theta = float32_repr(meta.get("llama.rope.freq_base", META_DEFAULT_ROPE_THETA))
    params = build_params(
        dim=dim,
        n_layers=int(meta.require("llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),  # absent: no GQA
        vocab_size=len(tokens),
        hidden_dim=hidden_dim,
        norm_eps=float32_repr(meta.require("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=rope_theta,
        rope_scaling=gguf_rope_scaling(meta, reader, dim // n_heads, rope_theta),
    )

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for t in reader.tensors:
            if t.name.startswith("rope_freqs"):  # llama.cpp's precomputed llama3 factors: we derive them
                continue
            yield gguf_to_meta_name(t.name), gguf_tensor_to_torch(t)

    return Source(params, hidden_dim, tensors, lambda out: write_gguf_tokenizer(meta, out))


def llama3_rope_factors(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """The per-frequency divisors of Llama 3.1's RoPE scaling (llama-models, apply_scaling);
    llama.cpp stores exactly these as the `rope_freqs` tensor."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context / scaling["low_freq_factor"]
    high_freq_wavelen = old_context / scaling["high_freq_factor"]
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - scaling["low_freq_factor"]) / (
        scaling["high_freq_factor"] - scaling["low_freq_factor"]
    )
    blended = 1 / ((1 - smooth) / scaling["factor"] + smooth)
    factors = torch.where(wavelen > low_freq_wavelen, torch.full_like(freqs, scaling["factor"]), blended)
    return torch.where(wavelen < high_freq_wavelen, torch.ones_like(freqs), factors)


def gguf_rope_scaling(meta: GGUFMetadata, reader, head_dim: int, theta: float) -> Optional[dict]:
    """llama.cpp marks Llama 3.1 scaling only by a `rope_freqs` tensor of per-frequency divisors;
    we accept it when it matches Meta's fixed factors, which is what `use_scaled_rope` means."""
    kind = meta.get("llama.rope.scaling.type", "none")
    if kind != "none":
        raise ConversionError(f"unsupported rope scaling {kind!r} (only Llama 3.1's 'llama3' scaling is supported)")
    rope_freqs = [t for t in reader.tensors if t.name.startswith("rope_freqs")]
    if not rope_freqs:
        return None
    stored = gguf_tensor_to_torch(rope_freqs[0]).double().flatten()
    expected = llama3_rope_factors(head_dim, theta, META_ROPE_SCALING)
    if stored.shape != expected.shape or not torch.allclose(stored, expected, rtol=1e-4):
        raise ConversionError("unsupported rope scaling: rope_freqs differs from Llama 3.1's factors")
    return dict(META_ROPE_SCALING)


def write_gguf_tokenizer(meta: GGUFMetadata, out_dir: Path) -> None:
    kind = meta.require("tokenizer.ggml.model")
    tokens = list(meta.require("tokenizer.ggml.tokens"))
    types = [int(t) for t in meta.get("tokenizer.ggml.token_type", [GGUF_NORMAL_TOKEN] * len(tokens))]
    if kind == "llama":
        scores = [float(s) for s in meta.require("tokenizer.ggml.scores")]
        data = sentencepiece_model_bytes(
            tokens,
            scores,
            types,
            unk_id=int(meta.get("tokenizer.ggml.unknown_token_id", NO_TOKEN_ID)),
            bos_id=int(meta.get("tokenizer.ggml.bos_token_id", NO_TOKEN_ID)),
            eos_id=int(meta.get("tokenizer.ggml.eos_token_id", NO_TOKEN_ID)),
            pad_id=int(meta.get("tokenizer.ggml.padding_token_id", NO_TOKEN_ID)),
            add_dummy_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
        )
        (out_dir / TOKENIZER_NAME).write_bytes(data)
    elif kind == "gpt2":
        pre = meta.get("tokenizer.ggml.pre", "gpt2")
        if pre not in PRE_TOKENIZER_PATTERNS:
            raise ConversionError(
                f"unknown pre-tokenizer {pre!r}; known: {', '.join(sorted(PRE_TOKENIZER_PATTERNS))}"
            )
        special_ids = {i for i, t in enumerate(types) if t != GGUF_NORMAL_TOKEN}
        merges = [tuple(m.split(" ")) for m in meta.require("tokenizer.ggml.merges")]
        ranks = byte_level_bpe_ranks(tokens, special_ids, merges)

        def token_at(key: str) -> Optional[str]:
            i = meta.get(key)
            return None if i is None else tokens[int(i)]

        eos = token_at("tokenizer.ggml.eos_token_id")
        if eos is None:
            raise ConversionError("GGUF metadata lacks tokenizer.ggml.eos_token_id")
        spec = tokenizer_spec(
            pattern=PRE_TOKENIZER_PATTERNS[pre],
            special_tokens={tokens[i]: i for i in sorted(special_ids)},
            bos_token=token_at("tokenizer.ggml.bos_token_id"),
            eos_token=eos,
            pad_token=token_at("tokenizer.ggml.padding_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
        )
        write_tiktoken_model(out_dir / TOKENIZER_NAME, ranks)
        write_tokenizer_spec(out_dir / TOKENIZER_SPEC_NAME, spec)
    else:
        raise ConversionError(f"unsupported GGUF tokenizer model {kind!r} (expected 'llama' or 'gpt2')")


# --------------------------------------------------------------------------------------------
# Hugging Face directory
# --------------------------------------------------------------------------------------------

HF_CONFIG = "config.json"
HF_SINGLE_FILE = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_ARCHITECTURE = "LlamaForCausalLM"

HF_GLOBAL_NAMES = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}
HF_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / HF_CONFIG).is_file()


def hf_to_meta_name(name: str) -> str:
    stem, _, suffix = name.rpartition(".")
    if suffix != "weight":
        raise ConversionError(f"unexpected tensor {name!r} (biases are not part of a Llama model)")
    if stem in HF_GLOBAL_NAMES:
        return HF_GLOBAL_NAMES[stem] + ".weight"
    parts = stem.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in HF_LAYER_NAMES:
        return f"layers.{parts[2]}.{HF_LAYER_NAMES[parts[3]]}.weight"
    raise ConversionError(f"unexpected tensor {name!r} (not part of a Llama model)")


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's q/k row permutation (convert_llama_weights_to_hf.py, `permute`).

    Per head, HF stores the first halves of Meta's rotary pairs, then the second halves; Meta
    interleaves them: rows (0, d/2, 1, d/2+1, ...) of HF's head become rows (0, 1, 2, 3, ...).
    """
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_rope_settings(config: dict) -> tuple[float, Optional[dict]]:
    """(rope_theta, llama3 scaling or None). transformers 5 nests both in `rope_parameters`;
    older configs keep `rope_theta` at the top and the scaling in `rope_scaling`."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", config.get("rope_theta", META_DEFAULT_ROPE_THETA))
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise ConversionError(f"unsupported rope scaling {kind!r} (only Llama 3.1's 'llama3' scaling is supported)")
    scaling = {key: type(META_ROPE_SCALING[key])(rope[key]) for key in META_ROPE_SCALING}
    return float(theta), scaling


def check_hf_config(config: dict, src: Path) -> None:
    model_type = config.get("model_type")
    architectures = config.get("architectures") or [HF_ARCHITECTURE]
    if model_type != "llama" or HF_ARCHITECTURE not in architectures:
        raise ConversionError(
            f"{src}: model_type {model_type!r} / architectures {architectures} is not a Llama model (LlamaForCausalLM)"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ConversionError(f"{src}: {flag}=true has no place in Meta's Llama format")
    if config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{src}: hidden_act {config['hidden_act']!r}; Meta's Llama uses silu")
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim * config["num_attention_heads"] != config["hidden_size"]:
        raise ConversionError(f"{src}: head_dim {head_dim} != hidden_size / num_attention_heads; Meta's format cannot say so")


def hf_weight_files(src: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it (one file, or shards listed in the index)."""
    from safetensors import SafetensorError, safe_open

    if (src / HF_INDEX).is_file():
        weight_map = json.loads((src / HF_INDEX).read_text())["weight_map"]
        return {name: src / file for name, file in weight_map.items()}
    if (src / HF_SINGLE_FILE).is_file():
        try:
            with safe_open(src / HF_SINGLE_FILE, framework="pt") as f:
                return {name: src / HF_SINGLE_FILE for name in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ConversionError(f"cannot read {src / HF_SINGLE_FILE}: {e}") from e
    raise ConversionError(f"{src}: no {HF_SINGLE_FILE} or {HF_INDEX} (only safetensors checkpoints are supported)")


def read_hf_dir(src: Path, tokenizer_path: Optional[Path]) -> Source:
    from safetensors import SafetensorError, safe_open

    config = json.loads((src / HF_CONFIG).read_text())
    check_hf_config(config, src)
    n_heads = config["num_attention_heads"]
    n_kv_heads = config.get("num_key_value_heads") or n_heads
    rope_theta, rope_scaling = hf_rope_settings(config)
    hidden_dim = config["intermediate_size"]
    params = build_params(
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=config["vocab_size"],
        hidden_dim=hidden_dim,
        norm_eps=config["rms_norm_eps"],
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
    )
    files = hf_weight_files(src)

    def read_file(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):  # a buffer older versions saved: derived, not learned
                    continue
                meta_name = hf_to_meta_name(name)
                tensor = f.get_tensor(name)
                if meta_name.endswith("attention.wq.weight"):
                    tensor = unpermute_rotary(tensor, n_heads)
                elif meta_name.endswith("attention.wk.weight"):
                    tensor = unpermute_rotary(tensor, n_kv_heads)
                yield meta_name, tensor

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for file in sorted(set(files.values())):
            try:
                yield from read_file(file)
            except (SafetensorError, OSError) as e:
                raise ConversionError(f"cannot read {file}: {e}") from e

    return Source(params, hidden_dim, tensors, hf_tokenizer_writer(src, config, tokenizer_path))


def hf_tokenizer_writer(src: Path, config: dict, tokenizer_path: Optional[Path]) -> Optional[Callable[[Path], None]]:
    """Pick how to produce tokenizer.model: an explicit path, SRC's SentencePiece model, or
    SRC's tokenizer.json; None when SRC holds none of them."""
    if tokenizer_path is not None:
        return lambda out: shutil.copyfile(tokenizer_path, out / TOKENIZER_NAME)
    if (src / TOKENIZER_NAME).is_file() and is_sentencepiece_model(src / TOKENIZER_NAME):
        return lambda out: shutil.copyfile(src / TOKENIZER_NAME, out / TOKENIZER_NAME)
    if (src / "tokenizer.json").is_file():
        return lambda out: write_hf_tokenizer_json(src, config, out)
    return None


def hf_pre_tokenizer_pattern(pre: Optional[dict]) -> str:
    """Map the pre-tokenizer structures of the byte-level BPE models we know to one regex."""

    def is_byte_level(step: dict, use_regex: bool) -> bool:
        return (
            step.get("type") == "ByteLevel"
            and step.get("use_regex", True) == use_regex
            and not step.get("add_prefix_space", False)
        )

    if pre is None:
        steps = []
    elif pre.get("type") == "Sequence":
        steps = pre["pretokenizers"]
    else:
        steps = [pre]
    if len(steps) == 1 and is_byte_level(steps[0], use_regex=True):
        return GPT2_PATTERN
    if len(steps) == 2:
        first, second = steps
        if first.get("type") == "Digits" and first.get("individual_digits") and is_byte_level(second, True):
            return SMOLLM_PATTERN
        if (
            first.get("type") == "Split"
            and "Regex" in first.get("pattern", {})
            and first.get("behavior") == "Isolated"
            and not first.get("invert", False)
            and is_byte_level(second, use_regex=False)
        ):
            return first["pattern"]["Regex"]
    raise ConversionError(f"unsupported pre-tokenizer in tokenizer.json: {json.dumps(pre)[:200]}")


def write_hf_tokenizer_json(src: Path, config: dict, out_dir: Path) -> None:
    """tokenizer.json (byte-level BPE) -> tiktoken tokenizer.model + tokenizer_spec.json."""
    tok = json.loads((src / "tokenizer.json").read_text())
    model = tok["model"]
    if model.get("type") != "BPE" or tok.get("normalizer") is not None:
        raise ConversionError(f"{src}/tokenizer.json: only byte-level BPE without a normalizer is supported")
    pattern = hf_pre_tokenizer_pattern(tok.get("pre_tokenizer"))
    specials = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    vocab = model["vocab"]
    tokens = [None] * (max(list(vocab.values()) + list(specials.values()), default=-1) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    ordinary = [(t, i) for i, t in enumerate(tokens) if t is not None and i not in specials.values()]
    # Newer tokenizer.json files store merges as [left, right] pairs, older ones as "left right".
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model.get("merges", [])]
    unicode_to_byte = {ch: b for b, ch in gpt2_bytes_to_unicode().items()}
    ranks = {bpe_token_bytes(t, unicode_to_byte): i for t, i in ordinary}
    check_ranks_follow_merges(
        ranks, [(bpe_token_bytes(a, unicode_to_byte), bpe_token_bytes(b, unicode_to_byte)) for a, b in merges]
    )

    tok_config_path = src / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text()) if tok_config_path.is_file() else {}
    id_to_token = {i: t for t, i in specials.items()} | {i: t for t, i in vocab.items()}

    def token_named(key: str) -> Optional[str]:
        value = tok_config.get(key)
        if isinstance(value, dict):  # AddedToken serialized as a dict
            value = value.get("content")
        if value is None and isinstance(config.get(key + "_id"), int):
            value = id_to_token.get(config[key + "_id"])
        return value

    bos, eos = token_named("bos_token"), token_named("eos_token")
    if eos is None:
        raise ConversionError(f"{src}: no eos_token in tokenizer_config.json or eos_token_id in config.json")
    add_bos = tok_config.get("add_bos_token")
    if add_bos is None:  # tokenizers' TemplateProcessing that starts with the BOS token adds it
        single = (tok.get("post_processor") or {}).get("single") or []
        add_bos = bool(single) and single[0].get("SpecialToken", {}).get("id") == bos
    chat_template = tok_config.get("chat_template")
    if chat_template is None and (src / "chat_template.jinja").is_file():
        chat_template = (src / "chat_template.jinja").read_text()
    spec = tokenizer_spec(
        pattern=pattern,
        special_tokens=dict(sorted(specials.items(), key=lambda x: x[1])),
        bos_token=bos,
        eos_token=eos,
        pad_token=token_named("pad_token"),
        add_bos=bool(add_bos),
        chat_template=chat_template,
    )
    write_tiktoken_model(out_dir / TOKENIZER_NAME, ranks)
    write_tokenizer_spec(out_dir / TOKENIZER_SPEC_NAME, spec)


# --------------------------------------------------------------------------------------------
# Writing the output directory atomically
# --------------------------------------------------------------------------------------------


def prepare_output(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ConversionError(f"{out_dir} exists and is not empty; pass --force to replace it")


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def make_readable(tmp_dir: Path) -> None:
    """mkdtemp/mkstemp create private (0700/0600) entries; give them the usual permissions."""
    umask = current_umask()
    os.chmod(tmp_dir, 0o777 & ~umask)
    for path in tmp_dir.iterdir():
        os.chmod(path, 0o666 & ~umask)


def publish(tmp_dir: Path, out_dir: Path) -> None:
    """Move the finished tmp_dir to out_dir; an old out_dir is renamed away first, then deleted."""
    make_readable(tmp_dir)
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rename(out_dir, old / out_dir.name)
    os.rename(tmp_dir, out_dir)
    if old is not None:
        shutil.rmtree(old)


def write_checkpoint(source: Source, tmp_dir: Path, dtype: torch.dtype) -> None:
    shapes = expected_shapes(source.params, source.hidden_dim)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in source.tensors():
        if name not in shapes:
            raise ConversionError(f"tensor {name} does not belong to a {source.params['n_layers']}-layer model")
        if tuple(tensor.shape) != shapes[name]:
            raise ConversionError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {shapes[name]}")
        state[name] = tensor.to(dtype).contiguous()
    if "output.weight" not in state and "tok_embeddings.weight" in state:
        # Tied embeddings: the output projection reuses the input embedding. Meta's format has no
        # flag for that, so we store a copy and the engine loads it strictly like any checkpoint.
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise ConversionError(f"source lacks {len(missing)} tensors, e.g. {missing[:3]}")
    torch.save(state, tmp_dir / CHECKPOINT_NAME)
    (tmp_dir / PARAMS_NAME).write_text(json.dumps(source.params, indent=2) + "\n")


def open_source(src: Path, tokenizer_path: Optional[Path]) -> Source:
    if is_gguf_file(src):
        if tokenizer_path is not None:
            raise ConversionError("--tokenizer applies to Hugging Face directories; a GGUF file carries its own")
        return read_gguf(src)
    if is_hf_dir(src):
        return read_hf_dir(src, tokenizer_path)
    raise ConversionError(f"{src} is neither a GGUF file nor a Hugging Face directory with {HF_CONFIG}")


def convert(
    src: Path | str,
    out_dir: Path | str,
    dtype: torch.dtype = torch.bfloat16,
    force: bool = False,
    tokenizer_path: Optional[Path | str] = None,
) -> Path:
    """Convert `src` (GGUF file or HF directory) into a Meta-format directory `out_dir`."""
    src, out_dir = Path(src), Path(out_dir)
    tokenizer_path = None if tokenizer_path is None else Path(tokenizer_path)
    if not src.exists():
        raise ConversionError(f"{src} does not exist")
    prepare_output(out_dir, force)
    source = open_source(src, tokenizer_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write_checkpoint(source, tmp_dir, dtype)
        if source.write_tokenizer is None:
            warnings.warn(
                f"{src} holds no tokenizer (tokenizer.model or tokenizer.json); {out_dir} gets none. "
                f"Copy one in, or convert again with --tokenizer PATH.",
                stacklevel=2,
            )
        else:
            source.write_tokenizer(tmp_dir)
        publish(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convert a Llama checkpoint (GGUF file or Hugging Face directory) into Meta's format.",
    )
    parser.add_argument("src", type=Path, help="a llama GGUF file, or a HF directory with config.json and safetensors")
    parser.add_argument("out_dir", type=Path, help="directory to create: consolidated.00.pth, params.json, tokenizer.model")
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="bfloat16",
        help="dtype of the saved weights (default: bfloat16; GGUF weights are dequantized first)",
    )
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer.model to copy when a HF directory holds none"
    )
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    try:
        out = convert(args.src, args.out_dir, DTYPES[args.dtype], args.force, args.tokenizer)
    except ConversionError as e:
        raise SystemExit(f"convert.py: error: {e}") from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
