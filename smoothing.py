"""w8a8's smoothing (SmoothQuant): part of each input channel's range moved from the activations
into the weights, so that 8 bits a token lose less.

The problem. `--quantize w8a8` rounds each token's input x to a linear layer to 256 levels between
that token's own min and max (`quantize.W8A8Linear`). A few channels of the residual stream carry
values 10-30x larger than the rest, in every token (on the demo model, channels 14, 247, 308 and
507 of most layers), and they set the step for all the others: the small channels get a handful
of levels each. The weights have no such problem: each row of W is rounded with its own scale.

The idea (Xiao et al., "SmoothQuant", 2023). For a per-channel scale s (K,), in real numbers

    y = x W^T = (x / s) (W * s)^T                    (column k of W multiplied by s_k)

so dividing the large channels of x by a large s_k, and multiplying the same columns of W by it,
changes nothing before rounding, and evens out the ranges that get rounded. The scale splits each
channel's range between the two, with a migration strength alpha:

    s_k = max_t |x[t, k]|^alpha / max_n |W[n, k]|^(1 - alpha)

The division costs nothing where x is an RMSNorm's output, RMSNorm(h) * gamma: it folds into the
norm's weight, gamma / s. In a Llama block that is the input of wq, wk, wv (`wqkv`, fused) and of
w1, w3 (`w13`), which share their norm and so share s. The feed-forward's w2 and the output head
stay weight-only int8 in w8a8 (`quantize.layer_storage`), so they are not smoothed.

max |x[t, k]| is measured on one forward pass over CALIBRATION_TOKENS pseudo-random token ids: the
large channels belong to the residual stream, not to the text (calibrating on 600 tokens of English
did no better). On the demo model, through its integer matmuls, smoothing took w8a8's perplexity
over bf16 on the tests' text from +2.3% to +0.2%, and top-1 agreement from 91.3% to 95.5% (on ten
pieces of other text: +1.7% -> +1.3% on average, the worst +6.9% -> +2.2%, 92.0% -> 94.6%).

When. The loader quantizes each weight as it reads it, so the float model never exists in memory
(`checkpoint.load_transformer`). Smoothing needs the activations, so it runs once everything is
loaded: calibrate on the (unsmoothed) w8a8 model, then, one block at a time, read the float
weights of wqkv and w13 from the checkpoint again, fold in s, and quantize them anew. Peak memory
grows by one block's float32 weights.

Shape legend: T calibration tokens, C model dim (= K, the input channels of wqkv and w13), N a
layer's output rows.
"""

from typing import Callable

import torch
from torch import nn

from model import FUSED_PROJECTIONS, RMSNorm, Transformer
from quantize import MIN_SCALE, W8A8Linear

SMOOTHING_ALPHA = 0.6  # measured on the demo model: 0.5 to 0.8 gave about the same, 1.0 (all into W) worse
CALIBRATION_TOKENS = 64  # 64 and 512 gave the same scales' accuracy
CALIBRATION_SEED = 0  # the same ids, hence the same model, on every load

# Each RMSNorm of a block, and the layer that reads its output (fused name; model.FUSED_PROJECTIONS
# lists Meta's layers inside it, which an unfused model holds separately).
NORM_READERS = {"attention_norm": "attention.wqkv", "ffn_norm": "feed_forward.w13"}


def smoothing_scales(activation_max: torch.Tensor, weight: torch.Tensor, alpha: float = SMOOTHING_ALPHA) -> torch.Tensor:
    """s (K,) in float32 from max_t |x[t, k]| (K,) and the float weight (N, K) of every layer reading x:
    s_k = max|x_k|^alpha / max_n |W[n, k]|^(1 - alpha)."""
    x_range = activation_max.float().clamp(min=MIN_SCALE)  # (K,)
    w_range = weight.abs().amax(dim=0).float().clamp(min=MIN_SCALE)  # (K,)
    return x_range.pow(alpha) / w_range.pow(1 - alpha)


@torch.no_grad()
def fold_into_norm(norm: RMSNorm, scales: torch.Tensor) -> torch.Tensor:
    """Divide the norm's weight by `scales` (K,) in place; return the scales to multiply the weights'
    columns by, (K,) float32: gamma / (gamma / s) as stored, so that the rounding of the new gamma to
    its dtype is undone in the weight and norm * weight is unchanged (s where gamma is 0)."""
    gamma = norm.weight.detach().float().clone()  # (K,): a copy, also when the weight is float32 already
    norm.weight.copy_(gamma / scales)  # rounded to the weight's dtype
    stored = norm.weight.detach().float()
    return torch.where(stored != 0, gamma / stored, scales)


@torch.inference_mode()
def activation_maxima(model: Transformer, n_tokens: int = CALIBRATION_TOKENS) -> dict[str, torch.Tensor]:
    """max_t |x[t, k]| (C,) of every block's RMSNorm outputs ("layers.3.ffn_norm": ...), over one
    forward pass of n_tokens pseudo-random ids (fewer if the model's max_seq_len is shorter). The
    pass overwrites the start of the KV cache, which holds nothing yet."""
    n_tokens = min(n_tokens, model.args.max_seq_len)
    generator = torch.Generator().manual_seed(CALIBRATION_SEED)
    ids = torch.randint(model.args.vocab_size, (1, n_tokens), generator=generator)  # (1, T)
    maxima: dict[str, torch.Tensor] = {}
    hooks = []
    for index, block in enumerate(model.layers):
        for norm_name in NORM_READERS:
            def keep_max(module: nn.Module, inputs: tuple, output: torch.Tensor, name=f"layers.{index}.{norm_name}"):
                maxima[name] = output.reshape(-1, output.shape[-1]).abs().amax(dim=0).float()  # (C,)
            hooks.append(getattr(block, norm_name).register_forward_hook(keep_max))
    try:
        model(ids.to(model.norm.weight.device), 0, last_only=True)
    finally:
        for hook in hooks:
            hook.remove()
    return maxima


def readers_of(fused_name: str, fused: bool) -> list[tuple[str, list[str]]]:
    """The layers of a block reading one norm's output: (module name in the block, [Meta's layers whose
    rows it holds]); one fused layer, or Meta's layers one by one (ModelArgs.fused_projections)."""
    parts = list(FUSED_PROJECTIONS[fused_name])
    return [(fused_name, parts)] if fused else [(part, [part]) for part in parts]


@torch.no_grad()
def smooth_w8a8(model: Transformer, read_weight: Callable[[str], torch.Tensor],
                after_each_block: Callable[[], None] = lambda: None) -> None:
    """Smooth every w8a8 layer that reads an RMSNorm's output, in place (see the top of this file).

    read_weight("layers.3.attention.wq.weight"): that float weight (N, K) as the checkpoint holds it,
    on the model's device. after_each_block: called once a block's layers are replaced (the loader
    hands the float copies' memory back there)."""
    maxima = activation_maxima(model)
    for index, block in enumerate(model.layers):
        for norm_name, fused_name in NORM_READERS.items():
            readers = readers_of(fused_name, model.args.fused_projections)
            if not all(isinstance(block.get_submodule(name), W8A8Linear) for name, _ in readers):
                continue  # this scheme keeps these layers weight-only: no activations to smooth
            weights = {name: torch.cat([read_weight(f"layers.{index}.{part}.weight").float() for part in parts])
                       for name, parts in readers}  # (N, K) each, float32
            scales = smoothing_scales(maxima[f"layers.{index}.{norm_name}"], torch.cat(list(weights.values())))
            column_scales = fold_into_norm(getattr(block, norm_name), scales)  # (K,)
            for name, weight in weights.items():
                block.set_submodule(name, W8A8Linear.from_float(weight * column_scales))
            del weights
        after_each_block()
