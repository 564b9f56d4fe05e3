"""Choosing the next token from the model's logits: one small function per step.

The model gives a score (logit) per vocabulary entry. To pick the next token:

1. repetition penalty (Keskar et al. 2019, "CTRL", sec. 4.1): make every token that already
   occurs in the sequence less likely, by dividing its logit by the penalty (multiplying, if the
   logit is negative, so that it always goes down). 1.0 turns it off;
2. temperature: divide the logits by T before the softmax. T < 1 sharpens the distribution,
   T > 1 flattens it, and T = 0 means "always take the highest score" (greedy decoding);
3. top-k (Fan et al. 2018): keep only the k highest-scoring tokens;
4. top-p (nucleus) sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens
   whose probabilities add up to at least p, renormalise, and draw from those only. This cuts the
   long tail of unlikely tokens that makes text derail;
5. draw one token from what is left.

All the knobs travel together as one `SamplingParams` value (with the seed that makes a draw
reproducible and the stop strings that end a text early), made and checked once where a user's
settings come in, then passed down unchanged to the decode loop.

The order (penalty, temperature, top-k, top-p) is Hugging Face `generate`'s, whose logits
processors serve as the reference in tests/test_sampling.py. Greedy decoding applies the
repetition penalty too, then takes the argmax.

Speculative decoding (decoding.py) asks a different question of the same distribution: a draft
token x was *proposed* for this position; keep it, or draw another? `verify_draft` answers it
with the rule of Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative
Decoding", sec. 2.3) and Chen et al. 2023, which leaves the distribution of the output unchanged
(see `accept_or_resample`). Greedy: keep x if it is the argmax.

Shapes: B batch, V vocabulary.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch

DEFAULT_TEMPERATURE = 0.6  # Meta's defaults for text_completion and chat_completion
DEFAULT_TOP_P = 0.9
NO_REPETITION_PENALTY = 1.0  # dividing by 1 changes nothing
# The repetition penalties we accept. Common values lie between 1.0 and 1.5; at 100 a seen token's
# logit is already divided (or multiplied) a hundredfold, so it is practically never drawn again
# (or drawn every time, at 1/100). Far beyond, the penalized logits overflow float32 to inf
# (1e-300 divides by almost nothing) and the softmax turns into NaN, with no meaning gained.
MIN_REPETITION_PENALTY = 1e-2
MAX_REPETITION_PENALTY = 1e2
SMALLEST_FLOAT32 = torch.finfo(torch.float32).tiny  # ~1.2e-38, the smallest normal float32
# torch.Generator.manual_seed's range: a 64-bit seed, negative ones taken modulo 2**64.
MIN_SEED = -(2**63)
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    """Every knob of sampling, checked once when made: a bad value is an error naming it.

    temperature: 0 = greedy (and a tiny one is greedy too); top_p: (0, 1], 1 = no nucleus cut;
    top_k: None = no top-k cut; repetition_penalty: 0.01 to 100, 1.0 = off, above 1 discourages
    repeats; seed: None = torch's global random state, a 64-bit int = the same draws every time; stop: strings that end the text right before
    them (their tokens are generated, the text is cut).
    """

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: Optional[int] = None
    repetition_penalty: float = NO_REPETITION_PENALTY
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        check_sampling_args(self.temperature, self.top_p, self.top_k, self.repetition_penalty)
        check_seed(self.seed)
        object.__setattr__(self, "stop", check_stop_strings(self.stop))  # frozen: set once, here

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalizes_repeats(self) -> bool:
        return self.repetition_penalty != NO_REPETITION_PENALTY


# The keywords of SamplingParams, as the user-facing calls (text_completion, chat_completion, the
# CLI) spell them; the engine's inner calls take one SamplingParams instead.
SAMPLING_KEYWORDS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop")


def refuse_loose_sampling_keywords(function: str, keywords: dict) -> None:
    """A one-line error for sampling keywords passed where one `sampling=SamplingParams(...)` goes."""
    if keywords:
        loose = ", ".join(f"{k}={v!r}" for k, v in keywords.items())
        unknown = sorted(set(keywords) - set(SAMPLING_KEYWORDS))
        if unknown:
            raise TypeError(f"{function}() got unexpected keyword argument(s) {unknown}")
        raise TypeError(f"{function}() takes the sampling settings as one value now: "
                        f"sampling=SamplingParams({loose})")


def sampling_or_default(sampling: object, function: str) -> SamplingParams:
    """`sampling` itself, or Meta's defaults for None; anything else is an error naming the call."""
    if sampling is None:
        return SamplingParams()
    if not isinstance(sampling, SamplingParams):
        raise TypeError(f"{function}(): sampling must be a SamplingParams, e.g. sampling=SamplingParams(temperature=0), "
                        f"got {sampling!r}")
    return sampling


def check_seed(seed: object) -> None:
    if seed is None:
        return
    if not isinstance(seed, int) or isinstance(seed, bool) or not MIN_SEED <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer from -2**63 to 2**64 - 1 (a 64-bit seed), or None; got {seed!r}")


def check_stop_strings(stop: object) -> tuple[str, ...]:
    """None or a list/tuple of non-empty strings -> a tuple of them."""
    if stop is None:
        return ()
    if isinstance(stop, str) or not isinstance(stop, (list, tuple)):
        raise ValueError(f"stop must be a list of strings, e.g. stop=['\\n\\n'], got {stop!r}")
    for s in stop:
        if not isinstance(s, str) or s == "":
            raise ValueError(f"each stop string must be a non-empty string, got {s!r}")
    return tuple(stop)


def _is_real_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_sampling_args(
    temperature: float,
    top_p: float,
    top_k: Optional[int] = None,
    repetition_penalty: float = NO_REPETITION_PENALTY,
) -> None:
    """Reject out-of-range values instead of silently clamping them."""
    if not _is_real_number(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if not _is_real_number(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus cut), got {top_p!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1, or None for no top-k cut; got {top_k!r}")
    if not _is_real_number(repetition_penalty) or not MIN_REPETITION_PENALTY <= repetition_penalty <= MAX_REPETITION_PENALTY:
        raise ValueError(
            f"repetition_penalty must be a number from {MIN_REPETITION_PENALTY:g} to {MAX_REPETITION_PENALTY:g} "
            f"(1.0 = off, e.g. 1.1 discourages repeats), got {repetition_penalty!r}"
        )


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Lower the logits of tokens already in the sequence: (B, V) -> (B, V).

    seen: (B, V) bool, True for every token id present in the row so far (prompt and output).
    A positive logit is divided by the penalty and a negative one multiplied, so a penalty > 1
    always lowers it (CTRL, sec. 4.1; Hugging Face's RepetitionPenaltyLogitsProcessor).
    """
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the top_k highest logits of each row, set the rest to -inf: (B, V) -> (B, V).

    Tokens tied with the k-th highest are kept too (so the cut never depends on sort order).
    """
    top_k = min(top_k, logits.shape[-1])
    kth_highest = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_highest, float("-inf"))


def logits_to_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / temperature) in float32: (B, V) -> (B, V). Needs temperature > 0.

    The row's highest logit is subtracted first (softmax does not change when every logit moves
    by the same amount): the scaled logits are then <= 0, so a tiny temperature (1e-300) sends the
    others to -inf and leaves exp(0) = 1 for the top one, instead of inf / inf = NaN. That is the
    right limit: softmax(l / T) tends to the argmax (ties share it) as T -> 0, i.e. greedy. A
    temperature below float32's smallest normal number would round to 0 in the division (0 / 0 is
    NaN), so it divides by that number instead: the result is one-hot there either way.
    """
    logits = logits.float()
    temperature = max(temperature, SMALLEST_FLOAT32)
    return torch.softmax((logits - logits.amax(dim=-1, keepdim=True)) / temperature, dim=-1)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the nucleus and renormalise: (B, V) -> (B, V).

    Sort descending; a token is kept if the probability mass *before* it is still below top_p
    (so the most likely token is always kept, and the token that crosses top_p is kept too).
    """
    sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, sorted_ids, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


def draw(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token id per row, drawn from `probs`: (B, V) -> (B,)."""
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@dataclass
class SamplerStages:
    """What each step of the sampler made of a batch of logits (B, V), in order (see the top of
    this file). interpret.py shows them; `sample` draws from the last one."""

    logits: torch.Tensor  # (B, V) float32, after the repetition penalty
    top_k_logits: torch.Tensor  # (B, V) after top-k: -inf where it cut (the same as `logits` without top-k)
    probs: Optional[torch.Tensor]  # (B, V) softmax(top_k_logits / temperature); None when greedy
    final: Optional[torch.Tensor]  # (B, V) after top-p, renormalised: what the draw uses; None when greedy


def sampler_stages(
    logits: torch.Tensor, params: SamplingParams, seen: Optional[torch.Tensor] = None
) -> SamplerStages:
    """Run the sampler's steps on logits (B, V), keeping each result.

    `seen` (B, V) bool marks the tokens each row holds so far; it is needed only when the
    repetition penalty is on. Greedy decoding stops after the penalty (the argmax needs no more).
    """
    logits = logits.float()
    if params.penalizes_repeats:
        if seen is None:
            raise ValueError("a repetition penalty needs `seen`, the tokens each row holds so far")
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return SamplerStages(logits, logits, None, None)
    top_k_logits = logits if params.top_k is None else top_k_filter(logits, params.top_k)
    probs = logits_to_probs(top_k_logits, params.temperature)
    final = top_p_filter(probs, params.top_p) if params.top_p < 1 else probs
    return SamplerStages(logits, top_k_logits, probs, final)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """The next token of every row: (B, V) logits -> (B,) ids."""
    stages = sampler_stages(logits, params, seen)
    if params.greedy:
        return torch.argmax(stages.logits, dim=-1)
    return draw(stages.final, generator)


def accept_or_resample(
    probs: torch.Tensor, draft: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Keep each row's draft token with probability p(draft), else draw from p without it: (B,) ids.

    probs: (B, V), the sampler's final distribution p (what `sample` would draw from); draft: (B,).
    The rule of speculative sampling (Leviathan et al. 2023, sec. 2.3; Chen et al. 2023, alg. 2)
    for a draft that came from a distribution q: accept x with probability min(1, p(x) / q(x)),
    else draw from norm(max(0, p - q)). A draft copied from the text (prompt lookup, decoding.py)
    is a point mass, q = one-hot(x), so the rule becomes: accept x with probability p(x); else
    draw from p with x removed, renormalised. The output is then distributed exactly as p:

        P(out = x) = p(x)                                       (accepted)
        P(out = y) = (1 - p(x)) * p(y) / (1 - p(x)) = p(y)      for y != x (rejected, then drawn)

    So the draft changes how many forward passes a token costs, never which tokens come out (in
    distribution). The returned id equals the draft exactly when it was accepted.
    """
    p_draft = probs.gather(-1, draft[:, None]).squeeze(-1)  # (B,)
    u = torch.rand(p_draft.shape, generator=generator, device=probs.device)  # (B,) uniform in [0, 1)
    residual = probs.scatter(-1, draft[:, None], 0.0)  # (B, V): p with the draft removed
    # A row whose whole mass is on the draft keeps it: p(draft) is 1 there, but may be stored as 1 - 1e-7.
    rejected = (u >= p_draft) & (residual.sum(dim=-1) > 0)  # (B,)
    tokens = draft.clone()
    if rejected.any():
        leftover = residual[rejected]  # (R, V)
        tokens[rejected] = draw(leftover / leftover.sum(dim=-1, keepdim=True), generator)
    return tokens


def verify_draft(
    logits: torch.Tensor,
    draft: torch.Tensor,
    params: SamplingParams,
    seen: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """The next token of every row, given that `draft` (B,) was proposed for it: (B, V) logits -> (B,) ids.

    Greedy: the argmax, as `sample` (the draft is kept when it is the argmax). Sampling:
    `accept_or_resample` on the same final distribution `sample` draws from. Either way the draft
    was accepted exactly where the returned id equals it.
    """
    stages = sampler_stages(logits, params, seen)
    if params.greedy:
        return torch.argmax(stages.logits, dim=-1)
    return accept_or_resample(stages.final, draft, generator)


def sample_next_token(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: Optional[torch.Generator] = None,
    top_k: Optional[int] = None,
    repetition_penalty: float = NO_REPETITION_PENALTY,
    seen: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`sample` with the knobs as keywords: (B, V) logits -> (B,) ids."""
    return sample(logits, SamplingParams(temperature, top_p, top_k, repetition_penalty), seen, generator)
