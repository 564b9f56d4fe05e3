"""The decode loop: a batch of prompts in, one column of new tokens per step out.

How it works (Meta's `generation.py`, restructured):

1. **A grid of ids.** Prompts in one batch have different lengths, so they are *left*-padded to
   the longest: every row's last prompt token sits in the same column P - 1, and every row's next
   token goes into the same next column. Padding positions are masked out of attention, and each
   row counts its RoPE positions from its own first real token (see `model.causal_mask`), so a
   padded prompt is computed exactly as if it were alone.
2. **Prefill**: the prompt columns go through the model in one pass, filling the KV cache; the last
   column's logits give the first new token of every row.
3. **Decode**: one token per step. Each step feeds only the newest column (B, 1) at its position,
   and the model attends to the cache for the rest.

`Decoding` is that loop for one static batch: `LLaMa.decode` makes one, and streaming
(`TextStream`), the chat REPL, `interpret.py why`, bench.py and `LLaMa.generate` of one prompt
iterate it. A list of prompts is scheduled continuously instead (batching.py: rows join and leave
at every step), with the same prefill, decode step and sampling. It yields a `DecodeStep` per column *before* that column goes through the
model: a caller that has what it needs (every row at a stop token, enough text) just stops
iterating, and no forward pass is wasted. Why a row ends is the caller's business (streaming.py).

Every column's logits are checked to be finite before anything is sampled from them: NaN/inf
weights (a broken checkpoint) or float16 activations that overflow would otherwise give an empty
greedy completion or a crash inside `torch.multinomial`. The check is one sum over (B, V) per step
(`all_finite`), next to a forward pass through the whole model; only once it fails is the
sequence run again, layer by layer, to name the first layer whose output is not finite.

The KV cache outlives one run: `KVCacheRecord` remembers which ids row 0 of the cache holds, so a
chat's next turn can skip the prefix it already computed (`reuse_cache=True`).

**Speculative decoding by prompt lookup** (`speculate=N`; Saxena 2023, "Prompt Lookup Decoding";
Hugging Face's `prompt_lookup_num_tokens`, llama.cpp's `lookup` example). A decode step of a small
batch is bound by reading the weights, not by arithmetic: a pass over T = 1 + k tokens costs
little more than a pass over one. So guess the next k tokens cheaply, run them through the model
in one pass, and keep the guesses the model agrees with:

1. **Draft** (`prompt_lookup_draft`): when the text repeats what came before (a passage to copy,
   code to edit, a summary that quotes its source), the last few tokens have occurred earlier, and
   what followed them then is a good guess for what follows now. No draft model is needed.
2. **Verify**: the newest token and the k drafts go through the model at their positions; the
   logits of column i score the token of column i + 1, so one pass scores every draft and the
   token after the last one. Draft i is checked against the distribution its column gets
   (`sampling.verify_draft`): greedy keeps it if it is the argmax; sampling keeps it with
   probability p(draft) and otherwise draws from p without it, which leaves the output
   distribution unchanged (`sampling.accept_or_resample`). At the first rejected draft, the
   model's own token takes its place; if every draft is kept, the last column gives one more
   token for free. A pass thus yields 1 to k + 1 tokens, and greedy output is the plain loop's.
3. **The KV cache needs no undo.** It is indexed by position: the pass wrote keys/values for
   every draft, and those of rejected drafts are simply wrong for the text as it now stands. The
   next pass starts at the first rejected column and overwrites them; attention reads only the
   cache up to the end of the pass that is running (`KVCache.update`), so a stale entry beyond it
   is never looked at before it is rewritten.

Each draft is still yielded as its own `DecodeStep` (a caller cannot tell speculation from plain
decoding, apart from the speed). Batch size 1 only: rows would accept different numbers of drafts
and fall out of step. The T > 1 verification passes call the model directly: a compiled decode
step (`compile=True`) is used for the passes that have no draft. `drafted` and `accepted` count
the drafts.

Shapes: B batch, P longest prompt, V vocabulary, k drafts.
"""

import types
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch

from model import Transformer
from sampling import SamplingParams, sample, verify_draft

# Padding positions are masked out, so any valid id will do as filler.
FILLER_TOKEN_ID = 0
# The longest n-gram a prompt-lookup draft matches on: Saxena's `max_ngram_size=3` (HF's
# `max_matching_ngram_size` defaults to 2). Longer matches are rarer but predict better.
PROMPT_LOOKUP_MAX_NGRAM = 3


class NonFiniteLogitsError(ValueError):
    """The model's logits hold NaN or inf: the message says where they first appear and what to try.
    A ValueError, as a broken checkpoint is (checkpoint.CheckpointError): bad data, not a bug here."""


@dataclass
class KVCacheRecord:
    """What the KV cache holds between runs of the decode loop.

    tokens: the ids whose keys/values row 0 holds, at positions 0, 1, ...; kept only for
    single-prompt runs ([] after a batch). writes: counts prefills, so that a paused run notices
    that another one has overwritten the cache since.
    """

    tokens: list[int] = field(default_factory=list)
    writes: int = 0

    def prefix_len(self, prompt_tokens: list[int]) -> int:
        """How many leading ids of `prompt_tokens` row 0 already holds.

        At most len(prompt_tokens) - 1: the last prompt token must go through the model to give
        the logits of the first new token.
        """
        n = 0
        limit = min(len(self.tokens), len(prompt_tokens) - 1)
        while n < limit and self.tokens[n] == prompt_tokens[n]:
            n += 1
        return n


@dataclass
class DecodeStep:
    """One column of new tokens, as the decode loop samples it."""

    position: int  # the column (sequence position) the tokens go into
    tokens: torch.Tensor  # (B,) the token sampled for every row
    logprobs: Optional[torch.Tensor]  # (B,) their log-probabilities under the model, if asked for
    logits: torch.Tensor  # (B, V) the model's logits they were sampled from
    seen: Optional[torch.Tensor]  # (B, V) bool: the ids each row held before this step (repetition penalty on)


def check_speculate(speculate: object, batch_size: int) -> None:
    """speculate: an int >= 0 (0 = off), and speculation only for a batch of one prompt."""
    if not isinstance(speculate, int) or isinstance(speculate, bool) or speculate < 0:
        raise ValueError(f"speculate must be an integer >= 0 (0 = off, N = draft up to N tokens per pass), "
                         f"got {speculate!r}")
    if speculate and batch_size > 1:
        raise ValueError(f"speculative decoding runs one prompt at a time, got a batch of {batch_size}: decode "
                         f"them one by one (generate does), or set speculate=0")


def prompt_lookup_draft(tokens: Sequence[int], num_draft: int, max_ngram: int = PROMPT_LOOKUP_MAX_NGRAM) -> list[int]:
    """Up to `num_draft` ids that may follow `tokens`, copied from earlier in them ([] if none match).

    The last n ids, for n = max_ngram down to 1, are looked for earlier in `tokens`, the most
    recent occurrence first (the nearest context is the likeliest to be continuing); the ids that
    followed that occurrence are the draft. A longer n-gram is tried first: its continuation is
    more often right. The occurrence may overlap the last n ids (in "a b a b a" the last "a b a"
    occurred at 0 and is followed by "b a"), so a repeating pattern continues itself. Saxena's
    notebook and Hugging Face take the earliest occurrence instead.
    """
    tokens = list(tokens)
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        ngram = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # the last n ids themselves never count
            if tokens[start] == ngram[0] and tokens[start : start + n] == ngram:
                return tokens[start + n : start + n + num_draft]
    return []


class Decoding:
    """One run of the decode loop over a batch: iterate it once for its DecodeSteps.

    `llama` is the engine (`inference.LLaMa`): its model, decode step (eager or compiled), device,
    KV cache record and, under tensor parallelism, the hook that keeps every rank's tokens equal.
    Readable once iteration has begun: `reused_tokens` (leading prompt ids taken from the KV
    cache) and, after the prefill, `prompt_logprobs`. speculate=N (one prompt only): draft up to N
    tokens per forward pass by prompt lookup (see the top of this file); `drafted` and `accepted`
    count the drafts proposed and kept so far.
    """

    def __init__(
        self, llama, prompt_tokens: list[list[int]], max_gen_len: int, sampling: SamplingParams,
        generator: Optional[torch.Generator], logprobs: bool, prompt_logprobs: bool, reuse_cache: bool,
        speculate: int = 0,
    ):
        check_speculate(speculate, len(prompt_tokens))
        self.llama = llama
        self.speculate = speculate
        self.drafted = 0  # draft tokens that went through a verification pass
        self.accepted = 0  # of those, the ones the model kept
        self.prompt_tokens = [list(p) for p in prompt_tokens]
        self.sampling = sampling
        self.generator = generator
        self.logprobs = logprobs
        self.want_prompt_logprobs = prompt_logprobs
        self.reuse_cache = reuse_cache
        self.prompt_len = max(len(p) for p in prompt_tokens)  # P: every row's prompt ends in column P - 1
        self.total_len = min(llama.args.max_seq_len, self.prompt_len + max_gen_len)
        self.reused_tokens = 0
        self.prompt_logprobs: Optional[list[list[float]]] = None  # (B, P - 1) once the prefill ran
        self._started = False

    def __iter__(self) -> Iterator[DecodeStep]:
        if self._started:
            raise RuntimeError("a Decoding runs once: call LLaMa.decode again for another run")
        self._started = True
        return self._steps()

    def _token_grid(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Left-pad the prompts into one (B, total_len) grid of ids; also return each row's padding (B,),
        or None when no row is padded."""
        device = self.llama.device
        tokens = torch.full((len(self.prompt_tokens), self.total_len), FILLER_TOKEN_ID, dtype=torch.long, device=device)
        for row, prompt in enumerate(self.prompt_tokens):
            tokens[row, self.prompt_len - len(prompt) : self.prompt_len] = torch.tensor(prompt, device=device)
        pad_lens = torch.tensor([self.prompt_len - len(p) for p in self.prompt_tokens], device=device)
        return tokens, (pad_lens if pad_lens.any() else None)

    def _seen_tokens(self) -> Optional[torch.Tensor]:
        """(B, V) bool: which ids each prompt holds, for the repetition penalty (None when it is off)."""
        if not self.sampling.penalizes_repeats:
            return None
        device = self.llama.device
        seen = torch.zeros((len(self.prompt_tokens), self.llama.args.vocab_size), dtype=torch.bool, device=device)
        for row, prompt in enumerate(self.prompt_tokens):
            seen[row, torch.tensor(prompt, device=device)] = True
        return seen

    def _prefill(self, tokens: torch.Tensor, start_pos: int, pad_lens: Optional[torch.Tensor]) -> torch.Tensor:
        """Run the prompt columns start_pos ... P-1 through the model in one pass, filling the KV
        cache; the logits (B, 1, V) of the last column, or of every column (B, P - start_pos, V)
        when the prompt's own logprobs are wanted. Positions before start_pos must be cached."""
        record = self.llama.kv_cache
        single_row = tokens.shape[0] == 1 and pad_lens is None
        # Keep the record true at every moment, even if this pass is interrupted (Ctrl-C).
        record.tokens = tokens[0, :start_pos].tolist() if single_row else []
        record.writes += 1
        logits = self.llama.model(tokens[:, start_pos : self.prompt_len], start_pos=start_pos, pad_lens=pad_lens,
                                  last_only=not self.want_prompt_logprobs)
        if single_row:
            record.tokens = tokens[0, : self.prompt_len].tolist()
        return logits

    def _forward_columns(self, tokens: torch.Tensor, start: int, drafts: list[int], pad_lens: Optional[torch.Tensor],
                         cache_owner: int) -> torch.Tensor:
        """The logits (B, 1 + k, V) after column `start` (just sampled) and the k `drafts` after it go
        through the model: row i scores column start + 1 + i. Without drafts, one decode step."""
        record = self.llama.kv_cache
        if record.writes != cache_owner:
            raise RuntimeError(
                "another generation ran while this one was paused and overwrote the KV cache: "
                "finish (or drop) one stream before starting the next"
            )
        end = start + 1 + len(drafts)
        single_row = tokens.shape[0] == 1 and pad_lens is None
        if single_row:  # from `start` on, the cache is being rewritten (after rejected drafts: overwritten)
            del record.tokens[start:]
        if drafts:  # a verification pass: every column's logits, by the model itself (not the decode step)
            tokens[:, start + 1 : end] = torch.tensor(drafts, device=tokens.device)
            logits = self.llama.model(tokens[:, start:end], start, pad_lens)  # (B, 1 + k, V)
        else:
            step = self.llama.decode_step(self.llama.model, tokens[:, start:end], start, pad_lens)  # (B, V)
            logits = step[:, None]  # (B, 1, V)
        if single_row:
            # Rejected drafts too: the cache does hold their keys/values, which are right for these ids
            # (a position's keys/values depend only on the ids up to it).
            record.tokens += tokens[0, start:end].tolist()
        return logits

    # The whole loop runs under inference mode (a decorated generator: on for each step, off again
    # while the caller runs): like no_grad, and PyTorch also skips the version counters and view
    # tracking that autograd would need (measured: about 5-8% more tokens per second here).
    @torch.inference_mode()
    def _steps(self) -> Iterator[DecodeStep]:
        llama = self.llama
        if self.reuse_cache:
            self.reused_tokens = llama.kv_cache.prefix_len(self.prompt_tokens[0])
        tokens, pad_lens = self._token_grid()
        seen = self._seen_tokens()
        logits = self._prefill(tokens, self.reused_tokens, pad_lens)  # (B, P or 1, V)
        if self.want_prompt_logprobs:
            # log p(token t | tokens before t) for the prompt: logits at t - 1 score token t.
            self.prompt_logprobs = log_prob_of(logits[:, :-1], tokens[:, 1 : self.prompt_len]).tolist()  # (B, P - 1)
        logits = logits[:, -1:]  # (B, 1, V): the scores of column P
        drafts: list[int] = []  # proposed ids of the columns after the first one `logits` scores
        batch_rows = torch.arange(tokens.shape[0], device=llama.device)
        cache_owner = llama.kv_cache.writes  # the prefill that filled the cache for these tokens
        cur_pos = self.prompt_len
        while True:
            # logits (B, 1 + k, V): row i scores column cur_pos + i, for which drafts[i] was proposed
            # (i < k); the last row scores the column after the drafts. Without speculation, k = 0.
            for draft, column_logits in zip(drafts + [None], logits.unbind(dim=1)):  # column_logits: (B, V)
                if not all_finite(column_logits):  # cheap next to the forward pass that made them
                    raise NonFiniteLogitsError(self._non_finite_message(tokens, cur_pos, pad_lens))
                if draft is None:
                    next_token = sample(column_logits, self.sampling, seen, self.generator)  # (B,)
                else:
                    proposed = torch.tensor([draft], device=llama.device)  # (B,): speculation has B = 1
                    next_token = verify_draft(column_logits, proposed, self.sampling, seen, self.generator)
                if llama.tensor_parallel is not None:
                    next_token = llama.tensor_parallel.broadcast_from_main(next_token)  # ranks stay in lockstep
                tokens[:, cur_pos] = next_token
                logprobs = log_prob_of(column_logits, next_token) if self.logprobs else None
                yield DecodeStep(cur_pos, next_token, logprobs, column_logits, seen)
                if seen is not None:
                    seen[batch_rows, next_token] = True
                cur_pos += 1
                rejected = draft is not None and int(next_token[0]) != draft
                self.accepted += draft is not None and not rejected
                if cur_pos == self.total_len:
                    return  # no room for another token: its logits are not needed
                if rejected:
                    break  # the later rows scored a text that is not this one: draft again from here
            # Columns up to cur_pos - 1 are decided; draft the ones after, within the room left.
            drafts = self._draft(tokens, cur_pos)
            self.drafted += len(drafts)
            logits = self._forward_columns(tokens, cur_pos - 1, drafts, pad_lens, cache_owner)

    def _draft(self, tokens: torch.Tensor, cur_pos: int) -> list[int]:
        """Prompt-lookup drafts for columns cur_pos, cur_pos + 1, ...: none without speculation, and
        never past the last column of this run."""
        if not self.speculate:
            return []
        room = self.total_len - cur_pos
        return prompt_lookup_draft(tokens[0, :cur_pos].tolist(), min(self.speculate, room))


    def _non_finite_message(self, tokens: torch.Tensor, cur_pos: int, pad_lens: Optional[torch.Tensor]) -> str:
        """Why the logits for column `cur_pos` are not finite, in one line: the first layer whose output
        is not, found by running the sequence so far through the model once more (the KV cache is
        overwritten, so the record forgets what it held)."""
        model = self.llama.model
        dtype = str(model.norm.weight.dtype).removeprefix("torch.")
        where = ""
        if self.llama.tensor_parallel is None:  # under torchrun every rank would have to join the re-run
            self.llama.kv_cache.tokens = []
            self.llama.kv_cache.writes += 1
            layer = first_non_finite_layer(model, tokens[:, :cur_pos], pad_lens)
            where = f", first in the output of {layer}" if layer is not None else ""
        return f"the checkpoint produced NaN/inf logits at position {cur_pos} ({dtype}{where}): {non_finite_advice(dtype)}"


def all_finite(logits: torch.Tensor) -> bool:
    """Whether every number of `logits` ((B, V) or (V,)) is finite, from their sum in float64: a NaN or an
    infinity makes the sum NaN or infinite, and finite float32, bf16 or float16 numbers cannot
    overflow a float64 sum (float32's largest, 3.4e38, times a million entries is 3.4e44; float64
    reaches 1.8e308). One pass of additions: 78 us for 8 x 49,152 bf16 logits on a Sapphire Rapids
    against 442 us for `torch.isfinite(logits).all()` (a comparison, an absolute value and a
    reduction)."""
    return bool(torch.isfinite(logits.sum(dtype=torch.float64)))


def non_finite_advice(dtype: str) -> str:
    """What to try when a model in `dtype` ("float16", ...) gives NaN/inf logits."""
    if dtype == "float16":
        return ("in float16 activations can overflow: run in bfloat16 (--dtype bfloat16, dtype=\"bfloat16\"); "
                "else its weights hold NaN/inf")
    return "its weights hold NaN/inf, or overflowed"


def first_non_finite_layer(model: Transformer, tokens: torch.Tensor, pad_lens: Optional[torch.Tensor]) -> Optional[str]:
    """The name of the first module (embedding, layer i, final norm, output head) whose output holds
    NaN/inf when `tokens` (B, T) go through `model` from position 0; None if none does."""
    named = [("the embedding", model.tok_embeddings)]
    named += [(f"layer {i}", layer) for i, layer in enumerate(model.layers)]
    named += [("the final norm", model.norm), ("the output head", model.output)]
    found: list[str] = []

    def watch(name: str):
        def hook(module, inputs, output):
            if not found and not torch.isfinite(output).all():
                found.append(name)
        return hook

    handles = [module.register_forward_hook(watch(name)) for name, module in named]
    try:
        with torch.inference_mode():
            model(tokens, 0, pad_lens)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def log_prob_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target], for logits (..., V) and targets (...)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


# --------------------------------------------------------------------------------------------
# The decode step, and its compiled version
# --------------------------------------------------------------------------------------------


def decode_step(model: Transformer, tokens: torch.Tensor, start_pos: int, pad_lens: Optional[torch.Tensor]) -> torch.Tensor:
    """One decoding step: the logits (B, V) that follow `tokens` (B, 1) placed at `start_pos`."""
    return model(tokens, start_pos, pad_lens, last_only=True)[:, -1]


# How the decode step is compiled. Each option removes work that would otherwise be repeated on
# every token:
# - freezing: Inductor's freezing pass runs on the graph. Passed here, it does not pack the weights
#   for oneDNN (measured with torch 2.13: TorchDynamo reads the process-wide
#   Inductor config's `freezing`, not these options, when it decides to treat parameters as
#   constants; with that set, every graph held a packed copy of every weight, +616 MB for the demo).
#   bf16 weights are packed once, by bf16_layers.PackedLinear, for eager and compiled steps alike.
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


def compile_decode_step(step, static_cache: bool = False):
    """`step` compiled by torch.compile (Inductor): the ops of a whole decode step fused into a few
    generated kernels, with far less Python per token.

    dynamic=True: start_pos grows by one each step and the attended part of the KV cache with it;
    compiling once for symbolic sizes avoids a recompile per position. A ragged batch (padding
    mask) compiles a second graph the first time it is seen.

    static_cache=True (the default on CUDA, see `LLaMa.build`): the step of `static_decode_step`,
    whose shapes never change, compiled with mode="reduce-overhead": on CUDA, the whole step is
    captured once as a CUDA graph and replayed for every token (one launch instead of hundreds of
    kernel launches, which bound a small model's decoding). The model's KV cache must be zeroed.
    """
    # RoPE multiplies complex numbers, for which Inductor generates no code: those few ops run as
    # ordinary PyTorch calls inside the compiled step. That is expected, so its warning is not shown.
    warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex")
    if static_cache:
        compiled = torch.compile(own_copy(step), dynamic=False, mode="reduce-overhead")
        return static_decode_step(compiled)
    return torch.compile(own_copy(step), dynamic=True, options=COMPILE_OPTIONS)


def static_decode_step(step):
    """The decode step for a static KV cache: `step` (`decode_step` or its compiled version) gets the
    position as a 0-d tensor, so that it is data, not a shape (model.KVCache.update); called as
    `decode_step` is, with an int."""
    def run(model: Transformer, tokens: torch.Tensor, start_pos: int, pad_lens: Optional[torch.Tensor]) -> torch.Tensor:
        return step(model, tokens, torch.tensor(start_pos, device=tokens.device), pad_lens)
    return run


def own_copy(function: types.FunctionType) -> types.FunctionType:
    """A copy of `function` with its own code object, for one engine to compile.

    torch.compile keeps the graphs it compiled on the function's *code object*, and picks one by
    its guards. The guards on modules are skipped (COMPILE_OPTIONS), so nothing would tell two
    models apart: a second engine compiled from the same `decode_step` would run the first one's
    graph, with the first model's frozen weights or (another kind of layer) a KeyError. With a code
    object of its own, every engine compiles, and keeps, its own graphs.
    """
    return types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)


def choose_static_cache(static_cache: Optional[bool], device: torch.device, compile: bool) -> bool:
    """Whether to decode with a static KV cache: as asked, else only where it pays (compiled, on CUDA)."""
    if static_cache is None:
        return compile and device.type == "cuda"
    if not isinstance(static_cache, bool):
        raise ValueError(f"static_cache must be True, False or None, got {static_cache!r}")
    return static_cache


def make_decode_step(compile: bool, static_cache: bool):
    """The decode step an engine runs: eager or compiled, with today's KV cache or a static one."""
    if compile:
        return compile_decode_step(decode_step, static_cache)
    return static_decode_step(decode_step) if static_cache else decode_step
