"""Chat formats: how a dialog becomes the token ids a chat model was fine-tuned on.

A chat model is still a next-token predictor. Fine-tuning taught it one particular way of writing
a conversation down, with markers for who speaks and where each turn ends; to chat we write the
dialog exactly that way and leave it open at the start of the assistant's turn (the *cue*). The
model then writes the answer and closes the turn with an end-of-turn token, where we stop.

Three formats, with the text they make for [system "S", user "Q", assistant "A", user "R"]
(`<x>` is the special token x, not its text):

* **Llama 2** (Meta's `llama/generation.py`, `chat_completion`): each user/assistant exchange is
  one BOS...EOS sequence, and the system prompt goes inside the first user turn.
      <s>[INST] <<SYS>>\\nS\\n<</SYS>>\\n\\nQ [/INST] A </s><s>[INST] R [/INST]
  The tags are plain text here (SentencePiece has no control tokens for them), so a message that
  contains one could forge a turn: Meta answers such dialogs with an error, and so do we.

* **Llama 3** (Meta's `llama_models/llama3/chat_format.py`, `ChatFormat.encode_dialog_prompt`):
      <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\nS<|eot_id|>
      <|start_header_id|>user<|end_header_id|>\\n\\nQ<|eot_id|> ... <|start_header_id|>assistant<|end_header_id|>\\n\\n

* **ChatML** (SmolLM2, Qwen, ...; the model's own jinja `chat_template`):
      <|im_start|>system\\nS<|im_end|>\\n<|im_start|>user\\nQ<|im_end|>\\n ... <|im_start|>assistant\\n
  SmolLM2's template adds a default system prompt when the dialog has none; we read it from the
  template text that came with the model (see `chatml_default_system_prompt`).

In Llama 3 and ChatML the markers are special tokens, and message text is encoded with special
tokens *disallowed*, so "<|eot_id|>" typed by a user is just text and can never end a turn.

Which format a tokenizer speaks is decided from its content by `chat_format_for(tokenizer)` at the
end of this file, never from a file or model name. `LLaMa` holds the chosen format
(`LLaMa.chat_format`), as Meta's Llama 3 generator holds its formatter.

A dialog is a list of `{"role": "system" | "user" | "assistant", "content": str}`: an optional
system message first, then user and assistant alternating, ending with the user (whose message the
model answers). Anything else is a `DialogError` naming the message at fault.
"""

from __future__ import annotations

import re
from typing import Literal, Optional, Sequence, TypedDict

from tokenizer import KIND_SENTENCEPIECE, NO_TOKEN_ID, Tokenizer

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


class Message(TypedDict):
    role: Role
    content: str


Dialog = list[Message]

# Keys `LLaMa.chat_completion(..., logprobs=True)` adds to the messages it returns; such a message
# may be appended to the dialog as it is, so these keys are accepted (and ignored) in dialogs.
ANSWER_EXTRA_KEYS = ("tokens", "logprobs")


class DialogError(ValueError):
    """A dialog that cannot be written in the chat format; the message names the culprit."""


# --------------------------------------------------------------------------------------------
# Checking a dialog
# --------------------------------------------------------------------------------------------


def check_dialog(dialog: object) -> None:
    """Raise a DialogError unless `dialog` is [system?] user (assistant user)*."""
    if not isinstance(dialog, (list, tuple)):
        raise DialogError(f"a dialog must be a list of messages, got {type(dialog).__name__}")
    if len(dialog) == 0:
        raise DialogError("the dialog is empty: give at least one user message")
    for i, message in enumerate(dialog):
        check_message(i, message)

    first_turn = 1 if dialog[0]["role"] == "system" else 0
    if first_turn == len(dialog):
        raise DialogError("the dialog has only a system message: add a user message for the model to answer")
    for i in range(first_turn, len(dialog)):
        role = dialog[i]["role"]
        expected = "user" if (i - first_turn) % 2 == 0 else "assistant"
        if role == "system":
            raise DialogError(f"message {i} is a system message: only the first message may be one")
        if role != expected:
            raise DialogError(
                f"message {i} is from the {role}, expected the {expected}: after an optional system "
                f"message, user and assistant must alternate, starting with the user"
            )
    if dialog[-1]["role"] != "user":
        raise DialogError(
            f"the dialog ends with an assistant message (message {len(dialog) - 1}): the last message "
            f"must be the user's, which the model then answers"
        )


def check_message(i: int, message: object) -> None:
    if not isinstance(message, dict):
        raise DialogError(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
    missing = [key for key in ("role", "content") if key not in message]
    if missing:
        raise DialogError(f"message {i} has no {' or '.join(repr(k) for k in missing)}: {message!r}"[:200])
    unknown = sorted(set(message) - {"role", "content", *ANSWER_EXTRA_KEYS})
    if unknown:
        raise DialogError(f"message {i} has unknown key(s) {unknown}; a message has 'role' and 'content'")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise DialogError(f"message {i} has role {role!r}; the roles are {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise DialogError(f"message {i} ({role}) has content of type {type(content).__name__}, expected a string")
    if not content.strip():
        raise DialogError(f"message {i} ({role}) has empty content: say something, or leave the message out")


# --------------------------------------------------------------------------------------------
# The formats
# --------------------------------------------------------------------------------------------


class ChatFormat:
    """Writes a dialog as token ids. Subclasses implement `encode_dialog_prompt` for one format.

    Attributes:
        name: "llama2", "llama3" or "chatml".
        stop_tokens: ids that end the assistant's turn; generation stops at any of them.
    """

    name: str

    def __init__(self, tokenizer: "Tokenizer"):
        self.tokenizer = tokenizer
        self.stop_tokens: set[int] = set(tokenizer.stop_tokens)

    def encode_dialog_prompt(self, dialog: Sequence[Message]) -> list[int]:
        """The ids of the whole dialog, ending with the cue for the assistant's turn."""
        raise NotImplementedError

    def special_id(self, token: str) -> int:
        """The id of a special token this format needs; the tokenizer was chosen because it has it."""
        return self.tokenizer.special_tokens[token]

    def text(self, s: str) -> list[int]:
        """Ordinary text: no BOS/EOS, and special-token text stays text."""
        return self.tokenizer.encode(s, bos=False, eos=False)


# Llama 2 ------------------------------------------------------------------------------------

# Meta's constants (llama/generation.py).
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
LLAMA2_SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]


class Llama2ChatFormat(ChatFormat):
    """Meta's Llama 2 `chat_completion` format: one <s>[INST] user [/INST] answer </s> per exchange."""

    name = "llama2"

    def __init__(self, tokenizer: "Tokenizer"):
        super().__init__(tokenizer)
        self.stop_tokens.add(tokenizer.eos_id)  # the answer ends with </s>

    def encode_dialog_prompt(self, dialog: Sequence[Message]) -> list[int]:
        check_dialog(dialog)
        for i, message in enumerate(dialog):
            tags = [tag for tag in LLAMA2_SPECIAL_TAGS if tag in message["content"]]
            if tags:
                raise DialogError(
                    f"message {i} ({message['role']}) contains {tags[0]!r}, a Llama 2 control tag: in this "
                    f"format tags are plain text and would let the message forge a turn; remove it"
                )
        if dialog[0]["role"] == "system":  # the system prompt goes inside the first user message
            first_user = B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]
            dialog = [{"role": "user", "content": first_user}, *dialog[2:]]

        ids: list[int] = []
        for user, answer in zip(dialog[0::2], dialog[1::2]):
            exchange = f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} "
            ids += self.tokenizer.encode(exchange, bos=True, eos=True)
        ids += self.tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
        return ids


# Llama 3 ------------------------------------------------------------------------------------

LLAMA3_HEADER_START = "<|start_header_id|>"
LLAMA3_HEADER_END = "<|end_header_id|>"
LLAMA3_END_OF_TURN = "<|eot_id|>"
LLAMA3_HEADER_SEPARATOR = "\n\n"  # between a header and the message text


class Llama3ChatFormat(ChatFormat):
    """Meta's Llama 3 `ChatFormat`: a header naming the role, the text, then <|eot_id|>."""

    name = "llama3"

    def __init__(self, tokenizer: "Tokenizer"):
        super().__init__(tokenizer)
        self.stop_tokens.add(self.special_id(LLAMA3_END_OF_TURN))

    def encode_header(self, role: str) -> list[int]:
        return [
            self.special_id(LLAMA3_HEADER_START),
            *self.text(role),
            self.special_id(LLAMA3_HEADER_END),
            *self.text(LLAMA3_HEADER_SEPARATOR),
        ]

    def encode_message(self, message: Message) -> list[int]:
        # Meta's llama-models 0.3.0 keeps the content as it is (no strip()), and so do we.
        return self.encode_header(message["role"]) + self.text(message["content"]) + [self.special_id(LLAMA3_END_OF_TURN)]

    def encode_dialog_prompt(self, dialog: Sequence[Message]) -> list[int]:
        check_dialog(dialog)
        ids = [self.tokenizer.bos_id]
        for message in dialog:
            ids += self.encode_message(message)
        return ids + self.encode_header("assistant")  # the cue: the model writes the answer next


# ChatML -------------------------------------------------------------------------------------

CHATML_START = "<|im_start|>"
CHATML_END = "<|im_end|>"
CHATML_TURN_SEPARATOR = "\n"  # after each <|im_end|>

# A default system turn written as a literal in a ChatML jinja template, e.g. SmolLM2's
#   {{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\n' }}
# The newline is a real one in the template text, or the escape "\n" inside a jinja string.
_CHATML_DEFAULT_SYSTEM = re.compile(
    re.escape(CHATML_START) + r"system(?:\n|\\n)(?P<prompt>[^{}]*?)" + re.escape(CHATML_END)
)


def chatml_default_system_prompt(chat_template: Optional[str]) -> Optional[str]:
    """The system prompt a ChatML template writes when the dialog has none, or None.

    Only a literal system turn counts: a turn built from `message['content']` holds jinja
    expressions (braces), which the pattern does not match.
    """
    if not chat_template:
        return None
    match = _CHATML_DEFAULT_SYSTEM.search(chat_template)
    if match is None:
        return None
    return match.group("prompt").replace("\\n", "\n")


class ChatMLFormat(ChatFormat):
    """ChatML: <|im_start|>role\\ntext<|im_end|>\\n per message; no BOS."""

    name = "chatml"

    def __init__(self, tokenizer: "Tokenizer", default_system_prompt: Optional[str]):
        super().__init__(tokenizer)
        self.default_system_prompt = default_system_prompt
        self.stop_tokens.add(self.special_id(CHATML_END))

    def encode_message(self, role: str, content: str) -> list[int]:
        # One text piece from <|im_start|> to <|im_end|>: exactly the span a tokenizer that splits
        # the rendered template at special tokens (Hugging Face's) encodes in one go.
        return [
            self.special_id(CHATML_START),
            *self.text(f"{role}\n{content}"),
            self.special_id(CHATML_END),
            *self.text(CHATML_TURN_SEPARATOR),
        ]

    def encode_dialog_prompt(self, dialog: Sequence[Message]) -> list[int]:
        check_dialog(dialog)
        ids: list[int] = []
        if dialog[0]["role"] != "system" and self.default_system_prompt is not None:
            ids += self.encode_message("system", self.default_system_prompt)
        for message in dialog:
            ids += self.encode_message(message["role"], message["content"])
        return ids + [self.special_id(CHATML_START), *self.text("assistant\n")]


# --------------------------------------------------------------------------------------------
# Choosing the format from the vocabulary
# --------------------------------------------------------------------------------------------


class NoChatFormatError(ValueError):
    """A vocabulary without chat markers was asked to encode a dialog."""


def chat_format_for(tokenizer: Tokenizer, required: bool = False) -> Optional[ChatFormat]:
    """The chat format a vocabulary was made for, read from its content.

    SentencePiece is Llama 2's tokenizer; Llama 3's header tokens mean Llama 3's format (also when
    a converted Hugging Face Llama 3 vocabulary comes with a sidecar); <|im_start|>/<|im_end|> mean
    ChatML, with the default system prompt of the model's own template. Otherwise None, or with
    required=True an error saying why this vocabulary cannot encode a dialog.
    """
    if tokenizer.kind == KIND_SENTENCEPIECE:
        return Llama2ChatFormat(tokenizer)
    special = tokenizer.special_tokens
    llama3_markers = (LLAMA3_HEADER_START, LLAMA3_HEADER_END, LLAMA3_END_OF_TURN)
    if all(t in special for t in llama3_markers) and tokenizer.bos_id != NO_TOKEN_ID:
        return Llama3ChatFormat(tokenizer)
    if CHATML_START in special and CHATML_END in special:
        return ChatMLFormat(tokenizer, chatml_default_system_prompt(tokenizer.chat_template))
    if required:
        raise NoChatFormatError(
            f"{tokenizer.model_path}: this vocabulary has no chat format (neither Llama 3's header tokens nor "
            f"ChatML's {CHATML_START}/{CHATML_END}): it cannot encode a dialog; use text completion"
        )
    return None
