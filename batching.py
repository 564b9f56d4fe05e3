"""Continuous batching: every row of the batch stays busy until no prompt is left.

The decode loop (decoding.py) runs one *static* batch: the prompts start together, left-padded to
one length, and the batch ends when its last row ends. A row that stopped early holds its slot
idle, and a list longer than `max_batch_size` waits for the whole batch before it. With prompts
and answers of mixed lengths most of the batch is idle most of the time.

Continuous batching (Yu et al. 2022, "Orca", iteration-level scheduling; vLLM's and llama.cpp's
servers) decides who is in the batch at *every step*:

1. **Slots.** The KV cache has `max_batch_size` rows; each running request owns one (its slot)
   for as long as it runs, and nothing else writes there.
2. **Admit.** Before each step, every free slot takes the next waiting request: its prompt goes
   through the model alone, in one pass, into that slot's cache row (`model(..., first_row=slot)`),
   and the last position's logits give its first token. The other rows keep their caches and
   simply decode one step later.
3. **Decode.** One pass for every running row: each feeds its newest token at its *own* position
   (`model(tokens, positions)` with positions a (B,) tensor). Rows now sit at different points of
   different texts, so the positions are per row: RoPE rotates each row by its own position, and
   the attention mask lets each row see its own cache up to its own token (`model.causal_mask`);
   the keys are as many positions as the longest row has, the rest of a shorter row is masked.
4. **Finish and refill.** A row that made a stop token, a stop string or its `max_gen_len` is
   finished at once, its slot is free, and the next step admits the next waiting prompt into it.

Each request is computed as it would be alone: its prompt is prefilled alone, and in the decode
pass its row attends only to its own cache. Greedy output is the single-prompt loop's (up to float
noise: a kernel may sum in another order for another batch shape; exact in float32 in practice).
Each request samples with its own random generator: a seeded request draws the same tokens
whoever runs beside it.

**Masked is not the same as harmless.** A masked key gets weight 0, but 0 * NaN is NaN: a slot's
positions past its own text, which a shorter row's mask hides, must hold numbers. Fresh memory
(`torch.empty`) may hold anything, so each slot remembers how far its cache holds numbers
(`finite_len`) and zeroes what a step would read beyond that (`Transformer.zero_cache`); after a
request that failed on NaN, its slot is counted as holding none.

`ContinuousBatching` is the scheduler: `submit` requests, call `step` until `busy` is False (or
`run` a list to the end). `LLaMa.generate` uses it for a list of prompts; server.py runs it in one
thread for all HTTP clients. Prefills call the model; the decode step is `row_decode_step`, compiled
when the engine is (`LLaMa.build(compile=True)`).

Shapes: B rows in a step (up to max_batch_size), P a prompt's length, V vocabulary, S keys.
"""

from collections import deque
from dataclasses import dataclass, field
from typing import AbstractSet, Callable, Iterator, Optional

import torch

from decoding import FILLER_TOKEN_ID, NonFiniteLogitsError, all_finite, compile_decode_step, log_prob_of, non_finite_advice
from sampling import SamplingParams, sample
from streaming import Generation, GenerationRow, TextTracker

# torch.Generator.manual_seed takes 64-bit seeds; request i of a seeded list gets seed + i, wrapped.
SEED_MODULUS = 2**64
# Positions of a slot's KV cache zeroed at once ahead of what the longest row reads (see `_make_finite`):
# a write to 30 layers' caches is ~60 small ops, worth doing once per 64 steps rather than every step.
ZERO_AHEAD = 64
# A decode step has at least 2 rows (a free one rides along): torch.compile treats a size of 1 as a
# special case, and a compiled step would compile a second time (about a minute here) for a batch of one.
MIN_DECODE_ROWS = 2


@dataclass(eq=False)
class Request:
    """One prompt to complete, and what has been made of it so far.

    Given: prompt_tokens, max_gen_len, sampling, stop_tokens (ids that end it, not part of the
    output), and what to record: logprobs (of each generated token), top_logprobs (the k likeliest
    ids and their log-probabilities at each step), prompt_logprobs (log p of each prompt token
    after the first). generator: the random generator it samples with (None: torch's global one).

    Filled in by the scheduler: `row` (tokens, text, finish_reason; streaming.GenerationRow), the
    logprobs asked for, `error` (the exception that ended it, if any) and `done`.
    """

    prompt_tokens: list[int]
    max_gen_len: int
    sampling: SamplingParams
    stop_tokens: AbstractSet[int]
    generator: Optional[torch.Generator] = None
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: bool = False
    row: Optional[GenerationRow] = None
    prompt_logprob_values: Optional[list[float]] = None
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # per step: (id, log p), likeliest first
    error: Optional[Exception] = None
    done: bool = False
    cancelled: bool = False  # set by the owner (e.g. a client that went away): freed at the next step
    # While running: its slot, how many ids its cache row holds, and how many tokens it sampled.
    slot: Optional[int] = None
    cached: int = 0
    sampled: int = 0
    last_token: int = FILLER_TOKEN_ID  # the newest sampled id: it goes through the model next
    seen: Optional[torch.Tensor] = None  # (V,) bool: ids it holds, for the repetition penalty


class ContinuousBatching:
    """The scheduler over `llama` (an `inference.LLaMa`): requests wait in order, run in slots,
    and leave as soon as they end (see the top of this file). Not thread-safe: one thread steps it."""

    def __init__(self, llama):
        self.llama = llama
        self.model = llama.model
        self.max_seq_len = llama.args.max_seq_len
        self.slots: list[Optional[Request]] = [None] * llama.args.max_batch_size
        self.finite_len = [0] * llama.args.max_batch_size  # per slot: positions 0 ... n - 1 hold numbers
        self.waiting: deque[Request] = deque()
        # The KV cache's rows are about to be overwritten: a paused stream or a chat's reuse_cache
        # must not trust them any more (decoding.KVCacheRecord).
        llama.kv_cache.tokens = []
        llama.kv_cache.writes += 1

    # ----------------------------------------------------------------------------------------
    # Submitting, and what is running
    # ----------------------------------------------------------------------------------------

    def submit(self, request: Request) -> Request:
        """Queue `request` (its prompt checked as `LLaMa.decode` checks one); it runs when a slot is free."""
        self.llama.check_can_generate([request.prompt_tokens], request.max_gen_len)
        request.row = GenerationRow(TextTracker(self.llama.tokenizer, request.sampling.stop))
        self.waiting.append(request)
        return request

    @property
    def running(self) -> list[Request]:
        return [r for r in self.slots if r is not None]

    @property
    def busy(self) -> bool:
        """Whether anything is waiting or running."""
        return bool(self.waiting) or any(r is not None for r in self.slots)

    def run(self, requests: list[Request]) -> Iterator[list[Request]]:
        """Submit `requests` and step until all have ended; yield each step's changed requests."""
        for request in requests:
            self.submit(request)
        while self.busy:
            yield self.step()

    # ----------------------------------------------------------------------------------------
    # One step: admit into free slots, then decode every running row once
    # ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Free the slots of cancelled requests, admit waiting ones, decode one token for every
        running row. Returns the requests that changed (new tokens, or ended)."""
        changed: list[Request] = []
        for request in self.running + [r for r in self.waiting if r.cancelled]:
            if request.cancelled:
                self._finish(request, changed)
        self.waiting = deque(r for r in self.waiting if not r.cancelled)
        self._admit(changed)
        if self.running:
            self._decode(changed)
        return changed

    def _admit(self, changed: list[Request]) -> None:
        """Each free slot takes the next waiting request: its prompt goes through the model alone,
        into the slot's cache row, and its first token is sampled."""
        while self.waiting and None in self.slots:
            request = self.waiting.popleft()
            slot = self.slots.index(None)
            self.slots[slot] = request
            request.slot = slot
            request.seen = self._seen_tokens(request)
            prompt = torch.tensor([request.prompt_tokens], device=self.llama.device)  # (1, P)
            logits = self.model(prompt, 0, last_only=not request.prompt_logprobs, first_row=slot)  # (1, P or 1, V)
            request.cached = len(request.prompt_tokens)
            self.finite_len[slot] = max(self.finite_len[slot], request.cached)
            if request.prompt_logprobs:  # logits at t - 1 score token t
                request.prompt_logprob_values = log_prob_of(logits[0, :-1], prompt[0, 1:]).tolist()  # (P - 1,)
            self._take(request, logits[0, -1], changed)

    def _decode(self, changed: list[Request]) -> None:
        """One pass for every running row, each at its own position; slots below the highest running
        one that are free ride along (their output is ignored)."""
        rows = 1 + max(r.slot for r in self.running)  # B: slots 0 ... rows - 1, a view of the cache
        rows = min(max(rows, MIN_DECODE_ROWS), len(self.slots))
        tokens = torch.full((rows, 1), FILLER_TOKEN_ID, dtype=torch.long)  # (B, 1)
        positions = torch.zeros(rows, dtype=torch.long)  # (B,): a free slot sits at position 0
        for request in self.running:
            tokens[request.slot, 0] = request.last_token
            positions[request.slot] = request.cached
        n_keys = int(positions.max()) + 1  # S: the longest row's positions
        for request in self.running:
            self._make_finite(request.slot, n_keys)
        device = self.llama.device
        logits = self.llama.row_decode_step(self.model, tokens.to(device), positions.to(device), n_keys)  # (B, V)
        for request in self.running:
            request.cached += 1  # its newest token is in the cache now
            self.finite_len[request.slot] = max(self.finite_len[request.slot], request.cached)
            self._take(request, logits[request.slot], changed)

    def _make_finite(self, slot: int, n_keys: int) -> None:
        """Zero the slot's cache positions from where it stops holding numbers up to n_keys (and
        ZERO_AHEAD positions beyond, so that this happens once every ZERO_AHEAD steps, not every step)."""
        if self.finite_len[slot] < n_keys:
            end = min(self.max_seq_len, n_keys + ZERO_AHEAD)
            self.model.zero_cache(slot, self.finite_len[slot], end)
            self.finite_len[slot] = end

    # ----------------------------------------------------------------------------------------
    # A row's next token, and its end
    # ----------------------------------------------------------------------------------------

    def _take(self, request: Request, logits: torch.Tensor, changed: list[Request]) -> None:
        """Sample the request's next token from its logits (V,), record it, and end the request if
        that was a stop token, completed a stop string, or was its last allowed one."""
        changed.append(request)
        if not all_finite(logits):
            dtype = str(self.model.norm.weight.dtype).removeprefix("torch.")
            request.error = NonFiniteLogitsError(
                f"the checkpoint produced NaN/inf logits at position {request.cached} ({dtype}): "
                f"{non_finite_advice(dtype)}")
            self.finite_len[request.slot] = 0  # its cache row may hold NaN now
            self._finish(request, changed)
            return
        seen = request.seen[None] if request.seen is not None else None  # (1, V)
        token = int(sample(logits[None], request.sampling, seen, request.generator)[0])
        logprob = None
        if request.logprobs or request.top_logprobs:
            log_probs = torch.log_softmax(logits.float(), dim=-1)  # (V,)
            logprob = float(log_probs[token])
            if request.top_logprobs:
                values, ids = log_probs.topk(request.top_logprobs)
                request.top.append(list(zip(ids.tolist(), values.tolist())))
        if request.seen is not None:
            request.seen[token] = True
        request.last_token = token
        request.sampled += 1
        request.row.add(token, logprob, request.stop_tokens)
        room = min(request.max_gen_len, self.max_seq_len - len(request.prompt_tokens))  # tokens it may sample
        if request.row.finish_reason is not None or request.sampled >= room:
            self._finish(request, changed)

    def _finish(self, request: Request, changed: list[Request]) -> None:
        """End the request (finish_reason set unless it failed or was cancelled) and free its slot."""
        if request.error is None and not request.cancelled:
            request.row.finish()
        if request.slot is not None:
            self.slots[request.slot] = None
        request.slot = None
        request.done = True
        if request not in changed:
            changed.append(request)

    def _seen_tokens(self, request: Request) -> Optional[torch.Tensor]:
        """(V,) bool: the prompt's ids, for the repetition penalty (None when it is off)."""
        if not request.sampling.penalizes_repeats:
            return None
        seen = torch.zeros(self.llama.args.vocab_size, dtype=torch.bool, device=self.llama.device)
        seen[torch.tensor(request.prompt_tokens, device=self.llama.device)] = True
        return seen


def row_decode_step(model, tokens: torch.Tensor, positions: torch.Tensor, n_keys: int) -> torch.Tensor:
    """One decode step of rows at their own positions: the logits (B, V) that follow `tokens` (B, 1),
    row b's token at positions[b], attending to the first n_keys cache positions of each row."""
    return model(tokens, positions, last_only=True, n_keys=n_keys)[:, -1]


def make_row_decode_step(compile: bool):
    """The row decode step an engine runs: eager, or compiled as the decode step is (decoding.py)."""
    return compile_decode_step(row_decode_step) if compile else row_decode_step


def request_generators(llama, seed: Optional[int], count: int) -> list[Optional[torch.Generator]]:
    """One generator per request of a list: request i draws with seed + i, so that what it samples
    depends on its own seed only, not on the requests beside it (None: torch's global generator)."""
    if seed is None:
        return [None] * count
    return [llama.random_generator((seed + i) % SEED_MODULUS) for i in range(count)]


def generate_continuously(
    llama, prompt_tokens: list[list[int]], max_gen_len: int, sampling: SamplingParams, logprobs: bool, echo: bool,
    stop_tokens: AbstractSet[int], on_step: Optional[Callable[[list[GenerationRow]], None]] = None,
) -> list[Generation]:
    """`LLaMa.generate` for a list of prompts, continuously batched: one `Generation` per prompt, in
    order. on_step gets the rows of every prompt admitted so far (admission follows the list's
    order) after each step. A request that fails (NaN logits) raises its error at once."""
    generators = request_generators(llama, sampling.seed, len(prompt_tokens))
    requests = [Request(list(prompt), max_gen_len, sampling, stop_tokens, generator, logprobs=logprobs,
                        prompt_logprobs=logprobs and echo) for prompt, generator in zip(prompt_tokens, generators)]
    batcher = ContinuousBatching(llama)
    for _ in batcher.run(requests):
        for request in requests:
            if request.error is not None:
                raise request.error
        if on_step is not None:
            on_step([r.row for r in requests if r.row is not None and (r.slot is not None or r.done)])
    generations = []
    for request in requests:
        head_logprobs = None
        if request.prompt_logprob_values is not None:  # nothing predicts a prompt's first token: 0.0, as Meta's
            head_logprobs = [0.0] + request.prompt_logprob_values
        echo_prompt = request.prompt_tokens if echo else None
        generations.append(request.row.to_generation(echo_prompt, head_logprobs, logprobs, llama.tokenizer))
    return generations
