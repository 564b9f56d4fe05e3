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

The order (penalty, temperature, top-k, top-p) is Hugging Face `generate`'s, whose logits
processors serve as the reference in tests/test_sampling.py. Greedy decoding applies the
repetition penalty too, then takes the argmax.

Shapes: B batch, V vocabulary.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch

DEFAULT_TEMPERATURE = 0.6  # Meta's defaults for text_completion and chat_completion
DEFAULT_TOP_P = 0.9
NO_REPETITION_PENALTY = 1.0  # dividing by 1 changes nothing


@dataclass(frozen=True)
class SamplingParams:
    """Every knob of sampling, checked once when made: a bad value is an error naming it.

    temperature: 0 = greedy; top_p: (0, 1], 1 = no nucleus cut; top_k: None = no top-k cut;
    repetition_penalty: > 0, 1.0 = off, above 1 discourages repeats.
    """

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: Optional[int] = None
    repetition_penalty: float = NO_REPETITION_PENALTY

    def __post_init__(self):
        check_sampling_args(self.temperature, self.top_p, self.top_k, self.repetition_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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
    if not _is_real_number(repetition_penalty) or repetition_penalty <= 0:
        raise ValueError(
            f"repetition_penalty must be a number > 0 (1.0 = off, e.g. 1.1 discourages repeats), got {repetition_penalty!r}"
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
    """softmax(logits / temperature) in float32: (B, V) -> (B, V). Needs temperature > 0."""
    return torch.softmax(logits.float() / temperature, dim=-1)


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


def sample_next_token(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: Optional[torch.Generator] = None,
    top_k: Optional[int] = None,
    repetition_penalty: float = NO_REPETITION_PENALTY,
    seen: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The next token of every row: (B, V) logits -> (B,) ids.

    `seen` (B, V) bool marks the tokens each row holds so far; it is needed only when
    repetition_penalty != 1.
    """
    logits = logits.float()
    if repetition_penalty != NO_REPETITION_PENALTY:
        if seen is None:
            raise ValueError("a repetition penalty needs `seen`, the tokens each row holds so far")
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    probs = logits_to_probs(logits, temperature)
    if top_p < 1:
        probs = top_p_filter(probs, top_p)
    return draw(probs, generator)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """`sample_next_token` with the knobs taken from a SamplingParams: (B, V) -> (B,)."""
    return sample_next_token(
        logits, params.temperature, params.top_p, generator, params.top_k, params.repetition_penalty, seen
    )
