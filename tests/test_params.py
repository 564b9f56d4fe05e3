"""params/ presets: Meta's params.json for every official model, checked against published counts.

Each count is the number of parameters of our `Transformer` built from the preset on the "meta"
device (shapes only, no memory), so it checks the preset *and* our model's shapes together.

Two conventions, stated here once:
- Llama 2's params.json says `"vocab_size": -1` ("take it from the tokenizer"), and the presets keep
  it, byte-for-byte what Meta ships (our loader fills it in from the weights). To count, we take the
  size of the Llama 2 tokenizer in tests/data, which is 32,000.
- Llama 3.2 1B and 3B tie their output head to the embedding. Meta's checkpoint still stores both
  `tok_embeddings.weight` and `output.weight` (same values; Meta's model loads it strictly), and so
  does our model, but the published counts count the shared matrix once: vocab_size * dim less.
"""

import json
from pathlib import Path

import pytest
import torch

from conftest import LLAMA2_TOKENIZER
from model import ModelArgs, Transformer
from tokenizer import Tokenizer

PARAMS_DIR = Path(__file__).resolve().parent.parent / "params"

# Published parameter counts (Meta's model cards; Hugging Face's safetensors metadata).
PUBLISHED_COUNTS = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "llama-3.1-8b": 8_030_261_248,  # same architecture as Llama 3 8B; only RoPE scaling differs
    "llama-3.1-70b": 70_553_706_496,
    "llama-3.1-405b": 405_853_388_800,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
}
TIED_EMBEDDINGS = {"llama-3.2-1b", "llama-3.2-3b"}  # tie_word_embeddings in their HF config.json


def preset(name: str) -> dict:
    return json.loads((PARAMS_DIR / f"{name}.json").read_text())


def count_parameters(params: dict, tokenizer_vocab_size: int, tied_embeddings: bool) -> int:
    if params["vocab_size"] == -1:
        params = {**params, "vocab_size": tokenizer_vocab_size}
    args = ModelArgs(**params)
    with torch.device("meta"):
        model = Transformer(args)
    total = sum(p.numel() for p in model.parameters())
    return total - args.vocab_size * args.dim if tied_embeddings else total


def test_there_is_one_preset_per_official_model():
    assert sorted(p.stem for p in PARAMS_DIR.glob("*.json")) == sorted(PUBLISHED_COUNTS)


@pytest.mark.parametrize("name", PUBLISHED_COUNTS)
def test_preset_gives_the_published_parameter_count(name):
    llama2_vocab_size = Tokenizer(LLAMA2_TOKENIZER).n_words
    assert llama2_vocab_size == 32000
    assert count_parameters(preset(name), llama2_vocab_size, name in TIED_EMBEDDINGS) == PUBLISHED_COUNTS[name]


@pytest.mark.parametrize("name", PUBLISHED_COUNTS)
def test_preset_holds_only_meta_keys_and_llama2_leaves_vocab_to_the_tokenizer(name):
    params = preset(name)
    ModelArgs(**{**params, "vocab_size": 1})  # an unknown key would be a TypeError naming it
    assert (params["vocab_size"] == -1) == name.startswith("llama-2-")
    # Llama 3.1 and 3.2 stretch RoPE for their 128K context; Llama 2 and 3 do not.
    assert params.get("use_scaled_rope", False) == name.startswith(("llama-3.1-", "llama-3.2-"))
