"""Run under torchrun by test_tensor_parallel.py: greedy generation and logits with tensor parallel.

    torchrun --standalone --nproc_per_node N tests/tp_worker.py CKPT_DIR OUT_PREFIX PROMPTS_JSON MAX_GEN_LEN

Every rank saves OUT_PREFIX.rank<R>.pt: its generated tokens, the logits of the first prompt, and
how many parameters it holds, so the test can check that all ranks agree and each holds its share.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference import LLaMa  # noqa: E402
from sampling import SamplingParams  # noqa: E402
from tensor_parallel import init_from_torchrun  # noqa: E402


def main(ckpt_dir: str, out_prefix: str, prompts_json: str, max_gen_len: str) -> None:
    tp = init_from_torchrun("cpu")
    assert tp is not None, "run me with torchrun --nproc_per_node N (N > 1)"
    llama = LLaMa.build(ckpt_dir, max_seq_len=64, max_batch_size=4, device="cpu", dtype="float32",
                        progress=False, tensor_parallel=tp)
    prompts = json.loads(prompts_json)
    generations = llama.generate(prompts, max_gen_len=int(max_gen_len), sampling=SamplingParams(temperature=0))
    logits = llama.model(torch.tensor([prompts[0]]), start_pos=0)
    torch.save({
        "tokens": [g.tokens for g in generations],
        "logits": logits,
        "n_params": sum(p.numel() for p in llama.model.parameters()),
    }, f"{out_prefix}.rank{tp.rank}.pt")
    tp.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
