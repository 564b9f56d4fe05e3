"""What every reader hands the converter: a `Source`, its params.json, and the one error type.

The converter (convert.py) reads two formats, GGUF (convert_gguf.py) and Hugging Face
(convert_hf.py). Each reader turns its input into the same three things, so that writing the
Meta-format directory is one piece of code for both:

    Source.params           Meta's params.json, built here by `build_params` from plain sizes
    Source.tensors()        (Meta name, tensor) pairs, one at a time (a 70B model need not fit twice)
    Source.write_tokenizer  writes tokenizer.model (and tokenizer_spec.json) into a directory

params.json cannot state every size directly: the FFN width is the output of Meta's rounding rule,
so `find_ffn_params` searches for the rule's inputs that reproduce a source's width exactly.

Every bad input is a `ConversionError` whose message names the culprit in one line.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from model import RopeScaling, feed_forward_hidden_dim

# --------------------------------------------------------------------------------------------
# Names of things in the output directory; the error; what a reader returns
# --------------------------------------------------------------------------------------------

CHECKPOINT_NAME = "consolidated.00.pth"  # Meta's name for shard 0 (we always write one shard)
PARAMS_NAME = "params.json"
TOKENIZER_NAME = "tokenizer.model"
TOKENIZER_SPEC_NAME = "tokenizer_spec.json"


class ConversionError(Exception):
    """Bad input to the converter; `convert.main()` prints the message as one line, without traceback."""


@dataclass
class Source:
    params: dict  # Meta's params.json, from `build_params`
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]  # (Meta name, tensor), one at a time
    write_tokenizer: Optional[Callable[[Path], None]]  # None: the source holds no tokenizer
    n_tensors: Optional[int] = None  # how many `tensors()` yields, for the progress bar (None: unknown)


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object ({...}); anything else is one error naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise ConversionError(f"{path} holds a JSON {type(value).__name__}, expected an object {{...}}")
    return value


# --------------------------------------------------------------------------------------------
# Tensor names in the three formats
# --------------------------------------------------------------------------------------------

# Each tensor's name in Meta's checkpoint, in llama.cpp's GGUF and in Hugging Face's LlamaForCausalLM
# (every one of them ends in ".weight"). A layer's tensors are layers.N.<Meta>, blk.N.<GGUF> and
# model.layers.N.<Hugging Face>.
META, GGUF, HUGGING_FACE = 0, 1, 2  # the columns
GLOBAL_TENSOR_NAMES = (
    ("tok_embeddings", "token_embd", "model.embed_tokens"),
    ("norm", "output_norm", "model.norm"),
    ("output", "output", "lm_head"),
)
LAYER_TENSOR_NAMES = (
    ("attention.wq", "attn_q", "self_attn.q_proj"),
    ("attention.wk", "attn_k", "self_attn.k_proj"),
    ("attention.wv", "attn_v", "self_attn.v_proj"),
    ("attention.wo", "attn_output", "self_attn.o_proj"),
    ("feed_forward.w1", "ffn_gate", "mlp.gate_proj"),  # w1: the gate, under SiLU
    ("feed_forward.w3", "ffn_up", "mlp.up_proj"),
    ("feed_forward.w2", "ffn_down", "mlp.down_proj"),
    ("attention_norm", "attn_norm", "input_layernorm"),
    ("ffn_norm", "ffn_norm", "post_attention_layernorm"),
)


def meta_tensor_name(name: str, column: int, layer_prefix: str) -> Optional[str]:
    """Meta's name for a tensor named as in `column` of the tables above; None if it is not one."""
    stem, _, suffix = name.rpartition(".")
    if suffix != "weight":
        return None
    for row in GLOBAL_TENSOR_NAMES:
        if stem == row[column]:
            return row[META] + ".weight"
    index, _, rest = stem.removeprefix(layer_prefix + ".").partition(".")
    if stem.startswith(layer_prefix + ".") and index.isdigit():
        for row in LAYER_TENSOR_NAMES:
            if rest == row[column]:
                return f"layers.{index}.{row[META]}.weight"
    return None


# --------------------------------------------------------------------------------------------
# Hyperparameters: Meta's params.json
# --------------------------------------------------------------------------------------------

META_DEFAULT_ROPE_THETA = 10000.0  # Llama 2's theta; also LlamaConfig's default

# Meta's FFN width rule (llama/model.py, FeedForward.__init__) rounds up to a multiple of
# `multiple_of`; 256 is what Llama 2 7B uses, so we try it first for the most familiar params.json.
MULTIPLE_OF_CANDIDATES = (256, 1024, 512, 128, 64, 32, 16, 8, 4, 2, 1)

# Llama 3.1's `use_scaled_rope: true` stands for these fixed values (llama-models, model.py,
# apply_scaling). Any other llama3-type scaling goes into params.json as an explicit override.
META_ROPE_SCALING = dataclasses.asdict(RopeScaling())


def find_ffn_params(dim: int, hidden_dim: int) -> tuple[int, Optional[float]]:
    """Find (multiple_of, ffn_dim_multiplier) for which Meta's rule gives `hidden_dim` exactly.

    params.json cannot state the FFN width directly, only the inputs of Meta's rule. We prefer
    no multiplier; otherwise the multiplier hidden_dim / base, nudged up by a few ulps so that
    int() does not round it one below, with the largest `multiple_of` that still works.
    """
    base = int(2 * (4 * dim) / 3)
    ratio = hidden_dim / base
    multipliers: list[Optional[float]] = [None, ratio]
    for _ in range(4):
        multipliers.append(math.nextafter(multipliers[-1], math.inf))
    for multiplier in multipliers:
        for multiple_of in MULTIPLE_OF_CANDIDATES:
            if feed_forward_hidden_dim(dim, multiple_of, multiplier) == hidden_dim:
                return multiple_of, multiplier
    raise ConversionError(
        f"cannot express FFN width {hidden_dim} (dim {dim}) with Meta's multiple_of/ffn_dim_multiplier rule"
    )


def float32_repr(x: float) -> float:
    """A float stored as float32 (GGUF) printed as its shortest float32 form: 1e-05, not 9.99e-06."""
    return float(str(np.float32(x)))


def build_params(
    *,
    dim: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    vocab_size: int,
    hidden_dim: int,
    norm_eps: float,
    rope_theta: float,
    rope_scaling: Optional[dict] = None,
) -> dict:
    """Meta's params.json; `rope_scaling` holds llama3-type factors (None: no scaling)."""
    if dim % n_heads != 0 or n_heads % n_kv_heads != 0:
        raise ConversionError(f"inconsistent heads: dim {dim}, n_heads {n_heads}, n_kv_heads {n_kv_heads}")
    multiple_of, ffn_dim_multiplier = find_ffn_params(dim, hidden_dim)
    params = {
        "dim": dim,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "vocab_size": vocab_size,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": ffn_dim_multiplier,
        "norm_eps": norm_eps,
        "rope_theta": rope_theta,
        "use_scaled_rope": rope_scaling is not None,
    }
    if rope_scaling is not None and rope_scaling != META_ROPE_SCALING:
        params["rope_scaling"] = rope_scaling
    return params

