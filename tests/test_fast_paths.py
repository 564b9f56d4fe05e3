"""Every fast path of the engine against its reference path: same logits, same greedy tokens.

* fused attention (`F.scaled_dot_product_attention`, GQA in place, query heads folded in decode)
  against the explicit `model.scaled_dot_product_attention` (`ModelArgs.reference_attention`);
* last-position-only logits against the last row of all logits;
* decoding late in a long context (position ~2000, through the KV cache) against a full recompute;
* prepacked bf16 linear layers against `F.linear`;
* the compiled decode step against the eager one, also beside speculative decoding's passes.

Tiny random-weight models keep these fast; the compiled test compiles one small graph.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from checkpoint import load_transformer
from conftest import LLAMA2_TOKENIZER
from inference import LLaMa
from model import ModelArgs, Transformer
from quantize import PackedLinear, prepacking_helps
from sampling import SamplingParams
from tiny import replay_prompt, write_tiny_llama2_checkpoint

VOCAB_SIZE = 256
SMALL = dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, vocab_size=VOCAB_SIZE)
FP32_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
# bf16 keeps 8 bits of mantissa: the fused kernel accumulates in float32, the reference rounds the
# (T, S) scores to bf16 first, so logits of size ~5 may differ by a few bf16 steps (2^-8 * 4 each).
BF16_TOLERANCE = dict(rtol=0.05, atol=0.15)


def twin_models(n_kv_heads: int, dtype=torch.float32, max_seq_len: int = 64, max_batch_size: int = 2):
    """(fast, reference): two Transformers with the same random weights, differing only in attention."""
    args = ModelArgs(**SMALL, n_kv_heads=n_kv_heads, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    torch.manual_seed(0)
    fast = Transformer(args)
    with torch.no_grad():
        for name, p in fast.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # not all ones: a norm applied wrongly must show
    reference = Transformer(dataclasses.replace(args, reference_attention=True))
    reference.load_state_dict(fast.state_dict(), strict=True)
    for model in (fast, reference):
        model.to(dtype)
        model.setup_caches(torch.device("cpu"), dtype)
    return fast.eval(), reference.eval()


def prefill_chunk_and_decode(model: Transformer, tokens: torch.Tensor, pad_lens=None) -> torch.Tensor:
    """Logits of every position, fed as a prefill, a second chunk after it, then one token at a time."""
    pieces = [model(tokens[:, :10], 0, pad_lens), model(tokens[:, 10:16], 10, pad_lens)]
    pieces += [model(tokens[:, pos:pos + 1], pos, pad_lens) for pos in range(16, tokens.shape[1])]
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["multi-head", "grouped-query", "multi-query"])
def test_fused_attention_equals_the_explicit_reference(n_kv_heads):
    fast, reference = twin_models(n_kv_heads)
    tokens = torch.randint(0, VOCAB_SIZE, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(prefill_chunk_and_decode(fast, tokens),
                               prefill_chunk_and_decode(reference, tokens), **FP32_TOLERANCE)


def test_fused_attention_equals_the_reference_on_a_left_padded_batch():
    fast, reference = twin_models(2)
    tokens = torch.randint(0, VOCAB_SIZE, (2, 22), generator=torch.Generator().manual_seed(2))
    pad_lens = torch.tensor([5, 0])
    torch.testing.assert_close(prefill_chunk_and_decode(fast, tokens, pad_lens),
                               prefill_chunk_and_decode(reference, tokens, pad_lens), **FP32_TOLERANCE)


def test_fused_attention_is_close_to_the_reference_in_bf16():
    fast, reference = twin_models(2, dtype=torch.bfloat16)
    tokens = torch.randint(0, VOCAB_SIZE, (2, 24), generator=torch.Generator().manual_seed(3))
    got, expected = prefill_chunk_and_decode(fast, tokens), prefill_chunk_and_decode(reference, tokens)
    torch.testing.assert_close(got, expected, **BF16_TOLERANCE)


def test_last_only_gives_the_last_row_of_all_logits():
    fast, _ = twin_models(2)
    tokens = torch.randint(0, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(4))
    every = fast(tokens, 0)
    last = fast(tokens, 0, last_only=True)
    assert last.shape == (2, 1, VOCAB_SIZE)
    # Not bit-exact: a matmul over 1 row and over 12 rows may sum in different orders.
    torch.testing.assert_close(last, every[:, -1:], **FP32_TOLERANCE)


def test_decoding_at_position_2000_equals_a_full_recompute():
    context, steps = 2000, 4
    fast, _ = twin_models(2, max_seq_len=context + steps, max_batch_size=1)
    tokens = torch.randint(0, VOCAB_SIZE, (1, context + steps), generator=torch.Generator().manual_seed(5))
    fast(tokens[:, :context], 0, last_only=True)
    decoded = [fast(tokens[:, pos:pos + 1], pos) for pos in range(context, context + steps)]
    # From scratch: the whole sequence in one pass (it rewrites the cache from position 0).
    recomputed = fast(tokens, 0)[:, context:]
    torch.testing.assert_close(torch.cat(decoded, dim=1), recomputed, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not prepacking_helps(torch.device("cpu"), torch.bfloat16), reason="no oneDNN bf16 here")
@pytest.mark.parametrize("shape", [(1, 64), (8, 64), (2, 3, 64)], ids=["one-row", "batch-8", "3-d"])
def test_prepacked_linear_is_bit_exact_with_f_linear(shape):
    weight = torch.randn(96, 64, dtype=torch.bfloat16)
    x = torch.randn(shape, dtype=torch.bfloat16)
    torch.testing.assert_close(PackedLinear(weight)(x), F.linear(x, weight), rtol=0, atol=0)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return write_tiny_llama2_checkpoint(tmp_path_factory.mktemp("tiny"), LLAMA2_TOKENIZER)


@pytest.mark.skipif(not prepacking_helps(torch.device("cpu"), torch.bfloat16), reason="no oneDNN bf16 here")
def test_bf16_on_cpu_is_prepacked_by_default_and_gives_the_same_logits_as_nn_linear(tiny_ckpt):
    llama = LLaMa.build(tiny_ckpt, max_seq_len=64, device="cpu", dtype="bfloat16", progress=False)
    assert isinstance(llama.model.layers[0].attention.wq, PackedLinear)
    assert isinstance(llama.model.output, PackedLinear)
    plain = load_transformer(tiny_ckpt, llama.args, torch.device("cpu"), torch.bfloat16, progress=False,
                             needs_gradients=True)  # gradients need nn.Linear: never prepacked
    assert isinstance(plain.layers[0].attention.wq, torch.nn.Linear)
    tokens = torch.tensor([llama.tokenizer.encode("Prepacked weights, same numbers", bos=True, eos=False)])
    packed_logits, plain_logits = llama.model(tokens, 0), plain(tokens, 0)
    # Both sum in float32 and round to bf16, but not always in the same order: where nn.Linear's
    # bf16 matmul and the prepacked weight run different oneDNN kernels (CPUs without native bf16,
    # e.g. at 2 threads) their K-blocking differs, and a sum that lands next to a rounding boundary
    # rounds to the neighbouring bf16 value. So: within one bf16 step (eps relative) everywhere.
    torch.testing.assert_close(packed_logits, plain_logits, rtol=torch.finfo(torch.bfloat16).eps,
                               atol=torch.finfo(torch.bfloat16).tiny)


def test_compiled_decode_gives_the_eager_greedy_tokens_and_logprobs(tiny_ckpt):
    prompts = ["Hello, my name is", "1 2 3", "The quick brown fox jumps over"]  # ragged: padding masks too
    kwargs = dict(max_seq_len=64, max_batch_size=4, device="cpu", dtype="float32", progress=False)
    eager = LLaMa.build(tiny_ckpt, **kwargs)
    compiled = LLaMa.build(tiny_ckpt, compile=True, **kwargs)
    def greedy_with_logprobs(llama):
        generations = llama.generate(llama.encode_prompts(prompts), 10, SamplingParams(temperature=0), logprobs=True)
        return [g.tokens for g in generations], [g.logprobs for g in generations]

    eager_tokens, eager_logprobs = greedy_with_logprobs(eager)
    compiled_tokens, compiled_logprobs = greedy_with_logprobs(compiled)
    assert compiled_tokens == eager_tokens
    for got, expected in zip(compiled_logprobs, eager_logprobs):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-4, atol=1e-4)
    # Speculative decoding (tests/test_speculative.py) calls the model itself for its verification
    # passes, beside the compiled step, which serves the passes that have no draft.
    prompt = replay_prompt(eager, prompts[0])
    expected = [int(step.tokens[0]) for step in eager.decode([prompt], 20, SamplingParams(temperature=0))]
    decoding = compiled.decode([prompt], 20, SamplingParams(temperature=0), speculate=4)
    assert [int(step.tokens[0]) for step in decoding] == expected
    assert decoding.drafted > decoding.accepted > 0


def test_warm_up_compiles_every_graph_a_generation_needs(tiny_ckpt):
    """After `warm_up` on a ragged batch, generating for it compiles nothing more, so the CLI's
    tokens/s measures generation, not compilation."""
    from torch._dynamo.utils import counters

    from cli import warm_up

    torch._dynamo.reset()
    llama = LLaMa.build(tiny_ckpt, max_seq_len=64, max_batch_size=4, device="cpu", dtype="float32",
                        progress=False, compile=True)
    prompts = ["Hello, my name is", "1 2 3"]  # ragged: a graph with a padding mask too
    warm_up(llama, llama.encode_prompts(prompts))
    graphs_after_warm_up = counters["stats"]["unique_graphs"]
    assert graphs_after_warm_up > 0
    llama.text_completion(prompts, temperature=0, max_gen_len=12)
    assert counters["stats"]["unique_graphs"] == graphs_after_warm_up


def test_cli_compile_reports_compiling_apart_and_prints_what_eager_prints(tiny_ckpt, capsys):
    from cli import main

    argv = ["--ckpt-dir", str(tiny_ckpt), "--prompt", "Hello", "--prompt", "1 2 3", "--temperature", "0",
            "--max-gen-len", "5", "--device", "cpu", "--dtype", "float32"]
    assert main(argv) == 0
    eager = capsys.readouterr()
    assert main(argv + ["--compile"]) == 0
    compiled = capsys.readouterr()
    assert compiled.out == eager.out
    assert "compiled in" in compiled.err and "compiled in" not in eager.err
