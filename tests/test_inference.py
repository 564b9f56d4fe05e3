"""inference.py: generation against Hugging Face's `generate`, ragged batches, sampling, bad input.

The tiny checkpoint is a random HF Llama written in Meta's layout (tests/tiny.py) with the real
Llama 2 SentencePiece tokenizer, so prompts are real text and HF's greedy generation is the oracle.
"""

import pytest
import torch

from conftest import LLAMA2_TOKENIZER
from cli import main
from inference import LLaMa
from sampling import SamplingParams
from tiny import LLAMA2_VOCAB_SIZE, TINY, hf_greedy, hf_model, meta_state_dict, write_checkpoint

PROMPTS = ["Hello, my name is", "The quick brown fox jumps over the lazy dog because", "1 2 3", "Paris"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF model, checkpoint dir): the same random weights in both."""
    params = {**TINY, "vocab_size": -1}  # as in Meta's Llama 2 params.json: the tokenizer decides
    hf = hf_model(TINY, LLAMA2_VOCAB_SIZE)
    ckpt = write_checkpoint(tmp_path_factory.mktemp("tiny"), meta_state_dict(hf, TINY), params, LLAMA2_TOKENIZER)
    return hf, ckpt


@pytest.fixture(scope="module")
def llama(tiny):
    return LLaMa.build(tiny[1], max_seq_len=128, max_batch_size=4, device="cpu", dtype="float32", progress=False)


def test_greedy_tokens_equal_hugging_face_generate(tiny, llama):
    hf, _ = tiny
    for prompt in PROMPTS:
        ids = llama.tokenizer.encode(prompt, bos=True, eos=False)
        expected = hf_greedy(hf, ids, 24)
        (ours,), _ = llama.text_completion([prompt], temperature=0, max_gen_len=24)
        n = len(ours)  # ours stops early at a stop token (</s>); HF was told not to
        assert ours == expected[:n], prompt
        assert n == 24 or expected[n] in llama.tokenizer.stop_tokens


def test_ragged_batch_gives_the_same_greedy_tokens_as_each_prompt_alone(llama):
    alone = [llama.text_completion([p], temperature=0, max_gen_len=20)[0][0] for p in PROMPTS]
    together, texts = llama.text_completion(PROMPTS, temperature=0, max_gen_len=20)
    assert together == alone
    assert texts == [llama.tokenizer.decode(t) for t in alone]


def test_batches_larger_than_max_batch_size_are_split_into_runs(llama):
    prompts = PROMPTS + PROMPTS[:2]  # 6 prompts, max_batch_size 4
    together, _ = llama.text_completion(prompts, temperature=0, max_gen_len=8)
    alone = [llama.text_completion([p], temperature=0, max_gen_len=8)[0][0] for p in prompts]
    assert together == alone


def test_echo_returns_prompt_then_completion(llama):
    prompt_ids = llama.tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    (plain,), _ = llama.text_completion([PROMPTS[0]], temperature=0, max_gen_len=5)
    (echoed,), _ = llama.text_completion([PROMPTS[0]], temperature=0, max_gen_len=5, echo=True)
    assert echoed == prompt_ids + plain


def test_logprobs_equal_hugging_face_log_softmax(tiny, llama):
    hf, _ = tiny
    (generation,) = llama.generate(llama.encode_prompts([PROMPTS[1]]), 6, SamplingParams(temperature=0), echo=True,
                                   logprobs=True)
    tokens, logprobs = [generation.tokens], [generation.logprobs]
    ids = torch.tensor([tokens[0]])
    with torch.no_grad():
        log_probs = torch.log_softmax(hf(ids).logits.float(), dim=-1)
    expected = log_probs[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
    assert logprobs[0][0] == 0.0  # nothing predicts the first token
    torch.testing.assert_close(torch.tensor(logprobs[0][1:]), expected, rtol=1e-4, atol=1e-4)


def test_same_seed_same_sample_and_sampling_follows_top_p(llama):
    first = llama.text_completion(PROMPTS[:2], temperature=1.0, top_p=0.9, max_gen_len=12, seed=7)
    second = llama.text_completion(PROMPTS[:2], temperature=1.0, top_p=0.9, max_gen_len=12, seed=7)
    other = llama.text_completion(PROMPTS[:2], temperature=1.0, top_p=0.9, max_gen_len=12, seed=8)
    assert first == second
    assert first != other
    # A tiny nucleus keeps only the most likely token: sampling becomes greedy.
    assert llama.text_completion(PROMPTS, temperature=1.0, top_p=1e-6, max_gen_len=8, seed=3) == \
        llama.text_completion(PROMPTS, temperature=0, max_gen_len=8)


def test_each_row_stops_at_its_first_stop_token_which_is_not_returned(llama):
    saved = llama.tokenizer.stop_tokens
    llama.tokenizer.stop_tokens = set()
    try:
        free, _ = llama.text_completion(PROMPTS[:2], temperature=0, max_gen_len=10)
        stop = free[0][3]  # declare the 4th token of row 0 a stop token
        llama.tokenizer.stop_tokens = {stop}
        stopped, texts = llama.text_completion(PROMPTS[:2], temperature=0, max_gen_len=10)
    finally:
        llama.tokenizer.stop_tokens = saved
    for free_row, stopped_row in zip(free, stopped):
        cut = free_row.index(stop) if stop in free_row else len(free_row)
        assert stopped_row == free_row[:cut]
    assert texts[0] == llama.tokenizer.decode(free[0][:free[0].index(stop)])


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[]), "empty"),
    (dict(prompts="hello"), "list of strings"),
    (dict(prompts=["ok", 3]), "prompt 1 is a int"),
    (dict(prompts=["x"], temperature=-0.1), "temperature"),
    (dict(prompts=["x"], top_p=0.0), "top_p"),
    (dict(prompts=["x"], top_p=1.5), "top_p"),
    (dict(prompts=["x"], max_gen_len=0), "max_gen_len"),
    (dict(prompts=["word " * 200]), "max_seq_len"),
])
def test_bad_completion_arguments_are_clear_errors(llama, kwargs, message):
    with pytest.raises(ValueError, match=message):
        llama.text_completion(**kwargs)


def test_text_completion_sends_logprobs_to_generate_in_one_line(llama):
    with pytest.raises(ValueError, match=r"returns \(out_tokens, out_text\); for log-probabilities use llama.generate"):
        llama.text_completion(["Hello"], logprobs=True)


@pytest.mark.parametrize("call", ["generate", "stream"])
def test_sampling_keywords_where_one_sampling_value_goes_name_the_new_spelling(llama, call):
    ids = llama.encode_prompts(["Hello"])
    with pytest.raises(TypeError, match=r"sampling=SamplingParams\(temperature=0, seed=3\)"):
        getattr(llama, call)(ids if call == "generate" else ids[0], 4, temperature=0, seed=3)
    with pytest.raises(TypeError, match="sampling must be a SamplingParams"):
        getattr(llama, call)(ids if call == "generate" else ids[0], 4, 0.7)  # Meta's positional temperature


@pytest.mark.parametrize("kwargs, message", [
    (dict(device="tpu"), "device"),
    (dict(device="cuda"), "CUDA"),
    (dict(dtype="float8"), "dtype"),
    (dict(dtype=torch.int8), "dtype"),
])
def test_bad_device_or_dtype_is_a_clear_error(tiny, kwargs, message):
    if "cuda" in kwargs.values() and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match=message):
        LLaMa.build(tiny[1], **kwargs)


def test_default_dtype_on_cpu_is_bfloat16(tiny):
    llama = LLaMa.build(tiny[1], max_seq_len=32, device="cpu", progress=False)
    assert llama.model.tok_embeddings.weight.dtype == torch.bfloat16
    assert llama.model.layers[0].attention.cache.cache_k.dtype == torch.bfloat16


def test_tokenizer_only_build_has_args_and_no_model(tiny):
    llama = LLaMa.build(tiny[1], load_model=False)
    assert llama.model is None and llama.args.vocab_size == LLAMA2_VOCAB_SIZE


def test_cli_prints_prompt_and_completion(tiny, capsys):
    code = main(["--ckpt-dir", str(tiny[1]), "--prompt", "Hello", "--prompt", "Bye", "--temperature", "0",
                 "--max-gen-len", "4", "--dtype", "float32", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    assert "> Hello" in out and "> Bye" in out


def test_cli_reports_a_missing_checkpoint_dir_in_one_line(tmp_path, capsys):
    code = main(["--ckpt-dir", str(tmp_path / "nope"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert code == 2
    assert "nope" in err and "does not exist" in err and "Traceback" not in err
