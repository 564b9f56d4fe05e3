"""The Llama transformer, by hand: pure math, no I/O, no sampling.

Llama is a decoder-only transformer (Touvron et al. 2023, "Llama 2", sec. 2.2; Dubey et al. 2024,
"The Llama 3 Herd of Models", sec. 3.1). A token id becomes a vector, passes through `n_layers`
identical blocks that each add to it (the *residual stream*), and a final norm and linear head turn
it into one score (logit) per vocabulary entry. Each block is pre-norm:

    h   = x + Attention(RMSNorm(x))          # tokens look at earlier tokens
    out = h + FeedForward(RMSNorm(h))        # each token is transformed on its own

The pieces, in the order this file defines them:

* **RMSNorm** (Zhang & Sennrich 2019): ``y = x / sqrt(mean(x^2) + eps) * g``. Like LayerNorm
  without the mean subtraction and bias.
* **RoPE**, rotary position embedding (Su et al. 2021): view each head vector as ``D/2`` complex
  numbers and multiply the one at pair index ``i`` by ``e^(i * m * theta_i)`` where ``m`` is the
  token's position and ``theta_i = rope_theta^(-2i/D)``. A rotation keeps lengths, and the dot
  product of a query at position ``m`` with a key at ``n`` then depends only on ``m - n``. Llama 3.1
  stretches the low frequencies to reach a longer context ("frequency scaling").
* **Grouped-query attention** (Ainslie et al. 2023): ``n_heads`` query heads share ``n_kv_heads``
  key/value heads (``n_rep = n_heads / n_kv_heads`` queries per K/V head). Keys and values of past
  tokens live in a preallocated **KV cache**, so each new token costs one row of work.
* **SwiGLU feed-forward** (Shazeer 2020): ``w2(silu(w1 x) * w3 x)``.

Shape legend (used in comments throughout this file):
    B  batch size                   T  new tokens in this call (prompt length, or 1 when decoding)
    S  positions attended to (= start_pos + T: the cache so far plus the new tokens)
    C  model dim (``dim``)          V  vocabulary size
    H  query heads                  K  key/value heads (``n_kv_heads``)
    D  head dim (= C / H)           F  feed-forward hidden size

Parameter names are Meta's (``tok_embeddings``, ``wq wk wv wo``, ``w1 w2 w3``, ``attention_norm``,
``ffn_norm``, ``norm``, ``output``), so a Meta ``consolidated.00.pth`` loads with ``strict=True``.
"""

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

# Llama 3.1's RoPE frequency scaling, with Meta's values (llama_models/llama3/model.py,
# `apply_scaling`: "Values obtained from grid search").
ROPE_SCALE_FACTOR = 8.0
ROPE_LOW_FREQ_FACTOR = 1.0
ROPE_HIGH_FREQ_FACTOR = 4.0
ROPE_ORIGINAL_CONTEXT = 8192  # original Llama 3 context length


@dataclass
class RopeScaling:
    """Llama 3.1 frequency scaling: which wavelengths are stretched, and by how much."""

    factor: float = ROPE_SCALE_FACTOR
    low_freq_factor: float = ROPE_LOW_FREQ_FACTOR
    high_freq_factor: float = ROPE_HIGH_FREQ_FACTOR
    original_max_position_embeddings: int = ROPE_ORIGINAL_CONTEXT


@dataclass
class ModelArgs:
    """Every key of Meta's `params.json` (Llama 2, 3, 3.1, 3.2), plus the run-time sizes.

    ``ModelArgs(**json.load(open("params.json")), max_seq_len=..., max_batch_size=...)`` works; an
    unknown key is a ``TypeError`` naming it (a dataclass does not drop keys silently). Llama 2's
    ``"vocab_size": -1`` ("the tokenizer decides") is resolved before, where params.json is read
    (`checkpoint.load_model_args`); here the vocabulary size is a number, or None while unknown.
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: as many K/V heads as query heads (plain multi-head)
    vocab_size: Optional[int] = None  # None: not known yet (Llama 2 leaves it to the tokenizer)
    multiple_of: int = 256  # FFN hidden size is rounded up to a multiple of this (fast matmuls)
    ffn_dim_multiplier: Optional[float] = None  # Llama 2 70B and Llama 3 scale the FFN up
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # Llama 2's base; Llama 3 writes 500000.0 in its params.json
    use_scaled_rope: bool = False  # Llama 3.1 and later: stretch low frequencies (see RopeScaling)
    rope_scaling: Optional[dict] = None  # override RopeScaling's fields, e.g. {"factor": 32.0}

    # Not in params.json: how much room to reserve for the KV cache.
    max_seq_len: int = 2048
    max_batch_size: int = 4
    # Not in params.json: how attention is computed. False: PyTorch's fused kernel (fast, the default);
    # True: the explicit `scaled_dot_product_attention` below (slow, the documented reference).
    reference_attention: bool = False
    # Not in params.json: how the projections that read the same input are multiplied. False: Meta's
    # separate wq, wk, wv and w1, w3 (the reference); True: one matmul for wq|wk|wv (`wqkv`) and one
    # for w1|w3 (`w13`): the same numbers in fewer, larger matmuls. The loader joins Meta's weights
    # (checkpoint.load_transformer), so a checkpoint keeps Meta's names either way.
    fused_projections: bool = False

    # Derived sizes, computed once in __post_init__.
    head_dim: int = field(init=False)
    n_rep: int = field(init=False)
    ffn_hidden_dim: int = field(init=False)
    rope_scaling_args: Optional[RopeScaling] = field(init=False)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelArgs.{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"ModelArgs.vocab_size must be >= 1 or None (not known yet), got {self.vocab_size} "
                             f"(params.json's -1 is resolved by checkpoint.load_model_args)")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"ModelArgs: dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"ModelArgs: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2 != 0:
            raise ValueError(f"ModelArgs: head_dim ({self.head_dim}) must be even: RoPE rotates pairs")
        self.n_rep = self.n_heads // self.n_kv_heads
        self.ffn_hidden_dim = feed_forward_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        self.rope_scaling_args = None
        if self.use_scaled_rope:
            overrides = dict(self.rope_scaling or {})
            overrides.pop("rope_type", None)  # Hugging Face's name for the scheme ("llama3")
            try:
                self.rope_scaling_args = RopeScaling(**overrides)
            except TypeError as e:
                raise ValueError(f"ModelArgs.rope_scaling: {e}; known keys: {list(RopeScaling.__dataclass_fields__)}")
        elif self.rope_scaling is not None:
            raise ValueError("ModelArgs.rope_scaling is given but use_scaled_rope is false")

    @property
    def has_vocab_size(self) -> bool:
        return self.vocab_size is not None

    def require_vocab_size(self) -> int:
        if self.vocab_size is None:
            raise ValueError("ModelArgs.vocab_size is None: set it (from the tokenizer or the weights) first")
        return self.vocab_size


def feed_forward_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """Meta's rule for the SwiGLU hidden size F.

    Start from the classic 4*dim, take 2/3 of it (SwiGLU has three matrices instead of two, so this
    keeps the parameter count), scale by `ffn_dim_multiplier` if given, round up to `multiple_of`.
    """
    hidden_dim = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


# --------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 for stability."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x.float()).type_as(x) * self.weight


# --------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE)
# --------------------------------------------------------------------------------------------


def apply_scaling(freqs: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1 frequency scaling (Meta's `apply_scaling`).

    Wavelength = 2*pi / frequency, in tokens. Waves longer than the original context / low_freq_factor
    never completed a turn in training, so they are slowed down by `factor` (the model sees the
    positions it knows, compressed). Waves shorter than context / high_freq_factor are kept: they
    encode local order. In between, blend the two smoothly.
    """
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / freqs
    slowed = torch.where(wavelen > low_freq_wavelen, freqs / scaling.factor, freqs)
    smooth = ((scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    blended = (1 - smooth) * slowed / scaling.factor + smooth * slowed
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, slowed)


def precompute_freqs_cis(
    head_dim: int, end: int, theta: float, scaling: Optional[RopeScaling] = None
) -> torch.Tensor:
    """The table of rotations e^(i * m * theta_j) for positions m < end: complex64 of shape (end, D/2).

    Always built on the CPU in float32 (then moved once), whatever device the model is on.
    """
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device="cpu")[: head_dim // 2].float() / head_dim))
    if scaling is not None:
        freqs = apply_scaling(freqs, scaling)
    positions = torch.arange(end, device="cpu", dtype=torch.float32)
    angles = torch.outer(positions, freqs)  # (end, D/2)
    return torch.polar(torch.ones_like(angles), angles)  # |z| = 1, arg z = angle


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys: consecutive pairs (x0, x1) are read as complex numbers x0 + i*x1.

    xq: (B, T, H, D), xk: (B, T, K, D), freqs_cis: (B or 1, T, D/2), one rotation per position.
    """
    if torch.compiler.is_compiling():
        return apply_rotary_emb_real(xq, xk, freqs_cis)
    xq_complex = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))  # (B, T, H, D/2)
    xk_complex = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))  # (B, T, K, D/2)
    rotation = freqs_cis.unsqueeze(2)  # (B or 1, T, 1, D/2): the same rotation for every head
    xq_out = torch.view_as_real(xq_complex * rotation).flatten(3)  # (B, T, H, D)
    xk_out = torch.view_as_real(xk_complex * rotation).flatten(3)  # (B, T, K, D)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def apply_rotary_emb_real(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_rotary_emb` in real numbers: (x0 + i*x1)(c + i*s) = (x0*c - x1*s) + i*(x0*s + x1*c).

    What torch.compile runs: Inductor generates no code for complex numbers, so there the complex
    form runs as separate eager calls that cut a compiled step's fused kernels apart; this one fuses
    with the ops around it. Tests hold it equal to the complex form."""
    rotation = torch.view_as_real(freqs_cis).unsqueeze(2)  # (B or 1, T, 1, D/2, 2): (c, s) pairs
    c, s = rotation[..., 0], rotation[..., 1]  # (B or 1, T, 1, D/2) each
    q0, q1 = xq.float().reshape(*xq.shape[:-1], -1, 2).unbind(-1)  # (B, T, H, D/2) each
    k0, k1 = xk.float().reshape(*xk.shape[:-1], -1, 2).unbind(-1)  # (B, T, K, D/2) each
    xq_out = torch.stack([q0 * c - q1 * s, q0 * s + q1 * c], dim=-1).flatten(3)  # (B, T, H, D)
    xk_out = torch.stack([k0 * c - k1 * s, k0 * s + k1 * c], dim=-1).flatten(3)  # (B, T, K, D)
    return xq_out.type_as(xq), xk_out.type_as(xk)


# --------------------------------------------------------------------------------------------
# Attention with a KV cache
# --------------------------------------------------------------------------------------------


class KVCache(nn.Module):
    """Keys and values of every position seen so far, preallocated for the longest run.

    Laid out (B, K, max_seq_len, D) so that "the first S positions" is one contiguous slice per head,
    which is what attention reads: it attends to the filled part only, so a token late in a long
    context costs little more than an early one. Not zeroed: nothing reads a position before it is
    written, and the untouched pages of a fresh allocation take no memory, so a large max_seq_len
    costs RAM only as the cache fills. Buffers are not persistent: they are not part of a checkpoint.
    """

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None, zeroed: bool = False):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        allocate = torch.zeros if zeroed else torch.empty  # zeroed: for the static use, see `update`
        self.register_buffer("cache_k", allocate(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("cache_v", allocate(shape, device=device, dtype=dtype), persistent=False)

    def update(
        self, start_pos: Union[int, torch.Tensor], xk: torch.Tensor, xv: torch.Tensor,
        n_keys: Optional[int] = None, first_row: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values (B, K, T, D) at start_pos; return the first S positions (B, K, S, D).

        The batch's rows are cache rows first_row ... first_row + B - 1 (continuous batching fills
        one row at a time, see batching.py; everything else uses rows 0 ... B - 1). S is n_keys when
        given (the width of the attention mask), else start_pos + T: only the filled part.

        start_pos comes in three kinds:
        - an int: every row writes positions start_pos ... start_pos + T - 1 (one prompt, or a
          left-padded batch of them);
        - a (B,) tensor: row b writes its own positions start_pos[b] ... (continuous batching: the
          rows are at different points of different texts). The mask then hides, per row, the
          positions after its own (`causal_mask`);
        - a 0-d tensor: the *static* use (CUDA graphs, `decoding.static_decode_step`). Then the
          write goes to positions given as data, and the whole cache comes back (S = max_seq_len),
          its unwritten positions masked by the caller: every step has the same shapes, so one
          captured graph serves every position. The cache must then be zeroed (`zeroed=True`),
          since masked positions still get multiplied by 0, and uninitialised memory may hold NaN.
        """
        batch_size, _, seqlen, _ = xk.shape
        rows = slice(first_row, first_row + batch_size)
        if isinstance(start_pos, torch.Tensor) and start_pos.dim() == 1:  # each row at its own positions
            row_ids = torch.arange(first_row, first_row + batch_size, device=xk.device)[:, None]  # (B, 1)
            positions = start_pos[:, None] + torch.arange(seqlen, device=xk.device)  # (B, T)
            # Indexing (B, 1) rows and (B, T) positions picks a (B, T) grid of (K, D) slots.
            self.cache_k[row_ids, :, positions] = xk.transpose(1, 2)  # (B, T, K, D)
            self.cache_v[row_ids, :, positions] = xv.transpose(1, 2)
            return self.cache_k[rows, :, :n_keys], self.cache_v[rows, :, :n_keys]  # (B, K, S, D)
        if isinstance(start_pos, torch.Tensor):
            positions = start_pos + torch.arange(seqlen, device=xk.device)  # (T,)
            self.cache_k[rows].index_copy_(2, positions, xk)
            self.cache_v[rows].index_copy_(2, positions, xv)
            return self.cache_k[rows], self.cache_v[rows]  # (B, K, max_seq_len, D)
        end_pos = start_pos + seqlen
        self.cache_k[rows, :, start_pos:end_pos] = xk
        self.cache_v[rows, :, start_pos:end_pos] = xv
        return self.cache_k[rows, :, :end_pos], self.cache_v[rows, :, :end_pos]

    def zero(self, row: int, start: int, end: int) -> None:
        """Set positions start ... end - 1 of one cache row to 0 (batching.py: so that positions a
        row attends to under its mask hold numbers, never the NaN that uninitialised memory may)."""
        self.cache_k[row, :, start:end] = 0
        self.cache_v[row, :, start:end] = 0


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Share each key/value head with n_rep query heads: (B, K, S, D) -> (B, K * n_rep, S, D).

    Same as torch.repeat_interleave(x, n_rep, dim=1): head k serves query heads k*n_rep ... k*n_rep+n_rep-1.
    """
    if n_rep == 1:
        return x
    batch_size, n_kv_heads, seqlen, head_dim = x.shape
    expanded = x[:, :, None, :, :].expand(batch_size, n_kv_heads, n_rep, seqlen, head_dim)
    return expanded.reshape(batch_size, n_kv_heads * n_rep, seqlen, head_dim)


class Attention(nn.Module):
    """Grouped-query self-attention over the KV cache.

    Two ways to compute the same softmax(q k^T / sqrt(D) + mask) v, chosen by
    `ModelArgs.reference_attention`:

    * fused (default): `F.scaled_dot_product_attention` with `enable_gqa=True`. The kernel reads each
      K/V head for its n_rep query heads in place (no repeated copy of the cache) and never stores the
      (T, S) score matrix, accumulating in float32 (flash attention; Dao et al. 2022).
    * reference: `repeat_kv` then the explicit `scaled_dot_product_attention` below, every step
      written out. Tests hold the fused path to it.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.n_rep = args.n_rep
        self.head_dim = args.head_dim
        self.reference_attention = args.reference_attention
        self.fused = args.fused_projections
        # Rows of the queries, keys and values in the output of wq, wk, wv (or of their fusion wqkv).
        self.qkv_sizes = [args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.n_kv_heads * args.head_dim]
        if self.fused:
            self.wqkv = nn.Linear(args.dim, sum(self.qkv_sizes), bias=False)  # the rows of wq, then wk, then wv
        else:
            self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
            self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
            self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache = KVCache(args.max_batch_size, args.max_seq_len, args.n_kv_heads, args.head_dim)

    def setup_cache(self, device: torch.device, dtype: torch.dtype, zeroed: bool = False) -> None:
        """A fresh (unwritten, or with `zeroed` all-zero) KV cache on `device` in `dtype`."""
        args = (self.cache.cache_k.shape[0], self.cache.cache_k.shape[2], self.n_kv_heads, self.head_dim)
        self.cache = KVCache(*args, device=device, dtype=dtype, zeroed=zeroed)

    def queries_keys_values(
        self, x: torch.Tensor, freqs_cis: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> queries (B, H, T, D), keys and values (B, K, T, D), RoPE applied, heads first."""
        batch_size, seqlen, _ = x.shape  # (B, T, C)
        if self.fused:
            xq, xk, xv = self.wqkv(x).split(self.qkv_sizes, dim=-1)  # one matmul: (B, T, H*D + 2*K*D), split
        else:
            xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)  # (B, T, H * D), (B, T, K * D), (B, T, K * D)
        xq = xq.view(batch_size, seqlen, self.n_heads, self.head_dim)  # (B, T, H, D)
        xk = xk.view(batch_size, seqlen, self.n_kv_heads, self.head_dim)  # (B, T, K, D)
        xv = xv.view(batch_size, seqlen, self.n_kv_heads, self.head_dim)  # (B, T, K, D)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        # Heads first: every head is an independent attention over the sequence.
        return xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)  # (B, H|K, T, D)

    def forward(
        self, x: torch.Tensor, start_pos: Union[int, torch.Tensor], freqs_cis: torch.Tensor,
        mask: Optional[torch.Tensor], first_row: int = 0,
    ) -> torch.Tensor:
        """x (B, T, C) at positions start_pos ... -> (B, T, C). mask: from `causal_mask`, or None:
        nothing to mask for one decoded token (T = 1), plain causal attention for a prompt (T > 1).
        first_row: the KV cache row of the batch's first row (see `KVCache.update`)."""
        batch_size, seqlen, _ = x.shape  # (B, T, C)
        xq, xk, xv = self.queries_keys_values(x, freqs_cis)  # (B, H|K, T, D)
        n_keys = mask.shape[-1] if mask is not None else None  # S: the mask has a column per key
        keys, values = self.cache.update(start_pos, xk, xv, n_keys, first_row)  # (B, K, S, D)
        if self.reference_attention:
            if mask is None and seqlen > 1:  # plainly causal (see `causal_mask`): written out here
                mask = causal_mask(seqlen, start_pos, None, x.device, x.dtype)
            keys, values = repeat_kv(keys, self.n_rep), repeat_kv(values, self.n_rep)  # (B, H, S, D)
            output = scaled_dot_product_attention(xq, keys, values, mask)  # (B, H, T, D)
        elif mask is None and seqlen > 1:
            # A prompt from position 0 with no padding (see `causal_mask`): plainly causal, which the
            # kernel applies itself (`is_causal`), skipping the blocks above the diagonal. On CUDA this
            # keeps the flash kernel; an explicit mask would send it to the math one, which stores the
            # whole float32 (B, H, T, S) score matrix.
            output = F.scaled_dot_product_attention(xq, keys, values, is_causal=True, enable_gqa=True)
        elif seqlen == 1:
            # Decoding. The n_rep query heads that share a K/V head are n_rep queries to that one
            # head: (B, H, 1, D) -> (B, K, n_rep, D). The same numbers, but the kernel sees K heads of
            # n_rep rows instead of H heads of one row, its slowest case (~7x slower at S = 2000).
            # A decode mask, if any, is (B or 1, 1, 1, S): it applies to every row alike.
            grouped = xq.view(batch_size, self.n_kv_heads, self.n_rep, self.head_dim)
            output = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask)
            output = output.view(batch_size, self.n_heads, 1, self.head_dim)  # (B, H, 1, D)
        else:
            output = F.scaled_dot_product_attention(xq, keys, values, attn_mask=mask, enable_gqa=True)
        output = output.transpose(1, 2).reshape(batch_size, seqlen, -1)  # (B, T, H * D)
        return self.wo(output)  # (B, T, C)


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v, written out (Vaswani et al. 2017, eq. 1).

    q: (B, H, T, D); k, v: (B, H, S, D); mask: additive, broadcastable to (B, H, T, S), 0 where
    attention is allowed and -inf where not. The softmax runs in float32, as Meta's code does.
    """
    return torch.matmul(attention_weights(q, k, mask), v)  # (B, H, T, D)


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask): how much each query takes from each key, (B, H, T, S).

    q: (B, H, T, D); k: (B, H, S, D); mask as in `scaled_dot_product_attention`. Row (b, h, i) sums
    to 1 over S. Computed in float32, then cast back to q's dtype, as Meta's code does.
    """
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if mask is not None:
        scores = scores + mask
    return F.softmax(scores.float(), dim=-1).type_as(q)  # each row sums to 1 over S


# --------------------------------------------------------------------------------------------
# Feed-forward (SwiGLU) and the transformer block
# --------------------------------------------------------------------------------------------


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, fused: bool = False):
        super().__init__()
        self.fused = fused  # see ModelArgs.fused_projections
        if fused:
            self.w13 = nn.Linear(dim, 2 * hidden_dim, bias=False)  # the rows of w1, then of w3
            self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        else:
            self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
            self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
            self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.w13(x).chunk(2, dim=-1)  # one matmul: (B, T, 2F), halved
        else:
            gate, up = self.w1(x), self.w3(x)  # (B, T, F) each
        return self.w2(F.silu(gate) * up)  # (B, T, C)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim, args.fused_projections)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, start_pos: Union[int, torch.Tensor], freqs_cis: torch.Tensor,
                mask: Optional[torch.Tensor], first_row: int = 0) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis, mask, first_row)
        return h + self.feed_forward(self.ffn_norm(h))


# --------------------------------------------------------------------------------------------
# The transformer
# --------------------------------------------------------------------------------------------


def causal_mask(
    seqlen: int, start_pos: Union[int, torch.Tensor], pad_lens: Optional[torch.Tensor], device: torch.device,
    dtype: torch.dtype, n_keys: Optional[int] = None,
) -> Optional[torch.Tensor]:
    """The additive attention mask for T new tokens after `start_pos` cached ones: (B or 1, 1, T, S).

    Row i is the new token at position start_pos + i; column j is position j of the cache. Causal:
    token start_pos + i may look at j <= start_pos + i, so the masked entries are j > start_pos + i
    (with start_pos = 0 this is the usual upper triangle; with a cache the first start_pos columns
    are all visible). A single decoded token (T = 1) may look at everything: no mask is needed.

    Ragged batches are left-padded: row b begins with pad_lens[b] padding positions, which no real
    token may look at. A padding token looks only at itself, so that its row is never all -inf
    (that would give NaN, and NaN leaks through `0 * value` into real rows in the next layer).

    Continuous batching (start_pos a (B,) tensor): row b's tokens are at its own positions
    start_pos[b] ..., and the keys are the first n_keys positions of every row, as many as the
    longest row needs. The same rule, per row: a shorter row sees its own positions up to its
    token, and the columns after it, which belong to no text of its own yet, are masked.

    A static KV cache (`KVCache.update` with a 0-d position tensor) is attended to whole: n_keys =
    max_seq_len columns, of which those after the new tokens are masked like any later position.
    """
    per_row = isinstance(start_pos, torch.Tensor) and start_pos.dim() == 1
    if seqlen == 1 and pad_lens is None and n_keys is None and not per_row:
        return None
    n_keys = n_keys if n_keys is not None else start_pos + seqlen  # S
    if per_row:
        query_pos = start_pos[:, None] + torch.arange(seqlen, device=device)  # (B, T)
    else:
        query_pos = (start_pos + torch.arange(seqlen, device=device))[None, :]  # (1, T)
    query_pos = query_pos[:, :, None]  # (B or 1, T, 1)
    key_pos = torch.arange(n_keys, device=device)[None, None, :]  # (1, 1, S)
    allowed = key_pos <= query_pos  # (B or 1, T, S)
    if pad_lens is not None:
        key_is_real = key_pos >= pad_lens[:, None, None]  # (B, 1, S)
        allowed = (allowed & key_is_real) | (key_pos == query_pos)  # (B, T, S)
    mask = torch.zeros(allowed.shape, device=device, dtype=dtype)
    mask = mask.masked_fill(~allowed, float("-inf"))
    # Always 4-D: PyTorch's fused attention kernels take a (B or 1, heads or 1, T, S) mask, and
    # silently fall back to a slower path for a 3-D one.
    return mask.unsqueeze(1)  # (B or 1, 1, T, S): the same for every head


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.require_vocab_size(), args.dim)
        self.layers = nn.ModuleList(TransformerBlock(layer_id, args) for layer_id in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # A plain attribute, not a buffer: `model.to(torch.bfloat16)` would cast a complex buffer to
        # a real dtype and silently drop the imaginary part. Moved to the model's device on use.
        self.freqs_cis = precompute_freqs_cis(args.head_dim, args.max_seq_len, args.rope_theta,
                                              args.rope_scaling_args)  # (max_seq_len, D/2)

    def setup_caches(self, device: torch.device, dtype: torch.dtype, zeroed: bool = False) -> None:
        """Allocate every layer's KV cache on `device` in `dtype` (`zeroed`: for a static cache).

        Needed once after building the model on the "meta" device (shapes only, no memory) and
        loading the weights into it with `load_state_dict(..., assign=True)`.
        """
        for layer in self.layers:
            layer.attention.setup_cache(device, dtype, zeroed)

    def rope_table(self, device: torch.device) -> torch.Tensor:
        """freqs_cis on `device` (moved there once, then reused)."""
        if self.freqs_cis.device != device:
            self.freqs_cis = self.freqs_cis.to(device)
        return self.freqs_cis

    @torch.no_grad()
    def forward(
        self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor], pad_lens: Optional[torch.Tensor] = None,
        last_only: bool = False, first_row: int = 0, n_keys: Optional[int] = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) in float32 for tokens (B, T) placed at positions start_pos ... start_pos+T-1.

        Call it once with the whole prompt (start_pos = 0), then once per new token (T = 1,
        start_pos = tokens so far). `pad_lens` (B,) gives the number of left-padding positions of
        each row in a ragged batch: they are masked out, and each row's positions count from its
        first real token, so a padded prompt is rotated exactly as it would be alone.

        start_pos as a (B,) tensor places each row at its own position (continuous batching,
        batching.py: rows that began at different times decode side by side); first_row says
        which KV cache row the batch's first row is (a new prompt is prefilled into the row that
        came free); n_keys: how many cache positions the rows attend to, at least the longest row's
        end (default: computed from start_pos, a read of the device; a compiled step is given it).
        start_pos as a 0-d tensor uses the KV cache statically (see `KVCache.update`):
        the same shapes at every position, for CUDA graphs.

        last_only: return only the last position's logits, (B, 1, V). Generation needs no more, and
        the output head is the largest matmul of a small model (V x C): skipping T - 1 of its rows
        makes a long prefill markedly cheaper.
        """
        batch_size, seqlen = tokens.shape
        static_cache = isinstance(start_pos, torch.Tensor) and start_pos.dim() == 0  # see KVCache.update
        per_row = isinstance(start_pos, torch.Tensor) and start_pos.dim() == 1
        if per_row:
            last_pos = n_keys if n_keys is not None else int(start_pos.max()) + seqlen  # S
        else:
            last_pos = start_pos + seqlen  # one past the last position
        if not static_cache and last_pos > self.args.max_seq_len:
            raise ValueError(f"positions up to {last_pos} exceed max_seq_len={self.args.max_seq_len}")
        if first_row + batch_size > self.args.max_batch_size:
            raise ValueError(f"batch of {batch_size} from KV cache row {first_row} exceeds "
                             f"max_batch_size={self.args.max_batch_size}")
        h = self.tok_embeddings(tokens)  # (B, T, C)

        starts = start_pos[:, None] if per_row else start_pos  # (B, 1), or the same start for every row
        positions = starts + torch.arange(seqlen, device=tokens.device)[None, :]  # (B or 1, T)
        if pad_lens is not None:
            positions = (positions - pad_lens[:, None]).clamp(min=0)  # (B, T); padding -> position 0
        freqs_cis = self.rope_table(tokens.device)[positions]  # (B or 1, T, D/2)
        # No mask tensor where attention's own `is_causal` says the same: a prompt from position 0
        # without padding (and a single decoded token needs none at all).
        if static_cache:  # the whole cache is attended to: mask what is not there yet
            mask = causal_mask(seqlen, start_pos, pad_lens, tokens.device, h.dtype, n_keys=self.args.max_seq_len)
        elif per_row:  # as many keys as the longest row has
            mask = causal_mask(seqlen, start_pos, pad_lens, tokens.device, h.dtype, n_keys=last_pos)
        elif start_pos == 0 and pad_lens is None:
            mask = None  # plainly causal
        else:
            mask = causal_mask(seqlen, start_pos, pad_lens, tokens.device, h.dtype)

        for layer in self.layers:
            h = layer(h, start_pos, freqs_cis, mask, first_row)
        if last_only:
            h = h[:, -1:]  # (B, 1, C)
        h = self.norm(h)
        return self.output(h).float()  # (B, T or 1, V)

    def zero_cache(self, row: int, start: int, end: int) -> None:
        """Zero positions start ... end - 1 of KV cache row `row` in every layer (see `KVCache.zero`)."""
        for layer in self.layers:
            layer.attention.cache.zero(row, start, end)


# --------------------------------------------------------------------------------------------
# The state dict's shapes, from ModelArgs alone
# --------------------------------------------------------------------------------------------

EMBEDDING_KEY = "tok_embeddings.weight"
OUTPUT_KEY = "output.weight"


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor of `Transformer(args).state_dict()`, in its order, with its shape.

    Computed from the args without building anything, so it costs nothing even for 405B. It is the
    one statement of the shapes: loaders check a checkpoint against it, the memory plan counts its
    bytes, convert.py writes tensors of these shapes (and a test holds it equal to a real model's).
    The KV caches are buffers, not part of a checkpoint, so they are not here.
    """
    dim, hidden, vocab = args.dim, args.ffn_hidden_dim, args.require_vocab_size()
    query_size, kv_size = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim  # H * D, K * D
    shapes = {EMBEDDING_KEY: (vocab, dim)}
    for i in range(args.n_layers):
        shapes.update({
            f"layers.{i}.attention.wq.weight": (query_size, dim),
            f"layers.{i}.attention.wk.weight": (kv_size, dim),
            f"layers.{i}.attention.wv.weight": (kv_size, dim),
            f"layers.{i}.attention.wo.weight": (dim, query_size),
            f"layers.{i}.feed_forward.w1.weight": (hidden, dim),
            f"layers.{i}.feed_forward.w2.weight": (dim, hidden),
            f"layers.{i}.feed_forward.w3.weight": (hidden, dim),
            f"layers.{i}.attention_norm.weight": (dim,),
            f"layers.{i}.ffn_norm.weight": (dim,),
        })
    shapes["norm.weight"] = (dim,)
    shapes[OUTPUT_KEY] = (vocab, dim)
    return shapes


# Fused projections (ModelArgs.fused_projections): each fused layer, and Meta's layers whose rows it
# holds, in order.
FUSED_PROJECTIONS = {
    "attention.wqkv": ("attention.wq", "attention.wk", "attention.wv"),
    "feed_forward.w13": ("feed_forward.w1", "feed_forward.w3"),
}


class FusedPlace(NamedTuple):
    """Where a Meta weight goes in a fused model: its fused layer, its place there, and how many parts it has."""

    module: str  # "layers.3.attention.wqkv"
    index: int  # 1 for wk
    n_parts: int  # 3


def fused_name(name: str) -> Optional[FusedPlace]:
    """For a Meta weight that a fused model holds inside a fused layer ("layers.3.attention.wk.weight"):
    that layer's name ("layers.3.attention.wqkv"), the weight's place in it (1) and the layer's
    number of parts (3). None for the others."""
    module_name = name.removesuffix(".weight")
    for fused, parts in FUSED_PROJECTIONS.items():
        for index, part in enumerate(parts):
            if module_name.endswith("." + part):
                return FusedPlace(module_name.removesuffix(part) + fused, index, len(parts))
    return None


# Names this module had before params.json's -1 got resolved where params.json is read.
MOVED_NAMES = {

    "VOCAB_SIZE_FROM_TOKENIZER": "checkpoint.PARAMS_VOCAB_FROM_TOKENIZER (ModelArgs.vocab_size is None while unknown)",
}


def __getattr__(name: str):
    """PEP 562: a name that moved says where it went, in one line."""
    where = MOVED_NAMES.get(name)
    raise AttributeError(f"model.{name} moved: use {where}" if where else
                         f"module 'model' has no attribute {name!r}")
