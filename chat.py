"""Chatting in the terminal: `python inference.py --chat` (cli.py starts it).

Two layers:

* `ChatSession` keeps a conversation (an optional system prompt, then user and assistant turns)
  and answers each new user message with a `TextStream`. Every turn encodes the whole dialog in
  the model's chat format, but only what the KV cache does not hold yet goes through the model:
  the cache still holds the previous prompt and answer, so normally just the new user turn and the
  assistant cue are prefilled (`LLaMa.stream(..., reuse_cache=True)`). When the history no longer
  fits in `max_seq_len` with room for an answer, the oldest exchanges are dropped (the cache is then
  refilled from where the dialog changed), and the answer says so in its `notices`.

* `run_chat` is the read-eval-print loop around it: it streams each answer as it comes, shows the
  speed after each answer, and understands a few commands (`/help`). Ctrl-C stops the current
  answer and keeps the session; Ctrl-D or /exit leaves.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Optional, TextIO

from chat_format import DialogError, Message
from decoding import check_speculate
from inference import LLaMa
from sampling import SamplingParams, refuse_loose_sampling_keywords, sampling_or_default
from streaming import FINISH_LENGTH, TextStream

# Per answer, unless told otherwise; also the room kept free for an answer when the history is
# trimmed to fit max_seq_len. Long enough for a few paragraphs.
DEFAULT_CHAT_MAX_GEN_LEN = 512

USER_PROMPT = "you> "
ASSISTANT_PREFIX = "assistant> "

HELP = """commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt (no TEXT: show it)
  /exit           leave (Ctrl-D too)
  /help           this text
Ctrl-C stops an answer and keeps the session."""


@dataclass
class Answer:
    """One answer being generated: iterate it (inside `with`) for text pieces."""

    session: "ChatSession"
    user_message: str
    stream: TextStream
    notices: list[str] = field(default_factory=list)  # e.g. "dropped the oldest exchange ..."
    shown: str = ""  # the pieces the caller has taken and handled (printed)
    started: float = 0.0
    seconds: float = 0.0

    def __enter__(self) -> "Answer":
        self.started = time.perf_counter()
        return self

    def __iter__(self) -> Iterator[str]:
        for piece in self.stream:
            yield piece
            # The caller asked for the next piece, so it has handled this one. A piece whose
            # printing Ctrl-C interrupted is not counted: the history keeps what the user saw.
            self.shown += piece

    def __exit__(self, *exc_info) -> bool:
        """Keep the exchange in the history: the whole answer, or what was shown before Ctrl-C."""
        self.seconds = time.perf_counter() - self.started
        self.session.record(self.user_message, self.shown)
        return False  # never swallow an exception (Ctrl-C is the caller's to report)

    def stats(self) -> str:
        n = len(self.stream.tokens)
        rate = n / self.seconds if self.seconds > 0 else 0.0
        prompt = len(self.stream.prompt_tokens)
        reused = self.stream.reused_tokens
        return (
            f"[{n} tokens in {self.seconds:.1f}s, {rate:.1f} tokens/s; "
            f"prompt {prompt} tokens: {prompt - reused} new, {reused} from the KV cache]"
        )


class ChatSession:
    """A conversation with a model, answering each user message with a stream."""

    def __init__(
        self,
        llama: LLaMa,
        system_prompt: Optional[str] = None,
        max_gen_len: int = DEFAULT_CHAT_MAX_GEN_LEN,
        sampling: Optional[SamplingParams] = None,
        speculate: int = 0,
        **loose_sampling_keywords,
    ):
        refuse_loose_sampling_keywords("ChatSession", loose_sampling_keywords)
        check_speculate(speculate, batch_size=1)
        self.llama = llama
        self.speculate = speculate  # prompt-lookup drafts per pass (decoding.py); 0 = off
        self.chat_format = llama.required_chat_format()
        if not isinstance(max_gen_len, int) or isinstance(max_gen_len, bool) or max_gen_len < 1:
            raise ValueError(f"max_gen_len must be an integer >= 1, got {max_gen_len!r}")
        self.max_gen_len = max_gen_len
        # Answer n is sampled with sampling.seed + n: a whole session replays exactly with the same seed.
        self.sampling = sampling_or_default(sampling, "ChatSession")
        self.system_prompt: Optional[str] = None
        self.messages: list[Message] = []  # user, assistant, user, assistant, ...
        self.n_answers = 0
        if system_prompt is not None:
            self.set_system(system_prompt)

    # -- the conversation --------------------------------------------------------------------------

    def dialog(self, user_message: Optional[str] = None, with_history: bool = True) -> list[Message]:
        """The dialog as the model sees it: system prompt, history, and the new user message."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        history = self.messages if with_history else []
        new = [{"role": "user", "content": user_message}] if user_message is not None else []
        return system + history + new

    def reset(self) -> None:
        self.messages = []

    def set_system(self, text: str) -> None:
        """Use `text` as the system prompt from the next answer on (the history stays)."""
        if not text.strip():
            raise DialogError("the system prompt is empty")
        self.system_prompt = text

    def record(self, user_message: str, answer: str) -> None:
        """Add one exchange to the history; an empty answer (stopped at once) is not kept."""
        if answer.strip():
            self.messages += [{"role": "user", "content": user_message}, {"role": "assistant", "content": answer}]

    # -- answering ---------------------------------------------------------------------------------

    def ask(self, user_message: str) -> Answer:
        """Start answering `user_message`; use as `with session.ask(text) as answer: for piece in answer: ...`.

        Raises DialogError (e.g. empty message) or ValueError (a message too long for max_seq_len)
        before anything is generated; the history is then unchanged.
        """
        max_seq_len = self.llama.args.max_seq_len
        alone = self.chat_format.encode_dialog_prompt(self.dialog(user_message, with_history=False))
        if len(alone) >= max_seq_len:
            raise ValueError(
                f"this message is {len(alone)} tokens with the system prompt, and max_seq_len={max_seq_len} "
                f"leaves no room for an answer: shorten it (or start with a larger --max-seq-len)"
            )
        notices = []
        prompt = self.chat_format.encode_dialog_prompt(self.dialog(user_message))
        dropped = 0
        while len(prompt) + self.max_gen_len > max_seq_len and self.messages:
            del self.messages[:2]  # the oldest user message and its answer
            dropped += 1
            prompt = self.chat_format.encode_dialog_prompt(self.dialog(user_message))
        if dropped:
            notices.append(
                f"the conversation no longer fits in max_seq_len={max_seq_len} with room for an answer: "
                f"dropped the oldest {dropped} exchange{'s' if dropped > 1 else ''}"
            )
        max_gen_len = min(self.max_gen_len, max_seq_len - len(prompt))
        seed = None if self.sampling.seed is None else self.sampling.seed + self.n_answers
        self.n_answers += 1
        stream = self.llama.stream(prompt, max_gen_len, replace(self.sampling, seed=seed),
                                   stop_tokens=self.chat_format.stop_tokens, reuse_cache=True, speculate=self.speculate)
        return Answer(self, user_message, stream, notices)


# --------------------------------------------------------------------------------------------
# The read-eval-print loop
# --------------------------------------------------------------------------------------------


def run_chat(
    session: ChatSession,
    read_line: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
    info: TextIO = sys.stderr,
    banner: str = "",
) -> int:
    """Talk until /exit or end of input; returns the process exit code (0).

    Answers go to `out` as they are generated; notices and speed to `info`.
    """
    if banner:
        print(banner, file=info)
    print("Type a message, or /help for commands. Ctrl-C stops an answer; Ctrl-D or /exit leaves.", file=info)
    while True:
        try:
            line = read_line(USER_PROMPT)
        except EOFError:  # Ctrl-D
            print(file=out)
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, as in Python's REPL
            print(file=out)
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if run_command(session, text, info) == "exit":
                return 0
            continue
        try:
            answer_turn(session, text, out, info)
        except KeyboardInterrupt:  # Ctrl-C before the answer began or after it ended
            print(" [stopped]", file=out, flush=True)


def answer_turn(session: ChatSession, text: str, out: TextIO, info: TextIO) -> None:
    """Stream the answer to one user message; Ctrl-C stops it, and what was shown is kept."""
    try:
        answer = session.ask(text)
    except ValueError as e:  # DialogError too: an empty message, a forged Llama 2 tag, too long
        print(f"error: {e}", file=info)
        return
    for notice in answer.notices:
        print(f"({notice})", file=info)
    print(ASSISTANT_PREFIX, end="", file=out, flush=True)
    try:
        with answer:
            for piece in answer:
                print(piece, end="", file=out, flush=True)
    except KeyboardInterrupt:
        print(" [stopped]", end="", file=out)
    print(file=out, flush=True)
    if answer.stream.finish_reason == FINISH_LENGTH:
        print(f"(the answer reached its limit of {session.max_gen_len} tokens: --max-gen-len)", file=info)
    print(answer.stats(), file=info, flush=True)


def run_command(session: ChatSession, text: str, info: TextIO) -> Optional[str]:
    """Carry out one /command; returns "exit" for /exit."""
    command, _, argument = text.partition(" ")
    argument = argument.strip()
    if command in ("/exit", "/quit"):
        return "exit"
    if command == "/reset":
        session.reset()
        print("(conversation cleared)", file=info)
    elif command == "/system":
        if not argument:
            print(f"(system prompt: {session.system_prompt or default_system_description(session)})", file=info)
        else:
            session.set_system(argument)
            print("(system prompt set)", file=info)
    elif command == "/help":
        print(HELP, file=info)
    else:
        print(f"unknown command {command}; type /help for the list", file=info)
    return None


def default_system_description(session: ChatSession) -> str:
    default = getattr(session.chat_format, "default_system_prompt", None)
    return f"none; the model's template default applies: {default!r}" if default else "none"


def enable_line_editing() -> None:
    """Arrow keys and history in `input()`, where the readline module exists (not on Windows)."""
    try:
        import readline  # noqa: F401  (importing it is what turns line editing on)
    except ImportError:
        pass
