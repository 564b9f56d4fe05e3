"""Tokenizer: text <-> token ids, for every vocabulary file our models ship with.

A language model never sees text, only integers. The tokenizer is the dictionary between the two,
and it must reproduce the *exact* ids the model was trained on: one id off and the model reads a
different word. Three vocabularies come through this one class, told apart by the *content* of
the file (never its name):

1. **SentencePiece BPE with byte fallback (Llama 2).** `tokenizer.model` is a protobuf holding
   32,000 pieces with scores. The text gets a dummy-prefix space ("Hello" -> "▁Hello"), pieces
   are merged by score, and any character without a piece falls back to its UTF-8 bytes
   (`<0xF0>`, ...), so nothing is ever unknown. The `sentencepiece` library does the work, exactly
   as Meta's `llama/tokenizer.py` does; special-token text such as "<s>" in the input is always
   ordinary text there.

2. **Byte-level BPE with tiktoken (Llama 3).** `tokenizer.model` is text, one `base64token rank`
   per line: 128,000 byte strings, the rank being both the merge priority and the token id.
   Encoding is two steps: a regex first splits the text into word-like chunks (so merges never
   cross, say, a letter/digit boundary), then inside each chunk the adjacent pair with the lowest
   rank is merged, again and again. Meta then appends 256 special tokens *after* the ranks
   (`<|begin_of_text|>` = 128000, ...). Source: Meta's `llama_models/llama3/tokenizer.py`
   (llama-models 0.3.0), whose constants we copy below by name.

3. **Any other tiktoken vocabulary, described by a sidecar.** A GPT-2 style byte-level BPE (e.g.
   SmolLM2's) is the same algorithm with a different split regex and different special tokens.
   Our converter writes its ranks in the same text format, plus `tokenizer_spec.json` next to it
   naming the regex, the special tokens, BOS/EOS/pad, the stop tokens, whether prompts start with
   BOS, and the chat template. Ranks may have gaps: there the ids belong to special tokens.

Usage:
    tok = Tokenizer("tokenizer.model")
    ids = tok.encode("Hello", bos=True, eos=False)
    text = tok.decode(ids)

This file is the tokenizer only. Around it: chat_format.py writes dialogs with these ids (and
chooses the format from the vocabulary), streaming.py decodes ids one token at a time while they
are generated, and tokenizer_files.py writes the files read here (for convert.py).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import AbstractSet, Iterator, Literal, Optional, Sequence, TypedDict, Union

import regex  # tiktoken's own dependency, with the same \p{L}-style regex dialect
import sentencepiece
import tiktoken


# -----------------------------------------------------------------------------
# Constants (Llama 3 values are copied from Meta's llama_models/llama3/tokenizer.py, v0.3.0)

# Meta reserves this many ids after the BPE ranks for special tokens.
LLAMA3_NUM_RESERVED_SPECIAL_TOKENS = 256

# The named Llama 3 special tokens, in id order; the rest of the 256 are
# <|reserved_special_token_2|> ... (numbering continues after the two reserved ones named here).
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message (the model wants to call a tool)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
]
LLAMA3_FIRST_UNNAMED_RESERVED_INDEX = 2  # <|reserved_special_token_0|> and _1 are named above

# Meta's pre-split regex: contractions, words (with one leading non-letter), numbers of at most
# three digits, punctuation runs, newlines, and whitespace (a trailing space stays with the word).
LLAMA3_PAT_STR = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501

LLAMA3_BOS_TOKEN = "<|begin_of_text|>"
LLAMA3_EOS_TOKEN = "<|end_of_text|>"
LLAMA3_PAD_TOKEN = "<|finetune_right_pad_id|>"  # Meta's pad_id
LLAMA3_STOP_TOKENS = ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]

# tiktoken handles at most this many characters per call without a pyo3 PanicException (Meta).
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
# Runs of whitespace or non-whitespace longer than this make the regex pathologically slow,
# so inputs are cut there first (Meta; https://github.com/openai/tiktoken/issues/195).
MAX_NO_WHITESPACES_CHARS = 25_000

# Byte-level BPE starts from single bytes, so every one of the 256 byte values needs a rank.
NUM_BYTE_VALUES = 256

# The sidecar our converter writes next to a non-Llama-3 tiktoken `tokenizer.model`.
TOKENIZER_SPEC_FILENAME = "tokenizer_spec.json"

KIND_SENTENCEPIECE = "sentencepiece"
KIND_LLAMA3 = "llama3"
KIND_TIKTOKEN = "tiktoken"

# Meta's convention for "this vocabulary has no such token" (sentencepiece's pad_id() is -1 too).
NO_TOKEN_ID = -1

# What `decode` puts where bytes do not (yet) form a whole UTF-8 character.
REPLACEMENT_CHARACTER = "\ufffd"
SENTENCEPIECE_SPACE = "\u2581"  # "▁", how SentencePiece writes a space inside a piece


class TokenizerFileError(ValueError):
    """A tokenizer file (model or sidecar) exists but does not hold what we expect."""


class InvalidTextError(ValueError):
    """Text that is not valid Unicode (a lone surrogate, e.g. from bytes decoded with errors="surrogateescape")."""


def check_valid_text(s: str) -> None:
    """`s` can be written as UTF-8 (every tokenizer works on its bytes), or an error saying where not."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidTextError(
            f"the text is not valid Unicode: character {e.start} is {s[e.start]!r}, a lone surrogate that "
            f"UTF-8 cannot encode (was it read from bytes that are not UTF-8?)"
        ) from None


class TokenizerSpec(TypedDict):
    """Schema of `tokenizer_spec.json`; every key is required, no other key is allowed."""

    pattern: str  # tiktoken (Rust fancy-regex) pre-split pattern
    special_tokens: dict[str, int]  # token text -> id; ids must not collide with ranks
    bos_token: Optional[str]  # None: the vocabulary has no BOS (then add_bos must be false)
    eos_token: str
    pad_token: Optional[str]
    stop_tokens: list[str]  # generation stops at any of these
    add_bos: bool  # does a plain completion prompt start with BOS?
    chat_template: Optional[str]  # jinja text, as shipped by the model


# (type check, human description) per key, used to validate a spec before reading or writing it.
_SPEC_FIELDS = {
    "pattern": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "special_tokens": (
        lambda v: isinstance(v, dict)
        and all(isinstance(k, str) and _is_token_id(i) for k, i in v.items()),
        "an object mapping token text to a non-negative integer id",
    ),
    "bos_token": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "eos_token": (lambda v: isinstance(v, str), "a string"),
    "pad_token": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "stop_tokens": (
        lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v),
        "a list of strings",
    ),
    "add_bos": (lambda v: isinstance(v, bool), "true or false"),
    "chat_template": (lambda v: v is None or isinstance(v, str), "a string or null"),
}


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# -----------------------------------------------------------------------------
# The tiktoken rank file: one "base64(token bytes) rank" per line


def _parse_rank_line(line: str) -> tuple[bytes, int]:
    """One line of a tiktoken file -> (token bytes, rank); ValueError if malformed."""
    token_b64, rank = line.split()  # ValueError unless exactly two fields
    token = base64.b64decode(token_b64, validate=True)  # binascii.Error is a ValueError
    if not token or not rank.isdigit():
        raise ValueError("expected a non-empty token and a non-negative integer rank")
    return token, int(rank)


def load_tiktoken_bpe(path: Path) -> dict[bytes, int]:
    """Read the mergeable ranks of a tiktoken file, failing on the first malformed line.

    (Meta's `load_bpe_file` skips bad lines with a warning; a silently smaller vocabulary would
    shift nothing but break encoding later, so we stop instead.)
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerFileError(f"{path}: a tiktoken file must be UTF-8 text ({e})") from None
    mergeable_ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = _parse_rank_line(line)
        except ValueError:
            raise TokenizerFileError(
                f"{path}, line {line_number}: expected 'base64token rank', got {line[:80]!r}"
            ) from None
        if token in mergeable_ranks or rank in seen_ranks:
            raise TokenizerFileError(
                f"{path}, line {line_number}: token or rank {rank} appears twice"
            )
        mergeable_ranks[token] = rank
        seen_ranks.add(rank)
    return mergeable_ranks


# -----------------------------------------------------------------------------
# The sidecar `tokenizer_spec.json`


def validate_tokenizer_spec(spec: object, source: str | Path) -> TokenizerSpec:
    """Check the sidecar's schema (keys and types); `source` names the file in error messages."""
    if not isinstance(spec, dict):
        raise TokenizerFileError(f"{source}: expected a JSON object, got {type(spec).__name__}")
    missing = sorted(_SPEC_FIELDS.keys() - spec.keys())
    unknown = sorted(spec.keys() - _SPEC_FIELDS.keys())
    if missing:
        raise TokenizerFileError(
            f"{source}: missing key(s) {missing}; required: {list(_SPEC_FIELDS)}"
        )
    if unknown:
        raise TokenizerFileError(
            f"{source}: unknown key(s) {unknown}; allowed: {list(_SPEC_FIELDS)}"
        )
    for key, (is_valid, expected) in _SPEC_FIELDS.items():
        if not is_valid(spec[key]):
            raise TokenizerFileError(f"{source}: key '{key}' must be {expected}, got {spec[key]!r}")
    if spec["bos_token"] is None and spec["add_bos"]:
        raise TokenizerFileError(f"{source}: key 'add_bos' is true but 'bos_token' is null")
    ids = list(spec["special_tokens"].values())
    if len(set(ids)) != len(ids):
        raise TokenizerFileError(f"{source}: key 'special_tokens' gives two tokens the same id")
    return spec  # type: ignore[return-value]


def load_tokenizer_spec(path: Path) -> TokenizerSpec:
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerFileError(f"{path}: not valid JSON ({e})") from None
    return validate_tokenizer_spec(spec, path)


# -----------------------------------------------------------------------------
# Telling the formats apart by content


def _looks_like_tiktoken(data: bytes) -> bool:
    """A tiktoken file starts with a `base64token rank` line (a protobuf starts with byte 0x0a)."""
    first_line = data.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        _parse_rank_line(first_line.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return False
    return True


def _load_sentencepiece(data: bytes) -> Optional[sentencepiece.SentencePieceProcessor]:
    """The processor if `data` is a SentencePiece model proto with pieces, else None."""
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(data)
    except RuntimeError:  # sentencepiece reports a protobuf parse failure this way
        return None
    return processor if processor.vocab_size() > 0 else None


# -----------------------------------------------------------------------------
# Building the special tokens of a tiktoken vocabulary


def llama3_special_tokens(num_base_tokens: int) -> dict[str, int]:
    """Meta's 256 Llama 3 special tokens, numbered right after the `num_base_tokens` ranks."""
    num_unnamed = LLAMA3_NUM_RESERVED_SPECIAL_TOKENS - len(LLAMA3_SPECIAL_TOKENS)
    reserved = [
        f"<|reserved_special_token_{LLAMA3_FIRST_UNNAMED_RESERVED_INDEX + i}|>"
        for i in range(num_unnamed)
    ]
    names = LLAMA3_SPECIAL_TOKENS + reserved
    return {name: num_base_tokens + i for i, name in enumerate(names)}


def _llama3_spec(num_base_tokens: int) -> TokenizerSpec:
    """What a sidecar would say for Meta's Llama 3 vocabulary."""
    return TokenizerSpec(
        pattern=LLAMA3_PAT_STR,
        special_tokens=llama3_special_tokens(num_base_tokens),
        bos_token=LLAMA3_BOS_TOKEN,
        eos_token=LLAMA3_EOS_TOKEN,
        pad_token=LLAMA3_PAD_TOKEN,
        stop_tokens=LLAMA3_STOP_TOKENS,
        add_bos=True,
        chat_template=None,
    )


def _check_vocabulary(
    model_path: Path, spec_source: str, ranks: dict[bytes, int], spec: TokenizerSpec
) -> None:
    """No special token takes an id a rank already has."""
    rank_ids = set(ranks.values())
    clashes = {name: i for name, i in spec["special_tokens"].items() if i in rank_ids}
    if clashes:
        some = dict(list(clashes.items())[:3])
        raise TokenizerFileError(
            f"{spec_source}: key 'special_tokens' reuses ids of {model_path}'s ranks: {some}"
        )


def _contains_any_byte(s: str, byte_values: bytes) -> bool:
    encoded = s.encode("utf-8")
    return len(encoded.translate(None, delete=byte_values)) != len(encoded)


# -----------------------------------------------------------------------------
# Cutting very long inputs (Meta's workaround for tiktoken's limits)


def _split_whitespaces_or_nonwhitespaces(s: str, max_consecutive_slice_len: int) -> Iterator[str]:
    """Split `s` so no piece holds more than `max_consecutive_slice_len` consecutive whitespace
    or non-whitespace characters (Meta's function, same name)."""
    current_slice_len = 0
    current_slice_is_space = s[0].isspace() if len(s) > 0 else False
    slice_start = 0
    for i in range(len(s)):
        is_now_space = s[i].isspace()
        if current_slice_is_space ^ is_now_space:
            current_slice_len = 1
            current_slice_is_space = is_now_space
        else:
            current_slice_len += 1
            if current_slice_len > max_consecutive_slice_len:
                yield s[slice_start:i]
                slice_start = i
                current_slice_len = 1
    yield s[slice_start:]


def _safe_substrings(s: str) -> Iterator[str]:
    for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
        yield from _split_whitespaces_or_nonwhitespaces(
            s[i : i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS
        )


# -----------------------------------------------------------------------------
# The Tokenizer


class Tokenizer:
    """One tokenizer for SentencePiece (Llama 2) and tiktoken (Llama 3, sidecar) vocabularies.

    Attributes (Meta's names):
        kind: "sentencepiece", "llama3" or "tiktoken" (a tiktoken file with a sidecar).
        n_words: vocabulary size; the model's vocab_size must equal it.
        bos_id, eos_id, pad_id: special ids; -1 when the vocabulary has none.
        stop_tokens: ids at which generation ends.
        add_bos: whether a plain completion prompt starts with BOS.
        special_tokens: special token text -> id (empty for SentencePiece).
        chat_template: the sidecar's jinja chat template, else None.
    """

    def __init__(self, model_path: str | Path):
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        self.model_path = model_path
        spec_path = model_path.with_name(TOKENIZER_SPEC_FILENAME)
        data = model_path.read_bytes()

        if _looks_like_tiktoken(data):
            self._init_tiktoken(model_path, spec_path if spec_path.is_file() else None)
            return
        sp_model = _load_sentencepiece(data)
        if sp_model is None:
            raise TokenizerFileError(
                f"{model_path}: unknown tokenizer format; expected a SentencePiece model "
                f"(protobuf, as Llama 2's tokenizer.model) or tiktoken BPE ranks (text lines "
                f"'base64token rank', as Llama 3's tokenizer.model)"
            )
        if spec_path.is_file():
            raise TokenizerFileError(
                f"{spec_path} describes a tiktoken vocabulary, but {model_path} is a SentencePiece "
                f"model; remove the sidecar or point at the right tokenizer.model"
            )
        self._init_sentencepiece(sp_model)

    def _init_sentencepiece(self, sp_model: sentencepiece.SentencePieceProcessor) -> None:
        # As Meta's llama/tokenizer.py (Llama 2): every id comes from the model proto.
        self.kind = KIND_SENTENCEPIECE
        self.sp_model = sp_model
        self.model: Optional[tiktoken.Encoding] = None
        self.n_words: int = sp_model.vocab_size()
        self.bos_id: int = sp_model.bos_id()
        self.eos_id: int = sp_model.eos_id()
        self.pad_id: int = sp_model.pad_id()
        self.stop_tokens: set[int] = {self.eos_id}
        self.add_bos = True
        self.special_tokens: dict[str, int] = {}
        self.chat_template: Optional[str] = None

    def _init_tiktoken(self, model_path: Path, spec_path: Optional[Path]) -> None:
        mergeable_ranks = load_tiktoken_bpe(model_path)
        if spec_path is None:
            self.kind = KIND_LLAMA3
            spec = _llama3_spec(num_base_tokens=len(mergeable_ranks))
            spec_source = f"Llama 3 special tokens for {model_path}"
        else:
            self.kind = KIND_TIKTOKEN
            spec = load_tokenizer_spec(spec_path)
            spec_source = str(spec_path)
        _check_vocabulary(model_path, spec_source, mergeable_ranks, spec)

        self.sp_model = None
        self.special_tokens = dict(spec["special_tokens"])
        try:
            self.model = tiktoken.Encoding(
                name=model_path.name,
                pat_str=spec["pattern"],
                mergeable_ranks=mergeable_ranks,
                special_tokens=self.special_tokens,
            )
        except ValueError as e:  # tiktoken rejects a regex it cannot compile
            raise TokenizerFileError(
                f"{spec_source}: key 'pattern' is not a valid regex ({e})"
            ) from None
        # Some vocabularies (SmolLM2's) lack a few single bytes: control characters and bytes that
        # never occur in UTF-8. Text containing them is encoded as Hugging Face does (see
        # `_encode_dropping_unranked_bytes`); tiktoken alone would crash on it.
        self.unranked_bytes = bytes(b for b in range(NUM_BYTE_VALUES) if bytes([b]) not in mergeable_ranks)
        self._split_regex = regex.compile(spec["pattern"])

        def token_id(key: str, token: Optional[str]) -> int:
            """The id of a token named by the spec: a special token, or else a plain rank."""
            if token is None:
                return NO_TOKEN_ID
            if token in self.special_tokens:
                return self.special_tokens[token]
            if token.encode("utf-8") in mergeable_ranks:
                return mergeable_ranks[token.encode("utf-8")]
            raise TokenizerFileError(
                f"{spec_source}: key '{key}' names {token!r}, which is neither a special token "
                f"nor in the ranks of {model_path}"
            )

        self.n_words = self.model.max_token_value + 1  # ranks may have gaps; ids run to the max
        self.bos_id = token_id("bos_token", spec["bos_token"])
        self.eos_id = token_id("eos_token", spec["eos_token"])
        self.pad_id = token_id("pad_token", spec["pad_token"])
        self.stop_tokens = {token_id("stop_tokens", t) for t in spec["stop_tokens"]}
        self.add_bos = spec["add_bos"]
        self.chat_template = spec["chat_template"]

    # -- text -> ids ----------------------------------------------------------------------------

    def encode(
        self,
        s: str,
        bos: bool,
        eos: bool,
        allowed_special: Union[Literal["all"], AbstractSet[str]] = frozenset(),
    ) -> list[int]:
        """Encode `s`, optionally with BOS first and EOS last.

        Special-token text in `s` (e.g. "<|eot_id|>") is ordinary text by default, as in Meta's
        code, so user input can never forge a control token. `allowed_special="all"` (or a set of
        names) turns such text into the special ids. SentencePiece has no such switch: there
        "<s>" is always text.
        """
        if not isinstance(s, str):
            raise TypeError(f"encode expects a str, got {type(s).__name__}")
        check_valid_text(s)
        if bos and self.bos_id == NO_TOKEN_ID:
            raise ValueError(f"{self.model_path}: this vocabulary has no BOS token; pass bos=False")
        if self.sp_model is not None:
            t = self.sp_model.encode(s)
        elif self.unranked_bytes and _contains_any_byte(s, self.unranked_bytes):
            t = self._encode_dropping_unranked_bytes(s, allowed_special)
        else:
            t = []
            for substr in _safe_substrings(s):
                # disallowed_special=(): special-token text not allowed above is plain text.
                t.extend(
                    self.model.encode(
                        substr, allowed_special=allowed_special, disallowed_special=()
                    )
                )
        if bos:
            t.insert(0, self.bos_id)
        if eos:
            t.append(self.eos_id)
        return t

    def _encode_dropping_unranked_bytes(
        self, s: str, allowed_special: Union[Literal["all"], AbstractSet[str]]
    ) -> list[int]:
        """Byte-level BPE for text holding bytes the vocabulary has no token for.

        Hugging Face's BPE splits the text with the regex first, then skips the unknown byte
        inside its piece and merges what remains. We do the same, piece by piece: the regex
        split is unchanged by the byte, which is dropped only afterwards.
        """
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        segments = [s]
        if allowed:
            special_regex = "(" + "|".join(regex.escape(name) for name in sorted(allowed, key=len, reverse=True)) + ")"
            segments = regex.split(special_regex, s)  # odd positions hold the special tokens
        t: list[int] = []
        for position, segment in enumerate(segments):
            if position % 2 == 1:
                t.append(self.special_tokens[segment])
                continue
            for piece in self._split_regex.findall(segment):
                kept = piece.encode("utf-8").translate(None, delete=self.unranked_bytes)
                if kept:
                    t.extend(self.model._encode_single_piece(kept))
        return t

    # -- ids -> text ----------------------------------------------------------------------------

    def _check_ids(self, t: Sequence[int]) -> None:
        bad = [i for i in t if not 0 <= i < self.n_words]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.n_words})")

    def decode(self, t: Sequence[int]) -> str:
        """Ids -> text. Special tokens come out as their text (for tiktoken, as Meta does);
        bytes that do not form valid UTF-8 become U+FFFD."""
        t = list(t)
        self._check_ids(t)
        if self.sp_model is not None:
            return self.sp_model.decode(t)
        try:
            return self.model.decode(t)
        except KeyError as e:  # an id in a gap between the ranks, not a special token
            raise ValueError(f"token id not in the vocabulary of {self.model_path}: {e}") from None

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of one id, for display: '▁Hello', '<0x0A>', ' world',
        '<|eot_id|>'. A byte-level piece that is not valid UTF-8 on its own shows U+FFFD."""
        self._check_ids([i])
        if self.sp_model is not None:
            return self.sp_model.id_to_piece(i)
        try:
            piece = self.model.decode_single_token_bytes(i)
        except KeyError:
            raise ValueError(f"token id not in the vocabulary of {self.model_path}: {i}") from None
        return piece.decode("utf-8", errors="replace")

    def token_bytes(self, i: int) -> bytes:
        """The bytes id `i` stands for in the text (b"" for a control token such as <s>): joined over
        a sequence, they are its UTF-8 text, even where one token holds only part of a character
        (OpenAI's logprobs "bytes"). SentencePiece: a byte piece '<0xF0>' is that byte, '▁' a space."""
        self._check_ids([i])
        if self.sp_model is None:
            try:
                return self.model.decode_single_token_bytes(i)
            except KeyError:
                raise ValueError(f"token id not in the vocabulary of {self.model_path}: {i}") from None
        if self.sp_model.IsControl(i):
            return b""
        if self.sp_model.IsByte(i):
            return bytes([int(self.sp_model.id_to_piece(i)[len("<0x"):-len(">")], 16)])
        return self.sp_model.id_to_piece(i).replace(SENTENCEPIECE_SPACE, " ").encode("utf-8")

    def is_control(self, i: int) -> bool:
        """Whether SentencePiece's decode skips id `i` (<s>, </s>); tiktoken decodes every id to text."""
        return self.sp_model is not None and self.sp_model.IsControl(i)

    def __getattr__(self, name: str):
        """A clear error for the chat and streaming names that moved out of the tokenizer."""
        if name in MOVED_NAMES:
            raise AttributeError(f"Tokenizer.{name} moved: use {MOVED_NAMES[name]}")
        raise AttributeError(f"'Tokenizer' object has no attribute {name!r}")


# Names the Tokenizer had before the chat format and the stream decoder got files of their own.
MOVED_NAMES = {
    "chat_format": "chat_format.chat_format_for(tokenizer), or LLaMa.chat_format",
    "require_chat_format": "chat_format.chat_format_for(tokenizer, required=True)",
    "encode_dialog_prompt": "LLaMa.chat_format.encode_dialog_prompt(dialog), "
    "or chat_format.chat_format_for(tokenizer, required=True).encode_dialog_prompt(dialog)",
    "stream_decoder": "streaming.StreamDecoder(tokenizer)",
}


# Names this module had before the tokenizer got a file of its own (chat format, stream decoder, writers).
MOVED_MODULE_NAMES = {
    "StreamDecoder": "streaming.StreamDecoder", "choose_chat_format": "chat_format.chat_format_for",
    "write_tiktoken_model": "tokenizer_files.write_tiktoken_model",
    "write_tokenizer_spec": "tokenizer_files.write_tokenizer_spec",
}


def __getattr__(name: str):
    """PEP 562: a name that moved says where it went, in one line."""
    where = MOVED_MODULE_NAMES.get(name)
    raise AttributeError(f"tokenizer.{name} moved: use {where}" if where else
                         f"module 'tokenizer' has no attribute {name!r}")
