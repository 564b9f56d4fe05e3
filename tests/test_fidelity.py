"""Fidelity on real weights: our engine on the converted SmolLM2-135M-Instruct vs independent engines.

References:
- Hugging Face transformers loading the *original* GGUF (`from_pretrained(dir, gguf_file=...)`):
  its own dequantisation, its own q/k layout, its own rotate-half RoPE and attention;
- Meta's reference `Transformer` from the llama-models wheel, run on our converted weights at
  model-parallel world size 1 (gloo, CPU).
Prompt ids come from HF's tokenizer, so these tests do not depend on our tokenizer.
"""

import sys
import tempfile
from pathlib import Path

import pytest
import torch

from inference import LLaMa
from sampling import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Les feuilles d'automne tombent lentement, et",
]
LOGITS_TOLERANCE = 1e-4  # max abs difference in fp32 (the bound)
GREEDY_TOKENS = 32


@pytest.fixture(scope="module")
def hf(hf_smollm2, hf_smollm2_tokenizer):
    return hf_smollm2, hf_smollm2_tokenizer


@pytest.fixture(scope="module")
def ours(demo_ckpt):
    return LLaMa.build(demo_ckpt, max_seq_len=256, max_batch_size=4, device="cpu", dtype=torch.float32,
                       progress=False)


def hf_ids(hf, prompt: str) -> list[int]:
    return hf[1](prompt, add_special_tokens=False)["input_ids"]


def test_fp32_logits_equal_hugging_face_on_the_gguf(hf, ours):
    for prompt in PROMPTS:
        ids = torch.tensor([hf_ids(hf, prompt)])
        with torch.no_grad():
            expected = hf[0](ids).logits
        got = ours.model(ids, start_pos=0)
        max_diff = (got - expected).abs().max().item()
        assert max_diff <= LOGITS_TOLERANCE, f"{prompt!r}: max abs logit difference {max_diff:.2e}"


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    out = hf[0].generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def cut_at_stop(tokens: list[int], stop_tokens: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop_tokens:
            return tokens[:i]
    return tokens


def test_greedy_generation_equals_hugging_face_generate_alone_and_in_a_ragged_batch(hf, ours):
    prompts = PROMPTS[:3]
    prompt_ids = [hf_ids(hf, p) for p in prompts]
    assert len({len(p) for p in prompt_ids}) == len(prompts), "the batch must be ragged"
    expected = [cut_at_stop(hf_greedy(hf, ids, GREEDY_TOKENS), ours.tokenizer.stop_tokens) for ids in prompt_ids]
    alone = ours.generate(prompt_ids[:1], max_gen_len=GREEDY_TOKENS, sampling=SamplingParams(temperature=0))[0].tokens
    batch = [g.tokens for g in ours.generate(prompt_ids, max_gen_len=GREEDY_TOKENS, sampling=SamplingParams(temperature=0))]
    assert alone == expected[0]
    assert batch == expected
    assert sum(len(t) for t in expected) >= 2 * GREEDY_TOKENS  # real generations, not early stops


def test_demo_model_completes_text_sensibly(ours):
    _, (text,) = ours.text_completion(["The capital of France is"], temperature=0, max_gen_len=8)
    assert "Paris" in text


def meta_reference_model(llama_models_root, demo_ckpt, args):
    """Meta's llama3 Transformer at model-parallel world size 1, holding our converted weights."""
    sys.path.insert(0, str(llama_models_root))
    try:
        import fairscale.nn.model_parallel.initialize as fs_init
        from llama_models.llama3.args import ModelArgs as MetaArgs
        from llama_models.llama3.model import Transformer as MetaTransformer
    except ImportError as e:
        pytest.skip(f"Meta's reference model cannot be imported: {e}")
    if not torch.distributed.is_initialized():
        # A file rendezvous rather than a TCP port: two test runs at once cannot collide.
        store = Path(tempfile.mkdtemp()) / "rendezvous"
        torch.distributed.init_process_group("gloo", init_method=store.as_uri(), rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)
    meta_args = MetaArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                         vocab_size=args.vocab_size, multiple_of=args.multiple_of,
                         ffn_dim_multiplier=args.ffn_dim_multiplier, norm_eps=args.norm_eps,
                         rope_theta=args.rope_theta, max_seq_len=64, max_batch_size=1)
    model = MetaTransformer(meta_args)
    state_dict = torch.load(demo_ckpt / "consolidated.00.pth", map_location="cpu", weights_only=True)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def test_logits_equal_metas_reference_transformer(llama_models_root, demo_ckpt, ours, hf):
    meta = meta_reference_model(llama_models_root, demo_ckpt, ours.args)
    ids = torch.tensor([hf_ids(hf, PROMPTS[1])])
    expected = meta(ids, start_pos=0)
    got = ours.model(ids, start_pos=0)
    assert (got - expected).abs().max().item() <= LOGITS_TOLERANCE
