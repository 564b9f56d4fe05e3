"""Vocabularies: a source's token list -> the tokenizer files our engine reads.

GGUF files and Hugging Face directories spell a vocabulary their own way; tokenizer.py reads two
kinds of `tokenizer.model` (tokenizer_files.py writes them). This chapter is the bridge:

- **Byte-level BPE** (GPT-2 style: SmolLM2, Llama 3) becomes tiktoken ranks -- the rank of a
  token is its id, which is its merge order -- plus `tokenizer_spec.json`, a sidecar naming the
  pre-tokenizer regex, the special tokens and the chat template.
- **SentencePiece** (Llama 2) from a bare token list becomes a SentencePiece ModelProto.

The readers (convert_gguf.py, convert_hf.py) pick the pieces out of their format; what the pieces
mean is decided here, once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from convert_source import TOKENIZER_NAME, TOKENIZER_SPEC_NAME, ConversionError
from tokenizer import LLAMA3_PAT_STR
from tokenizer_files import write_tiktoken_model, write_tokenizer_spec  # the formats tokenizer.py reads

# --------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE (GPT-2 style) -> tiktoken ranks + sidecar
# --------------------------------------------------------------------------------------------

# Pre-tokenizer regexes by llama.cpp's `tokenizer.ggml.pre` name.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Meta's Llama 3 pattern (llama_models/llama3/tokenizer.py), kept in one place: tokenizer.py.
LLAMA3_PATTERN = LLAMA3_PAT_STR
# SmolLM2 (HF: Sequence[Digits(individual_digits=True), ByteLevel(GPT-2 regex)]) as one regex:
# every digit is its own piece; and since the Digits step cuts the text before a digit, a run of
# whitespace in front of a digit ends its segment and stays whole (`\s+(?=\p{N})`), where GPT-2's
# `\s+(?!\S)` would leave its last space to the next piece.
SMOLLM_PATTERN = (
    r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""
)
PRE_TOKENIZER_PATTERNS = {"gpt2": GPT2_PATTERN, "smollm": SMOLLM_PATTERN, "llama-bpe": LLAMA3_PATTERN}

# Tokens that end a turn, by name, in the chat formats we know (ChatML, Llama 3).
KNOWN_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (openai/gpt-2, encoder.py).

    Byte-level BPE vocabularies spell every token with these characters; printable bytes map to
    themselves, the other 68 bytes to code points from 256 up.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


def bpe_token_bytes(token: str, unicode_to_byte: dict[str, int]) -> bytes:
    try:
        return bytes(unicode_to_byte[ch] for ch in token)
    except KeyError as e:
        raise ConversionError(f"token {token!r} is not spelled in GPT-2 byte-level characters") from e


def check_ranks_follow_merges(ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]]) -> None:
    """tiktoken merges the pair whose result has the lowest rank; HF/llama.cpp merge by merge
    order. They agree when the ids of merge results increase with the merge order."""
    previous = -1
    for i, (left, right) in enumerate(merges):
        rank = ranks.get(left + right)
        if rank is None or rank <= previous:
            raise ConversionError(
                f"merge {i} ({left!r} + {right!r}) breaks id order; this vocabulary cannot be expressed as tiktoken ranks"
            )
        previous = rank


def byte_level_bpe_ranks(ordinary: Iterable[tuple[str, int]], merges: list[tuple[str, str]]) -> dict[bytes, int]:
    """tiktoken's mergeable ranks: raw bytes of each ordinary (not special) token -> its id."""
    unicode_to_byte = {ch: b for b, ch in gpt2_bytes_to_unicode().items()}
    ranks = {bpe_token_bytes(t, unicode_to_byte): i for t, i in ordinary}
    byte_merges = [(bpe_token_bytes(a, unicode_to_byte), bpe_token_bytes(b, unicode_to_byte)) for a, b in merges]
    check_ranks_follow_merges(ranks, byte_merges)
    return ranks


def stop_tokens(eos_token: str, special_tokens: dict[str, int]) -> list[str]:
    stops = [eos_token]
    stops += [t for t in KNOWN_STOP_TOKENS if t in special_tokens and t not in stops]
    return stops


def tokenizer_spec(
    *,
    pattern: str,
    special_tokens: dict[str, int],
    bos_token: Optional[str],
    eos_token: str,
    pad_token: Optional[str],
    add_bos: bool,
    chat_template: Optional[str],
) -> dict:
    """The sidecar next to a tiktoken tokenizer.model (schema shared with tokenizer.py)."""
    return {
        "pattern": pattern,
        "special_tokens": special_tokens,
        "bos_token": bos_token,
        "eos_token": eos_token,
        "pad_token": pad_token,
        "stop_tokens": stop_tokens(eos_token, special_tokens),
        "add_bos": add_bos,
        "chat_template": chat_template,
    }


def write_byte_level_bpe(out_dir: Path, ranks: dict[bytes, int], spec: dict) -> None:
    """The two files of a byte-level BPE vocabulary: tiktoken ranks and the sidecar."""
    write_tiktoken_model(out_dir / TOKENIZER_NAME, ranks)
    write_tokenizer_spec(out_dir / TOKENIZER_SPEC_NAME, spec)


# --------------------------------------------------------------------------------------------
# Tokenizer: SentencePiece from a GGUF vocabulary
# --------------------------------------------------------------------------------------------

NO_TOKEN_ID = -1  # SentencePiece's "this special token does not exist"


def sentencepiece_model_bytes(
    tokens: list[str],
    scores: list[float],
    token_types: list[int],
    *,
    unk_id: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    add_dummy_prefix: bool,
) -> bytes:
    """A SentencePiece ModelProto set up like Llama 2's: BPE with byte fallback, identity
    normalizer, whitespace kept. GGUF token types use SentencePiece's numbering (1 normal,
    2 unknown, 3 control, 4 user defined, 5 unused, 6 byte), so they carry over directly."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    model = sp_pb2.ModelProto()
    for piece, score, kind in zip(tokens, scores, token_types):
        model.pieces.add(piece=piece, score=score, type=kind)
    spec = model.trainer_spec
    spec.model_type = sp_pb2.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = sp_pb2.ModelProto.SentencePiece.BYTE in token_types
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = unk_id, bos_id, eos_id, pad_id
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = add_dummy_prefix
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return model.SerializeToString()


def is_sentencepiece_model(path: Path) -> bool:
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError):
        return False
    return True

