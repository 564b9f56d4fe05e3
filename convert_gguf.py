"""Reading a llama GGUF file (llama.cpp's format): hyperparameters, tensors, tokenizer.

A GGUF file is one file: key/value metadata (`llama.embedding_length`, `tokenizer.ggml.tokens`,
...) followed by tensors. Three things differ from Meta's checkpoint:

- Names: `blk.N.attn_q.weight` is Meta's `layers.N.attention.wq.weight` (tables below).
- Storage: each tensor is quantized (Q4_1, Q8_0, ...) and lists its shape fastest dimension
  first. We dequantize with the `gguf` package and reverse the shape. The q/k rows are already in
  Meta's interleaved RoPE layout, because llama.cpp's converter undoes Hugging Face's permutation.
- Llama 3.1 RoPE scaling is not a flag but a `rope_freqs` tensor of per-frequency divisors; we
  accept it when it equals Meta's fixed factors, which is what `use_scaled_rope` means.

`read_gguf(path)` returns a `Source` (convert_source.py); nothing is dequantized until the
converter iterates its tensors.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from convert_source import GGUF, META_DEFAULT_ROPE_THETA, META_ROPE_SCALING, TOKENIZER_NAME, ConversionError, Source
from convert_source import build_params, float32_repr, meta_tensor_name
from convert_vocab import NO_TOKEN_ID, PRE_TOKENIZER_PATTERNS, byte_level_bpe_ranks, sentencepiece_model_bytes
from convert_vocab import tokenizer_spec, write_byte_level_bpe

GGUF_MAGIC = b"GGUF"

GGUF_NORMAL_TOKEN = 1  # tokenizer.ggml.token_type: 1 normal, 3 control, 4 user defined, ...


def is_gguf_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def gguf_to_meta_name(name: str) -> str:
    meta_name = meta_tensor_name(name, GGUF, layer_prefix="blk")
    if meta_name is None:
        raise ConversionError(f"unexpected GGUF tensor {name!r} (not part of a Llama model)")
    return meta_name


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
    except Exception as e:  # noqa: BLE001  (a file cut short or corrupt: gguf raises IndexError, ValueError, ...)
        raise ConversionError(f"cannot read GGUF file {path}: cut short or corrupt ({type(e).__name__}: {e})") from e
    meta = GGUFMetadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConversionError(f"{path}: architecture {arch!r} is not 'llama'; only Llama models can be converted")
    tokens = meta.require("tokenizer.ggml.tokens")
    dim = int(meta.require("llama.embedding_length"))
    n_heads = int(meta.require("llama.attention.head_count"))
    rope_theta = float32_repr(meta.get("llama.rope.freq_base", META_DEFAULT_ROPE_THETA))
    params = build_params(
        dim=dim,
        n_layers=int(meta.require("llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),  # absent: no GQA
        vocab_size=len(tokens),
        hidden_dim=int(meta.require("llama.feed_forward_length")),
        norm_eps=float32_repr(meta.require("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=rope_theta,
        rope_scaling=gguf_rope_scaling(meta, reader, dim // n_heads, rope_theta),
    )

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for t in reader.tensors:
            if t.name.startswith("rope_freqs"):  # llama.cpp's precomputed llama3 factors: we derive them
                continue
            yield gguf_to_meta_name(t.name), gguf_tensor_to_torch(t)

    n_tensors = sum(1 for t in reader.tensors if not t.name.startswith("rope_freqs"))
    return Source(params, tensors, lambda out: write_gguf_tokenizer(meta, out), n_tensors)


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
        ranks = byte_level_bpe_ranks(((t, i) for i, t in enumerate(tokens) if i not in special_ids), merges)

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
        write_byte_level_bpe(out_dir, ranks, spec)
