"""Streaming: text pieces as tokens come, never a broken character, joined exactly the final text.

- `StreamDecoder` on the Llama 2 (SentencePiece, byte fallback) and Llama 3 (byte-level BPE)
  tokenizers: joined pieces equal the tokenizer's own decode of all ids, on multi-byte texts and
  on random ids;
- `LLaMa.stream` with a scripted stand-in model that emits chosen tokens (emoji spelled by four
  byte tokens, CJK, accents), and on a tiny random model against `text_completion`;
- stop strings are held back while they might still match, and never shown;
- reusing the KV cache, an interrupted stream, and two streams at once.
"""

import random

import pytest
import torch

from conftest import LLAMA2_TOKENIZER
from inference import FINISH_LENGTH, FINISH_STOP, LLaMa
from model import ModelArgs
from sampling import SamplingParams
from streaming import StreamDecoder
from tiny import write_tiny_llama2_checkpoint
from tokenizer import REPLACEMENT_CHARACTER, Tokenizer

MULTIBYTE_TEXTS = [
    "🦙 llama",
    "Café naïve résumé — 日本語のテキスト, 中文 and 🙂👍🏽 👨‍👩‍👧‍👦!",
    "  leading spaces,\n\nnew lines\tand tabs  ",
    "Ω≈ç√∫ ¡™£¢∞§¶ ☃ 𝄞 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="module", params=["llama2", "llama3"])
def tokenizer(request, llama3_tokenizer_path):
    return Tokenizer(LLAMA2_TOKENIZER if request.param == "llama2" else llama3_tokenizer_path)


def stream_decode(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    decoder = StreamDecoder(tokenizer)
    return [decoder.feed(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_stream_decoder_pieces_join_to_the_text_and_never_split_a_character(tokenizer, text):
    ids = tokenizer.encode(text, bos=False, eos=False)
    pieces = stream_decode(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any(REPLACEMENT_CHARACTER in piece for piece in pieces)


def test_stream_decoder_holds_back_an_emoji_until_its_last_byte():
    llama2 = Tokenizer(LLAMA2_TOKENIZER)
    ids = llama2.encode("🦙", bos=False, eos=False)  # "▁" then the four byte tokens <0xF0><0x9F><0xA6><0x99>
    assert [llama2.id_to_piece(i) for i in ids] == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    assert stream_decode(llama2, ids) == ["", "", "", "", "🦙", ""]


def test_stream_decoder_keeps_sentencepiece_spaces_mid_sentence():
    llama2 = Tokenizer(LLAMA2_TOKENIZER)
    ids = llama2.encode("Hello world again", bos=False, eos=False)  # "▁Hello" "▁world" "▁again"
    assert stream_decode(llama2, ids) == ["Hello", " world", " again", ""]  # as decode: no leading space


def test_stream_decoder_equals_decode_on_random_ids(tokenizer):
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(tokenizer.n_words) for _ in range(rng.randrange(1, 30))]
        assert "".join(stream_decode(tokenizer, ids)) == tokenizer.decode(ids)


# --------------------------------------------------------------------------------------------
# LLaMa.stream with a scripted model
# --------------------------------------------------------------------------------------------


class ScriptedModel(torch.nn.Module):
    """Stands in for the Transformer: each call's logits put all weight on the next id of a script."""

    def __init__(self, script: list[int], vocab_size: int):
        super().__init__()
        self.script, self.vocab_size, self.calls = script, vocab_size, 0

    def forward(self, tokens: torch.Tensor, start_pos: int, pad_lens=None, last_only: bool = False) -> torch.Tensor:
        positions = 1 if last_only else tokens.shape[1]
        logits = torch.zeros(tokens.shape[0], positions, self.vocab_size)
        logits[:, -1, self.script[min(self.calls, len(self.script) - 1)]] = 100.0
        self.calls += 1
        return logits


def scripted_llama(text: str, then_eos: bool = True) -> LLaMa:
    tokenizer = Tokenizer(LLAMA2_TOKENIZER)
    script = tokenizer.encode(text, bos=False, eos=then_eos)
    args = ModelArgs(dim=8, n_layers=1, n_heads=1, vocab_size=tokenizer.n_words, max_seq_len=256, max_batch_size=1)
    return LLaMa(ScriptedModel(script, tokenizer.n_words), tokenizer, args, torch.device("cpu"))


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_stream_yields_whole_characters_that_join_to_the_final_text(text):
    llama = scripted_llama(text)
    stream = llama.stream("Say something:", sampling=SamplingParams(temperature=0))
    pieces = list(stream)
    assert "".join(pieces) == stream.text == llama.tokenizer.decode(stream.tokens)
    assert stream.text == text
    assert not any(REPLACEMENT_CHARACTER in piece for piece in pieces) and all(pieces)
    assert stream.finish_reason == FINISH_STOP  # the script ends with </s>
    (_,), (completion,) = scripted_llama(text).text_completion(["Say something:"], temperature=0)
    assert completion == stream.text


def test_stream_never_shows_a_stop_string_or_its_beginning():
    stream = scripted_llama("Sure.\nUser: hi").stream("x", sampling=SamplingParams(temperature=0, stop=["\nUser:"]))
    pieces = list(stream)
    assert "".join(pieces) == "Sure." and stream.finish_reason == FINISH_STOP
    assert not any("\n" in piece for piece in pieces)


def test_stream_releases_a_held_back_near_miss():
    stream = scripted_llama("a\nUse it\nUs").stream("x", sampling=SamplingParams(temperature=0, stop=["\nUser:"]))
    assert "".join(stream) == "a\nUse it\nUs"  # "\nUs" at the very end is released when the text ends


def test_stream_ends_at_max_gen_len():
    stream = scripted_llama("one two three four five six").stream("x", max_gen_len=3, sampling=SamplingParams(temperature=0))
    assert len(list(stream)) > 0 and len(stream.tokens) == 3 and stream.finish_reason == FINISH_LENGTH


@pytest.mark.parametrize("prompt, message", [
    ("", "prompt 0 has no tokens"),
    ([], "prompt 0 has no tokens"),
    (["a"], "prompt 0: token id .a. at position 0 is not in the vocabulary"),
    (3.5, "string or a list of token ids"),
    ("x", "max_gen_len"),
])
def test_stream_bad_input_is_a_clear_error(prompt, message):
    kwargs = dict(max_gen_len=0) if message == "max_gen_len" else {}
    llama = scripted_llama("hi")
    llama.tokenizer.add_bos = False  # so that "" really has no tokens
    with pytest.raises(ValueError, match=message):
        llama.stream(prompt, **kwargs)


# --------------------------------------------------------------------------------------------
# LLaMa.stream on a tiny random model: same text as text_completion; KV cache reuse
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    ckpt = write_tiny_llama2_checkpoint(tmp_path_factory.mktemp("tiny"), LLAMA2_TOKENIZER)
    return LLaMa.build(ckpt, max_seq_len=128, max_batch_size=2, device="cpu", dtype="float32", progress=False)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stream_equals_text_completion_when_sampling(tiny_llama, seed):
    kwargs = dict(temperature=1.0, top_p=0.95, seed=seed)
    (_,), (expected,) = tiny_llama.text_completion(["Once upon a time"], max_gen_len=40, **kwargs)
    stream = tiny_llama.stream("Once upon a time", max_gen_len=40, sampling=SamplingParams(**kwargs))
    assert "".join(stream) == expected == stream.text


def test_stream_reuses_the_cache_and_gives_the_same_tokens(tiny_llama):
    tokenizer = tiny_llama.tokenizer
    first = tiny_llama.stream("The cat sat on the", max_gen_len=6, reuse_cache=True, sampling=SamplingParams(temperature=0))
    list(first)
    held = list(tiny_llama.kv_cache_tokens)
    assert held == first.prompt_tokens + first.tokens[:-1]  # the last token was sampled, never fed
    longer = first.prompt_tokens + first.tokens + tokenizer.encode(" and then", bos=False, eos=False)
    reused = tiny_llama.stream(longer, max_gen_len=8, reuse_cache=True, sampling=SamplingParams(temperature=0))
    reused_text = "".join(reused)
    assert reused.reused_tokens == len(held)
    fresh = tiny_llama.stream(longer, max_gen_len=8, sampling=SamplingParams(temperature=0))  # reuse_cache=False: prefill all
    assert "".join(fresh) == reused_text and fresh.tokens == reused.tokens and fresh.reused_tokens == 0


def test_an_interrupted_stream_leaves_a_truthful_cache(tiny_llama):
    stream = tiny_llama.stream("The cat sat on the", max_gen_len=20, sampling=SamplingParams(temperature=0))
    pieces = iter(stream)
    next(pieces), next(pieces)
    pieces.close()  # what Ctrl-C in the consumer amounts to
    assert tiny_llama.kv_cache_tokens == stream.prompt_tokens + stream.tokens[:-1]
    assert stream.finish_reason is None
    again = tiny_llama.stream(stream.prompt_tokens, max_gen_len=20, reuse_cache=True, sampling=SamplingParams(temperature=0))
    fresh = tiny_llama.stream(stream.prompt_tokens, max_gen_len=20, sampling=SamplingParams(temperature=0))
    assert "".join(again) == "".join(fresh)


def test_a_paused_stream_refuses_to_continue_on_a_cache_another_run_overwrote(tiny_llama):
    paused = iter(tiny_llama.stream("The cat sat on the", max_gen_len=20, sampling=SamplingParams(temperature=0)))
    next(paused)
    tiny_llama.text_completion(["Hello"], temperature=0, max_gen_len=2)
    with pytest.raises(RuntimeError, match="overwrote the KV cache"):
        list(paused)
