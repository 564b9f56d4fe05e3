"""Tiny random-weight Llama checkpoints for tests, made by Hugging Face transformers.

The weights come from a `LlamaForCausalLM` with random init; they are written in Meta's layout
(names mapped, HF's q/k rotate-half permutation undone), so HF's model is an independent reference
for our loader and engine on exactly the same weights.
"""

import json
from pathlib import Path
from typing import Optional

import torch
import transformers

from model import ModelArgs
from sampling import SamplingParams

LLAMA2_VOCAB_SIZE = 32000  # tests/data/llama2-tokenizer.model
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, norm_eps=1e-5, rope_theta=10000.0)


def unpermute_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF keeps each head's q/k rows as [first halves | second halves] (rotate-half RoPE); Meta
    interleaves them as complex pairs. Inverse of `permute` in HF's convert_llama_weights_to_hf.py."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, 2, head_dim // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_model(params: dict, vocab_size: int, seed: int = 0) -> "transformers.LlamaForCausalLM":
    args = ModelArgs(**params, vocab_size=vocab_size)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        max_position_embeddings=4096, rms_norm_eps=args.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        tie_word_embeddings=False, attn_implementation="eager", bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "embed_tokens" in name or "lm_head" in name:
                p.normal_(0, 1.0)  # a peaked next-token distribution: greedy choices are far from ties
    return model


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    """HF's greedy continuation of one prompt by n tokens (stop tokens ignored): the reference."""
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                      attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def meta_state_dict(model, params: dict) -> dict:
    sd = model.state_dict()
    n_heads, n_kv_heads = params["n_heads"], params["n_kv_heads"]
    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"]}
    for i in range(params["n_layers"]):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        meta[q + "attention.wq.weight"] = unpermute_hf(sd[p + "self_attn.q_proj.weight"], n_heads)
        meta[q + "attention.wk.weight"] = unpermute_hf(sd[p + "self_attn.k_proj.weight"], n_kv_heads)
        meta[q + "attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        meta[q + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        meta[q + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        meta[q + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        meta[q + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        meta[q + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        meta[q + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    return {k: v.clone().contiguous() for k, v in meta.items()}


def write_checkpoint(out_dir: Path, state_dict: dict, params: dict, tokenizer_path: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, out_dir / "consolidated.00.pth")
    (out_dir / "params.json").write_text(json.dumps(params))
    (out_dir / "tokenizer.model").write_bytes(Path(tokenizer_path).read_bytes())
    return out_dir


def write_tiny_llama2_checkpoint(out_dir: Path, tokenizer_path: Path, seed: int = 0,
                                 dtype: Optional[torch.dtype] = None) -> Path:
    """The TINY model with random weights (from `seed`) as a Meta checkpoint for the Llama 2 tokenizer
    at `tokenizer_path`, its tensors stored in `dtype` (None: float32); params.json says vocab_size
    -1, as Meta's Llama 2 ones do."""
    hf = hf_model(TINY, LLAMA2_VOCAB_SIZE, seed=seed)
    state_dict = meta_state_dict(hf, TINY)
    if dtype is not None:
        state_dict = {name: tensor.to(dtype) for name, tensor in state_dict.items()}
    return write_checkpoint(out_dir, state_dict, {**TINY, "vocab_size": -1}, tokenizer_path)


# A prompt for speculative decoding (tests/test_speculative.py): the model's own continuation of a
# text, this many tokens with every CHANGED_EVERY-th one changed, is replayed to it.
REPLAYED_TOKENS = 24
CHANGED_EVERY = 6


def replay_prompt(llama, text: str) -> list[int]:
    """A prompt that `llama` (an inference.LLaMa) will partly repeat: the text, the model's own greedy
    continuation of it with every CHANGED_EVERY-th token changed, then the text again. The model
    continues the second copy much as it did the first, so drafts copied from the altered
    continuation are both kept and rejected. (A random model's own text rarely repeats itself, so
    prompt lookup would otherwise find few drafts.)"""
    (prompt,) = llama.encode_prompts([text])
    greedy = SamplingParams(temperature=0)
    continuation = [int(step.tokens[0]) for step in llama.decode([prompt], REPLAYED_TOKENS, greedy)]
    altered = [(t + 1) % llama.args.vocab_size if i % CHANGED_EVERY == CHANGED_EVERY - 1 else t
               for i, t in enumerate(continuation)]
    return prompt + altered + prompt[1:]  # the text again, without a second BOS
