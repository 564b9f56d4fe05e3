"""Looking inside the model, part 1: load it layer by layer, run it block by block, and keep what
the forward pass computes on the way (the residual stream, every head's attention weights).

`model.py` computes logits and nothing else. Here we open it up, without changing a line of it:
every function below calls the model's own submodules (`tok_embeddings`, `layers[i].attention.wq`,
`feed_forward`, `norm`, `output`, ...) and functions one after another, and keeps what a learner
wants to see. attribution.py and interpret.py stand on this file.

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

Shape legend: B batch, T tokens, C model dim, H query heads, K key/value heads, D head dim,
L layers, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from checkpoint import HostToDevice, ShardedCheckpoint, check_checkpoint_dir, choose_device, choose_dtype, load_model_args
from inference import DEFAULT_MAX_SEQ_LEN
from model import Attention, Transformer, TransformerBlock, attention_weights, causal_mask, repeat_kv

# Interpretation works on one text at a time; attribution batches its interpolation steps itself.
STUDY_BATCH_SIZE = 1
LAST_POSITION = -1  # Python's negative indexing: the last token

# Names of the loadable pieces of a Transformer (Meta's module names).
EMBEDDING = "tok_embeddings"
FINAL_NORM = "norm"
HEAD = "output"


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
    Tensors are read through the checkpoint's reader (`checkpoint.ShardedCheckpoint`), which checks
    every shape against params.json up front.
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
        self.args = load_model_args(self.ckpt_dir, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        self.checkpoint: Optional[ShardedCheckpoint] = ShardedCheckpoint(self.ckpt_dir, self.args)
        with torch.device("meta"):
            self.model = Transformer(self.args).eval()

    def _pieces(self, embedding: bool, layers: Iterable[int], head: bool) -> list[str]:
        pieces = [EMBEDDING] if embedding else []
        pieces += [f"layers.{check_layer(self.model, i)}" for i in layers]
        return pieces + ([FINAL_NORM, HEAD] if head else [])

    def load(self, embedding: bool = False, layers: Iterable[int] = (), head: bool = False) -> None:
        """Read the embedding, the given blocks and/or the final norm + head into `self.model`."""
        to_device = HostToDevice(self.device)  # to a GPU through pinned buffers; elsewhere a plain .to
        for piece in self._pieces(embedding, layers, head):
            module = self.model.get_submodule(piece)
            if is_loaded(module):
                continue
            if self.checkpoint is None:
                raise ValueError("this LayerLoader is closed: make a new one to load more")
            state = {key: to_device.to(self.checkpoint.read(f"{piece}.{key}")).to(self.dtype)  # cast on the device
                     for key in module.state_dict()}
            module.load_state_dict(state, strict=True, assign=True)
            if isinstance(module, TransformerBlock):
                module.attention.setup_cache(self.device, self.dtype)
        to_device.close()

    def unload(self, embedding: bool = False, layers: Iterable[int] = (), head: bool = False) -> None:
        """Send pieces back to the "meta" device, which frees their memory."""
        for piece in self._pieces(embedding, layers, head):
            self.model.get_submodule(piece).to("meta")

    def loaded_pieces(self) -> list[str]:
        return [p for p in self._pieces(True, range(self.args.n_layers), True) if is_loaded(self.model.get_submodule(p))]

    def close(self) -> None:
        """Forget the opened shards (their memory maps close when nothing else refers to them)."""
        self.checkpoint = None


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


def check_position(position: int, seqlen: int) -> int:
    """A token position (negative counts from the end), as an index 0 .. T-1."""
    if not isinstance(position, int) or not -seqlen <= position < seqlen:
        raise ValueError(f"position {position!r} is out of range for a text of {seqlen} tokens "
                         f"(use 0 .. {seqlen - 1}, or -1 for the last)")
    return position % seqlen


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
    q, k, v = attn.queries_keys_values(x, positions.freqs_cis)  # (B, H|K, T, D): the model's own projections
    k, v = repeat_kv(k, attn.n_rep), repeat_kv(v, attn.n_rep)  # (B, H, T, D)
    weights = attention_weights(q, k, positions.mask)  # (B, H, T, T): the model's own softmax
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
