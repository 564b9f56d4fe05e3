"""Prompt-lookup speculative decoding (decoding.py, sampling.verify_draft): the same output, faster.

- the n-gram draft on hand-made id lists: the longest n-gram first, its most recent occurrence,
  overlapping repeats; and a property check on random lists;
- greedy: speculative decoding gives plain greedy decoding's tokens and logprobs on the real demo
  model (float32, a prompt that asks it to copy a passage), and drafts are kept, so it is really
  speculating. A T-token verification pass and a T = 1 step sum in different orders, so two
  logits closer than float noise could swap: tokens are compared up to plain greedy's first near
  tie (a top-2 margin below TIE_MARGIN), and that tie is asserted not to come early (on this
  prompt there is none: the smallest margin is ~0.04);
- sampling: the accept/reject rule keeps the sampler's distribution (many draws on small explicit
  vectors, within 5 standard errors);
- on a tiny random model, with prompts it partly repeats (`tiny.replay_prompt`) so that drafts are
  both kept and rejected: greedy with a repetition penalty, sampling reproducible by seed, a
  vanishing nucleus is greedy, several prompts run one at a time, and the KV cache after rejected
  drafts holds what a fresh prefill of the recorded ids gives;
- bad input: a negative speculate, a batch of several prompts, the CLI flag.

The compiled decode step beside speculation is checked in tests/test_fast_paths.py (it compiles).
"""

import math

import pytest
import torch

import cli
from conftest import LLAMA2_TOKENIZER
from decoding import prompt_lookup_draft
from inference import LLaMa
from sampling import SamplingParams, accept_or_resample, sampler_stages, verify_draft
from tiny import replay_prompt, write_tiny_llama2_checkpoint

GREEDY = SamplingParams(temperature=0)
SPECULATE = 8
# float32 logits of a T-token pass and of a T = 1 step differ by ~1e-5 here: a greedy choice whose
# top-2 margin is above this cannot flip between them.
TIE_MARGIN = 1e-3
STANDARD_ERRORS = 5  # a correct sampler misses this bound about once in 3 million per count
DRAWS = 200_000

PASSAGE = ("The lighthouse stands at the end of a narrow spit of sand, painted in red and white bands. "
           "Every night its lamp turns once every ten seconds, and its beam reaches twenty miles out "
           "to sea, where the fishing boats watch for it on their way home through the winter storms.")


# --------------------------------------------------------------------------------------------
# The draft
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens, num_draft, max_ngram, draft", [
    ([], 4, 3, []),
    ([7], 4, 3, []),  # nothing earlier to match
    ([1, 2, 3, 4], 4, 3, []),  # the last id never occurred before
    # The trigram [1, 2, 3] occurs at 0 and at 6: the most recent one's continuation wins.
    ([1, 2, 3, 10, 11, 0, 1, 2, 3, 20, 21, 0, 1, 2, 3], 2, 3, [20, 21]),
    ([1, 2, 3, 10, 11, 0, 1, 2, 3, 20, 21, 0, 1, 2, 3], 5, 3, [20, 21, 0, 1, 2]),
    # [5, 1, 2] matches at 0; "2" alone matches later, at 5: the longer n-gram wins ...
    ([5, 1, 2, 30, 9, 2, 40, 5, 1, 2], 2, 3, [30, 9]),
    # ... unless n-grams are limited to one id.
    ([5, 1, 2, 30, 9, 2, 40, 5, 1, 2], 2, 1, [40, 5]),
    ([4, 7, 8, 4], 3, 3, [7, 8, 4]),  # no trigram or bigram matches: the unigram 4 does
    # The trigram [1, 2, 1] occurred at 0, overlapping itself: a repeat continues, up to the end.
    ([1, 2, 1, 2, 1], 5, 3, [2, 1]),
    ([9, 9, 9, 9], 3, 3, [9]),
])
def test_prompt_lookup_drafts_what_followed_the_latest_longest_match(tokens, num_draft, max_ngram, draft):
    assert prompt_lookup_draft(tokens, num_draft, max_ngram) == draft


def test_a_draft_is_what_followed_an_earlier_copy_of_the_last_ids_on_random_lists():
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        length = int(torch.randint(1, 30, (1,), generator=generator))
        tokens = torch.randint(0, 4, (length,), generator=generator).tolist()
        draft = prompt_lookup_draft(tokens, 5)
        if not draft:  # then not even the last id occurred before
            assert length < 2 or tokens[-1] not in tokens[:-1], tokens
            continue
        assert 1 <= len(draft) <= 5
        assert any(tokens[s : s + n] == tokens[-n:] and tokens[s + n : s + n + 5] == draft
                   for n in (1, 2, 3) for s in range(length - n)), (tokens, draft)


# --------------------------------------------------------------------------------------------
# The accept/reject rule keeps the distribution
# --------------------------------------------------------------------------------------------


def assert_distributed_as(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    """The draws `tokens` (N,) follow `probs` (V,): every id's count within 5 standard errors of
    N * p, and ids of probability 0 never drawn."""
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    for token, (count, p) in enumerate(zip(counts.tolist(), probs.double().tolist())):
        if p == 0:
            assert count == 0, token
        else:
            bound = STANDARD_ERRORS * math.sqrt(n * p * (1 - p))
            assert abs(count - n * p) <= bound, (token, count, n * p, bound)


@pytest.mark.parametrize("draft", [0, 1, 4, 5], ids=["likeliest", "middling", "unlikely", "impossible"])
def test_accept_or_resample_draws_exactly_from_p_whatever_the_draft(draft):
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    generator = torch.Generator().manual_seed(draft)
    tokens = accept_or_resample(probs.expand(DRAWS, -1), torch.full((DRAWS,), draft), generator)
    assert_distributed_as(tokens, probs)


def test_a_draft_holding_all_the_mass_is_always_kept_and_one_holding_none_never():
    certain = torch.tensor([[0.0, 1.0, 0.0]]).expand(1000, -1)
    kept = accept_or_resample(certain, torch.full((1000,), 1), torch.Generator().manual_seed(0))
    assert (kept == 1).all()
    replaced = accept_or_resample(certain, torch.full((1000,), 2), torch.Generator().manual_seed(0))
    assert (replaced == 1).all()


def test_verify_draft_draws_from_the_final_distribution_of_the_sampler():
    """Penalty, temperature, top-k and top-p all shape the p that drafts are judged against."""
    logits = torch.tensor([2.0, 1.5, 1.0, -0.5, 0.3, 0.9, -1.0, 1.2])
    seen = torch.tensor([False, True, False, True, False, False, False, True])
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=5, repetition_penalty=1.3)
    final = sampler_stages(logits[None], params, seen[None]).final[0]
    assert (final == 0).sum() >= 3  # top-k and top-p cut something: their effect is tested too
    generator = torch.Generator().manual_seed(0)
    for draft in (0, 1, 6):  # the likeliest; a penalized one; one that top-k cut
        tokens = verify_draft(logits.expand(DRAWS, -1), torch.full((DRAWS,), draft), params,
                              seen.expand(DRAWS, -1), generator)
        assert_distributed_as(tokens, final)


def test_greedy_verification_is_the_penalized_argmax_whatever_the_draft():
    logits = torch.tensor([[3.0, 2.9, -1.0]])
    seen = torch.tensor([[True, False, False]])  # 3.0 / 1.2 = 2.5 < 2.9: the penalty moves the argmax
    params = SamplingParams(temperature=0, repetition_penalty=1.2)
    for draft in range(3):
        assert verify_draft(logits, torch.tensor([draft]), params, seen).tolist() == [1]


# --------------------------------------------------------------------------------------------
# Greedy speculation is greedy decoding: the real demo model
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(demo_ckpt):
    return LLaMa.build(demo_ckpt, max_seq_len=512, max_batch_size=1, device="cpu", dtype="float32", progress=False,
                       threads=1)


def copy_prompt(llama: LLaMa) -> list[int]:
    """A request whose answer is grounded in its input: the answer copies the passage."""
    dialog = [{"role": "user", "content": f"Repeat the following passage exactly:\n\n{PASSAGE}"}]
    return llama.chat_format.encode_dialog_prompt(dialog)


def first_near_tie(steps) -> int:
    """The index of the first greedy step whose two highest logits are within TIE_MARGIN (or the count)."""
    for i, step in enumerate(steps):
        top2 = torch.topk(step.logits[0], 2).values
        if top2[0] - top2[1] < TIE_MARGIN:
            return i
    return len(steps)


def test_greedy_speculation_gives_plain_greedy_tokens_and_logprobs_on_the_demo_model(smol):
    prompt = copy_prompt(smol)
    n = 64
    plain = list(smol.decode([prompt], n, GREEDY, logprobs=True))
    speculative = smol.decode([prompt], n, GREEDY, logprobs=True, speculate=SPECULATE)
    steps = list(speculative)
    compared = first_near_tie(plain)
    assert compared >= n // 2, f"a near tie at step {compared}: this prompt cannot tell the two apart"
    assert [int(s.tokens[0]) for s in steps[:compared]] == [int(s.tokens[0]) for s in plain[:compared]]
    assert [s.position for s in steps] == list(range(len(prompt), len(prompt) + n))
    torch.testing.assert_close(torch.cat([s.logprobs for s in steps[:compared]]),
                               torch.cat([s.logprobs for s in plain[:compared]]), rtol=1e-4, atol=1e-4)
    assert speculative.accepted > n // 2  # copying a passage: most tokens come from kept drafts
    assert speculative.accepted <= speculative.drafted
    assert smol.tokenizer.decode([int(s.tokens[0]) for s in plain[:12]]).strip() in PASSAGE  # it did copy


def test_stream_and_chat_completion_take_speculate_and_answer_the_same(smol):
    dialog = [{"role": "user", "content": f"Repeat the following passage exactly:\n\n{PASSAGE}"}]
    (plain,) = smol.chat_completion([dialog], temperature=0, max_gen_len=16)
    (speculative,) = smol.chat_completion([dialog], temperature=0, max_gen_len=16, speculate=SPECULATE)
    assert speculative == plain  # the test above finds no near tie in this answer's first n // 2 tokens
    stream = smol.stream(copy_prompt(smol), 16, GREEDY, speculate=SPECULATE)
    assert "".join(stream) == plain["content"]


# --------------------------------------------------------------------------------------------
# A tiny random model: penalties, sampling by seed, the KV cache after rejected drafts, batches
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return write_tiny_llama2_checkpoint(tmp_path_factory.mktemp("tiny"), LLAMA2_TOKENIZER)


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    return LLaMa.build(tiny_ckpt, max_seq_len=128, max_batch_size=2, device="cpu", dtype="float32", progress=False,
                       threads=1)


TINY_TEXTS = ["1 2 3 1 2 3 1 2", "The cat sat on the mat. The cat sat on the", "Hello, my name is"]


@pytest.fixture(scope="module")
def replays(tiny) -> list[list[int]]:
    return [replay_prompt(tiny, text) for text in TINY_TEXTS]


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.01])
def test_greedy_with_or_without_a_repetition_penalty_is_unchanged_by_speculation(tiny, replays, repetition_penalty):
    """`seen` grows token by token inside a verification pass: each kept draft penalizes the next.
    (A penalty this small still lets the model repeat some of the text, so drafts are kept.)"""
    sampling = SamplingParams(temperature=0, repetition_penalty=repetition_penalty)
    drafted = accepted = 0
    for prompt in replays:
        plain = [int(s.tokens[0]) for s in tiny.decode([prompt], 30, sampling)]
        decoding = tiny.decode([prompt], 30, sampling, speculate=4)
        assert [int(s.tokens[0]) for s in decoding] == plain
        drafted, accepted = drafted + decoding.drafted, accepted + decoding.accepted
    assert drafted > accepted > 0  # drafts were both kept and rejected


def test_sampled_speculation_is_reproducible_by_seed_and_a_vanishing_nucleus_is_greedy(tiny, replays):
    ids = replays
    sampled = dict(temperature=1.0, top_p=0.95, top_k=40, repetition_penalty=1.1, seed=5)
    first = tiny.generate(ids, 30, SamplingParams(**sampled), speculate=4)
    again = tiny.generate(ids, 30, SamplingParams(**sampled), speculate=4)
    assert [g.tokens for g in first] == [g.tokens for g in again]
    # top_p -> 0 keeps the likeliest token only: p is one-hot, so drafts are judged greedily.
    nucleus = SamplingParams(temperature=1.0, top_p=1e-6, seed=5)
    assert [g.tokens for g in tiny.generate(ids, 30, nucleus, speculate=4)] == \
        [g.tokens for g in tiny.generate(ids, 30, GREEDY)]


def test_generate_runs_prompts_one_at_a_time_when_speculating(tiny, replays):
    ids = replays[:2]
    plain = tiny.generate(ids, 20, GREEDY, logprobs=True)  # one batch of two, left-padded
    speculative = tiny.generate(ids, 20, GREEDY, logprobs=True, speculate=4)
    assert [g.tokens for g in speculative] == [g.tokens for g in plain]
    for s, p in zip(speculative, plain):
        torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(p.logprobs), rtol=1e-4, atol=1e-4)


def test_after_rejected_drafts_the_kv_cache_holds_what_a_fresh_prefill_gives(tiny, tiny_ckpt, replays):
    """The cache is position-indexed: a rejected draft's keys/values are overwritten by the next pass.
    What the record says the cache holds (drafts fed last included) must be what it holds."""
    rejected = []
    for prompt in replays:
        decoding = tiny.decode([prompt], 30, GREEDY, speculate=4)
        list(decoding)
        if decoding.drafted > decoding.accepted:
            rejected.append(prompt)
    assert rejected  # some drafts were rejected, and their keys/values overwritten
    decoding = tiny.decode([rejected[0]], 30, GREEDY, speculate=4)
    list(decoding)
    held = list(tiny.kv_cache_tokens)
    fresh = LLaMa.build(tiny_ckpt, max_seq_len=128, max_batch_size=1, device="cpu", dtype="float32", progress=False,
                        threads=1)
    fresh.model(torch.tensor([held]), 0)
    for ours, theirs in zip(tiny.model.layers, fresh.model.layers):
        for name in ("cache_k", "cache_v"):
            torch.testing.assert_close(getattr(ours.attention.cache, name)[:1, :, : len(held)],
                                       getattr(theirs.attention.cache, name)[:1, :, : len(held)], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("speculate", [-1, 1.5, True, "3"])
def test_speculate_must_be_a_whole_number_of_at_least_zero(tiny, speculate):
    with pytest.raises(ValueError, match=r"speculate must be an integer >= 0 \(0 = off"):
        tiny.decode(tiny.encode_prompts(["Hi"]), 4, GREEDY, speculate=speculate)
    with pytest.raises(ValueError, match="speculate must be an integer >= 0"):
        tiny.generate(tiny.encode_prompts(["Hi"]), 4, GREEDY, speculate=speculate)


def test_speculating_over_a_batch_of_several_prompts_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="speculative decoding runs one prompt at a time, got a batch of 2"):
        tiny.decode(tiny.encode_prompts(TINY_TEXTS[:2]), 4, GREEDY, speculate=2)


def test_cli_speculate_below_zero_is_one_line_naming_the_flag(tiny_ckpt, capsys):
    argv = ["--ckpt-dir", str(tiny_ckpt), "--device", "cpu", "--dtype", "float32", "--prompt", "x"]
    assert cli.main(argv + ["--speculate", "-2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --speculate must be >= 0") and err.count("\n") == 1, err


def test_cli_speculate_prints_what_plain_decoding_prints(tiny_ckpt, capsys):
    argv = ["--ckpt-dir", str(tiny_ckpt), "--device", "cpu", "--dtype", "float32", "--temperature", "0",
            "--threads", "1", "--prompt", TINY_TEXTS[0], "--prompt", TINY_TEXTS[1], "--max-gen-len", "12"]
    assert cli.main(argv) == 0
    plain = capsys.readouterr().out
    assert cli.main(argv + ["--speculate", "4"]) == 0
    assert capsys.readouterr().out == plain
