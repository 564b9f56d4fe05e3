"""Text generation: load a checkpoint, then complete prompts in batches (`LLaMa`).

What happens between a prompt and its text (Meta's `generation.py`, restructured):

1. Encode each prompt (tokenizer.py; a dialog through its chat format, chat_format.py).
2. Run **the decode loop** (decoding.py): the prompts left-padded into one batch, a prefill pass
   through the model, then one new column of tokens per step, each sampled by sampling.py.
   `stream`, the chat REPL, `interpret.py why` and `bench.py` iterate `LLaMa.decode`; a list of
   prompts goes through its continuous form, the scheduler of batching.py (see below).
3. Rows stop independently at one of the tokenizer's stop tokens (or, in a chat, the format's
   end-of-turn tokens), or at an extra stop string; the run ends when every row has stopped or
   `max_gen_len` tokens were made. The stop token itself is not part of the output (streaming.py
   keeps each row's tokens, text and finish reason).

`speculate=N` drafts up to N tokens by prompt lookup and verifies them in one pass (decoding.py):
faster where the output repeats its input, the same greedy output. One prompt at a time.

On top of `generate` sit `text_completion` (text in, text out) and `chat_completion` (dialogs in,
assistant messages out). A list of prompts is *continuously batched* (batching.py): up to
`max_batch_size` run at once, and a row that ends is refilled with the next waiting prompt at once.
`stream` and `chat_stream` yield text pieces as they come; with `reuse_cache=True` a chat turn
runs only its new tokens through the model.

Sampling settings travel as one `sampling.SamplingParams` value; `text_completion` and
`chat_completion` keep Meta's keywords (`temperature`, `top_p`, ...) and make that value.

Command line (cli.py):  python inference.py --help
On N processes (tensor parallel, see tensor_parallel.py):  torchrun --nproc_per_node N inference.py ...
"""

import runpy
import sys
from pathlib import Path
from typing import AbstractSet, Callable, Optional, Sequence, Union

import torch

from batching import generate_continuously, make_row_decode_step, row_decode_step
from chat_format import ChatFormat, Dialog, DialogError, Message, chat_format_for
from checkpoint import (
    check_build_arguments,
    check_checkpoint_dir,
    check_vocab_matches,
    choose_device,
    choose_dtype,
    load_model_args,
    load_transformer,
    read_params,
)
from cpu import choose_threads
from decoding import (  # noqa: F401 (decode_step, log_prob_of: importable from here as before)
    DecodeStep,
    Decoding,
    KVCacheRecord,
    check_speculate,
    choose_static_cache,
    decode_step,
    log_prob_of,
    make_decode_step,
)
from model import ModelArgs, Transformer
from quantize import PLAIN, linear_storage
from sampling import (
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    NO_REPETITION_PENALTY,
    SamplingParams,
    refuse_loose_sampling_keywords,
    sampling_or_default,
)
from streaming import (  # noqa: F401 (FINISH_*: importable from here as before)
    FINISH_LENGTH,
    FINISH_STOP,
    Generation,
    GenerationRow,
    TextStream,
    TextTracker,
    follow,
    token_texts,
)
from tokenizer import InvalidTextError, Tokenizer

# The engine multiplies wq|wk|wv and w1|w3 as one matmul each (model.ModelArgs.fused_projections):
# the same numbers, in fewer calls.
FUSE_PROJECTIONS = True
DEFAULT_MAX_SEQ_LEN = 2048
DEFAULT_MAX_BATCH_SIZE = 4


class LLaMa:
    def __init__(
        self, model: Optional[Transformer], tokenizer: Tokenizer, args: ModelArgs, device: torch.device,
        tensor_parallel: Optional["TensorParallel"] = None,  # noqa: F821 (tensor_parallel.py builds on this file)
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.args = args
        self.device = device
        # How dialogs are written for this model, read from its vocabulary (None: it has no chat format).
        self.chat_format: Optional[ChatFormat] = chat_format_for(tokenizer)
        self.tensor_parallel = tensor_parallel  # None: the whole model is in this process
        self.kv_cache = KVCacheRecord()  # which ids the KV cache holds, for `reuse_cache`
        self.decode_step = decode_step  # or its compiled version: see `build(compile=True)`
        self.row_decode_step = row_decode_step  # the same, for rows at their own positions (batching.py)
        # What `build` chose, for the "loaded ..." line: the linear layers' storage (quantize.py).
        self.linear_storage: Optional[str] = None

    @staticmethod
    def build(
        ckpt_dir: Union[str, Path],
        tokenizer_path: Union[str, Path, None] = None,
        load_model: bool = True,
        max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        device: Union[str, torch.device, None] = None,
        dtype: Union[str, torch.dtype, None] = None,
        progress: bool = True,
        tensor_parallel: Optional["TensorParallel"] = None,  # noqa: F821
        quantize: Optional[str] = None,
        compile: bool = False,
        threads: Optional[int] = None,
        static_cache: Optional[bool] = None,
    ) -> "LLaMa":
        """Load a Meta checkpoint dir (params.json, consolidated.*.pth, tokenizer.model).

        device: None picks cuda, then mps, then cpu. dtype: None picks fp16 on GPUs, bf16 on CPU.
        Both accept a torch object or a string ("cuda:1", "bfloat16"). With load_model=False only
        the tokenizer and the args are loaded (`model` is None). With `tensor_parallel` (from
        `tensor_parallel.init_from_torchrun()`), this rank loads only its slice, on its own device.
        quantize: None, "int8" or "int4": weight-only quantization of the linear layers while
        loading (quantize.py). compile: `torch.compile` the decode step (the first generation then
        takes longer while it compiles). threads: CPU threads torch computes with (process-wide);
        None: every CPU this process may use, within its CPU quota (`cpu.default_threads`).
        static_cache: decode with the KV cache at fixed shapes (model.KVCache.update), which lets a
        compiled step run as one CUDA graph; None: on with compile on CUDA, off elsewhere (on a CPU
        it reads the whole cache each step).
        """
        check_build_arguments(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size,
                              load_model=load_model, progress=progress, compile=compile)
        if tensor_parallel is not None:
            if quantize is not None or compile:
                raise ValueError("quantize and compile are not supported with tensor parallel yet: run without them")
            device = tensor_parallel.device
        device = choose_device(device)
        dtype = choose_dtype(dtype, device, quantize)
        storage = linear_storage(device, dtype, quantize)  # a scheme this device cannot run is refused now
        torch.set_num_threads(choose_threads(threads))
        ckpt_dir = check_checkpoint_dir(ckpt_dir)
        read_params(ckpt_dir)  # a missing or broken params.json is reported before the tokenizer is read
        tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else ckpt_dir / "tokenizer.model"
        tokenizer = Tokenizer(tokenizer_path)
        args = load_model_args(ckpt_dir, max_seq_len, max_batch_size, vocab_size=tokenizer.n_words)
        if tensor_parallel is not None:
            tensor_parallel.check_args(args)  # e.g. a world size that does not divide n_kv_heads, on every rank
        model = None
        if load_model and tensor_parallel is None:
            model = load_transformer(ckpt_dir, args, device, dtype, progress=progress, quantize=quantize,
                                     fuse_projections=FUSE_PROJECTIONS)
        elif load_model:
            model = tensor_parallel.load_transformer(ckpt_dir, args, dtype, progress)
        # After loading: a params.json that disagrees with its own weights is named as that first.
        check_vocab_matches(tokenizer.n_words, tokenizer_path, args)
        llama = LLaMa(model, tokenizer, args, device, tensor_parallel)
        llama.linear_storage = storage if tensor_parallel is None else PLAIN  # tensor-parallel layers are plain
        static_cache = choose_static_cache(static_cache, device, compile)
        if static_cache and model is not None:
            model.setup_caches(device, dtype, zeroed=True)  # attended to whole: see model.KVCache.update
        llama.decode_step, llama.row_decode_step = make_decode_step(compile, static_cache), make_row_decode_step(compile)
        return llama

    # ----------------------------------------------------------------------------------------
    # The decode loop
    # ----------------------------------------------------------------------------------------

    def decode(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        sampling: Optional[SamplingParams] = None,
        logprobs: bool = False,
        prompt_logprobs: bool = False,
        reuse_cache: bool = False,
        generator: Optional[torch.Generator] = None,
        speculate: int = 0,
    ) -> "Decoding":
        """The decode loop over one batch (at most max_batch_size prompts): iterate the result for
        one `DecodeStep` per new column of tokens. Nothing runs until iteration starts.

        The loop never stops on its own before max_gen_len (or max_seq_len): the caller decides
        when it has what it needs (every row at a stop token, a stop string, enough text) and
        stops iterating; no forward pass is wasted. logprobs: each step also carries the
        log-probability of its tokens; prompt_logprobs: the Decoding's `prompt_logprobs` holds
        those of the prompt tokens once the prefill has run. reuse_cache (one prompt only): skip
        the prompt's longest prefix that the KV cache already holds (`kv_cache_tokens`).
        generator: the random generator to draw with (default: one seeded with sampling.seed).
        speculate (one prompt only): draft up to this many tokens per pass by prompt lookup (0: off).
        """
        sampling = sampling_or_default(sampling, "decode")
        self.check_can_generate(prompt_tokens, max_gen_len)
        if len(prompt_tokens) > self.args.max_batch_size:
            raise ValueError(f"decode runs one batch of at most max_batch_size={self.args.max_batch_size} prompts, "
                             f"got {len(prompt_tokens)}: generate splits longer lists")
        if reuse_cache and len(prompt_tokens) != 1:
            raise ValueError("reuse_cache is for a single prompt (the KV cache rows of a batch are not kept)")
        if generator is None:
            generator = self.random_generator(sampling.seed)
        return Decoding(self, prompt_tokens, max_gen_len, sampling, generator, logprobs, prompt_logprobs, reuse_cache,
                        speculate)

    def check_can_generate(self, prompt_tokens: list[list[int]], max_gen_len: int) -> None:
        if self.model is None:
            raise ValueError("this LLaMa was built with load_model=False: it has no model to generate with")
        if not isinstance(max_gen_len, int) or isinstance(max_gen_len, bool) or max_gen_len < 1:
            raise ValueError(f"max_gen_len must be an integer >= 1, got {max_gen_len!r}")
        if not isinstance(prompt_tokens, (list, tuple)) or len(prompt_tokens) == 0:
            raise ValueError("prompt_tokens must be a non-empty list of prompts, each a list of token ids")
        for i, prompt in enumerate(prompt_tokens):
            if not isinstance(prompt, (list, tuple)):
                raise ValueError(f"prompt {i} is a {type(prompt).__name__}, expected a list of token ids")
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} has no tokens: give at least one token (or a non-empty text)")
            self.check_token_ids(prompt, f"prompt {i}")
            if len(prompt) >= self.args.max_seq_len:
                raise ValueError(
                    f"prompt {i} is {len(prompt)} tokens, but max_seq_len={self.args.max_seq_len} leaves no room "
                    f"to generate: shorten it or raise max_seq_len"
                )

    def check_token_ids(self, tokens: Sequence[int], what: str) -> None:
        """Every id an int in [0, vocab_size), or one line naming `what`, the position and the id."""
        vocab_size = self.args.vocab_size
        for position, token in enumerate(tokens):
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab_size:
                raise ValueError(f"{what}: token id {token!r} at position {position} is not in the vocabulary "
                                 f"(an integer from 0 to {vocab_size - 1})")

    def random_generator(self, seed: Optional[int]) -> Optional[torch.Generator]:
        """A generator seeded with `seed`, or None for torch's global one."""
        return None if seed is None else torch.Generator(device=self.device).manual_seed(seed)

    @property
    def kv_cache_tokens(self) -> list[int]:
        """The ids whose keys/values row 0 of the KV cache holds, at positions 0, 1, ... ([] after a batch)."""
        return self.kv_cache.tokens

    def cached_prefix_len(self, prompt_tokens: list[int]) -> int:
        """How many leading ids of `prompt_tokens` the KV cache already holds (at most all but the last)."""
        return self.kv_cache.prefix_len(prompt_tokens)

    # ----------------------------------------------------------------------------------------
    # Generation from token ids
    # ----------------------------------------------------------------------------------------

    def generate(
        self, prompt_tokens: list[list[int]], max_gen_len: int, sampling: Optional[SamplingParams] = None,
        logprobs: bool = False, echo: bool = False, stop_tokens: Optional[AbstractSet[int]] = None,
        on_step: Optional[Callable[[list[GenerationRow]], None]] = None, speculate: int = 0,
        continuous: bool = True, **loose_sampling_keywords,
    ) -> list[Generation]:
        """Continue each list of prompt ids; one `Generation` per prompt, in order.

        Each has `tokens` (generated ids, with the prompt in front if echo), `text` (ending
        before the first of sampling.stop if one appeared), `finish_reason`, and with
        logprobs=True `logprobs` (one per token; the prompt's too with echo): the one way to get
        log-probabilities. stop_tokens: ids that end a row (not part of the output); default:
        the tokenizer's. on_step: called after every step with the `GenerationRow` of every prompt
        started so far (those of earlier batches finished), to show completions while they are made.
        speculate: prompt-lookup drafts per pass (decoding.py); the prompts then run one at a time.
        continuous: batch a list continuously (batching.py; prompt i samples with seed + i); False:
        in static batches of max_batch_size, one after the other (one generator for the whole run).
        """
        refuse_loose_sampling_keywords("generate", loose_sampling_keywords)
        sampling = sampling_or_default(sampling, "generate")
        self.check_can_generate(prompt_tokens, max_gen_len)
        check_speculate(speculate, batch_size=1)
        stop_tokens = self.tokenizer.stop_tokens if stop_tokens is None else stop_tokens
        if continuous and len(prompt_tokens) > 1 and not speculate and self.tensor_parallel is None:
            return generate_continuously(self, prompt_tokens, max_gen_len, sampling, logprobs, echo, stop_tokens,
                                         on_step)
        generator = self.random_generator(sampling.seed)  # one for all batches: a seed fixes the whole run
        results, rows_so_far = [], []
        batch_size = 1 if speculate else self.args.max_batch_size
        for start in range(0, len(prompt_tokens), batch_size):
            batch = prompt_tokens[start : start + batch_size]
            decoding = self.decode(batch, max_gen_len, sampling, logprobs=logprobs,
                                   prompt_logprobs=logprobs and echo, generator=generator, speculate=speculate)
            rows = [GenerationRow(TextTracker(self.tokenizer, sampling.stop)) for _ in batch]
            rows_so_far += rows
            for _ in follow(decoding, rows, stop_tokens):
                if on_step is not None:
                    on_step(rows_so_far)
            if on_step is not None:
                on_step(rows_so_far)  # every row of the batch finished: with what the end released
            results += self._generations(batch, rows, decoding.prompt_logprobs, logprobs, echo)
        return results

    def _generations(
        self, prompt_tokens: list[list[int]], rows: list[GenerationRow], prompt_logprobs: Optional[list[list[float]]],
        logprobs: bool, echo: bool,
    ) -> list[Generation]:
        """What each finished row of a batch made, with the prompt in front if echo."""
        prompt_len = max(len(p) for p in prompt_tokens)
        generations = []
        for i, (prompt, row) in enumerate(zip(prompt_tokens, rows)):
            head_logprobs = None
            if prompt_logprobs is not None:  # nothing predicts a prompt's first token: 0.0, as Meta's
                head_logprobs = [0.0] + prompt_logprobs[i][prompt_len - len(prompt) :]
            generations.append(row.to_generation(prompt if echo else None, head_logprobs, logprobs, self.tokenizer))
        return generations

    # ----------------------------------------------------------------------------------------
    # Streaming: text pieces as soon as they are generated
    # ----------------------------------------------------------------------------------------

    def stream(
        self,
        prompt: Union[str, list[int]],
        max_gen_len: Optional[int] = None,
        sampling: Optional[SamplingParams] = None,
        stop_tokens: Optional[AbstractSet[int]] = None,
        reuse_cache: bool = False,
        speculate: int = 0,
        **loose_sampling_keywords,
    ) -> TextStream:
        """Complete one prompt (text, or token ids), yielding text pieces as tokens come.

            for piece in llama.stream("Once upon a time", max_gen_len=50):
                print(piece, end="", flush=True)

        The pieces never split a character, and joined they are exactly the final text (as
        `text_completion` would return it). With reuse_cache=True, the prompt's longest prefix that
        the KV cache already holds from the previous call (`kv_cache_tokens`) is not run again:
        in a chat, only the new turn goes through the model. Nothing runs until iteration starts.
        speculate: prompt-lookup drafts per pass, as in `decode`.
        """
        refuse_loose_sampling_keywords("stream", loose_sampling_keywords)
        sampling = sampling_or_default(sampling, "stream")
        if isinstance(prompt, str):
            prompt_tokens = self.encode_prompt(prompt, "prompt")
        elif isinstance(prompt, (list, tuple)):
            prompt_tokens = list(prompt)  # its ids are checked with the rest of the run (check_can_generate)
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if max_gen_len is None:
            max_gen_len = max(1, self.args.max_seq_len - len(prompt_tokens))
        decoding = self.decode([prompt_tokens], max_gen_len, sampling, reuse_cache=reuse_cache, speculate=speculate)
        stop_tokens = self.tokenizer.stop_tokens if stop_tokens is None else stop_tokens
        return TextStream(decoding, self.tokenizer, sampling.stop, stop_tokens)

    def chat_stream(
        self,
        dialog: Sequence[Message],
        max_gen_len: Optional[int] = None,
        sampling: Optional[SamplingParams] = None,
        reuse_cache: bool = False,
        **loose_sampling_keywords,
    ) -> TextStream:
        """`stream` the assistant's answer to one dialog; it ends at the chat format's end of turn."""
        refuse_loose_sampling_keywords("chat_stream", loose_sampling_keywords)
        chat_format = self.required_chat_format()
        return self.stream(chat_format.encode_dialog_prompt(dialog), max_gen_len, sampling,
                           stop_tokens=chat_format.stop_tokens, reuse_cache=reuse_cache)

    def required_chat_format(self) -> ChatFormat:
        """`chat_format`, or an error saying why this vocabulary has none."""
        return self.chat_format or chat_format_for(self.tokenizer, required=True)

    # ----------------------------------------------------------------------------------------
    # Text in, text out (Meta's keywords)
    # ----------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        """Each prompt's ids, with BOS first where the vocabulary wants one."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise ValueError("prompts is empty: give at least one prompt")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompt {i} is a {type(prompt).__name__}, expected a string")
        return [self.encode_prompt(p, f"prompt {i}") for i, p in enumerate(prompts)]

    def encode_prompt(self, prompt: str, what: str) -> list[int]:
        """One prompt's ids (BOS first where the vocabulary wants one); text that is not valid Unicode
        is an error naming `what` ("prompt 2")."""
        try:
            return self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos, eos=False)
        except InvalidTextError as e:
            raise InvalidTextError(f"{what}: {e}") from None

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
        speculate: int = 0,
    ) -> tuple[list[list[int]], list[str]]:
        """Complete each prompt: (out_tokens, out_text).

        out_tokens[i] are the generated ids of prompt i (after the prompt, or including it if echo),
        out_text[i] their decoded text, ending before the first `stop` string if one appears.
        max_gen_len None: as much as max_seq_len leaves room for. temperature 0 is greedy; seed makes
        sampling reproducible; top_k and repetition_penalty as in sampling.py; speculate as in
        `generate`. Log-probabilities come from `generate(..., logprobs=True)`.
        """
        if logprobs:
            raise ValueError("text_completion returns (out_tokens, out_text); for log-probabilities use "
                             "llama.generate(llama.encode_prompts(prompts), max_gen_len, sampling, logprobs=True)")
        sampling = SamplingParams(temperature, top_p, top_k, repetition_penalty, seed, stop)
        prompt_tokens = self.encode_prompts(prompts)
        max_gen_len = self.args.max_seq_len - 1 if max_gen_len is None else max_gen_len
        generations = self.generate(prompt_tokens, max_gen_len, sampling, echo=echo, speculate=speculate)
        return [g.tokens for g in generations], [g.text for g in generations]

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
        speculate: int = 0,
    ) -> list[Message]:
        """The assistant's answer to each dialog: [{"role": "assistant", "content": ...}, ...].

        Each dialog is a list of {"role": "system" | "user" | "assistant", "content": str}: an
        optional system message, then user and assistant alternating, ending with the user. It is
        written in the model's chat format (chat_format.py) and the answer ends at the format's
        end-of-turn token. With logprobs=True each answer also has "tokens" (the text each generated
        token adds, see `token_texts`) and "logprobs" (their log-probabilities), as Meta's. A returned message
        can be appended to its dialog as it is, to continue the conversation. speculate: as in `generate`.
        """
        sampling = SamplingParams(temperature, top_p, top_k, repetition_penalty, seed, stop)
        if not isinstance(dialogs, (list, tuple)) or len(dialogs) == 0:
            raise ValueError("dialogs must be a non-empty list of dialogs (each a list of messages)")
        chat_format = self.required_chat_format()
        prompt_tokens = []
        for i, dialog in enumerate(dialogs):
            if isinstance(dialog, dict):
                raise DialogError(f"dialog {i} is a single message: a dialog is a list of messages")
            try:
                prompt_tokens.append(chat_format.encode_dialog_prompt(dialog))
            except DialogError as e:
                raise DialogError(f"dialog {i}: {e}") from None
            except InvalidTextError as e:
                raise InvalidTextError(f"dialog {i}: {e}") from None
        max_gen_len = self.args.max_seq_len - 1 if max_gen_len is None else max_gen_len
        generations = self.generate(prompt_tokens, max_gen_len, sampling, logprobs=logprobs,
                                    stop_tokens=chat_format.stop_tokens, speculate=speculate)
        answers: list[Message] = []
        for g in generations:
            answer = {"role": "assistant", "content": g.text}
            if logprobs:
                answer["tokens"] = token_texts(self.tokenizer, g.tokens)
                answer["logprobs"] = g.logprobs
            answers.append(answer)
        return answers


# Names this module had before the command line moved to cli.py and the stop strings to sampling.py.
MOVED_NAMES = {
    "main": "cli.main", "parse_args": "cli.parse_args", "warm_up": "cli.warm_up", "DEMO_PROMPTS": "cli.DEMO_PROMPTS",
    "DEFAULT_CLI_MAX_GEN_LEN": "cli.DEFAULT_CLI_MAX_GEN_LEN", "DEFAULT_CHAT_MAX_GEN_LEN": "chat.DEFAULT_CHAT_MAX_GEN_LEN",
    "check_stop_strings": "sampling.check_stop_strings (or SamplingParams(stop=...))",
    "check_prompts": "LLaMa.encode_prompts", "check_cli_sampling": "cli.check_cli_args",
    "print_logprobs": "cli.print_logprobs", "run_chat_cli": "cli.run_chat_cli", "WARM_UP_TOKENS": "cli.WARM_UP_TOKENS",
    "COMPILE_OPTIONS": "decoding.COMPILE_OPTIONS", "FILLER_TOKEN_ID": "decoding.FILLER_TOKEN_ID",
    "first_stop": "streaming.first_stop", "partial_stop_len": "streaming.partial_stop_len",
}


def __getattr__(name: str):
    """PEP 562: a name that moved says where it went, in one line."""
    where = MOVED_NAMES.get(name)
    raise AttributeError(f"inference.{name} moved: use {where}" if where else
                         f"module 'inference' has no attribute {name!r}")


if __name__ == "__main__":
    # `python inference.py ...` is the command line, which lives in cli.py: it stands on this engine
    # (it imports this file), so this file does not import it. This module is registered under its
    # own name first, so that cli.py's `import inference` finds it instead of loading it again.
    sys.modules.setdefault("inference", sys.modules[__name__])
    runpy.run_module("cli", run_name="__main__", alter_sys=True)
