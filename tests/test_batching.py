"""batching.py: continuous batching gives every prompt what it gives alone, and keeps every row busy.

The tiny checkpoint is a random HF Llama in Meta's layout (tests/tiny.py) with the real Llama 2
tokenizer, so HF's greedy `generate` of each prompt alone is the independent reference. Float32
throughout: there the batch a row runs in changes nothing but float noise.
"""

import pytest
import torch

from batching import ContinuousBatching, Request
from conftest import LLAMA2_TOKENIZER
from decoding import NonFiniteLogitsError
from inference import LLaMa
from model import ModelArgs, Transformer
from sampling import SamplingParams
from tiny import LLAMA2_VOCAB_SIZE, TINY, hf_greedy, hf_model, meta_state_dict, write_checkpoint

# Mixed lengths on purpose: prompts of 2 to 14 tokens, answers of 3 to 17.
PROMPTS = ["Hello, my name is", "The quick brown fox jumps over the lazy dog because it", "1 2 3", "Paris",
           "Once upon a time, in a land far away, there lived", "def main():", "Q: What is the capital of Peru?\nA:",
           "Roses are red,", "The meaning of life"]
MAX_GEN_LENS = [9, 3, 17, 5, 12, 7, 4, 15, 10]
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF model, checkpoint dir): the same random weights in both."""
    hf = hf_model(TINY, LLAMA2_VOCAB_SIZE)
    params = {**TINY, "vocab_size": LLAMA2_VOCAB_SIZE}
    ckpt = write_checkpoint(tmp_path_factory.mktemp("tiny"), meta_state_dict(hf, TINY), params, LLAMA2_TOKENIZER)
    return hf, ckpt


@pytest.fixture(scope="module")
def llama(tiny):
    return LLaMa.build(tiny[1], max_seq_len=64, max_batch_size=3, device="cpu", dtype="float32", progress=False)


def run(llama, prompt_tokens, max_gen_lens, sampling=GREEDY, generators=None):
    """Every prompt through one scheduler; the finished requests, in order."""
    generators = generators or [None] * len(prompt_tokens)
    requests = [Request(p, n, sampling, llama.tokenizer.stop_tokens, g)
                for p, n, g in zip(prompt_tokens, max_gen_lens, generators)]
    for _ in ContinuousBatching(llama).run(requests):
        pass
    return requests


def test_each_prompt_gets_hugging_face_greedy_tokens_as_if_alone(tiny, llama):
    hf, _ = tiny
    prompt_tokens = llama.encode_prompts(PROMPTS)
    requests = run(llama, prompt_tokens, MAX_GEN_LENS)
    for prompt, n, request in zip(prompt_tokens, MAX_GEN_LENS, requests):
        expected = hf_greedy(hf, prompt, n)
        made = request.row.tokens
        assert made == expected[: len(made)], llama.tokenizer.decode(prompt)
        assert len(made) == n or expected[len(made)] in llama.tokenizer.stop_tokens  # ended at a stop token


def test_text_completion_of_a_list_equals_each_prompt_alone(llama):
    together, texts = llama.text_completion(PROMPTS, temperature=0, max_gen_len=11)
    alone = [llama.text_completion([p], temperature=0, max_gen_len=11)[0][0] for p in PROMPTS]
    assert together == alone
    assert texts == [llama.tokenizer.decode(t) for t in alone]


def test_continuous_and_static_batching_make_the_same_greedy_tokens(llama):
    prompt_tokens = llama.encode_prompts(PROMPTS)
    continuous = llama.generate(prompt_tokens, 13, GREEDY)
    static = llama.generate(prompt_tokens, 13, GREEDY, continuous=False)
    assert [g.tokens for g in continuous] == [g.tokens for g in static]
    assert [g.finish_reason for g in continuous] == [g.finish_reason for g in static]


def test_a_finished_row_is_refilled_while_the_others_keep_decoding(llama):
    prompt_tokens = llama.encode_prompts(PROMPTS[:5])
    requests = [Request(p, n, GREEDY, set()) for p, n in zip(prompt_tokens, [2, 20, 20, 3, 3])]
    batcher = ContinuousBatching(llama)
    for request in requests:
        batcher.submit(request)
    batcher.step()  # 3 slots: the first three admitted (1 token each), then one decode step (a 2nd token)
    assert requests[0].done and requests[0].slot is None  # its 2 tokens made: slot 0 is free
    assert [r.slot for r in requests[1:]] == [1, 2, None, None]
    assert requests[1].sampled == 2
    batcher.step()  # request 3 takes slot 0 while 1 and 2 go on
    assert [r.slot for r in requests[1:]] == [1, 2, 0, None]
    assert requests[1].sampled == 3 and requests[3].sampled == 2  # admitted (1 token) and decoded (1 more)
    while batcher.busy:
        batcher.step()
    assert [len(r.row.tokens) for r in requests] == [2, 20, 20, 3, 3]


def test_results_come_back_in_input_order_when_later_prompts_finish_first(llama):
    prompts = ["A long story begins", "Hi", "Hi there", "Yes"]
    generations = llama.generate(llama.encode_prompts(prompts), 8, GREEDY)
    for prompt, generation in zip(prompts, generations):
        (alone,) = llama.generate(llama.encode_prompts([prompt]), 8, GREEDY)
        assert generation.tokens == alone.tokens


def test_a_seeded_list_samples_prompt_i_as_it_samples_alone_with_seed_plus_i(llama):
    """So what a prompt samples depends on its own seed only, not on the prompts beside it."""
    prompt_tokens = llama.encode_prompts(PROMPTS[:5])
    together = llama.generate(prompt_tokens, 10, SamplingParams(temperature=1.0, top_p=0.95, seed=1234))
    again = llama.generate(prompt_tokens, 10, SamplingParams(temperature=1.0, top_p=0.95, seed=1234))
    assert [g.tokens for g in together] == [g.tokens for g in again]  # reproducible
    for i, (prompt, generation) in enumerate(zip(prompt_tokens, together)):
        (alone,) = llama.generate([prompt], 10, SamplingParams(temperature=1.0, top_p=0.95, seed=1234 + i))
        assert generation.tokens == alone.tokens
    assert len({tuple(g.tokens) for g in together}) == len(together)  # it did sample


def test_nan_in_a_cache_row_beyond_a_rows_text_does_not_reach_its_answer(llama):
    """A shorter row's mask hides the positions after its text, but 0 * NaN is NaN: the scheduler
    zeroes what it reads there. Fill every cache with NaN first, as uninitialised memory may be."""
    prompt_tokens = llama.encode_prompts(PROMPTS[:4])
    expected = [g.tokens for g in llama.generate(prompt_tokens, 9, GREEDY, continuous=False)]
    for layer in llama.model.layers:
        layer.attention.cache.cache_k.fill_(float("nan"))
        layer.attention.cache.cache_v.fill_(float("nan"))
    requests = run(llama, prompt_tokens, [9] * 4)
    assert [r.row.tokens for r in requests] == expected
    assert all(r.error is None for r in requests)


def test_a_request_whose_logits_turn_nan_ends_alone_and_frees_its_row(llama):
    prompt_tokens = llama.encode_prompts(PROMPTS[:4])
    expected = [g.tokens for g in llama.generate(prompt_tokens, 8, GREEDY, continuous=False)]
    calls = {"n": 0}

    def poison_row_1(module, inputs, output):  # the output head: passes 1-3 are prefills, then decode steps
        calls["n"] += 1
        if calls["n"] == 5:
            output[1] = float("nan")

    handle = llama.model.output.register_forward_hook(poison_row_1)
    try:
        requests = run(llama, prompt_tokens, [8] * 4)
    finally:
        handle.remove()
    assert isinstance(requests[1].error, NonFiniteLogitsError)
    assert "NaN/inf" in str(requests[1].error)
    assert requests[1].row.finish_reason is None  # it failed: no finish reason
    for i in (0, 2, 3):  # the others, and the one admitted into the freed row, are untouched
        assert requests[i].error is None and requests[i].row.tokens == expected[i]


def test_a_cancelled_request_frees_its_row_at_the_next_step(llama):
    prompt_tokens = llama.encode_prompts(PROMPTS[:4])
    requests = [Request(p, 30, GREEDY, set()) for p in prompt_tokens]
    batcher = ContinuousBatching(llama)
    for request in requests:
        batcher.submit(request)
    batcher.step()  # requests 0-2 admitted and decoded once: 2 tokens each
    requests[1].cancelled = True
    batcher.step()
    assert requests[1].done and requests[1].slot is None and requests[3].slot == 1
    assert len(requests[1].row.tokens) == 2  # nothing after the cancel
    assert requests[1].row.finish_reason is None and requests[1].error is None


def test_a_list_raises_the_error_of_a_request_that_fails(llama):
    handle = llama.model.output.register_forward_hook(lambda m, i, o: o.fill_(float("nan")))
    try:
        with pytest.raises(NonFiniteLogitsError, match="NaN/inf logits at position"):
            llama.text_completion(PROMPTS[:3], temperature=0, max_gen_len=4)
    finally:
        handle.remove()


def test_echo_and_logprobs_of_a_list_equal_those_of_each_prompt_alone(llama):
    prompt_tokens = llama.encode_prompts(PROMPTS[:4])
    together = llama.generate(prompt_tokens, 6, GREEDY, logprobs=True, echo=True)
    for prompt, generation in zip(prompt_tokens, together):
        (alone,) = llama.generate([prompt], 6, GREEDY, logprobs=True, echo=True)
        assert generation.tokens == alone.tokens
        torch.testing.assert_close(torch.tensor(generation.logprobs), torch.tensor(alone.logprobs),
                                   rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# model.py: rows at their own positions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reference_attention", [False, True])
def test_rows_at_their_own_positions_give_each_rows_logits_alone(reference_attention):
    """Two prompts prefilled into KV cache rows 0 and 2, then one decode step for rows 0-2 at
    positions 7, 0 (a free row) and 4: each real row's logits are those of its prompt alone."""
    torch.manual_seed(0)
    args = ModelArgs(**TINY, vocab_size=100, max_seq_len=32, max_batch_size=3, reference_attention=reference_attention)
    model = Transformer(args).eval()
    model.setup_caches(torch.device("cpu"), torch.float32)
    a, b = torch.randint(0, 100, (1, 7)), torch.randint(0, 100, (1, 4))
    a_prefill, a_next = model(a, 0)[0, -1], model(torch.tensor([[5]]), 7)[0, -1]
    b_prefill, b_next = model(b, 0)[0, -1], model(torch.tensor([[6]]), 4)[0, -1]
    model.setup_caches(torch.device("cpu"), torch.float32, zeroed=True)
    torch.testing.assert_close(model(a, 0, first_row=0)[0, -1], a_prefill)
    torch.testing.assert_close(model(b, 0, first_row=2)[0, -1], b_prefill)
    step = model(torch.tensor([[5], [0], [6]]), torch.tensor([7, 0, 4]))  # (3, 1, V)
    torch.testing.assert_close(step[0, -1], a_next, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step[2, -1], b_next, rtol=1e-5, atol=1e-5)


def test_a_batch_past_the_last_cache_row_is_refused():
    args = ModelArgs(**TINY, vocab_size=100, max_seq_len=16, max_batch_size=2)
    model = Transformer(args).eval()
    model.setup_caches(torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="from KV cache row 1 exceeds max_batch_size=2"):
        model(torch.zeros(2, 3, dtype=torch.long), 0, first_row=1)
