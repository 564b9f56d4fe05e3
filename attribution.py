"""Looking inside the model, part 2: attribution. Which input tokens pushed a target logit up or down?

Two methods over the input embeddings, both differentiating through the model's own modules
(layers.py runs them from embeddings instead of ids, the `inputs_embeds` path):

* **gradient x input**: the embedding times the gradient of the target logit, summed over C; one
  backward pass, a first-order (local) estimate;
* **integrated gradients** (Sundararajan et al. 2017, "Axiomatic Attribution for Deep Networks"):
  (x - x0) times the gradient averaged along the straight path from a baseline x0 to the input x.
  Its scores add up to the target logit at the input minus at the baseline ("completeness", their
  sec. 3), and `completeness_error` says how close a finite number of steps comes.

Gradients need plain nn.Linear layers: load with `interpret.load_for_study` (see
`check_differentiable`).

Shape legend: B batch (interpolation steps), T tokens, C model dim, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from layers import LAST_POSITION, check_position, positions_for, residual_stream, token_tensor
from model import Transformer
from bf16_layers import HalfLinear, PackedLinear, WidenedLinear
from quantize import Int4Linear, Int8Linear, W8A8Linear

DEFAULT_IG_STEPS = 128  # completeness within 0.1% on the demo model's examples; 64 gave 4-7% (README)
COMPLETENESS_TOLERANCE = 0.02  # warn above 2%: the scores do not yet add up to the logit difference
# Token rows (interpolation steps x tokens) per forward/backward pass of integrated gradients:
# bigger passes run faster on a CPU (SmolLM2, 12 tokens: 8 passes of 16 steps took 2-4x the
# CPU time of one pass of 128), but every row keeps each layer's activations for the backward pass
# (about 1.2 MB per row for SmolLM2 in float32).
IG_ROWS_PER_PASS = 512

# The engine's fast stand-ins for nn.Linear (quantize.py): no gradients flow through them.
FAST_LINEAR_TYPES = (PackedLinear, HalfLinear, WidenedLinear, Int8Linear, Int4Linear, W8A8Linear)


def check_token_id(model: Transformer, token: int, role: str) -> int:
    vocab_size = model.args.vocab_size
    if not isinstance(token, int) or not 0 <= token < vocab_size:
        raise ValueError(f"{role} token id {token!r} is not in the vocabulary [0, {vocab_size})")
    return token


def check_target(model: Transformer, target: int) -> int:
    return check_token_id(model, target, "target")


def target_logit(model: Transformer, embeddings: torch.Tensor, position: int, target: int) -> torch.Tensor:
    """The logit of `target` at `position` for a batch of input embeddings (B, T, C) -> (B,).

    This is the `inputs_embeds` path: the model runs from embeddings, not ids, so that we can
    differentiate with respect to them (and feed it points between an input and a baseline).
    """
    positions = positions_for(model, embeddings.shape[1], embeddings.device, embeddings.dtype)
    hidden, _ = residual_stream(model, embeddings, positions)
    last = hidden[-1][:, position]  # (B, C): only this position's logits are needed
    return model.output(model.norm(last)).float()[:, target]


@dataclass
class GradientTimesInput:
    tokens: list[int]
    target: int
    position: int
    scores: torch.Tensor  # (T,): sum over C of embedding * d logit / d embedding
    logit: float  # the target's logit at the input


@dataclass
class IntegratedGradients:
    tokens: list[int]
    target: int
    position: int
    scores: torch.Tensor  # (T,)
    logit: float  # the target's logit at the input
    baseline_logit: float  # ... and at the baseline
    steps: int

    @property
    def completeness_error(self) -> float:
        """|sum of scores - (logit - baseline_logit)|, relative to the logit difference (0 = exact)."""
        difference = self.logit - self.baseline_logit
        return abs(float(self.scores.sum()) - difference) / max(abs(difference), torch.finfo(torch.float32).eps)


def check_differentiable(model: Transformer) -> None:
    """Attribution differentiates through every linear layer: they must be plain nn.Linear.

    `LLaMa.build` in bf16 on a CPU stores them prepacked for oneDNN (bf16_layers.PackedLinear) or
    widened for prompts (bf16_layers.WidenedLinear), and `quantize=` stores them as int8/int4/w8a8: fast
    for generation, but no gradient flows through them.
    """
    fast = [name for name, module in model.named_modules() if isinstance(module, FAST_LINEAR_TYPES)]
    if fast:
        raise ValueError(
            f"attribution needs gradients, but {fast[0]} (and {len(fast) - 1} more) is a "
            f"{type(model.get_submodule(fast[0])).__name__}, which has none: load the model with "
            f"interpret.load_for_study(...) (plain nn.Linear), as `python interpret.py` does"
        )


def input_embeddings(model: Transformer, tokens: Sequence[int]) -> torch.Tensor:
    """(1, T, C) embeddings of the text, detached: the leaf we differentiate with respect to."""
    with torch.no_grad():
        return model.tok_embeddings(token_tensor(model, tokens)).detach()


def gradient_x_input(
    model: Transformer, tokens: Sequence[int], target: int, position: int = LAST_POSITION
) -> GradientTimesInput:
    """Per-token score: the embedding times the gradient of the target logit, summed over C.

    A first-order Taylor estimate of each token's contribution; cheap (one backward pass) but
    local: it says how the logit moves for a small step, not how much a token contributed overall.
    """
    check_target(model, target)
    check_differentiable(model)
    position = check_position(position, len(tokens))
    x = input_embeddings(model, tokens).requires_grad_(True)
    logit = target_logit(model, x, position, target)
    (grad,) = torch.autograd.grad(logit.sum(), x)
    scores = (x * grad).sum(dim=-1)[0].detach()  # (T,)
    return GradientTimesInput(list(tokens), target, position, scores, float(logit.detach()))


def with_first_token_kept(x: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """The baseline, except that position 0 keeps the input's own embedding.

    Llama-style models park most of their attention on the first position (an "attention sink",
    Xiao et al. 2023), whose residual stream carries "massive activations" (Sun et al. 2024):
    about 2e4 in SmolLM2, against ~1e2 elsewhere. Blending that token away switches the mechanism
    off somewhere along the path, and the target logit jumps by tens within a hundredth of it, which
    no affordable number of steps integrates. Kept, the path is smooth enough. The price: the first
    token gets no score (x - x0 is zero there); in Llama 2 and 3 it is BOS anyway.
    """
    baseline = baseline.clone()
    baseline[:, 0] = x[:, 0]
    return baseline


@torch.no_grad()
def mean_embedding_baseline(model: Transformer, x: torch.Tensor) -> torch.Tensor:
    """The average token (the mean row of the embedding) at every position but the first.

    The default. Why not zeros, the "no input" of the IG paper: RMSNorm divides by
    sqrt(mean(x^2) + eps): any input, however small, comes out of the first norm at full size, so
    the output jumps at the origin (SmolLM2 on our README example: the " Berlin" logit is 0.0 at
    zero input, 3.6 at 1e-5 x the input, -2.2 at 1e-2 x, 16.3 at the input). A trained model's mean
    embedding sits well away from the origin (SmolLM2: RMS 0.09, a token's ~0.13); a random model's
    does not (its rows average out), so give tiny random models a token baseline instead.
    """
    mean = model.tok_embeddings.weight.mean(dim=0)  # (C,)
    return with_first_token_kept(x, mean.expand_as(x))


@torch.no_grad()
def token_baseline(model: Transformer, x: torch.Tensor, token: int) -> torch.Tensor:
    """One token's embedding (e.g. EOS) at every position but the first."""
    check_token_id(model, token, "baseline")
    return with_first_token_kept(x, model.tok_embeddings.weight[token].expand_as(x))


def zero_baseline(x: torch.Tensor) -> torch.Tensor:
    """Zero embeddings at every position but the first: the IG paper's choice, and a poor one here
    (see `mean_embedding_baseline`): try it and watch the completeness error."""
    return with_first_token_kept(x, torch.zeros_like(x))


def midpoints(steps: int) -> torch.Tensor:
    """alpha_k = (k + 1/2) / steps: the middle of each of `steps` equal pieces of [0, 1].

    The midpoint Riemann sum: its error shrinks as 1/steps^2 on a smooth path, and it never
    evaluates the baseline itself.
    """
    return (torch.arange(steps, dtype=torch.float32) + 0.5) / steps


def integrated_gradients(
    model: Transformer,
    tokens: Sequence[int],
    target: int,
    position: int = LAST_POSITION,
    steps: int = DEFAULT_IG_STEPS,
    baseline: Optional[torch.Tensor] = None,
    batch_size: Optional[int] = None,
) -> IntegratedGradients:
    """Per-token score: (x - x0) times the gradient averaged along the straight path x0 -> x.

    Along the path the target logit goes from F(x0) to F(x); the fundamental theorem of calculus
    for path integrals makes the scores sum to F(x) - F(x0) exactly ("completeness"); a Riemann
    sum over `steps` points approximates the average, and `completeness_error` says how well.
    The baseline x0 (1, T, C) defaults to `mean_embedding_baseline`; `batch_size` (points per
    forward/backward pass) to as many as fit in IG_ROWS_PER_PASS token rows.
    """
    check_target(model, target)
    check_differentiable(model)
    position = check_position(position, len(tokens))
    if batch_size is None:
        batch_size = max(1, IG_ROWS_PER_PASS // len(tokens))
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    x = input_embeddings(model, tokens)  # (1, T, C)
    x0 = mean_embedding_baseline(model, x) if baseline is None else baseline.detach().to(x.device, x.dtype)
    if x0.shape != x.shape:
        raise ValueError(f"baseline has shape {tuple(x0.shape)}, the input embeddings {tuple(x.shape)}")
    grad_sum = torch.zeros_like(x[0], dtype=torch.float32)  # (T, C)
    for alpha in midpoints(steps).split(batch_size):
        alpha = alpha.to(x.device, x.dtype)[:, None, None]  # (B, 1, 1)
        points = (x0 + alpha * (x - x0)).requires_grad_(True)  # (B, T, C)
        logits = target_logit(model, points, position, target)  # (B,)
        (grad,) = torch.autograd.grad(logits.sum(), points)  # each point's own gradient: (B, T, C)
        grad_sum += grad.float().sum(dim=0)
    scores = ((x - x0)[0].float() * grad_sum / steps).sum(dim=-1)  # (T,)
    with torch.no_grad():
        ends = target_logit(model, torch.cat([x, x0]), position, target)  # F(x), F(x0)
    return IntegratedGradients(list(tokens), target, position, scores, float(ends[0]), float(ends[1]), steps)
