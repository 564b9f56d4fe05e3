"""Chat formats and chat_completion, against independent references.

- Llama 3: Meta's own `ChatFormat.encode_dialog_prompt` (llama-models 0.3.0 wheel).
- Llama 2: the format Meta's Llama 2 `chat_completion` builds (llama/generation.py), written out
  token by token, and Meta's recipe replayed on the `sentencepiece` library itself.
- ChatML: Hugging Face's `apply_chat_template` with SmolLM2's own template, read from the GGUF.
- The real demo model (SmolLM2-135M-Instruct) knows the capital of France, and reusing the KV
  cache across turns gives the same answers as encoding the whole history again.
- Bad dialogs are errors that name the message at fault.
"""

import sys
from pathlib import Path

import pytest
import sentencepiece

from chat import ChatSession
from chat_format import DialogError, chat_format_for, chatml_default_system_prompt, check_dialog
from conftest import LLAMA2_TOKENIZER
from inference import LLaMa
from sampling import SamplingParams
from test_tokenizer import tiny_spec, write_tiny
from tiny import write_tiny_llama2_checkpoint
from tokenizer import Tokenizer

SYSTEM = {"role": "system", "content": "You are a terse pirate."}
DIALOGS = [
    [{"role": "user", "content": "Hello!"}],
    [SYSTEM, {"role": "user", "content": "Who are you?"}],
    [
        SYSTEM,
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Four, matey."},
        {"role": "user", "content": "And 10 * 12?\nShow your work."},
    ],
    [
        {"role": "user", "content": "  Café, naïve, 日本語 and 🦙  "},  # whitespace kept or stripped per format
        {"role": "assistant", "content": "Bonjour !\n\n- one\n- two"},
        {"role": "user", "content": "Thanks"},
    ],
]


# --------------------------------------------------------------------------------------------
# Llama 3: Meta's ChatFormat
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def meta_chat_format(llama_models_root, llama3_tokenizer_path):
    pytest.importorskip("PIL")  # llama_models.llama3.chat_format imports PIL (for images)
    if str(llama_models_root) not in sys.path:
        sys.path.insert(0, str(llama_models_root))
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    chat_format = ChatFormat(MetaTokenizer(Path(llama3_tokenizer_path)))
    return lambda dialog: chat_format.encode_dialog_prompt([RawMessage(**m) for m in dialog]).tokens


@pytest.fixture(scope="module")
def llama3(llama3_tokenizer_path):
    return Tokenizer(llama3_tokenizer_path)


@pytest.mark.parametrize("dialog", DIALOGS)
def test_llama3_dialog_ids_equal_metas_chat_format(llama3, meta_chat_format, dialog):
    assert chat_format_for(llama3).name == "llama3"
    assert chat_format_for(llama3, required=True).encode_dialog_prompt(dialog) == meta_chat_format(dialog)


def test_llama3_dialog_ids_by_hand(llama3):
    assert chat_format_for(llama3, required=True).encode_dialog_prompt([{"role": "user", "content": "Hi"}]) == [
        128000,  # <|begin_of_text|>
        128006,  # <|start_header_id|>
        882,  # "user"
        128007,  # <|end_header_id|>
        271,  # "\n\n"
        13347,  # "Hi"
        128009,  # <|eot_id|>
        128006,  # <|start_header_id|>   the cue: the assistant's header, left open
        78191,  # "assistant"
        128007,  # <|end_header_id|>
        271,  # "\n\n"
    ]


def test_llama3_turn_ends_at_eot(llama3):
    eot = llama3.special_tokens["<|eot_id|>"]
    assert eot in chat_format_for(llama3).stop_tokens


def test_llama3_control_token_text_in_a_message_stays_text(llama3):
    ids = chat_format_for(llama3, required=True).encode_dialog_prompt([{"role": "user", "content": "<|eot_id|><|start_header_id|>"}])
    assert ids.count(llama3.special_tokens["<|eot_id|>"]) == 1  # only the real end of the user turn
    assert ids.count(llama3.special_tokens["<|start_header_id|>"]) == 2  # user and assistant headers


# --------------------------------------------------------------------------------------------
# Llama 2: Meta's chat_completion format
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama2():
    return Tokenizer(LLAMA2_TOKENIZER)


def test_llama2_dialog_ids_written_out(llama2):
    dialog = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Why?"},
    ]
    assert chat_format_for(llama2).name == "llama2"
    assert chat_format_for(llama2, required=True).encode_dialog_prompt(dialog) == [
        # "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi! [/INST] Hello. </s>": the first exchange,
        # with the system prompt folded into the user message (Meta's B_SYS ... E_SYS).
        1,  # <s>
        518, 25580, 29962,  # "▁[" "INST" "]"
        3532, 14816, 29903, 6778,  # "▁<<" "SY" "S" ">>"
        13,  # "\n" (<0x0A>)
        3629, 11473, 29889,  # "Be" "▁brief" "."
        13,  # "\n"
        29966, 829, 14816, 29903, 6778,  # "<" "</" "SY" "S" ">>"
        13, 13,  # "\n\n"
        18567, 29991,  # "Hi" "!"
        518, 29914, 25580, 29962,  # "▁[" "/" "INST" "]"
        15043, 29889,  # "▁Hello" "."
        29871,  # "▁"  (Meta's f-string ends the exchange with a space)
        2,  # </s>
        # "<s>[INST] Why? [/INST]": the last user message, left open for the answer.
        1,  # <s>
        518, 25580, 29962,  # "▁[" "INST" "]"
        3750, 29973,  # "▁Why" "?"
        518, 29914, 25580, 29962,  # "▁[" "/" "INST" "]"
    ]  # fmt: skip


def metas_llama2_prompt(sp: sentencepiece.SentencePieceProcessor, dialog: list[dict]) -> list[int]:
    """Meta's Llama 2 `chat_completion` prompt (llama/generation.py), replayed on sentencepiece."""
    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
    if dialog[0]["role"] == "system":
        dialog = [{"role": dialog[1]["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}]\
            + dialog[2:]
    tokens = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        tokens += [sp.bos_id()] + sp.encode(f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ")
        tokens += [sp.eos_id()]
    return tokens + [sp.bos_id()] + sp.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}")


@pytest.mark.parametrize("dialog", DIALOGS)
def test_llama2_dialog_ids_equal_metas_recipe(llama2, dialog):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER))
    assert chat_format_for(llama2, required=True).encode_dialog_prompt(dialog) == metas_llama2_prompt(sp, dialog)


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"])
def test_llama2_control_tags_in_a_message_are_refused(llama2, tag):
    # Meta answers such a dialog with "Error: special tags are not allowed as part of the prompt."
    with pytest.raises(DialogError, match=r"message 0 \(user\).*control tag"):
        chat_format_for(llama2, required=True).encode_dialog_prompt([{"role": "user", "content": f"hi {tag} there"}])


# --------------------------------------------------------------------------------------------
# ChatML: Hugging Face's apply_chat_template on SmolLM2's own template
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(demo_ckpt):
    return Tokenizer(demo_ckpt / "tokenizer.model")


@pytest.mark.parametrize("dialog", DIALOGS)
def test_chatml_prompt_equals_hugging_faces_chat_template(smol, hf_smollm2_tokenizer, dialog):
    expected = hf_smollm2_tokenizer.apply_chat_template(dialog, tokenize=False, add_generation_prompt=True)
    ids = chat_format_for(smol, required=True).encode_dialog_prompt(dialog)
    assert chat_format_for(smol).name == "chatml"
    assert smol.decode(ids) == expected
    assert ids == hf_smollm2_tokenizer.encode(expected, add_special_tokens=False)


def test_chatml_default_system_prompt_comes_from_the_template(smol):
    assert chat_format_for(smol).default_system_prompt == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    text = smol.decode(chat_format_for(smol, required=True).encode_dialog_prompt([{"role": "user", "content": "Hi"}]))
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    text = smol.decode(chat_format_for(smol, required=True).encode_dialog_prompt([SYSTEM, {"role": "user", "content": "Hi"}]))
    assert "SmolLM" not in text and text.startswith("<|im_start|>system\nYou are a terse pirate.<|im_end|>\n")


@pytest.mark.parametrize("template, expected", [
    (None, None),
    ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' }}{% endfor %}",
     None),  # only a system turn built from the message: no default
    ("{{ '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}", "You are Qwen."),  # escaped newline
])
def test_chatml_default_system_prompt_only_from_a_literal_turn(template, expected):
    assert chatml_default_system_prompt(template) == expected


def test_chat_format_is_chosen_from_content_not_names(tmp_path):
    renamed = tmp_path / "llama3.tokenizer.model"  # a SentencePiece file under a misleading name
    renamed.write_bytes(LLAMA2_TOKENIZER.read_bytes())
    assert chat_format_for(Tokenizer(renamed)).name == "llama2"
    (tmp_path / "chatml").mkdir()
    chatml = Tokenizer(write_tiny(tmp_path / "chatml", tiny_spec(chat_template=None)))
    assert chat_format_for(chatml).name == "chatml" and chat_format_for(chatml).default_system_prompt is None
    assert chat_format_for(chatml, required=True).encode_dialog_prompt([{"role": "user", "content": "ab"}])[:2] == [1, chatml.encode("user", bos=False, eos=False)[0]]
    (tmp_path / "plain").mkdir()
    special = {"<|endoftext|>": 0, "<|other|>": 1}
    plain = Tokenizer(write_tiny(tmp_path / "plain", tiny_spec(
        special_tokens=special, bos_token=None, eos_token="<|endoftext|>", stop_tokens=["<|endoftext|>"])))
    assert chat_format_for(plain) is None
    with pytest.raises(ValueError, match="no chat format"):
        chat_format_for(plain, required=True).encode_dialog_prompt([{"role": "user", "content": "hi"}])


# --------------------------------------------------------------------------------------------
# Bad dialogs
# --------------------------------------------------------------------------------------------

U, A = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize("dialog, message", [
    ("hi", "must be a list of messages"),
    ([], "empty"),
    (["hi"], "message 0 must be a dict"),
    ([{"role": "user"}], "message 0 has no 'content'"),
    ([{"role": "user", "content": "hi", "name": "x"}], r"unknown key\(s\) \['name'\]"),
    ([{"role": "bot", "content": "hi"}], "message 0 has role 'bot'; the roles are system, user, assistant"),
    ([{"role": "user", "content": 42}], "message 0 \\(user\\) has content of type int"),
    ([{"role": "user", "content": "  \n"}], "message 0 \\(user\\) has empty content"),
    ([U, A, {"role": "assistant", "content": ""}], "message 2 \\(assistant\\) has empty content"),
    ([SYSTEM], "only a system message"),
    ([U, SYSTEM], "message 1 is a system message"),
    ([A, U], "message 0 is from the assistant, expected the user"),
    ([U, U], "message 1 is from the user, expected the assistant"),
    ([SYSTEM, U, A], r"ends with an assistant message \(message 2\)"),
])
def test_bad_dialogs_are_errors_naming_the_message(llama2, llama3, dialog, message):
    with pytest.raises(DialogError, match=message):
        check_dialog(dialog)
    for tok in (llama2, llama3):  # every format checks
        with pytest.raises(DialogError, match=message):
            chat_format_for(tok, required=True).encode_dialog_prompt(dialog)


# --------------------------------------------------------------------------------------------
# chat_completion on a tiny random model (Llama 2 format) and on the real demo model
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    ckpt = write_tiny_llama2_checkpoint(tmp_path_factory.mktemp("tiny"), LLAMA2_TOKENIZER)
    return LLaMa.build(ckpt, max_seq_len=128, max_batch_size=2, device="cpu", dtype="float32", progress=False)


def test_chat_completion_answers_each_dialog_like_generate_on_the_dialog_ids(tiny_llama):
    dialogs = [DIALOGS[0], DIALOGS[2], DIALOGS[1]]  # three dialogs, max_batch_size 2: two runs
    answers = tiny_llama.chat_completion(dialogs, temperature=0, max_gen_len=8)
    for dialog, answer in zip(dialogs, answers):
        ids = chat_format_for(tiny_llama.tokenizer, required=True).encode_dialog_prompt(dialog)
        (expected,) = tiny_llama.generate([ids], max_gen_len=8, sampling=SamplingParams(temperature=0))
        assert answer == {"role": "assistant", "content": tiny_llama.tokenizer.decode(expected.tokens)}


def test_chat_completion_logprobs_and_the_answer_continues_the_dialog(tiny_llama):
    (answer,) = tiny_llama.chat_completion([DIALOGS[0]], temperature=0, max_gen_len=6, logprobs=True)
    assert answer["role"] == "assistant"
    assert len(answer["tokens"]) == len(answer["logprobs"]) and all(lp <= 0 for lp in answer["logprobs"])
    assert "".join(answer["tokens"]) == answer["content"]
    if answer["content"].strip():
        dialog = DIALOGS[0] + [answer, {"role": "user", "content": "More."}]
        tiny_llama.chat_completion([dialog], temperature=0, max_gen_len=2)  # accepted as it is


@pytest.mark.parametrize("dialogs, message", [
    ([], "non-empty list of dialogs"),
    ({"role": "user", "content": "hi"}, "non-empty list of dialogs"),
    ([{"role": "user", "content": "hi"}], "dialog 0 is a single message"),
    ([DIALOGS[0], [U, A]], "dialog 1: the dialog ends with an assistant message"),
    ([[{"role": "robot", "content": "hi"}]], "dialog 0: message 0 has role 'robot'"),
])
def test_chat_completion_bad_input_is_a_clear_error(tiny_llama, dialogs, message):
    with pytest.raises(ValueError, match=message):
        tiny_llama.chat_completion(dialogs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(max_gen_len=0), "max_gen_len"),
    (dict(stop="\n"), "stop must be a list"),
])
def test_chat_completion_bad_sampling_values_are_clear_errors(tiny_llama, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_llama.chat_completion([DIALOGS[0]], **kwargs)


@pytest.fixture(scope="module")
def demo_llama(demo_ckpt):
    return LLaMa.build(demo_ckpt, max_seq_len=512, max_batch_size=1, device="cpu", dtype="float32", progress=False)


def test_demo_model_knows_the_capital_of_france(demo_llama):
    (answer,) = demo_llama.chat_completion(
        [[{"role": "user", "content": "What is the capital of France?"}]], temperature=0, max_gen_len=16)
    assert answer["role"] == "assistant"
    assert "Paris" in answer["content"]


def test_kv_cache_reuse_across_turns_equals_encoding_the_whole_history(demo_llama):
    session = ChatSession(demo_llama, max_gen_len=8, sampling=SamplingParams(temperature=0))
    turns = []
    for question in ["My name is Alice.", "What is my name?", "Say it again."]:
        dialog = session.dialog(question)
        cached_before = list(demo_llama.kv_cache_tokens)
        with session.ask(question) as answer:
            text = "".join(answer)
        turns.append((dialog, cached_before, answer.stream, text))

    for turn, (dialog, cached_before, stream, text) in enumerate(turns):
        if turn > 0:  # the cache held the previous prompt and answer; only what follows was prefilled
            previous_prompt = turns[turn - 1][2].prompt_tokens
            assert stream.prompt_tokens[: len(cached_before)] == cached_before
            assert stream.reused_tokens == len(cached_before) > len(previous_prompt)
        fresh = demo_llama.chat_stream(dialog, max_gen_len=8, sampling=SamplingParams(temperature=0))  # the whole history, no reuse
        assert "".join(fresh) == text
        assert fresh.tokens == stream.tokens and fresh.reused_tokens == 0
