"""Sampling controls: each step against Hugging Face's logits processors, and every knob end to end.

- repetition penalty, top-k, top-p: our functions against HF's `RepetitionPenaltyLogitsProcessor`,
  `TopKLogitsWarper`, `TopPLogitsWarper` on the same logits;
- greedy decoding with a repetition penalty against HF `generate(repetition_penalty=...)` on a
  tiny random model with the same weights (tests/tiny.py);
- stop strings, seeds, top_k through `text_completion`; bad values are errors naming the knob.
"""

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from conftest import LLAMA2_TOKENIZER
from cli import main
from inference import FINISH_LENGTH, FINISH_STOP, LLaMa
from sampling import (
    SamplingParams,
    apply_repetition_penalty,
    logits_to_probs,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)
from tiny import LLAMA2_VOCAB_SIZE, TINY, hf_model, meta_state_dict, write_checkpoint

VOCAB = 50


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(3, VOCAB) * 3  # (B, V), no ties


@pytest.fixture
def history():
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (3, 12))  # (B, T) ids each row holds so far


def seen_mask(history: torch.Tensor) -> torch.Tensor:
    return torch.zeros(history.shape[0], VOCAB, dtype=torch.bool).scatter_(1, history, True)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_equals_hugging_face(logits, history, penalty):
    expected = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen_mask(history), penalty), expected)


@pytest.mark.parametrize("k", [1, 5, VOCAB, VOCAB + 10])
def test_top_k_equals_hugging_face(logits, k):
    expected = TopKLogitsWarper(top_k=k)(None, logits.clone())
    assert torch.equal(top_k_filter(logits, k), expected)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.99])  # 1.0 = no cut: not called
def test_top_p_keeps_the_same_tokens_as_hugging_face(logits, p):
    hf_kept = torch.isfinite(TopPLogitsWarper(top_p=p)(None, logits.clone()))
    ours = top_p_filter(logits_to_probs(logits, 1.0), p)
    assert torch.equal(ours > 0, hf_kept)
    torch.testing.assert_close(ours.sum(-1), torch.ones(3))


def test_sampling_with_top_k_draws_only_the_k_most_likely(logits):
    generator = torch.Generator().manual_seed(0)
    allowed = torch.topk(logits, 3).indices
    for _ in range(50):
        token = sample_next_token(logits, temperature=2.0, top_p=1.0, generator=generator, top_k=3)
        assert all(token[b] in allowed[b] for b in range(3))


def test_greedy_applies_the_penalty_before_the_argmax(logits, history):
    seen = seen_mask(history)
    expected = apply_repetition_penalty(logits, seen, 5.0).argmax(-1)
    assert torch.equal(sample_next_token(logits, 0, 1.0, repetition_penalty=5.0, seen=seen), expected)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "temperature must be a number >= 0"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature="0.7"), "temperature"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=0), "top_k must be an integer >= 1, or None"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_k=True), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a number from 0.01 to 100"),
    (dict(repetition_penalty=-1.2), "repetition_penalty"),
])
def test_bad_sampling_values_are_errors_naming_the_knob(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


# --------------------------------------------------------------------------------------------
# End to end on a tiny random model
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = hf_model(TINY, LLAMA2_VOCAB_SIZE)
    ckpt = write_checkpoint(tmp_path_factory.mktemp("tiny"), meta_state_dict(hf, TINY), {**TINY, "vocab_size": -1},
                            LLAMA2_TOKENIZER)
    llama = LLaMa.build(ckpt, max_seq_len=128, max_batch_size=4, device="cpu", dtype="float32", progress=False)
    return hf, llama, ckpt


@pytest.mark.parametrize("penalty", [1.5, 0.8])
def test_greedy_with_repetition_penalty_equals_hugging_face_generate(tiny, penalty):
    hf, llama, _ = tiny
    prompts = ["the the the the", "Hello, my name is"]
    ids = [llama.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    ours, _ = llama.text_completion(prompts, temperature=0, max_gen_len=16, repetition_penalty=penalty)
    for prompt_ids, tokens in zip(ids, ours):
        out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                          repetition_penalty=penalty, attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
        expected = out[0, len(prompt_ids):].tolist()
        assert tokens == expected[: len(tokens)]


def test_top_k_one_is_greedy_and_seeds_reproduce(tiny):
    _, llama, _ = tiny
    prompts = ["Hello, my name is", "1 2 3"]
    greedy = llama.text_completion(prompts, temperature=0, max_gen_len=10)
    assert llama.text_completion(prompts, temperature=1.5, top_p=1.0, top_k=1, max_gen_len=10, seed=5) == greedy
    first = llama.text_completion(prompts, temperature=1.0, top_k=40, max_gen_len=10, seed=11)
    assert llama.text_completion(prompts, temperature=1.0, top_k=40, max_gen_len=10, seed=11) == first


def test_stop_strings_cut_the_text_before_the_first_one(tiny):
    _, llama, _ = tiny
    prompt = ["Hello, my name is"]
    (free_tokens,), (free_text,) = llama.text_completion(prompt, temperature=0, max_gen_len=20)
    stop = free_text[len(free_text) // 2 : len(free_text) // 2 + 3]  # some text from the middle
    (tokens,), (text,) = llama.text_completion(prompt, temperature=0, max_gen_len=20, stop=["never there", stop])
    assert text == free_text[: free_text.index(stop)]
    assert tokens == free_tokens[: len(tokens)]  # the output stops at the token that completed the stop string
    assert stop in llama.tokenizer.decode(tokens) and stop not in llama.tokenizer.decode(tokens[:-1])
    (generation,) = llama.generate([llama.tokenizer.encode(prompt[0], bos=True, eos=False)], 20, sampling=SamplingParams(temperature=0, stop=[stop]))
    assert generation.finish_reason == FINISH_STOP and generation.text == text
    (generation,) = llama.generate([llama.tokenizer.encode(prompt[0], bos=True, eos=False)], 3, sampling=SamplingParams(temperature=0))
    assert generation.finish_reason == FINISH_LENGTH


def test_stop_strings_with_echo_keep_the_prompt(tiny):
    _, llama, _ = tiny
    prompt = "Hello, my name is"
    (_,), (free_text,) = llama.text_completion([prompt], temperature=0, max_gen_len=12, echo=True)
    generated = free_text[len(prompt) :]
    stop = generated[len(generated) // 2 :][:2]
    (_,), (text,) = llama.text_completion([prompt], temperature=0, max_gen_len=12, echo=True, stop=[stop])
    assert text == prompt + generated[: generated.index(stop)]


@pytest.mark.parametrize("stop, message", [
    ("\n", "stop must be a list of strings"),
    ([""], "non-empty string"),
    ([3], "non-empty string"),
])
def test_bad_stop_strings_are_errors(tiny, stop, message):
    with pytest.raises(ValueError, match=message):
        tiny[1].text_completion(["Hi"], max_gen_len=2, stop=stop)


def test_bad_seed_is_an_error(tiny):
    with pytest.raises(ValueError, match="seed must be an integer"):
        tiny[1].text_completion(["Hi"], max_gen_len=2, seed="42")


def test_cli_takes_every_sampling_flag(tiny, capsys):
    code = main(["--ckpt-dir", str(tiny[2]), "--prompt", "Hello", "--temperature", "0.8", "--top-p", "0.95",
                 "--top-k", "20", "--repetition-penalty", "1.2", "--stop", "zzz", "--seed", "3", "--max-gen-len", "4",
                 "--echo", "--logprobs", "--dtype", "float32", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    assert "> Hello" in out and "logprob" in out


@pytest.mark.parametrize("flags, message", [
    (["--top-k", "0"], "--top-k must be"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be"),
    (["--temperature", "nan"], "--temperature must be"),
    (["--stop", ""], "non-empty"),
    (["--max-gen-len", "0"], "--max-gen-len"),
    (["--system", "hi"], "--system is for --chat"),
    (["--chat", "--prompt", "hi"], "with --chat, type your messages"),
])
def test_cli_rejects_bad_sampling_flags_before_loading(tmp_path, capsys, flags, message):
    code = main(["--ckpt-dir", str(tmp_path / "not-needed"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert "does not exist" not in err  # failed before looking at the checkpoint
