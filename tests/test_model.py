"""model.py against independent references: Hugging Face's LlamaForCausalLM and Meta's apply_scaling.

A tiny random-weight Llama is built in Hugging Face transformers, its weights are moved into our
`Transformer` under Meta's names (undoing HF's q/k permutation), and the two must give the same
fp32 logits: for multi-head, grouped-query and multi-query attention, with Llama 3.1 RoPE scaling,
and whether the prompt is fed in one pass or split into prefill + decode steps through the KV cache.
"""

import dataclasses
import sys

import pytest
import torch
import transformers

from model import (ModelArgs, RopeScaling, Transformer, apply_scaling, attention_weights, feed_forward_hidden_dim,
                   repeat_kv, scaled_dot_product_attention)
from tiny import meta_state_dict


VOCAB_SIZE = 256
DIM = 64
N_HEADS = 4
N_LAYERS = 2
MAX_SEQ_LEN = 64


def hf_config(n_kv_heads: int, rope_scaling=None, rope_theta=10000.0):
    args = ModelArgs(dim=DIM, n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=n_kv_heads, vocab_size=VOCAB_SIZE,
                     multiple_of=32)
    rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling is not None:
        rope_parameters = {"rope_type": "llama3", "rope_theta": rope_theta, **rope_scaling}
    return transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=DIM,
        intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=MAX_SEQ_LEN,
        rms_norm_eps=1e-5,
        rope_parameters=rope_parameters,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )


def build_pair(n_kv_heads: int, rope_scaling=None, max_batch_size: int = 4):
    """A random HF Llama and our Transformer holding the same weights."""
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(hf_config(n_kv_heads, rope_scaling)).eval()
    with torch.no_grad():  # random norms too, so a wrong norm weight cannot hide behind ones
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    args = ModelArgs(dim=DIM, n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=n_kv_heads, vocab_size=VOCAB_SIZE,
                     multiple_of=32, use_scaled_rope=rope_scaling is not None, rope_scaling=rope_scaling,
                     max_seq_len=MAX_SEQ_LEN, max_batch_size=max_batch_size)
    ours = Transformer(args)
    layout = {"n_heads": N_HEADS, "n_kv_heads": n_kv_heads, "n_layers": N_LAYERS}
    ours.load_state_dict(meta_state_dict(hf_model, layout), strict=True)
    return hf_model, ours


# Small values so that the long wavelengths of a head_dim=16 table are actually scaled and blended.
SMALL_ROPE_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["multi-head", "grouped-query", "multi-query"])
def test_logits_equal_hugging_face_in_one_pass(n_kv_heads):
    hf_model, ours = build_pair(n_kv_heads)
    tokens = torch.randint(0, VOCAB_SIZE, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(tokens).logits
    torch.testing.assert_close(ours(tokens, start_pos=0), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["multi-head", "grouped-query"])
def test_prefill_then_decode_through_kv_cache_equals_one_full_pass(n_kv_heads):
    hf_model, ours = build_pair(n_kv_heads)
    tokens = torch.randint(0, VOCAB_SIZE, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf_model(tokens).logits
    prefill = ours(tokens[:, :10], start_pos=0)
    chunk = ours(tokens[:, 10:16], start_pos=10)  # a second multi-token chunk after a cache offset
    steps = [ours(tokens[:, pos:pos + 1], start_pos=pos) for pos in range(16, 24)]
    got = torch.cat([prefill, chunk, *steps], dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_llama31_scaled_rope_logits_equal_hugging_face():
    hf_model, ours = build_pair(2, rope_scaling=SMALL_ROPE_SCALING)
    tokens = torch.randint(0, VOCAB_SIZE, (1, 60), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf_model(tokens).logits
    torch.testing.assert_close(ours(tokens, start_pos=0), expected, rtol=1e-5, atol=1e-5)


def test_left_padded_rows_give_the_same_logits_as_alone():
    _, ours = build_pair(2)
    long = torch.randint(0, VOCAB_SIZE, (1, 12), generator=torch.Generator().manual_seed(4))
    short = long[:, :7].clone()
    next_tokens = torch.tensor([[3], [4]])
    alone = ours(short, start_pos=0)[0, -1]
    alone_next = ours(next_tokens[:1], start_pos=7)[0, -1]  # decode one token after the prompt

    pad_id = 0
    padded = torch.cat([torch.full((1, 5), pad_id), short], dim=1)
    batch = torch.cat([padded, long], dim=0)
    pad_lens = torch.tensor([5, 0])
    together = ours(batch, start_pos=0, pad_lens=pad_lens)[0, -1]
    together_next = ours(next_tokens, start_pos=12, pad_lens=pad_lens)[0, -1]
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together_next, alone_next, rtol=1e-5, atol=1e-5)


def test_scaled_rope_frequencies_equal_metas_apply_scaling(llama_models_root):
    sys.path.insert(0, str(llama_models_root))
    try:
        from llama_models.llama3.model import apply_scaling as meta_apply_scaling
    except ImportError as e:  # Meta's module imports fairscale (a dev requirement)
        pytest.skip(f"Meta's llama_models.llama3.model cannot be imported: {e}")
    head_dim, theta = 128, 500000.0
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    torch.testing.assert_close(apply_scaling(freqs, RopeScaling()), meta_apply_scaling(freqs), rtol=0, atol=0)


def test_repeat_kv_equals_repeat_interleave_over_heads():
    x = torch.randn(2, 3, 5, 8)  # (B, K, S, D)
    torch.testing.assert_close(repeat_kv(x, 4), torch.repeat_interleave(x, 4, dim=1), rtol=0, atol=0)


@pytest.mark.parametrize("dim, multiple_of, multiplier, expected", [
    (4096, 256, None, 11008),   # Llama 2 7B
    (5120, 256, None, 13824),   # Llama 2 13B
    (8192, 4096, 1.3, 28672),   # Llama 2 70B
    (4096, 1024, 1.3, 14336),   # Llama 3 8B
    (2048, 256, 1.5, 8192),     # Llama 3.2 1B
])
def test_feed_forward_hidden_size_follows_metas_rule(dim, multiple_of, multiplier, expected):
    # Expected sizes are the published `intermediate_size` of each model.
    assert feed_forward_hidden_dim(dim, multiple_of, multiplier) == expected


def test_model_args_reject_unknown_key_by_name():
    with pytest.raises(TypeError, match="rope_thetta"):
        ModelArgs(dim=64, n_heads=4, rope_thetta=1.0)


def test_model_args_check_head_divisibility():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="dim"):
        ModelArgs(dim=65, n_heads=4)


def test_vocab_size_is_none_until_known_and_never_a_stand_in_number():
    args = ModelArgs(dim=64, n_heads=4)
    assert args.vocab_size is None and not args.has_vocab_size
    assert ModelArgs(dim=64, n_heads=4, vocab_size=100).has_vocab_size
    with pytest.raises(ValueError, match=r"ModelArgs\.vocab_size is None: set it"):
        Transformer(args)
    with pytest.raises(ValueError, match=r"ModelArgs\.vocab_size must be >= 1 or None .*, got -1"):
        ModelArgs(dim=64, n_heads=4, vocab_size=-1)


def test_attention_weights_are_the_softmax_the_reference_attention_multiplies_by():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 16, generator=generator) for _ in range(3))  # (B, H, T=S, D)
    mask = torch.full((5, 5), float("-inf")).triu(1)[None, None]  # causal
    weights = attention_weights(q, k, mask)  # (B, H, T, S)
    assert weights.shape == (2, 4, 5, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 5))
    assert (weights.triu(1) == 0).all()  # no query looks ahead
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, mask), weights @ v, rtol=0, atol=0)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, mask),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                               rtol=1e-5, atol=1e-5)


def test_rope_scaling_overrides_are_applied_and_unknown_ones_named():
    args = ModelArgs(use_scaled_rope=True, rope_scaling={"factor": 32.0, "rope_type": "llama3"})
    assert args.rope_scaling_args == dataclasses.replace(RopeScaling(), factor=32.0)
    with pytest.raises(ValueError, match="rope_scaling"):
        ModelArgs(use_scaled_rope=True, rope_scaling={"fctor": 32.0})


def test_bf16_cast_keeps_rope_table_complex():
    _, ours = build_pair(2)
    ours.to(torch.bfloat16)
    assert ours.freqs_cis.dtype == torch.complex64
