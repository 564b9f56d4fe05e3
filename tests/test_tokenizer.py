"""Tests for tokenizer.py: exact ids against independent references.

- Llama 2 (SentencePiece): the `sentencepiece` library itself, on tests/data/llama2-tokenizer.model.
- Llama 3 (tiktoken): Meta's own `Tokenizer` from the llama-models 0.3.0 wheel (conftest fetches it).
- Sidecar tiktoken vocabularies: a tiny hand-made vocabulary whose ids we work out by hand.
- Bad input: every error names the file and, for the sidecar, the key at fault.
"""

import json
import sys

import pytest
import sentencepiece

from conftest import LLAMA2_TOKENIZER
from tokenizer import (
    LLAMA3_NUM_RESERVED_SPECIAL_TOKENS,
    MAX_NO_WHITESPACES_CHARS,
    TOKENIZER_SPEC_FILENAME,
    Tokenizer,
    TokenizerFileError,
    _split_whitespaces_or_nonwhitespaces,
    load_tiktoken_bpe,
)
from tokenizer_files import write_tiktoken_model, write_tokenizer_spec

# Texts that exercise the corners of both algorithms: pre-split regex classes, byte fallback,
# whitespace handling, digits (Llama 3 groups at most three), and special-token look-alikes.
TEXTS = [
    "",
    "Hello world",
    "This is a test sentence.",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "multiple     spaces\tand\ttabs\nand\nnewlines\r\nCRLF\n\n\n",
    "Café naïve résumé Ångström façade",
    "日本語のテキストと中文文本",
    "emoji 😀👍🏽 and family 👨‍👩‍👧‍👦",
    "Arabic: مرحبا بالعالم",
    "digits 1234567890 and 3.14159 and 1,000,000",
    "don't I'LL we've THEY'RE it's",
    "def f(x):\n    return x ** 2  # square\n",
    "<s> and </s> and <unk> as text",
    "<|begin_of_text|>Hi<|eot_id|>",
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>",
    "<|reserved_special_token_5|> <|python_tag|><|image|>",
    "\u200b zero width, \u0301combining accent",
]


# -----------------------------------------------------------------------------
# Llama 2: SentencePiece, against the sentencepiece library


@pytest.fixture(scope="module")
def llama2():
    return Tokenizer(LLAMA2_TOKENIZER)


@pytest.fixture(scope="module")
def sp_reference():
    return sentencepiece.SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER))


def test_llama2_attributes_equal_the_sentencepiece_models(llama2, sp_reference):
    assert llama2.kind == "sentencepiece"
    assert llama2.n_words == sp_reference.vocab_size() == 32000
    assert llama2.bos_id == sp_reference.bos_id() == 1
    assert llama2.eos_id == sp_reference.eos_id() == 2
    assert llama2.pad_id == sp_reference.pad_id() == -1  # Llama 2 has no pad token
    assert llama2.stop_tokens == {2}
    assert llama2.add_bos is True
    assert llama2.special_tokens == {}
    assert llama2.chat_template is None


@pytest.mark.parametrize("text", TEXTS)
def test_llama2_ids_equal_sentencepiece_library_with_and_without_bos_eos(llama2, sp_reference, text):
    plain = sp_reference.encode(text)
    assert llama2.encode(text, bos=False, eos=False) == plain
    assert llama2.encode(text, bos=True, eos=False) == [1] + plain
    assert llama2.encode(text, bos=False, eos=True) == plain + [2]
    assert llama2.encode(text, bos=True, eos=True) == [1] + plain + [2]
    # allowed_special has no effect on SentencePiece: "<s>" is always text there.
    assert llama2.encode(text, bos=False, eos=False, allowed_special="all") == plain


@pytest.mark.parametrize("text", TEXTS)
def test_llama2_decode_equals_sentencepiece_library(llama2, sp_reference, text):
    ids = sp_reference.encode(text)
    assert llama2.decode(ids) == sp_reference.decode(ids)
    assert llama2.decode([1] + ids + [2]) == sp_reference.decode([1] + ids + [2])


def test_llama2_exact_ids_for_hello_world(llama2):
    assert llama2.encode("Hello world", bos=True, eos=True) == [
        1,  # <s>  (BOS)
        15043,  # "▁Hello"  (the dummy prefix turns the start of text into a word start)
        3186,  # "▁world"
        2,  # </s>  (EOS)
    ]
    assert [llama2.id_to_piece(i) for i in (15043, 3186)] == ["▁Hello", "▁world"]


def test_llama2_emoji_falls_back_to_utf8_bytes(llama2):
    assert llama2.encode("😀", bos=False, eos=False) == [
        29871,  # "▁"  (dummy prefix; no piece "▁😀" exists)
        243,  # <0xF0>  byte-fallback pieces sit at id = byte + 3 (after <unk>, <s>, </s>)
        162,  # <0x9F>
        155,  # <0x98>
        131,  # <0x80>
    ]


def test_llama2_special_token_text_is_plain_text(llama2):
    assert llama2.encode("<s>", bos=False, eos=False) == [
        529,  # "▁<"
        29879,  # "s"
        29958,  # ">"   -- never 1: input text cannot forge a BOS
    ]


def test_format_is_detected_from_content_not_name(tmp_path):
    renamed = tmp_path / "vocab.tiktoken"
    renamed.write_bytes(LLAMA2_TOKENIZER.read_bytes())
    assert Tokenizer(renamed).kind == "sentencepiece"


# -----------------------------------------------------------------------------
# Llama 3: tiktoken, against Meta's own Tokenizer from the llama-models wheel


@pytest.fixture(scope="module")
def meta_tokenizer(llama_models_root, llama3_tokenizer_path):
    # Meta's tokenizer module imports only tiktoken and llama_models.tokenizer_utils (stdlib).
    if str(llama_models_root) not in sys.path:
        sys.path.insert(0, str(llama_models_root))
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    return MetaTokenizer(llama3_tokenizer_path)


@pytest.fixture(scope="module")
def llama3(llama3_tokenizer_path):
    return Tokenizer(llama3_tokenizer_path)


def test_llama3_attributes_equal_metas_tokenizer(llama3, meta_tokenizer):
    assert llama3.kind == "llama3"
    assert llama3.n_words == meta_tokenizer.n_words == 128256  # 128,000 ranks + 256 specials
    assert len(llama3.special_tokens) == LLAMA3_NUM_RESERVED_SPECIAL_TOKENS
    assert llama3.special_tokens == meta_tokenizer.special_tokens
    assert llama3.bos_id == meta_tokenizer.bos_id == 128000  # <|begin_of_text|>
    assert llama3.eos_id == meta_tokenizer.eos_id == 128001  # <|end_of_text|>
    assert llama3.pad_id == meta_tokenizer.pad_id == 128004  # <|finetune_right_pad_id|>
    assert llama3.stop_tokens == set(meta_tokenizer.stop_tokens) == {128001, 128008, 128009}
    assert llama3.add_bos is True
    assert llama3.chat_template is None


@pytest.mark.parametrize("text", TEXTS)
def test_llama3_ids_equal_metas_tokenizer_by_default(llama3, meta_tokenizer, text):
    for bos in (False, True):
        for eos in (False, True):
            assert llama3.encode(text, bos=bos, eos=eos) == meta_tokenizer.encode(text, bos=bos, eos=eos)


@pytest.mark.parametrize("text", TEXTS)
def test_llama3_ids_equal_metas_tokenizer_with_special_tokens(llama3, meta_tokenizer, text):
    ours = llama3.encode(text, bos=True, eos=False, allowed_special="all")
    assert ours == meta_tokenizer.encode(text, bos=True, eos=False, allowed_special="all")


@pytest.mark.parametrize("text", TEXTS)
def test_llama3_decode_equals_metas_tokenizer(llama3, meta_tokenizer, text):
    ids = meta_tokenizer.encode(text, bos=True, eos=True, allowed_special="all")
    assert llama3.decode(ids) == meta_tokenizer.decode(ids)


def test_llama3_exact_ids_from_metas_own_test(llama3):
    # The same ids as llama_models/llama3/tests/api/test_tokenizer.py.
    ids = llama3.encode("This is a test sentence.", bos=True, eos=True)
    assert ids == [
        128000,  # <|begin_of_text|>
        2028,  # "This"
        374,  # " is"   (the regex keeps a word's leading space with it)
        264,  # " a"
        1296,  # " test"
        11914,  # " sentence"
        13,  # "."
        128001,  # <|end_of_text|>
    ]
    assert llama3.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"


def test_llama3_special_token_text_is_plain_text_unless_allowed(llama3):
    assert llama3.encode("<|eot_id|>", bos=False, eos=False, allowed_special="all") == [128009]
    plain = llama3.encode("<|eot_id|>", bos=False, eos=False)
    assert 128009 not in plain and llama3.decode(plain) == "<|eot_id|>"


def test_llama3_very_long_input_is_split_like_metas(llama3, meta_tokenizer):
    # Runs longer than MAX_NO_WHITESPACES_CHARS are cut before the regex sees them.
    text = "a" * (MAX_NO_WHITESPACES_CHARS + 5000) + " " * (MAX_NO_WHITESPACES_CHARS + 3) + "end"
    assert llama3.encode(text, bos=False, eos=False) == meta_tokenizer.encode(text, bos=False, eos=False)


@pytest.mark.parametrize("text", ["", "a", "ab  cd", "aaaaaaa   bbbbbbbbb\t\t\t\t\tc", " x" * 10])
def test_long_run_splitter_equals_metas(meta_tokenizer, text):
    meta_split = type(meta_tokenizer)._split_whitespaces_or_nonwhitespaces
    for limit in (1, 2, 3, 5):
        assert list(_split_whitespaces_or_nonwhitespaces(text, limit)) == list(meta_split(text, limit))


def test_llama3_ranks_survive_a_write_and_reload(tmp_path, llama3_tokenizer_path):
    ranks = load_tiktoken_bpe(llama3_tokenizer_path)
    copy = tmp_path / "tokenizer.model"
    write_tiktoken_model(copy, ranks)
    assert load_tiktoken_bpe(copy) == ranks
    assert copy.read_bytes() == llama3_tokenizer_path.read_bytes()  # Meta's file is sorted by rank


# -----------------------------------------------------------------------------
# Tiktoken vocabularies described by a sidecar tokenizer_spec.json

# Ids 0..2 are special tokens (as in SmolLM2), so byte b has id BYTE_OFFSET + b, then two merges.
BYTE_OFFSET = 3
ID_AB = BYTE_OFFSET + 256  # 259: b"ab"
ID_ABC = ID_AB + 1  # 260: b"abc" = "ab" + "c"
ID_FAR_SPECIAL = 300  # a special token after a gap: ids 261..299 are unused
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def tiny_ranks() -> dict[bytes, int]:
    ranks = {bytes([b]): BYTE_OFFSET + b for b in range(256)}
    ranks[b"ab"] = ID_AB
    ranks[b"abc"] = ID_ABC
    return ranks


def tiny_spec(**overrides) -> dict:
    spec = {
        "pattern": GPT2_PATTERN,
        "special_tokens": {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|far|>": ID_FAR_SPECIAL},
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": None,
        "stop_tokens": ["<|im_end|>", "<|endoftext|>"],
        "add_bos": False,
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    spec.update(overrides)
    return spec


def write_tiny(tmp_path, spec: dict | None = None):
    model = tmp_path / "tokenizer.model"
    write_tiktoken_model(model, tiny_ranks())
    if spec is not None:
        write_tokenizer_spec(tmp_path / TOKENIZER_SPEC_FILENAME, spec)
    return model


def test_sidecar_attributes_come_from_the_spec(tmp_path):
    tok = Tokenizer(write_tiny(tmp_path, tiny_spec()))
    assert tok.kind == "tiktoken"
    assert tok.n_words == ID_FAR_SPECIAL + 1  # max id + 1, gaps included
    assert tok.bos_id == 1 and tok.eos_id == 2
    assert tok.pad_id == -1  # pad_token null
    assert tok.stop_tokens == {2, 0}
    assert tok.add_bos is False
    assert tok.special_tokens == tiny_spec()["special_tokens"]
    assert tok.chat_template == tiny_spec()["chat_template"]


def test_sidecar_ids_follow_the_merges_by_hand(tmp_path):
    tok = Tokenizer(write_tiny(tmp_path, tiny_spec()))
    assert tok.encode("abc ab", bos=False, eos=False) == [
        ID_ABC,  # "abc": a+b -> "ab" (rank 259), then "ab"+c -> "abc" (rank 260)
        BYTE_OFFSET + ord(" "),  # " ab" is one regex chunk; " a" is not a merge, so " " stays alone
        ID_AB,  # "ab"
    ]
    assert tok.encode("x", bos=True, eos=True) == [1, BYTE_OFFSET + ord("x"), 2]
    assert tok.decode([1, ID_ABC, 2]) == "<|im_start|>abc<|im_end|>"
    assert tok.id_to_piece(ID_AB) == "ab"


def test_sidecar_special_tokens_parse_only_when_allowed(tmp_path):
    tok = Tokenizer(write_tiny(tmp_path, tiny_spec()))
    text = "<|im_start|>ab<|far|>"
    assert tok.encode(text, bos=False, eos=False, allowed_special="all") == [1, ID_AB, ID_FAR_SPECIAL]
    assert tok.encode(text, bos=False, eos=False, allowed_special={"<|far|>"})[-1] == ID_FAR_SPECIAL
    plain = tok.encode(text, bos=False, eos=False)
    assert 1 not in plain and ID_FAR_SPECIAL not in plain and tok.decode(plain) == text


def test_sidecar_decode_rejects_an_id_in_a_gap(tmp_path):
    tok = Tokenizer(write_tiny(tmp_path, tiny_spec()))
    with pytest.raises(ValueError, match="280"):
        tok.decode([280])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([ID_FAR_SPECIAL + 1])


def test_sidecar_null_bos_gives_bos_id_minus_one_and_refuses_bos(tmp_path):
    tok = Tokenizer(write_tiny(tmp_path, tiny_spec(bos_token=None)))
    assert tok.bos_id == -1 and tok.add_bos is False
    with pytest.raises(ValueError, match="no BOS"):
        tok.encode("ab", bos=True, eos=False)


def test_sidecar_token_names_may_be_plain_ranks(tmp_path):
    tok = Tokenizer(write_tiny(tmp_path, tiny_spec(pad_token="ab")))
    assert tok.pad_id == ID_AB


def test_writers_leave_no_temporary_files(tmp_path):
    write_tiny(tmp_path, tiny_spec())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["tokenizer.model", TOKENIZER_SPEC_FILENAME])
    assert json.loads((tmp_path / TOKENIZER_SPEC_FILENAME).read_text()) == tiny_spec()


# -----------------------------------------------------------------------------
# Bad input: clear errors that name the file and what was expected


def test_missing_file_error_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer(missing)


@pytest.mark.parametrize("content", [b"", b"\x00\xff garbage \x13\x37" * 10, b"just some text\n"])
def test_garbage_file_error_names_the_path_and_both_formats(tmp_path, content):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(content)
    with pytest.raises(TokenizerFileError) as error:
        Tokenizer(bad)
    message = str(error.value)
    assert str(bad) in message and "SentencePiece" in message and "tiktoken" in message


def test_malformed_rank_line_error_names_the_line(tmp_path):
    model = write_tiny(tmp_path)
    with model.open("a") as f:
        f.write("not-base64!! seven\n")
    with pytest.raises(TokenizerFileError, match=r"line 259"):
        Tokenizer(model)


def test_rank_file_with_binary_tail_error_names_the_path(tmp_path):
    model = write_tiny(tmp_path)
    with model.open("ab") as f:
        f.write(b"\xff\xfe\x00")
    with pytest.raises(TokenizerFileError, match="UTF-8") as error:
        Tokenizer(model)
    assert str(model) in str(error.value)


def test_bytes_without_a_token_are_dropped_after_the_regex_split_as_hugging_face_does(tmp_path):
    # Hand-made vocabulary without b"\x04": HF's BPE splits "a\x04b" into the pieces "a", "\x04",
    # "b" and skips the unknown byte, so the result is [a, b], not the merged "ab" token.
    model = tmp_path / "tokenizer.model"
    ranks = {bytes([b]): b for b in range(256) if b != 0x04}
    ranks[b"ab"] = 256
    write_tiktoken_model(model, ranks)
    spec = tiny_spec(special_tokens={"<|x|>": 4}, bos_token=None, eos_token="<|x|>", stop_tokens=["<|x|>"])
    write_tokenizer_spec(tmp_path / TOKENIZER_SPEC_FILENAME, spec)
    tok = Tokenizer(model)
    assert tok.encode("ab", bos=False, eos=False) == [256]
    assert tok.encode("a\x04b", bos=False, eos=False) == [ord("a"), ord("b")]
    assert tok.encode("a\x04b<|x|>", bos=False, eos=False, allowed_special="all") == [ord("a"), ord("b"), 4]


def test_truncated_sidecar_error_names_the_sidecar(tmp_path):
    model = write_tiny(tmp_path)
    (tmp_path / TOKENIZER_SPEC_FILENAME).write_text(json.dumps(tiny_spec())[:40])
    with pytest.raises(TokenizerFileError, match=TOKENIZER_SPEC_FILENAME):
        Tokenizer(model)


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda s: s.update(merges=[]), "merges"),  # unknown key
        (lambda s: s.pop("eos_token"), "eos_token"),  # missing key
        (lambda s: s.update(add_bos="no"), "add_bos"),  # bad type
        (lambda s: s.update(special_tokens={"<|x|>": "0"}), "special_tokens"),  # id not an int
        (lambda s: s.update(stop_tokens="<|im_end|>"), "stop_tokens"),  # not a list
        (lambda s: s.update(bos_token=None, add_bos=True), "add_bos"),  # BOS wanted but none
    ],
)
def test_invalid_sidecar_error_names_the_file_and_key(tmp_path, edit, key):
    model = write_tiny(tmp_path)
    spec = tiny_spec()
    edit(spec)
    (tmp_path / TOKENIZER_SPEC_FILENAME).write_text(json.dumps(spec))
    with pytest.raises(TokenizerFileError) as error:
        Tokenizer(model)
    assert TOKENIZER_SPEC_FILENAME in str(error.value) and key in str(error.value)


def test_writer_refuses_an_invalid_spec(tmp_path):
    with pytest.raises(TokenizerFileError, match="unknown key"):
        write_tokenizer_spec(tmp_path / TOKENIZER_SPEC_FILENAME, tiny_spec(merges=[]))
    assert not any(tmp_path.iterdir())


def test_sidecar_stop_token_not_in_vocab_error_names_key_and_token(tmp_path):
    model = write_tiny(tmp_path, tiny_spec(stop_tokens=["<|im_end|>", "<|eot_id|>"]))
    with pytest.raises(TokenizerFileError) as error:
        Tokenizer(model)
    message = str(error.value)
    assert TOKENIZER_SPEC_FILENAME in message and "stop_tokens" in message and "<|eot_id|>" in message


def test_sidecar_special_id_colliding_with_a_rank_is_rejected(tmp_path):
    model = write_tiny(tmp_path, tiny_spec(special_tokens={"<|im_start|>": 1, "<|im_end|>": ID_AB}))
    with pytest.raises(TokenizerFileError, match="special_tokens"):
        Tokenizer(model)


def test_sidecar_invalid_regex_error_names_pattern(tmp_path):
    model = write_tiny(tmp_path, tiny_spec(pattern="(unclosed"))
    with pytest.raises(TokenizerFileError, match="pattern"):
        Tokenizer(model)


def test_sidecar_next_to_a_sentencepiece_model_is_rejected(tmp_path):
    model = tmp_path / "tokenizer.model"
    model.write_bytes(LLAMA2_TOKENIZER.read_bytes())
    write_tokenizer_spec(tmp_path / TOKENIZER_SPEC_FILENAME, tiny_spec())
    with pytest.raises(TokenizerFileError, match="SentencePiece"):
        Tokenizer(model)


# --------------------------------------------------------------------------------------------
# SmolLM2's pre-tokenizer on every kind of numeral (issue 13), against Hugging Face
# --------------------------------------------------------------------------------------------

def unicode_numerals() -> dict[str, list[str]]:
    """Every character of the Unicode number categories this Python knows: Nd (decimal digits, ٣),
    Nl (letter numbers, Ⅻ), No (other numbers, ½ ² ⑦)."""
    import unicodedata

    numerals: dict[str, list[str]] = {"Nd": [], "Nl": [], "No": []}
    for code_point in range(sys.maxunicode + 1):
        category = unicodedata.category(chr(code_point))
        if category in numerals:
            numerals[category].append(chr(code_point))
    return numerals


def test_smollm2_splits_every_numeral_as_hugging_face_does(demo_ckpt, hf_smollm2_tokenizer):
    """SmolLM2's tokenizer.json pre-tokenizes with Sequence[Digits(individual_digits=True), ByteLevel]
    (conftest's hf_smollm2_tokenizer). HF's Digits isolates every character for which Rust's
    `char::is_numeric` holds: the categories Nd, Nl and No, i.e. \\p{N}, not only 0-9. So " ½" is two
    pre-tokens, " " and "½", as in our `smollm` pattern. (transformers' GGUF loader alone ignores
    `tokenizer.ggml.pre = smollm` and keeps " ½", and even "12", whole: not SmolLM2's tokenizer.)

    The tokenizer comes from the GGUF through convert (demo_ckpt), so it has the pattern convert
    writes into tokenizer_spec.json today. Every numeral alone, after a space, doubled after a word
    and a space, and next to an ASCII digit."""
    ours = Tokenizer(demo_ckpt / "tokenizer.model")
    mismatches = []
    for category, characters in unicode_numerals().items():
        for c in characters:
            for text in (c, " " + c, "x " + c + c, "1" + c + " 2", "  " + c):
                expected = hf_smollm2_tokenizer.encode(text, add_special_tokens=False)
                if ours.encode(text, bos=False, eos=False) != expected:
                    mismatches.append((category, text))
    assert not mismatches, f"{len(mismatches)} differ, e.g. {mismatches[:10]}"


def test_smollm2_numerals_newer_than_pythons_unicode_tables(demo_ckpt, hf_smollm2_tokenizer):
    """Code points that HF's Digits (Rust's newer Unicode tables) isolates but this Python's
    unicodedata does not yet call numbers (e.g. U+11DE0, U+16FF4): found by asking Digits itself."""
    from tokenizers import pre_tokenizers

    digits = pre_tokenizers.Digits(individual_digits=True)
    ours = Tokenizer(demo_ckpt / "tokenizer.model")
    newer = [chr(cp) for cp in range(0x10000, sys.maxunicode + 1)
             if len(digits.pre_tokenize_str("a" + chr(cp) + "a")) == 3]
    for c in newer:
        for text in (c, " " + c, "x " + c + c):
            assert ours.encode(text, bos=False, eos=False) == hf_smollm2_tokenizer.encode(text, add_special_tokens=False), text


EMOJI_TEXT = "Hello wörld 🦙 café, 😊🌍"


def test_llama2_token_bytes_join_into_the_text_sentencepiece_decodes(llama2, sp_reference):
    """Byte pieces (<0xF0> ...) are single bytes of a character; joined, every token's bytes are the
    text (with SentencePiece's dummy-prefix space in front, which decode drops at the start)."""
    ids = llama2.encode(EMOJI_TEXT, bos=True, eos=False)
    assert llama2.token_bytes(ids[0]) == b""  # <s>
    assert any(len(llama2.token_bytes(i)) == 1 and llama2.token_bytes(i)[0] >= 0x80 for i in ids)  # a byte piece
    joined = b"".join(llama2.token_bytes(i) for i in ids).decode("utf-8")
    assert joined == " " + sp_reference.decode(ids)


def test_llama3_token_bytes_are_metas_tokenizer_bytes(llama3, meta_tokenizer):
    ids = llama3.encode(EMOJI_TEXT, bos=True, eos=False)
    assert [llama3.token_bytes(i) for i in ids] == [meta_tokenizer.model.decode_single_token_bytes(i) for i in ids]
    assert b"".join(llama3.token_bytes(i) for i in ids[1:]).decode("utf-8") == EMOJI_TEXT
