"""Looking inside the model: layer-range loading, hidden states, attention, logit lens, attribution.

`model.py` computes logits and nothing else. Here we open it up, without changing a line of it:
every function below calls the model's own submodules (`tok_embeddings`, `layers[i].attention.wq`,
`feed_forward`, `norm`, `output`, ...) and functions (`apply_rotary_emb`, `repeat_kv`,
`causal_mask`) one after another, and keeps what a learner wants to see on the way.

Chapters, each using only what stands above it:

1. **Layer-range loading.** A `Transformer` built on the "meta" device has every shape and no
   memory. `LayerLoader` fills in only the pieces asked for (the embedding, blocks i..j, the
   final norm and head), reading only their tensors from the memory-mapped shards, and can empty
   them again. A model that does not fit in memory can be streamed through it a range at a time.
2. **Stepwise compute.** `embed`, `run_block`, `apply_head`: run one after another they give
   *exactly* the full model's logits, because they are the full model's own modules.
3. **The forward pass written out.** The same block with attention spelled out, so that the
   softmax weights can be kept: the residual stream after every block (`hidden_states`) and every
   head's attention pattern (`attention_maps`) in one `trace`.
4. **Logit lens** (nostalgebraist 2020, "interpreting GPT: the logit lens"): read every layer's
   residual stream through the final norm and head, as if the model stopped there.
5. **Attribution** over the input embeddings: gradient x input, and integrated gradients
   (Sundararajan et al. 2017, "Axiomatic Attribution for Deep Networks") whose scores add up to
   the target logit at the input minus at the baseline ("completeness", their sec. 3).
6. **Why this token.** For each generated token: the top candidates with their probabilities
   from the model, after repetition penalty / temperature / top-k, and after top-p, and which
   of them top-k or top-p cut.
7. **Tables and pictures** (matplotlib, optional: only for PNG files).
8. **Command line**: ``python interpret.py hidden|attention|lens|attribute|why --help``.

Shape legend: B batch (interpolation steps in attribution), T tokens, C model dim, H query heads,
K key/value heads, D head dim, L layers, V vocabulary.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import AbstractSet, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from checkpoint import (
    CheckpointError,
    check_checkpoint_dir,
    check_vocab_matches,
    choose_device,
    choose_dtype,
    load_model_args,
    load_transformer,
)
from inference import DEFAULT_MAX_SEQ_LEN, LLaMa, decode_step
from inspect_checkpoint import model_shapes, tensor_index, vocab_size_from_shapes
from model import Attention, Transformer, TransformerBlock, apply_rotary_emb, causal_mask, repeat_kv
from quantize import Int4Linear, Int8Linear, PackedLinear
from sampling import (
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    NO_REPETITION_PENALTY,
    SamplingParams,
    apply_repetition_penalty,
    logits_to_probs,
    sample,
    top_k_filter,
    top_p_filter,
)
from tokenizer import Tokenizer, TokenizerFileError

# Interpretation works on one text at a time; attribution batches its interpolation steps itself.
STUDY_BATCH_SIZE = 1
# float32 by default: bf16 rounding would swamp small attributions and the completeness check.
DEFAULT_STUDY_DTYPE = "float32"
DEFAULT_SHOW = 5  # tokens shown per layer (lens) or per step (why)
DEFAULT_IG_STEPS = 128  # completeness within 0.1% on the demo model's examples; 64 gave 4-7% (README)
COMPLETENESS_TOLERANCE = 0.02  # warn above 2%: the scores do not yet add up to the logit difference
# Token rows (interpolation steps x tokens) per forward/backward pass of integrated gradients:
# bigger passes run faster on a CPU (SmolLM2, 12 tokens: 8 passes of 16 steps took 2-4x the
# CPU time of one pass of 128), but every row keeps each layer's activations for the backward pass
# (about 1.2 MB per row for SmolLM2 in float32).
IG_ROWS_PER_PASS = 512
DEFAULT_WHY_GEN_LEN = 8
DEFAULT_TEXT = "The capital of France is Paris. The capital of Germany is"
MATPLOTLIB_HINT = "PNG output needs matplotlib: pip install matplotlib"
PNG_DPI = 80  # pixels per inch of the saved pictures: readable labels, small files
LAST_POSITION = -1  # Python's negative indexing: the last token

# The engine's fast stand-ins for nn.Linear (quantize.py): no gradients flow through them.
FAST_LINEAR_TYPES = (PackedLinear, Int8Linear, Int4Linear)

# Names of the loadable pieces of a Transformer (Meta's module names).
EMBEDDING = "tok_embeddings"
FINAL_NORM = "norm"
HEAD = "output"


class MissingDependencyError(RuntimeError):
    """An optional package is needed for what was asked; the message says how to install it."""


# --------------------------------------------------------------------------------------------
# 1. Layer-range loading
# --------------------------------------------------------------------------------------------


def is_loaded(module: nn.Module) -> bool:
    """True if the module holds real weights (not the "meta" device's shapes-only placeholders)."""
    return not any(p.is_meta for p in module.parameters())


def check_layer(model: Transformer, layer: int) -> int:
    n_layers = model.args.n_layers
    if not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer!r} is out of range: this model has {n_layers} layers, 0 .. {n_layers - 1}")
    return layer


def require_loaded(model: Transformer, name: str) -> nn.Module:
    """model.<name> ("tok_embeddings", "layers.3", "norm", "output"), with an error if not loaded."""
    module = model.get_submodule(name)
    if not is_loaded(module):
        raise ValueError(f"{name} is not loaded: call LayerLoader.load(...) for it first")
    return module


class LayerLoader:
    """Load the pieces of a Meta checkpoint one range at a time, reading only their tensors.

        loader = LayerLoader("checkpoints/llama-2-70b", dtype="bfloat16", max_seq_len=512)
        loader.load(embedding=True)           # loader.model.tok_embeddings is real now
        loader.load(layers=range(0, 8))       # blocks 0..7
        loader.unload(layers=range(0, 8))     # back to the "meta" device: memory released

    `loader.model` is an ordinary `Transformer`; the pieces not loaded are on the "meta" device.
    Which shard holds which tensor comes from the cached tensor index (inspect_checkpoint.py).
    """

    def __init__(
        self,
        ckpt_dir: Union[str, Path],
        device: Union[str, torch.device, None] = None,
        dtype: Union[str, torch.dtype, None] = None,
        max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
        max_batch_size: int = STUDY_BATCH_SIZE,
    ):
        self.ckpt_dir = check_checkpoint_dir(ckpt_dir)
        self.device = choose_device(device)
        self.dtype = choose_dtype(dtype, self.device)
        args = load_model_args(self.ckpt_dir, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        self.index = tensor_index(self.ckpt_dir)
        if not args.has_vocab_size:  # Llama 2's -1: the weights know
            args = load_model_args(self.ckpt_dir, max_seq_len, max_batch_size,
                                   vocab_size=vocab_size_from_shapes(self.index, args.dim))
        self.args = args
        with torch.device("meta"):
            self.model = Transformer(args).eval()
        self._check_names()
        self._opened: dict[int, dict] = {}  # shard number -> its memory-mapped state dict

    def _check_names(self) -> None:
        expected = set(model_shapes(self.args))
        found = set(self.index.names())
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        if missing or unexpected:
            raise CheckpointError(
                f"{self.ckpt_dir}: tensors do not match params.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )

    def _pieces(self, embedding: bool, layers: Iterable[int], head: bool) -> list[str]:
        pieces = [EMBEDDING] if embedding else []
        pieces += [f"layers.{check_layer(self.model, i)}" for i in layers]
        return pieces + ([FINAL_NORM, HEAD] if head else [])

    def load(self, embedding: bool = False, layers: Iterable[int] = (), head: bool = False) -> None:
        """Read the embedding, the given blocks and/or the final norm + head into `self.model`."""
        for piece in self._pieces(embedding, layers, head):
            module = self.model.get_submodule(piece)
            if is_loaded(module):
                continue
            state = {}
            for key, placeholder in module.state_dict().items():
                name = f"{piece}.{key}"
                tensor = self.index.load_tensor(name, self.args.dim, self._opened)
                if tensor.shape != placeholder.shape:
                    raise CheckpointError(
                        f"{name} in {self.ckpt_dir} has shape {tuple(tensor.shape)}, "
                        f"but params.json implies {tuple(placeholder.shape)}"
                    )
                state[key] = tensor.to(device=self.device, dtype=self.dtype)
            module.load_state_dict(state, strict=True, assign=True)
            if isinstance(module, TransformerBlock):
                module.attention.setup_cache(self.device, self.dtype)

    def unload(self, embedding: bool = False, layers: Iterable[int] = (), head: bool = False) -> None:
        """Send pieces back to the "meta" device, which frees their memory."""
        for piece in self._pieces(embedding, layers, head):
            self.model.get_submodule(piece).to("meta")

    def loaded_pieces(self) -> list[str]:
        return [p for p in self._pieces(True, range(self.args.n_layers), True) if is_loaded(self.model.get_submodule(p))]

    def close(self) -> None:
        """Forget the opened shards (their memory maps close when nothing else refers to them)."""
        self._opened.clear()


# --------------------------------------------------------------------------------------------
# 2. Stepwise compute: embed, block by block, head
# --------------------------------------------------------------------------------------------


@dataclass
class Positions:
    """What every block needs to know about where the tokens sit (positions 0 .. T-1)."""

    freqs_cis: torch.Tensor  # (1, T, D/2) RoPE rotations, complex
    mask: Optional[torch.Tensor]  # (1, 1, T, T) additive causal mask; None for a single token


def check_length(model: Transformer, seqlen: int) -> None:
    if seqlen < 1:
        raise ValueError("no tokens: give a non-empty text")
    if seqlen > model.args.max_seq_len:
        raise ValueError(
            f"the text is {seqlen} tokens, longer than max_seq_len={model.args.max_seq_len}: "
            f"shorten it or raise max_seq_len (--max-seq-len)"
        )


def check_tokens(model: Transformer, tokens: torch.Tensor) -> None:
    vocab_size = model.args.vocab_size
    if tokens.numel() and not bool(((tokens >= 0) & (tokens < vocab_size)).all()):
        bad = tokens[(tokens < 0) | (tokens >= vocab_size)][:5].tolist()
        raise ValueError(f"token ids {bad} are outside the vocabulary [0, {vocab_size})")


def positions_for(model: Transformer, seqlen: int, device: torch.device, dtype: torch.dtype) -> Positions:
    """The RoPE rotations and causal mask for a sequence of `seqlen` tokens starting at position 0,
    exactly as `Transformer.forward` makes them for start_pos = 0."""
    check_length(model, seqlen)
    positions = torch.arange(0, seqlen, device=device)[None, :]  # (1, T)
    return Positions(model.rope_table(device)[positions], causal_mask(seqlen, 0, None, device, dtype))


@torch.no_grad()
def embed(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Token ids (B, T) -> the residual stream's start (B, T, C): one row of the embedding each."""
    check_length(model, tokens.shape[1])
    check_tokens(model, tokens)
    return require_loaded(model, EMBEDDING)(tokens)


@torch.no_grad()
def run_block(model: Transformer, layer: int, h: torch.Tensor, positions: Positions) -> torch.Tensor:
    """Block `layer` applied to the residual stream h (B, T, C), through the model's own code."""
    block = require_loaded(model, f"layers.{check_layer(model, layer)}")
    if h.shape[0] > model.args.max_batch_size:  # the block writes its keys and values into its KV cache
        raise ValueError(f"batch of {h.shape[0]} exceeds max_batch_size={model.args.max_batch_size}")
    return block(h, 0, positions.freqs_cis, positions.mask)


@torch.no_grad()
def apply_head(model: Transformer, h: torch.Tensor) -> torch.Tensor:
    """Final norm and output head: residual stream (B, T, C) -> logits (B, T, V) in float32."""
    norm, head = require_loaded(model, FINAL_NORM), require_loaded(model, HEAD)
    return head(norm(h)).float()


def stepwise_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """embed -> every block -> head: the same logits as model(tokens, start_pos=0)."""
    h = embed(model, tokens)
    positions = positions_for(model, tokens.shape[1], h.device, h.dtype)
    for layer in range(model.args.n_layers):
        h = run_block(model, layer, h, positions)
    return apply_head(model, h)


def streamed_logits(
    ckpt_dir: Union[str, Path],
    tokens: torch.Tensor,
    layers_per_step: int,
    device: Union[str, torch.device, None] = None,
    dtype: Union[str, torch.dtype, None] = None,
) -> torch.Tensor:
    """Logits (B, T, V) of a model of which at most `layers_per_step` blocks are in memory at once."""
    if layers_per_step < 1:
        raise ValueError(f"layers_per_step must be >= 1, got {layers_per_step}")
    batch_size, seqlen = tokens.shape
    loader = LayerLoader(ckpt_dir, device, dtype, max_seq_len=seqlen, max_batch_size=batch_size)
    model = loader.model
    tokens = tokens.to(loader.device)
    loader.load(embedding=True)
    h = embed(model, tokens)
    loader.unload(embedding=True)
    positions = positions_for(model, seqlen, h.device, h.dtype)
    for start in range(0, loader.args.n_layers, layers_per_step):
        layers = range(start, min(start + layers_per_step, loader.args.n_layers))
        loader.load(layers=layers)
        for layer in layers:
            h = run_block(model, layer, h, positions)
        loader.unload(layers=layers)
    loader.load(head=True)
    logits = apply_head(model, h)
    loader.close()
    return logits


# --------------------------------------------------------------------------------------------
# 3. The forward pass written out: hidden states and attention weights
# --------------------------------------------------------------------------------------------


def attention_with_weights(
    attn: Attention, x: torch.Tensor, positions: Positions
) -> tuple[torch.Tensor, torch.Tensor]:
    """`Attention.forward` for a whole sequence without the KV cache, keeping the softmax weights.

    x: (B, T, C). Returns the attention output (B, T, C) and the weights (B, H, T, T): row i of
    head h is how much query token i takes from each key token j (zero for j > i; the row sums to 1).
    """
    batch_size, seqlen, _ = x.shape
    xq = attn.wq(x).view(batch_size, seqlen, attn.n_heads, attn.head_dim)  # (B, T, H, D)
    xk = attn.wk(x).view(batch_size, seqlen, attn.n_kv_heads, attn.head_dim)  # (B, T, K, D)
    xv = attn.wv(x).view(batch_size, seqlen, attn.n_kv_heads, attn.head_dim)  # (B, T, K, D)
    xq, xk = apply_rotary_emb(xq, xk, positions.freqs_cis)
    q, k, v = xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)  # (B, H|K, T, D)
    k, v = repeat_kv(k, attn.n_rep), repeat_kv(v, attn.n_rep)  # (B, H, T, D)

    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(attn.head_dim)  # (B, H, T, T)
    if positions.mask is not None:
        scores = scores + positions.mask
    weights = F.softmax(scores.float(), dim=-1).type_as(q)
    output = torch.matmul(weights, v)  # (B, H, T, D)
    output = output.transpose(1, 2).reshape(batch_size, seqlen, -1)  # (B, T, H * D)
    return attn.wo(output), weights


def block_with_weights(
    block: TransformerBlock, x: torch.Tensor, positions: Positions
) -> tuple[torch.Tensor, torch.Tensor]:
    """`TransformerBlock.forward` with the attention weights kept: (B, T, C) -> (B, T, C), (B, H, T, T)."""
    attended, weights = attention_with_weights(block.attention, block.attention_norm(x), positions)
    h = x + attended
    return h + block.feed_forward(block.ffn_norm(h)), weights


def residual_stream(
    model: Transformer, embeddings: torch.Tensor, positions: Positions
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run every block from the given embeddings (B, T, C), differentiably.

    Returns the residual stream at L+1 points (after the embedding, after each block) and the
    L attention weights; the last residual is what the final norm and head read.
    """
    hidden, attention = [embeddings], []
    h = embeddings
    for layer in range(model.args.n_layers):
        h, weights = block_with_weights(require_loaded(model, f"layers.{layer}"), h, positions)
        hidden.append(h)
        attention.append(weights)
    return hidden, attention


@dataclass
class Trace:
    """Everything one forward pass over one text computes, kept."""

    tokens: list[int]
    hidden: torch.Tensor  # (L+1, T, C): [0] the embeddings, [i+1] the residual stream after block i
    attention: torch.Tensor  # (L, H, T, T): [layer, head, query, key]; each row sums to 1
    logits: torch.Tensor  # (T, V) float32: the model's next-token scores at every position


def token_tensor(model: Transformer, tokens: Sequence[int]) -> torch.Tensor:
    """One text's ids as a (1, T) tensor on the model's device, checked against length and vocabulary."""
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=require_loaded(model, EMBEDDING).weight.device)
    check_length(model, ids.shape[1])
    check_tokens(model, ids)
    return ids


@torch.no_grad()
def trace(model: Transformer, tokens: Sequence[int]) -> Trace:
    """Hidden states, attention weights and logits of one text, in one pass."""
    ids = token_tensor(model, tokens)
    embeddings = model.tok_embeddings(ids)
    positions = positions_for(model, ids.shape[1], ids.device, embeddings.dtype)
    hidden, attention = residual_stream(model, embeddings, positions)
    logits = apply_head(model, hidden[-1])
    return Trace(
        tokens=list(tokens),
        hidden=torch.cat(hidden, dim=0),
        attention=torch.cat(attention, dim=0),
        logits=logits[0],
    )


def hidden_states(model: Transformer, tokens: Sequence[int]) -> torch.Tensor:
    """The residual stream (L+1, T, C): after the embedding, then after each block (before the final norm)."""
    return trace(model, tokens).hidden


def attention_maps(model: Transformer, tokens: Sequence[int], layer: int) -> torch.Tensor:
    """Layer `layer`'s attention weights (H, T, T): [head, query, key]."""
    check_layer(model, layer)
    return trace(model, tokens).attention[layer]


# --------------------------------------------------------------------------------------------
# 4. Logit lens
# --------------------------------------------------------------------------------------------


@dataclass
class LensRow:
    """What the model would predict if it stopped after `layer` blocks (0 = right after the embedding)."""

    layer: int
    token_ids: list[int]  # top-k, most likely first
    probs: list[float]


def check_position(position: int, seqlen: int) -> int:
    """A token position (negative counts from the end), as an index 0 .. T-1."""
    if not isinstance(position, int) or not -seqlen <= position < seqlen:
        raise ValueError(f"position {position!r} is out of range for a text of {seqlen} tokens "
                         f"(use 0 .. {seqlen - 1}, or -1 for the last)")
    return position % seqlen


@torch.no_grad()
def lens_probs(model: Transformer, tokens: Sequence[int], position: int = LAST_POSITION) -> torch.Tensor:
    """Next-token probabilities (L+1, V) read from every layer's residual stream at `position`."""
    position = check_position(position, len(tokens))
    residual = trace(model, tokens).hidden[:, position]  # (L+1, C)
    logits = apply_head(model, residual)  # (L+1, V): the same norm and head at every depth
    return torch.softmax(logits, dim=-1)


def logit_lens(
    model: Transformer, tokens: Sequence[int], k: int = DEFAULT_SHOW, position: int = LAST_POSITION
) -> list[LensRow]:
    """The top-k next tokens at `position`, read through the final norm and head after every layer."""
    if k < 1:
        raise ValueError(f"top-k must be >= 1, got {k}")
    probs = lens_probs(model, tokens, position)
    top = torch.topk(probs, min(k, probs.shape[-1]), dim=-1)
    return [LensRow(layer, ids.tolist(), p.tolist()) for layer, (p, ids) in enumerate(zip(top.values, top.indices))]


# --------------------------------------------------------------------------------------------
# 5. Attribution: which input tokens pushed the target logit up or down
# --------------------------------------------------------------------------------------------


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

    `LLaMa.build` in bf16 on a CPU stores them prepacked for oneDNN (quantize.PackedLinear), and
    `quantize=` stores them as int8/int4: fast for generation, but no gradient flows through them.
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


# --------------------------------------------------------------------------------------------
# 6. Why this token: the sampler's view of each step of a generation
# --------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    token: int
    prob: float  # the model's own probability: softmax(logits)
    prob_shaped: float  # after repetition penalty, temperature and top-k (greedy: 1 for the argmax)
    prob_final: float  # after top-p, renormalised: what the draw used
    cut: Optional[str]  # "top-k" or "top-p" if that filter removed it, else None


@dataclass
class WhyStep:
    position: int  # where the chosen token goes in the sequence
    chosen: int
    candidates: list[Candidate]  # the most likely by the model, plus the chosen token if it is not among them
    kept: int  # how many tokens could have been drawn


@dataclass
class SamplerView:
    """The distributions `sampling.sample_next_token` goes through, for one row of logits (V,)."""

    probs: torch.Tensor  # (V,) softmax of the raw logits
    shaped: torch.Tensor  # (V,) after repetition penalty, temperature and top-k
    final: torch.Tensor  # (V,) after top-p: the distribution drawn from
    cut_by_top_k: torch.Tensor  # (V,) bool
    cut_by_top_p: torch.Tensor  # (V,) bool


@torch.no_grad()
def sampler_view(logits: torch.Tensor, params: SamplingParams, seen: Optional[torch.Tensor]) -> SamplerView:
    """Each step of `sampling.sample_next_token`, kept, in its order (see sampling.py)."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    if params.repetition_penalty != NO_REPETITION_PENALTY:
        logits = apply_repetition_penalty(logits[None], seen[None], params.repetition_penalty)[0]
    nothing_cut = torch.zeros_like(probs, dtype=torch.bool)
    if params.greedy:  # all the mass on the argmax; nothing is filtered
        one_hot = F.one_hot(torch.argmax(logits), logits.shape[-1]).float()
        return SamplerView(probs, one_hot, one_hot, nothing_cut, nothing_cut)
    cut_by_top_k = nothing_cut
    if params.top_k is not None:
        filtered = top_k_filter(logits[None], params.top_k)[0]
        cut_by_top_k = torch.isinf(filtered) & ~torch.isinf(logits)
        logits = filtered
    shaped = logits_to_probs(logits[None], params.temperature)[0]
    final = top_p_filter(shaped[None], params.top_p)[0] if params.top_p < 1 else shaped
    return SamplerView(probs, shaped, final, cut_by_top_k, (shaped > 0) & (final == 0))


@torch.no_grad()
def why(
    model: Transformer,
    prompt_tokens: Sequence[int],
    stop_tokens: AbstractSet[int],
    max_gen_len: int = DEFAULT_WHY_GEN_LEN,
    params: Optional[SamplingParams] = None,
    show: int = DEFAULT_SHOW,
    seed: Optional[int] = None,
) -> list[WhyStep]:
    """Generate as `LLaMa.generate` does (the same model calls, the same sampler; the same seed
    gives the same tokens) and explain every step: the `show` most likely candidates.

    params: temperature, top-p, top-k, repetition penalty (default: `SamplingParams()`, Meta's).
    """
    params = SamplingParams() if params is None else params
    if max_gen_len < 1 or show < 1:
        raise ValueError(f"max_gen_len and show must be >= 1, got {max_gen_len} and {show}")
    ids = token_tensor(model, prompt_tokens)
    if ids.shape[1] >= model.args.max_seq_len:
        raise ValueError(f"the prompt is {ids.shape[1]} tokens: max_seq_len={model.args.max_seq_len} "
                         f"leaves no room to generate; raise --max-seq-len")
    generator = torch.Generator(device=ids.device).manual_seed(seed) if seed is not None else None
    seen = None  # (1, V) bool: the tokens so far, for the repetition penalty
    if params.repetition_penalty != NO_REPETITION_PENALTY:
        seen = torch.zeros((1, model.args.vocab_size), dtype=torch.bool, device=ids.device)
        seen[0, ids[0]] = True
    logits = model(ids, start_pos=0, last_only=True)[:, -1]  # (1, V): the prefill, as generate does
    steps = []
    end = min(model.args.max_seq_len, ids.shape[1] + max_gen_len)
    for cur_pos in range(ids.shape[1], end):
        chosen = int(sample(logits, params, seen, generator)[0])
        view = sampler_view(logits[0], params, seen[0] if seen is not None else None)
        top = torch.topk(view.probs, min(show, view.probs.shape[-1])).indices.tolist()
        shown = top + ([chosen] if chosen not in top else [])
        candidates = [
            Candidate(t, float(view.probs[t]), float(view.shaped[t]), float(view.final[t]),
                      cut="top-k" if view.cut_by_top_k[t] else "top-p" if view.cut_by_top_p[t] else None)
            for t in shown
        ]
        steps.append(WhyStep(cur_pos, chosen, candidates, int((view.final > 0).sum())))
        if chosen in stop_tokens or cur_pos + 1 == end:
            break
        if seen is not None:
            seen[0, chosen] = True
        logits = decode_step(model, torch.tensor([[chosen]], device=ids.device), cur_pos, None)  # (1, V)
    return steps


# --------------------------------------------------------------------------------------------
# 7. Tables and pictures
# --------------------------------------------------------------------------------------------


def token_label(tokenizer: Tokenizer, token: int) -> str:
    """A token as it sits in the vocabulary, quoted so that spaces and newlines show: ' Paris', '\\n'."""
    return repr(tokenizer.id_to_piece(token))


def layer_name(layer: int) -> str:
    """Residual stream index -> words: 0 is the embedding, i+1 is after block i."""
    return "embedding" if layer == 0 else f"block {layer - 1}"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def format_hidden(hidden: torch.Tensor, labels: list[str]) -> str:
    """The size (root mean square) of the residual stream at each layer and token."""
    rms = hidden.float().pow(2).mean(dim=-1).sqrt()  # (L+1, T)
    rows = [[layer_name(i)] + [f"{v:.3g}" for v in rms[i].tolist()] for i in range(rms.shape[0])]
    return format_table(["RMS of residual"] + labels, rows)


def format_attention(weights: torch.Tensor, labels: list[str]) -> str:
    """A (T, T) attention matrix as text: rows are queries, columns keys."""
    rows = [[labels[i]] + [f"{w:.2f}" if j <= i else "" for j, w in enumerate(weights[i].tolist())]
            for i in range(weights.shape[0])]
    return format_table(["query \\ key"] + labels, rows)


def format_lens(rows: list[LensRow], tokenizer: Tokenizer) -> str:
    table = [[layer_name(r.layer)] + [f"{token_label(tokenizer, t)} {p:.2f}" for t, p in zip(r.token_ids, r.probs)]
             for r in rows]
    k = len(rows[0].token_ids)
    return format_table(["layer"] + [f"top {i + 1}" for i in range(k)], table)


def format_attribution(
    labels: list[str], gxi: Optional[GradientTimesInput], ig: Optional[IntegratedGradients]
) -> str:
    header = ["position", "token"] + (["grad x input"] if gxi else []) + (["integrated gradients"] if ig else [])
    rows = []
    for i, label in enumerate(labels):
        row = [str(i), label]
        row += [f"{float(gxi.scores[i]):+.4f}"] if gxi else []
        row += [f"{float(ig.scores[i]):+.4f}"] if ig else []
        rows.append(row)
    text = format_table(header, rows)
    if ig is not None:
        text += (f"\nintegrated gradients, {ig.steps} steps: scores sum to {float(ig.scores.sum()):+.4f}; "
                 f"logit at input - at baseline = {ig.logit:+.4f} - {ig.baseline_logit:+.4f} = "
                 f"{ig.logit - ig.baseline_logit:+.4f} (completeness error {100 * ig.completeness_error:.2f}%)")
        if ig.completeness_error > COMPLETENESS_TOLERANCE:
            text += (f"\nwarning: the scores miss the logit difference by more than {100 * COMPLETENESS_TOLERANCE:g}%: "
                     f"the path is rough; raise --steps (or try another --baseline) before trusting them")
    return text


def format_why(steps: list[WhyStep], tokenizer: Tokenizer, params: SamplingParams) -> str:
    shaping, settings = ["temperature"], [f"T={params.temperature:g}"]  # the sampler's steps in use, in order
    if params.repetition_penalty != NO_REPETITION_PENALTY:
        shaping.insert(0, "penalty")
        settings.insert(0, f"repetition penalty {params.repetition_penalty:g}")
    if params.top_k is not None:
        shaping.append("top-k")
        settings.append(f"top-k {params.top_k}")
    header = ["candidate", "p (model)", f"p ({', '.join(shaping)})", "p (after top-p)", ""]
    out = []
    for step in steps:
        rule = "greedy" if params.greedy else f"{', '.join(settings)}, top-p {params.top_p:g}: {step.kept} token(s) kept"
        out.append(f"position {step.position}: chose {token_label(tokenizer, step.chosen)} ({rule})")
        rows = [[token_label(tokenizer, c.token), f"{c.prob:.4f}", f"{c.prob_shaped:.4f}", f"{c.prob_final:.4f}",
                 f"cut by {c.cut}" if c.cut else ("<- chosen" if c.token == step.chosen else "")]
                for c in step.candidates]
        out.append(format_table(header, rows))
        out.append("")
    return "\n".join(out)


def require_matplotlib():
    """matplotlib.pyplot with a file-only backend, or an error that says how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError(MATPLOTLIB_HINT) from None
    matplotlib.use("Agg")  # draw into files; no display needed
    import matplotlib.pyplot as plt

    return plt


def save_attention_png(weights: torch.Tensor, labels: list[str], path: Union[str, Path], title: str) -> Path:
    """Heatmaps of attention weights (H, T, T), one panel per head; tokens label both axes."""
    plt = require_matplotlib()
    n_heads = weights.shape[0]
    cols = math.ceil(math.sqrt(n_heads))
    rows = math.ceil(n_heads / cols)
    cell = 0.3 * len(labels) + 2  # inches per panel: room for one label per token
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell + 1, rows * cell), squeeze=False, layout="constrained")
    for head, ax in enumerate(axes.flat):
        if head >= n_heads:
            ax.axis("off")
            continue
        image = ax.imshow(weights[head].float().cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"head {head}" if n_heads > 1 else title, fontsize=10)
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel("key (attended to)", fontsize=8)
        ax.set_ylabel("query (attending)", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    if n_heads > 1:
        fig.suptitle(title)
    fig.savefig(path, dpi=PNG_DPI)
    plt.close(fig)
    return Path(path)


def save_attribution_png(scores: dict[str, torch.Tensor], labels: list[str], path: Union[str, Path], title: str) -> Path:
    """Bar chart of per-token attribution scores, one group of bars per method."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(0.5 * len(labels) + 2, 3.5))
    width = 0.8 / len(scores)
    for i, (method, values) in enumerate(scores.items()):
        ax.bar([x + i * width for x in range(len(labels))], values.float().cpu().tolist(), width, label=method)
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, rotation=90, fontsize=8)
    ax.set_ylabel("contribution to the target logit")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=PNG_DPI)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------------------------
# 8. Command line
# --------------------------------------------------------------------------------------------


def load_for_study(
    ckpt_dir: Union[str, Path],
    device: Union[str, torch.device, None] = None,
    dtype: Union[str, torch.dtype, None] = DEFAULT_STUDY_DTYPE,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
) -> LLaMa:
    """`LLaMa.build` for one text at a time, with plain nn.Linear layers (see `check_differentiable`)."""
    llama = LLaMa.build(ckpt_dir, load_model=False, max_seq_len=max_seq_len, max_batch_size=STUDY_BATCH_SIZE,
                        device=device, dtype=dtype)
    args = load_model_args(ckpt_dir, max_seq_len=max_seq_len, max_batch_size=STUDY_BATCH_SIZE)
    model = load_transformer(ckpt_dir, args, llama.device, choose_dtype(dtype, llama.device), progress=False)
    check_vocab_matches(llama.tokenizer.n_words, llama.tokenizer.model_path, model.args)
    return LLaMa(model, llama.tokenizer, model.args, llama.device)


def encode_text(llama: LLaMa, text: str) -> list[int]:
    if not text:
        raise ValueError("--text is empty: give some text to look at")
    tokens = llama.tokenizer.encode(text, bos=llama.tokenizer.add_bos, eos=False)
    if len(tokens) > llama.args.max_seq_len:
        raise ValueError(f"the text is {len(tokens)} tokens, longer than max_seq_len={llama.args.max_seq_len}: "
                         f"shorten it or raise --max-seq-len")
    return tokens


def resolve_target(llama: LLaMa, model: Transformer, tokens: list[int], position: int,
                   target_text: Optional[str], target_id: Optional[int]) -> int:
    """--target-id, or --target (text that must be exactly one token), or else the model's top prediction."""
    if target_id is not None and target_text is not None:
        raise ValueError("give --target or --target-id, not both")
    if target_id is not None:
        return check_target(model, target_id)
    if target_text is not None:
        ids = llama.tokenizer.encode(target_text, bos=False, eos=False)
        if len(ids) != 1:
            pieces = [llama.tokenizer.id_to_piece(i) for i in ids]
            raise ValueError(f"--target {target_text!r} is {len(ids)} tokens {pieces}, not one token of the "
                             f"vocabulary: give a single token (mind the leading space) or --target-id")
        return ids[0]
    return int(torch.argmax(trace(model, tokens).logits[check_position(position, len(tokens))]))


def cmd_hidden(llama: LLaMa, args: argparse.Namespace) -> str:
    tokens = encode_text(llama, args.text)
    hidden = hidden_states(llama.model, tokens)
    labels = [token_label(llama.tokenizer, t) for t in tokens]
    text = format_hidden(hidden, labels)
    if args.out:
        torch.save({"tokens": tokens, "hidden": hidden.cpu()}, args.out)
        text += f"\nsaved the residual stream {tuple(hidden.shape)} (layers+1, tokens, dim) to {args.out}"
    return text


def cmd_attention(llama: LLaMa, args: argparse.Namespace) -> str:
    tokens = encode_text(llama, args.text)
    check_layer(llama.model, args.layer)
    weights = attention_maps(llama.model, tokens, args.layer)  # (H, T, T)
    if args.head is not None and not 0 <= args.head < weights.shape[0]:
        raise ValueError(f"head {args.head} is out of range: layer {args.layer} has {weights.shape[0]} heads, "
                         f"0 .. {weights.shape[0] - 1}")
    labels = [token_label(llama.tokenizer, t) for t in tokens]
    chosen = weights[[args.head]] if args.head is not None else weights
    what = f"layer {args.layer}, head {args.head}" if args.head is not None else f"layer {args.layer}, mean of heads"
    text = f"attention weights, {what}\n" + format_attention(chosen.mean(dim=0), labels)
    if args.out:
        title = f"layer {args.layer}" + (f", head {args.head}" if args.head is not None else "")
        save_attention_png(chosen, labels, args.out, title)
        text += f"\nsaved the heatmap to {args.out}"
    return text


def cmd_lens(llama: LLaMa, args: argparse.Namespace) -> str:
    tokens = encode_text(llama, args.text)
    position = check_position(args.position, len(tokens))
    rows = logit_lens(llama.model, tokens, args.show, position)
    head = f"logit lens at position {position} ({token_label(llama.tokenizer, tokens[position])}): next-token guesses"
    return head + "\n" + format_lens(rows, llama.tokenizer)


def cmd_attribute(llama: LLaMa, args: argparse.Namespace) -> str:
    tokens = encode_text(llama, args.text)
    position = check_position(args.position, len(tokens))
    target = resolve_target(llama, llama.model, tokens, position, args.target, args.target_id)
    labels = [token_label(llama.tokenizer, t) for t in tokens]
    gxi = gradient_x_input(llama.model, tokens, target, position) if args.method in ("gxi", "both") else None
    ig = None
    if args.method in ("ig", "both"):
        x = input_embeddings(llama.model, tokens)
        baseline = BASELINES[args.baseline](llama.model, x, llama.tokenizer.eos_id)
        ig = integrated_gradients(llama.model, tokens, target, position, args.steps, baseline)
    title = (f"attribution of {token_label(llama.tokenizer, target)} (id {target}) as the next token "
             f"after position {position} ({labels[position]})")
    text = title + "\n" + format_attribution(labels, gxi, ig)
    if args.out:
        scores = {}
        if gxi is not None:
            scores["grad x input"] = gxi.scores
        if ig is not None:
            scores["integrated gradients"] = ig.scores
        save_attribution_png(scores, labels, args.out, title)
        text += f"\nsaved the bar chart to {args.out}"
    return text


def cmd_why(llama: LLaMa, args: argparse.Namespace) -> str:
    tokens = encode_text(llama, args.text)
    params = SamplingParams(args.temperature, args.top_p, args.top_k, args.repetition_penalty)
    steps = why(llama.model, tokens, llama.tokenizer.stop_tokens, args.max_gen_len, params, args.show, args.seed)
    generated = llama.tokenizer.decode([s.chosen for s in steps])
    return f"{args.text!r} -> {generated!r}\n\n" + format_why(steps, llama.tokenizer, params)


# --baseline for integrated gradients: (model, input embeddings, EOS id) -> baseline embeddings.
BASELINES = {
    "mean": lambda model, x, eos_id: mean_embedding_baseline(model, x),
    "eos": lambda model, x, eos_id: token_baseline(model, x, eos_id),
    "zero": lambda model, x, eos_id: zero_baseline(x),
}
PNG_COMMANDS = ("attention", "attribute")  # their --out is a picture
COMMANDS = {"hidden": cmd_hidden, "attention": cmd_attention, "lens": cmd_lens, "attribute": cmd_attribute, "why": cmd_why}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_argument("--ckpt-dir", help="Meta checkpoint dir (default: the SmolLM2-135M-Instruct demo model, "
                        "fetched and converted once)")
    common.add_argument("--text", default=DEFAULT_TEXT, help="the text to look at (for why: the prompt)")
    common.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    common.add_argument("--dtype", default=DEFAULT_STUDY_DTYPE,
                        help="float32, bfloat16 or float16; float32 keeps small attributions accurate")
    common.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN, help="longest text (and generation)")

    parser = argparse.ArgumentParser(
        description="Look inside a Llama model: the residual stream, attention, logit lens, attribution, and "
        "why a generated token was chosen. Runs on the demo model unless --ckpt-dir is given.")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("hidden", parents=[common], formatter_class=fmt,
                       help="size of the residual stream after the embedding and after every block")
    p.add_argument("--out", help="save the hidden states (layers+1, tokens, dim) to this .pt file")

    p = sub.add_parser("attention", parents=[common], formatter_class=fmt, help="attention weights of one layer")
    p.add_argument("--layer", type=int, required=True, help="which layer (0 = first block)")
    p.add_argument("--head", type=int, help="one head only (default: every head in the PNG, their mean as text)")
    p.add_argument("--out", help="write a heatmap PNG here (needs matplotlib)")

    p = sub.add_parser("lens", parents=[common], formatter_class=fmt,
                       help="logit lens: the top next tokens read from every layer")
    p.add_argument("--show", type=int, default=DEFAULT_SHOW, help="tokens shown per layer")
    p.add_argument("--position", type=int, default=LAST_POSITION, help="which token's next-token guess (-1 = last)")

    p = sub.add_parser("attribute", parents=[common], formatter_class=fmt,
                       help="which input tokens made a target token likely (grad x input, integrated gradients)")
    p.add_argument("--target", help="the target token as text; must be one token (default: the model's top prediction)")
    p.add_argument("--target-id", type=int, help="the target token by id")
    p.add_argument("--position", type=int, default=LAST_POSITION,
                   help="the position whose next-token logit is explained (-1 = last)")
    p.add_argument("--method", choices=["gxi", "ig", "both"], default="both")
    p.add_argument("--steps", type=int, default=DEFAULT_IG_STEPS, help="integration points for integrated gradients")
    p.add_argument("--baseline", choices=list(BASELINES), default="mean",
                   help="integrated gradients start from this input (the first token always kept): the mean "
                   "embedding, the EOS token's, or zeros (poor with RMSNorm: see the README)")
    p.add_argument("--out", help="write a bar chart PNG here (needs matplotlib)")

    p = sub.add_parser("why", parents=[common], formatter_class=fmt,
                       help="generate, and show each step's candidates before and after temperature / top-p")
    p.add_argument("--max-gen-len", type=int, default=DEFAULT_WHY_GEN_LEN, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help="nucleus sampling; 1 = no cut")
    p.add_argument("--top-k", type=int, help="draw only from the K most likely tokens (default: no such limit)")
    p.add_argument("--repetition-penalty", type=float, default=NO_REPETITION_PENALTY, help="1 = off")
    p.add_argument("--show", type=int, default=DEFAULT_SHOW, help="candidates shown per step")
    p.add_argument("--seed", type=int, help="random seed: with the same seed and --dtype, the same tokens as inference.py")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if args.command in PNG_COMMANDS and args.out:
            require_matplotlib()  # fail before loading the model, not after the work
        ckpt_dir = args.ckpt_dir
        if ckpt_dir is None:
            from demo_model import DemoModelError, ensure_demo_model  # only needed for the demo

            try:
                ckpt_dir = ensure_demo_model()
            except DemoModelError as e:  # its message says how to get the model by hand
                raise CheckpointError(str(e)) from None
        llama = load_for_study(ckpt_dir, args.device, args.dtype, args.max_seq_len)
        print(COMMANDS[args.command](llama, args))
    except (CheckpointError, TokenizerFileError, MissingDependencyError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
