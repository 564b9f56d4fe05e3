"""The chat REPL: `python inference.py --chat` driven through a pseudo-terminal, and ChatSession.

- The real demo model (SmolLM2-135M-Instruct) in a pty with pexpect: two turns where the second
  needs the first, Ctrl-C in the middle of an answer (the session lives on), /reset, /exit.
- ChatSession on a tiny random model: history trimmed to max_seq_len with a notice, a message
  too long for any answer, commands, and an answer interrupted while it is printed.
"""

import io
import os
import re
import sys
from pathlib import Path

import pytest

from chat import ChatSession, run_chat
from chat_format import DialogError
from conftest import LLAMA2_TOKENIZER
from inference import LLaMa
from sampling import SamplingParams
from tiny import write_tiny_llama2_checkpoint

ROOT = Path(__file__).resolve().parent.parent
STATS = r"\[\d+ tokens in [\d.]+s"  # the line after each answer
# Generous: the first expect includes loading the model, and CI machines are slow and shared.
PTY_TIMEOUT_S = 600


# --------------------------------------------------------------------------------------------
# The real thing, in a pseudo-terminal
# --------------------------------------------------------------------------------------------


def test_chat_repl_in_a_terminal(demo_ckpt):
    pexpect = pytest.importorskip("pexpect")
    command = [str(ROOT / "inference.py"), "--chat", "--ckpt-dir", str(demo_ckpt), "--temperature", "0",
               "--max-gen-len", "24", "--max-seq-len", "1024", "--dtype", "float32", "--device", "cpu"]
    env = {**os.environ, "TERM": "dumb"}  # no colour or bracketed-paste escapes from readline
    child = pexpect.spawn(sys.executable, command, cwd=str(ROOT), env=env, encoding="utf-8", timeout=PTY_TIMEOUT_S)
    try:
        child.expect_exact("you> ")

        def say(message: str) -> str:
            """Send one message; return the answer text once the next prompt shows."""
            child.sendline(message)
            child.expect_exact("assistant> ")
            child.expect(STATS)
            answer = child.before
            child.expect_exact("you> ")
            return answer

        say("My name is Alice. Please remember it.")
        assert "Alice" in say("What is my name?")  # the second turn sees the first

        child.sendline("Count from 1 to 100, one number per line.")
        child.expect_exact("assistant> ")
        child.expect(r"\S")  # the answer has begun ...
        child.sendintr()  # ... Ctrl-C
        child.expect_exact("[stopped]")
        child.expect(STATS)
        child.expect_exact("you> ")  # the session is still alive

        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.expect_exact("you> ")
        assert "Alice" not in say("What is my name?")  # forgotten

        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before


# --------------------------------------------------------------------------------------------
# ChatSession and run_chat on a tiny random model (Llama 2 format)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    ckpt = write_tiny_llama2_checkpoint(tmp_path_factory.mktemp("tiny"), LLAMA2_TOKENIZER)
    return LLaMa.build(ckpt, max_seq_len=128, max_batch_size=1, device="cpu", dtype="float32", progress=False)


def answer(session: ChatSession, message: str):
    with session.ask(message) as a:
        text = "".join(a)
    return a, text


def test_history_is_trimmed_to_max_seq_len_with_a_notice(tiny_llama):
    session = ChatSession(tiny_llama, system_prompt="Answer briefly.", max_gen_len=20, sampling=SamplingParams(temperature=0))
    message = "Tell me about the weather in Paris in spring, please."
    notices = []
    for _ in range(6):
        a, _ = answer(session, message)
        notices += a.notices
        prompt = len(a.stream.prompt_tokens)
        assert prompt + session.max_gen_len <= tiny_llama.args.max_seq_len
    assert notices and "dropped the oldest" in notices[0] and "max_seq_len=128" in notices[0]
    assert session.dialog()[0] == {"role": "system", "content": "Answer briefly."}  # the system prompt stays


def test_a_message_too_long_for_any_answer_is_refused_and_the_history_kept(tiny_llama):
    session = ChatSession(tiny_llama, max_gen_len=8, sampling=SamplingParams(temperature=0))
    answer(session, "Hello there")
    history = list(session.messages)
    with pytest.raises(ValueError, match="leaves no room for an answer"):
        session.ask("word " * 200)
    with pytest.raises(DialogError, match="empty content"):
        session.ask("   ")
    assert session.messages == history


def test_an_empty_answer_is_not_kept():
    session = ChatSession.__new__(ChatSession)
    session.messages = []
    session.record("hi", "   ")
    assert session.messages == []


class InterruptingOutput(io.StringIO):
    """A terminal where the user presses Ctrl-C after `pieces` writes of answer text."""

    def __init__(self, pieces: int):
        super().__init__()
        self.pieces_left = pieces

    def write(self, s: str) -> int:
        if s and not s.startswith(("assistant> ", "\n", " [stopped]")):
            self.pieces_left -= 1
            if self.pieces_left < 0:
                raise KeyboardInterrupt
        return super().write(s)


def test_ctrl_c_while_printing_keeps_the_session_and_what_was_shown(tiny_llama):
    session = ChatSession(tiny_llama, max_gen_len=30, sampling=SamplingParams(temperature=0))
    lines = iter(["Tell me a long story", "/exit"])
    out, info = InterruptingOutput(pieces=3), io.StringIO()
    assert run_chat(session, read_line=lambda prompt: next(lines), out=out, info=info) == 0
    assert "[stopped]" in out.getvalue()
    (user, assistant) = session.messages
    assert user["content"] == "Tell me a long story"
    assert assistant["content"] and assistant["content"] in out.getvalue()  # what was shown is kept


def test_commands_and_end_of_input(tiny_llama):
    session = ChatSession(tiny_llama, max_gen_len=4, sampling=SamplingParams(temperature=0))
    script = ["hello", "/system You are terse.", "/system", "/reset", "/help", "/bogus", "", "/system  "]

    def read_line(prompt: str) -> str:
        if not script:
            raise EOFError  # Ctrl-D
        line = script.pop(0)
        if line == "":
            raise KeyboardInterrupt  # Ctrl-C at the prompt: a fresh prompt, nothing else
        return line

    out, info = io.StringIO(), io.StringIO()
    assert run_chat(session, read_line=read_line, out=out, info=info) == 0
    log = info.getvalue()
    assert re.search(STATS, log)
    assert "(system prompt set)" in log and "(system prompt: You are terse.)" in log
    assert "(conversation cleared)" in log and "/reset" in log  # /help lists the commands
    assert "unknown command /bogus" in log
    assert session.messages == [] and session.system_prompt == "You are terse."


def test_a_session_with_a_seed_replays_exactly(tiny_llama):
    def run() -> list[str]:
        session = ChatSession(tiny_llama, max_gen_len=8, sampling=SamplingParams(temperature=1.0, seed=3))
        return [answer(session, m)[1] for m in ("Hi", "And then?")]

    assert run() == run()


@pytest.mark.parametrize("kwargs, sampling, message", [
    (dict(max_gen_len=0), {}, "max_gen_len"),
    ({}, dict(top_k=0), "top_k"),
    ({}, dict(temperature=-1), "temperature"),
    ({}, dict(stop="\n"), "stop must be a list"),
    (dict(system_prompt=" "), {}, "system prompt is empty"),
])
def test_bad_session_settings_fail_at_once(tiny_llama, kwargs, sampling, message):
    with pytest.raises(ValueError, match=message):
        ChatSession(tiny_llama, sampling=SamplingParams(**sampling), **kwargs)


def test_a_session_takes_its_sampling_settings_as_one_value(tiny_llama):
    with pytest.raises(TypeError, match=r"sampling=SamplingParams\(temperature=0\)"):
        ChatSession(tiny_llama, temperature=0)
