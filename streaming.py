"""Streaming: generated ids -> text, one token at a time, with stop strings and finish reasons.

The decode loop (`LLaMa.decode` in inference.py) makes one column of token ids per step. Turning
them into text *while* they come needs three small pieces, each a class below:

* `StreamDecoder`: ids -> text pieces that never split a character (a character may be spelled by
  several tokens; SentencePiece's leading space depends on what came before);
* `TextTracker`: one row's text as it grows, watched for stop strings: a piece that might be the
  beginning of a stop string is held back until the next token decides;
* `GenerationRow`: one row of a batch: its tokens, log-probabilities, text, and why it ended
  (`finish_reason`, OpenAI's names: "stop" for a stop token or string, "length" for running out
  of room or of `max_gen_len`).

`TextStream` puts them together for one prompt: iterate it for text pieces as the decode loop
makes tokens (`LLaMa.stream`, the chat REPL).

Shapes: B rows in a batch, V vocabulary.
"""

from dataclasses import dataclass, field
from typing import AbstractSet, Iterator, Optional, Sequence

from tokenizer import REPLACEMENT_CHARACTER, Tokenizer

# Why a generation ended (the names OpenAI's API uses).
FINISH_STOP = "stop"  # a stop token (end of text, end of turn) or a stop string
FINISH_LENGTH = "length"  # max_gen_len tokens, or the end of max_seq_len


# --------------------------------------------------------------------------------------------
# Decoding ids while they are generated
# --------------------------------------------------------------------------------------------


class StreamDecoder:
    """Turns generated ids into text one token at a time, never splitting a character.

    Decoding token by token does not work: one character may be spelled by several tokens (an
    emoji is four byte tokens "<0xF0><0x9F><0xA6><0x99>" in Llama 2, and byte-level BPE tokens can
    end mid-character), and SentencePiece drops the space of a sequence's first "▁word" but keeps
    it mid-sentence. So we decode a short *window* of recent ids and emit what it adds to the
    window's already-emitted head (the method of vLLM's `detokenize_incrementally` and Hugging
    Face's `TextStreamer`):

        head   = ids[head_start:emitted_end]   already shown; decoded again for context
        window = ids[head_start:]              head plus the ids not yet shown
        new    = decode(window)[len(decode(head)):]

    While `decode(window)` ends in U+FFFD the last character is still incomplete: nothing is
    emitted and the window grows. Otherwise `new` is emitted and the window slides forward: the
    ids just emitted become the next head. The head is always whole characters, so its text is a
    prefix of the window's. `flush()` emits what is held back when generation ends (a dangling
    partial character becomes U+FFFD, as in `decode`). Joined, the pieces equal
    `tokenizer.decode(all ids)`.

    One SentencePiece subtlety: decode skips control tokens (<s>, </s>) and drops the space of the
    first *other* piece. A head of control tokens only would let that drop hit a new "▁word" that
    is mid-sentence in the full text, so such a head is not taken: the window keeps its old head.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.head_start = 0  # first id of the window
        self.emitted_end = 0  # ids before this one have been emitted

    def feed(self, token: int) -> str:
        """Add one id; return the text it completes (often "", while a character is incomplete)."""
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character shows as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.emitted_end == len(self.ids):
            return ""
        head = self.tokenizer.decode(self.ids[self.head_start : self.emitted_end])
        window = self.tokenizer.decode(self.ids[self.head_start :])
        if window.endswith(REPLACEMENT_CHARACTER) and not final:
            return ""  # the last character is not complete yet
        assert window.startswith(head), (head, window)  # the head is whole characters
        new_head = self.ids[self.emitted_end :]
        if not all(self.tokenizer.is_control(i) for i in new_head):
            self.head_start = self.emitted_end
        self.emitted_end = len(self.ids)
        return window[len(head) :]


# --------------------------------------------------------------------------------------------
# Stop strings
# --------------------------------------------------------------------------------------------


def first_stop(text: str, stop: Sequence[str]) -> Optional[int]:
    """Where the earliest stop string begins in `text`, or None."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def partial_stop_len(text: str, stop: Sequence[str]) -> int:
    """The length of the longest end of `text` that could be the beginning of a stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class TextTracker:
    """One row's generated text as it grows: decoded safely, and watched for stop strings.

    `feed(token)` returns the text that may be shown now: whole characters only (see
    `StreamDecoder`), and never what might be the start of a stop string: with stop
    "\\nUser:", a "\\nUser" waits until the next token shows whether ":" follows. When a stop
    string appears, the text ends right before it and `stopped` turns true.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]):
        self.decoder = StreamDecoder(tokenizer)
        self.stop = stop
        self.text = ""  # shown so far
        self.pending = ""  # decoded, held back
        self.stopped = False

    def feed(self, token: int) -> str:
        return self._release(self.decoder.feed(token), final=False)

    def finish(self) -> str:
        """The text held back until the end (none after a stop string)."""
        if self.stopped:
            return ""
        return self._release(self.decoder.flush(), final=True)

    def _release(self, new_text: str, final: bool) -> str:
        self.pending += new_text
        cut = first_stop(self.pending, self.stop)
        if cut is not None:
            self.stopped = True
        else:
            cut = len(self.pending) - (0 if final else partial_stop_len(self.pending, self.stop))
        piece, self.pending = self.pending[:cut], ("" if self.stopped else self.pending[cut:])
        self.text += piece
        return piece


# --------------------------------------------------------------------------------------------
# What generation makes: per row, per stream
# --------------------------------------------------------------------------------------------


@dataclass
class Generation:
    """What `LLaMa.generate` made for one prompt."""

    tokens: list[int]  # generated ids (with the prompt in front if echo)
    logprobs: Optional[list[float]]  # log-probability of each of those tokens, if asked for
    text: str = ""  # the decoded tokens, ending before the first stop string if one appeared
    finish_reason: Optional[str] = None  # FINISH_STOP or FINISH_LENGTH


@dataclass
class GenerationRow:
    """What one row of a batch has made so far, and why it ended."""

    text: TextTracker
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: Optional[str] = None  # FINISH_STOP or FINISH_LENGTH once the row has ended

    def add(self, token: int, logprob: Optional[float], stop_tokens: AbstractSet[int]) -> None:
        """Take the row's next token, unless the row has ended already."""
        if self.finish_reason is not None:
            return
        if token in stop_tokens:  # the stop token itself is not part of the output
            self.finish_reason = FINISH_STOP
            return
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.text.feed(token)
        if self.text.stopped:
            self.finish_reason = FINISH_STOP

    def finish(self) -> None:
        self.text.finish()
        if self.finish_reason is None:
            self.finish_reason = FINISH_LENGTH

    def to_generation(
        self, echo_prompt: Optional[list[int]], prompt_logprobs: Optional[list[float]], logprobs: bool,
        tokenizer: Tokenizer,
    ) -> Generation:
        tokens, scores, text = self.tokens, self.logprobs, self.text.text
        if echo_prompt is not None:
            # Decode prompt and output together (SentencePiece spaces depend on what comes first),
            # then drop what followed a stop string: the output's text ends the whole text.
            full = tokenizer.decode(echo_prompt + tokens)
            dropped = len(tokenizer.decode(tokens)) - len(text)
            tokens, text = echo_prompt + tokens, full[: len(full) - dropped]
            scores = (prompt_logprobs or [0.0] * len(echo_prompt)) + scores
        return Generation(tokens=tokens, logprobs=scores if logprobs else None, text=text,
                          finish_reason=self.finish_reason)


def follow(decoding, rows: list[GenerationRow], stop_tokens: AbstractSet[int]) -> Iterator:
    """Run `decoding` (an `inference.Decoding`) for `rows`, one GenerationRow per prompt: each step's
    tokens (and log-probabilities) go to their rows, then the step is yielded, so that a caller can
    show what the rows have made so far. It ends when every row has ended (no forward pass is
    wasted) or the decoding runs out of room; then every row is finished (`finish_reason` set)."""
    for step in decoding:
        step_logprobs = step.logprobs.tolist() if step.logprobs is not None else [None] * len(rows)
        for row, token, logprob in zip(rows, step.tokens.tolist(), step_logprobs):
            row.add(token, logprob, stop_tokens)
        yield step
        if all(row.finish_reason is not None for row in rows):
            break
    for row in rows:
        row.finish()


def token_texts(tokenizer: Tokenizer, tokens: list[int]) -> list[str]:
    """The text each token adds, so that the texts join into the decoded whole; a character spelled
    by several tokens goes to the token that completes it (the others get "")."""
    decoder = StreamDecoder(tokenizer)
    texts = [decoder.feed(t) for t in tokens]
    if texts:
        texts[-1] += decoder.flush()
    return texts


class TextStream:
    """The answer to one prompt while it is generated: iterate over it for text pieces.

    Also readable during and after the loop: `tokens` (generated ids so far, stop token
    excluded), `text` (the text shown so far), `finish_reason` (FINISH_STOP, FINISH_LENGTH, or
    None while running or after an interruption), `prompt_tokens`, and `reused_tokens` (leading
    prompt ids whose keys/values came from the KV cache instead of the model).

    Built on the public decode loop: `decoding` is what `LLaMa.decode` returns for this one prompt.
    Nothing runs until iteration starts.
    """

    def __init__(
        self,
        decoding: "Decoding",  # noqa: F821 (inference.Decoding: the decode loop stands above this file)
        tokenizer: Tokenizer,
        stop: Sequence[str],
        stop_tokens: AbstractSet[int],
    ):
        self.decoding = decoding
        self.prompt_tokens: list[int] = decoding.prompt_tokens[0]
        self.finish_reason: Optional[str] = None
        self._row = GenerationRow(TextTracker(tokenizer, stop))
        self._pieces = self._generate(stop_tokens)

    @property
    def tokens(self) -> list[int]:
        return self._row.tokens

    @property
    def text(self) -> str:
        return self._row.text.text

    @property
    def reused_tokens(self) -> int:
        return self.decoding.reused_tokens

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def _generate(self, stop_tokens: AbstractSet[int]) -> Iterator[str]:
        row = self._row
        shown = 0
        for _ in follow(self.decoding, [row], stop_tokens):
            if len(row.text.text) > shown:
                yield row.text.text[shown:]
                shown = len(row.text.text)
        self.finish_reason = row.finish_reason
        if len(row.text.text) > shown:  # what the end released (a held-back partial stop string)
            yield row.text.text[shown:]
