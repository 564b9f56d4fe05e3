"""Reading a Hugging Face Llama directory: config.json, safetensors, tokenizer.

A directory saved by transformers' `LlamaForCausalLM.save_pretrained` holds the same numbers as
Meta's checkpoint under other names (`model.layers.N.self_attn.q_proj.weight` is Meta's
`layers.N.attention.wq.weight`), and one real difference: HF permutes the rows of wq/wk so that
each head's rotary pairs are (i, i + head_dim/2) -- "rotate half" -- instead of Meta's
neighbouring pairs (2i, 2i+1). `unpermute_rotary` applies the inverse of the permutation in HF's
`convert_llama_weights_to_hf.py`.

Weights come from `model.safetensors` or from shards listed in `model.safetensors.index.json`
(never from pickles). The tokenizer comes from, in this order: an explicit `--tokenizer` file,
the directory's SentencePiece `tokenizer.model`, or its `tokenizer.json` (byte-level BPE, turned
into tiktoken ranks by convert_vocab.py).

`read_hf_dir(src, tokenizer_path)` returns a `Source` (convert_source.py); tensors are read one
file at a time as the converter iterates them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from convert_source import HUGGING_FACE, META_DEFAULT_ROPE_THETA, META_ROPE_SCALING, TOKENIZER_NAME, ConversionError
from convert_source import Source, build_params, meta_tensor_name, read_json_object
from convert_vocab import GPT2_PATTERN, SMOLLM_PATTERN, byte_level_bpe_ranks, is_sentencepiece_model, tokenizer_spec
from convert_vocab import write_byte_level_bpe

HF_CONFIG = "config.json"
HF_SINGLE_FILE = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_ARCHITECTURE = "LlamaForCausalLM"

# The config.json sizes that go into params.json. LlamaConfig has a default for each (Llama 2 7B's),
# but save_pretrained always writes them: a config without one is damaged, and guessing is worse.
HF_REQUIRED_KEYS = {
    "hidden_size": int, "num_hidden_layers": int, "num_attention_heads": int, "vocab_size": int,
    "intermediate_size": int, "rms_norm_eps": float,
}
HF_OPTIONAL_INT_KEYS = ("num_key_value_heads", "head_dim")  # absent or null: no GQA / hidden_size // heads
SAFETENSORS_REQUIREMENT = "safetensors>=0.4,<1"  # as in requirements.txt


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / HF_CONFIG).is_file()


def hf_to_meta_name(name: str) -> str:
    meta_name = meta_tensor_name(name, HUGGING_FACE, layer_prefix="model.layers")
    if meta_name is None:
        why = "biases are not part of a Llama model" if name.endswith(".bias") else "not part of a Llama model"
        raise ConversionError(f"unexpected tensor {name!r} ({why})")
    return meta_name


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's q/k row permutation (convert_llama_weights_to_hf.py, `permute`).

    Per head, HF stores the first halves of Meta's rotary pairs, then the second halves; Meta
    interleaves them: rows (0, d/2, 1, d/2+1, ...) of HF's head become rows (0, 1, 2, 3, ...).
    """
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_rope_settings(config: dict) -> tuple[float, Optional[dict]]:
    """(rope_theta, llama3 scaling or None). transformers 5 nests both in `rope_parameters`;
    older configs keep `rope_theta` at the top and the scaling in `rope_scaling`."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", config.get("rope_theta", META_DEFAULT_ROPE_THETA))
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise ConversionError(f"unsupported rope scaling {kind!r} (only Llama 3.1's 'llama3' scaling is supported)")
    missing = [key for key in META_ROPE_SCALING if key not in rope]
    if missing:
        raise ConversionError(f"{HF_CONFIG}: llama3 rope scaling lacks {', '.join(missing)}")
    scaling = {key: type(META_ROPE_SCALING[key])(rope[key]) for key in META_ROPE_SCALING}
    return float(theta), scaling


def is_a(value, expected: type) -> bool:
    """JSON's types: an int is also a float; a bool (true/false) is neither."""
    allowed = (int, float) if expected is float else expected
    return isinstance(value, allowed) and not isinstance(value, bool)


def check_hf_config(config: dict, src: Path) -> None:
    for key, expected in HF_REQUIRED_KEYS.items():
        if key not in config:
            raise ConversionError(f"{src / HF_CONFIG} lacks {key!r} (a number: {expected.__name__})")
        if not is_a(config[key], expected):
            raise ConversionError(f"{src / HF_CONFIG}: {key} is {config[key]!r}, expected a number ({expected.__name__})")
    for key in HF_OPTIONAL_INT_KEYS:
        if config.get(key) is not None and not is_a(config[key], int):
            raise ConversionError(f"{src / HF_CONFIG}: {key} is {config[key]!r}, expected an integer or null")
    model_type = config.get("model_type")
    architectures = config.get("architectures") or [HF_ARCHITECTURE]
    if model_type != "llama" or HF_ARCHITECTURE not in architectures:
        raise ConversionError(
            f"{src}: model_type {model_type!r} / architectures {architectures} is not a Llama model (LlamaForCausalLM)"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ConversionError(f"{src}: {flag}=true has no place in Meta's Llama format")
    if config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{src}: hidden_act {config['hidden_act']!r}; Meta's Llama uses silu")
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim * config["num_attention_heads"] != config["hidden_size"]:
        raise ConversionError(f"{src}: head_dim {head_dim} != hidden_size / num_attention_heads; Meta's format cannot say so")


def import_safetensors():
    """The safetensors package (in requirements.txt), or one line saying what to install."""
    try:
        import safetensors
    except ImportError:
        raise ConversionError(
            f"reading a Hugging Face checkpoint needs the safetensors package: pip install '{SAFETENSORS_REQUIREMENT}'"
        ) from None
    return safetensors


def hf_weight_files(src: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it (one file, or shards listed in the index)."""
    safetensors = import_safetensors()
    if (src / HF_INDEX).is_file():
        weight_map = read_json_object(src / HF_INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ConversionError(f"{src / HF_INDEX} has no \"weight_map\" of tensor name -> file name")
        return {name: src / file for name, file in weight_map.items()}
    if (src / HF_SINGLE_FILE).is_file():
        try:
            with safetensors.safe_open(src / HF_SINGLE_FILE, framework="pt") as f:
                return {name: src / HF_SINGLE_FILE for name in f.keys()}
        except (safetensors.SafetensorError, OSError) as e:
            raise ConversionError(f"cannot read {src / HF_SINGLE_FILE}: {e}") from e
    raise ConversionError(f"{src}: no {HF_SINGLE_FILE} or {HF_INDEX} (only safetensors checkpoints are supported)")


def read_hf_dir(src: Path, tokenizer_path: Optional[Path]) -> Source:
    safetensors = import_safetensors()
    config = read_json_object(src / HF_CONFIG)
    check_hf_config(config, src)
    n_heads = config["num_attention_heads"]
    n_kv_heads = config.get("num_key_value_heads") or n_heads
    rope_theta, rope_scaling = hf_rope_settings(config)
    params = build_params(
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=config["vocab_size"],
        hidden_dim=config["intermediate_size"],
        norm_eps=config["rms_norm_eps"],
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
    )
    files = hf_weight_files(src)

    def read_file(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
        with safetensors.safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):  # a buffer older versions saved: derived, not learned
                    continue
                meta_name = hf_to_meta_name(name)
                tensor = f.get_tensor(name)
                if meta_name.endswith("attention.wq.weight"):
                    tensor = unpermute_rotary(tensor, n_heads)
                elif meta_name.endswith("attention.wk.weight"):
                    tensor = unpermute_rotary(tensor, n_kv_heads)
                yield meta_name, tensor

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for file in sorted(set(files.values())):
            try:
                yield from read_file(file)
            except (safetensors.SafetensorError, OSError) as e:
                raise ConversionError(f"cannot read {file}: {e}") from e

    n_tensors = sum(1 for name in files if not name.endswith("rotary_emb.inv_freq"))
    return Source(params, tensors, hf_tokenizer_writer(src, config, tokenizer_path), n_tensors)


def hf_tokenizer_writer(src: Path, config: dict, tokenizer_path: Optional[Path]) -> Optional[Callable[[Path], None]]:
    """Pick how to produce tokenizer.model: an explicit path, SRC's SentencePiece model, or
    SRC's tokenizer.json; None when SRC holds none of them."""
    if tokenizer_path is not None:
        return lambda out: shutil.copyfile(tokenizer_path, out / TOKENIZER_NAME)
    if (src / TOKENIZER_NAME).is_file() and is_sentencepiece_model(src / TOKENIZER_NAME):
        return lambda out: shutil.copyfile(src / TOKENIZER_NAME, out / TOKENIZER_NAME)
    if (src / "tokenizer.json").is_file():
        return lambda out: write_hf_tokenizer_json(src, config, out)
    return None


def hf_pre_tokenizer_pattern(pre: Optional[dict]) -> str:
    """Map the pre-tokenizer structures of the byte-level BPE models we know to one regex."""

    def is_byte_level(step: dict, use_regex: bool) -> bool:
        return (
            step.get("type") == "ByteLevel"
            and step.get("use_regex", True) == use_regex
            and not step.get("add_prefix_space", False)
        )

    if pre is None:
        steps = []
    elif pre.get("type") == "Sequence":
        steps = pre["pretokenizers"]
    else:
        steps = [pre]
    if len(steps) == 1 and is_byte_level(steps[0], use_regex=True):
        return GPT2_PATTERN
    if len(steps) == 2:
        first, second = steps
        if first.get("type") == "Digits" and first.get("individual_digits") and is_byte_level(second, True):
            return SMOLLM_PATTERN
        if (
            first.get("type") == "Split"
            and "Regex" in first.get("pattern", {})
            and first.get("behavior") == "Isolated"
            and not first.get("invert", False)
            and is_byte_level(second, use_regex=False)
        ):
            return first["pattern"]["Regex"]
    raise ConversionError(f"unsupported pre-tokenizer in tokenizer.json: {json.dumps(pre)[:200]}")


def write_hf_tokenizer_json(src: Path, config: dict, out_dir: Path) -> None:
    """tokenizer.json (byte-level BPE) -> tiktoken tokenizer.model + tokenizer_spec.json."""
    tok = read_json_object(src / "tokenizer.json")
    model = tok.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or tok.get("normalizer") is not None:
        raise ConversionError(f"{src}/tokenizer.json: only byte-level BPE without a normalizer is supported")
    pattern = hf_pre_tokenizer_pattern(tok.get("pre_tokenizer"))
    specials = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    vocab = model["vocab"]
    tokens = [None] * (max(list(vocab.values()) + list(specials.values()), default=-1) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    ordinary = [(t, i) for i, t in enumerate(tokens) if t is not None and i not in specials.values()]
    # Newer tokenizer.json files store merges as [left, right] pairs, older ones as "left right".
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model.get("merges", [])]
    ranks = byte_level_bpe_ranks(ordinary, merges)

    tok_config_path = src / "tokenizer_config.json"
    tok_config = read_json_object(tok_config_path) if tok_config_path.is_file() else {}
    id_to_token = {i: t for t, i in specials.items()} | {i: t for t, i in vocab.items()}

    def token_named(key: str) -> Optional[str]:
        value = tok_config.get(key)
        if isinstance(value, dict):  # AddedToken serialized as a dict
            value = value.get("content")
        if value is None and isinstance(config.get(key + "_id"), int):
            value = id_to_token.get(config[key + "_id"])
        return value

    bos, eos = token_named("bos_token"), token_named("eos_token")
    if eos is None:
        raise ConversionError(f"{src}: no eos_token in tokenizer_config.json or eos_token_id in config.json")
    add_bos = tok_config.get("add_bos_token")
    if add_bos is None:  # tokenizers' TemplateProcessing that starts with the BOS token adds it
        single = (tok.get("post_processor") or {}).get("single") or []
        add_bos = bool(single) and single[0].get("SpecialToken", {}).get("id") == bos
    chat_template = tok_config.get("chat_template")
    if chat_template is None and (src / "chat_template.jinja").is_file():
        chat_template = (src / "chat_template.jinja").read_text()
    spec = tokenizer_spec(
        pattern=pattern,
        special_tokens=dict(sorted(specials.items(), key=lambda x: x[1])),
        bos_token=bos,
        eos_token=eos,
        pad_token=token_named("pad_token"),
        add_bos=bool(add_bos),
        chat_template=chat_template,
    )
    write_byte_level_bpe(out_dir, ranks, spec)

