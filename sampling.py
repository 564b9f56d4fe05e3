"""Choosing the next token from the model's logits: one small function per step.

The model gives a score (logit) per vocabulary entry. To pick the next token:

1. temperature: divide the logits by T before the softmax. T < 1 sharpens the distribution,
   T > 1 flattens it, and T = 0 means "always take the highest score" (greedy decoding);
2. top-p (nucleus) sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens
   whose probabilities add up to at least p, renormalise, and draw from those only. This cuts the
   long tail of unlikely tokens that makes text derail;
3. draw one token from what is left.

Shapes: B batch, V vocabulary.
"""

from typing import Optional

import torch


def check_sampling_args(temperature: float, top_p: float) -> None:
    """Reject out-of-range values instead of silently clamping them."""
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


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
    logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """The next token of every row: (B, V) logits -> (B,) ids."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    probs = logits_to_probs(logits, temperature)
    if top_p < 1:
        probs = top_p_filter(probs, top_p)
    return draw(probs, generator)
