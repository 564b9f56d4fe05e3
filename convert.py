"""Convert a Llama checkpoint from GGUF or Hugging Face format into Meta's format.

Our engine reads exactly what Meta publishes: a directory with

    consolidated.00.pth   a flat state dict (Meta's names: tok_embeddings, layers.N.attention.wq, ...)
    params.json           the hyperparameters (dim, n_layers, n_heads, ...; nothing else)
    tokenizer.model       SentencePiece (Llama 2) or tiktoken ranks (Llama 3 style)

Other formats hold the same numbers under other names and, sometimes, in another order. This
file is the converter's spine: open a source, check every tensor against the shape our model
expects, write the directory. The chapters, in reading order:

    convert_source.py   what every reader returns (a `Source`), params.json, `ConversionError`
    convert_vocab.py    vocabularies -> tokenizer files (byte-level BPE -> tiktoken, SentencePiece)
    convert_gguf.py     reading a llama GGUF file (llama.cpp): dequantized tensors, metadata
    convert_hf.py       reading a Hugging Face directory: config.json, safetensors, q/k un-permuted

The output appears atomically (atomic.py): we fill a temporary directory next to OUT_DIR and
rename it at the end, so a failed or interrupted conversion (an error, Ctrl-C, `kill`) leaves
nothing behind, and `--force` swaps an old OUT_DIR for the new one in a single rename. (After a
`kill -9` the temporary directory stays until the next conversion into the same parent removes it.)

    python convert.py SmolLM2-135M-Instruct.Q4_1.gguf checkpoints/smollm2 --dtype bfloat16

A progress bar counts the tensors on a terminal (none in a pipe or a log, none with `--quiet`).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

import convert_gguf
import convert_hf
import convert_source
import convert_vocab
from atomic import atomic_dir, check_parent, make_readable, publish_dir
from convert_gguf import is_gguf_file, read_gguf
from convert_hf import HF_CONFIG, is_hf_dir, read_hf_dir
from convert_source import CHECKPOINT_NAME, PARAMS_NAME, ConversionError, Source
from convert_source import TOKENIZER_NAME, TOKENIZER_SPEC_NAME  # noqa: F401  (re-exported: convert.TOKENIZER_NAME)
from model import ModelArgs, expected_shapes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INTERRUPTED_STATUS = 130  # what a shell reports for a program ended by Ctrl-C (128 + SIGINT)

# --------------------------------------------------------------------------------------------
# Checking and writing the tensors
# --------------------------------------------------------------------------------------------


def _shapes_for(params: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Meta checkpoint with its shape, from params.json: `model.expected_shapes`,
    the one rule the loader checks too."""
    try:
        args = ModelArgs(**params)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"the source's hyperparameters do not make a Llama model: {e}") from e
    return expected_shapes(args)


def write_checkpoint(source: Source, tmp_dir: Path, dtype: torch.dtype, progress: bool = True) -> None:
    shapes = _shapes_for(source.params)
    state: dict[str, torch.Tensor] = {}
    # disable=None: tqdm draws the bar only when stderr is a terminal (no bar in a pipe or a log).
    with tqdm(source.tensors(), total=source.n_tensors, desc="converting", unit="tensor",
              disable=None if progress else True) as bar:
        for name, tensor in bar:
            if name not in shapes:
                raise ConversionError(f"tensor {name} does not belong to a {source.params['n_layers']}-layer model")
            if tuple(tensor.shape) != shapes[name]:
                raise ConversionError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {shapes[name]}")
            state[name] = tensor.to(dtype).contiguous()
    if "output.weight" not in state and "tok_embeddings.weight" in state:
        # Tied embeddings: the output projection reuses the input embedding. Meta's format has no
        # flag for that, so we store a copy and the engine loads it strictly like any checkpoint.
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise ConversionError(f"source lacks {len(missing)} tensors, e.g. {missing[:3]}")
    torch.save(state, tmp_dir / CHECKPOINT_NAME)
    (tmp_dir / PARAMS_NAME).write_text(json.dumps(source.params, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Opening a source, writing the output directory
# --------------------------------------------------------------------------------------------


def open_source(src: Path, tokenizer_path: Optional[Path]) -> Source:
    if is_gguf_file(src):
        if tokenizer_path is not None:
            raise ConversionError("--tokenizer applies to Hugging Face directories; a GGUF file carries its own")
        return read_gguf(src)
    if is_hf_dir(src):
        return read_hf_dir(src, tokenizer_path)
    raise ConversionError(f"{src} is neither a GGUF file nor a Hugging Face directory with {HF_CONFIG}")


def check_output(out_dir: Path, force: bool) -> None:
    """Refuse a bad OUT_DIR before reading a byte of the source (atomic_dir would, but later)."""
    try:
        check_parent(out_dir, parents=True)
    except OSError as e:
        raise ConversionError(str(e)) from None
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ConversionError(f"{out_dir} exists and is not empty; pass --force to replace it")


def convert(
    src: Path | str,
    out_dir: Path | str,
    dtype: torch.dtype = torch.bfloat16,
    force: bool = False,
    tokenizer_path: Optional[Path | str] = None,
    progress: bool = True,
) -> Path:
    """Convert `src` (GGUF file or HF directory) into a Meta-format directory `out_dir`.

    progress=True draws a bar per tensor on a terminal (never into a pipe or a log)."""
    src, out_dir = Path(src), Path(out_dir)
    tokenizer_path = None if tokenizer_path is None else Path(tokenizer_path)
    if not src.exists():
        raise ConversionError(f"{src} does not exist")
    check_output(out_dir, force)
    source = open_source(src, tokenizer_path)
    with atomic_dir(out_dir, replace=force, parents=True) as tmp_dir:
        write_checkpoint(source, tmp_dir, dtype, progress)
        if source.write_tokenizer is None:
            warnings.warn(
                f"{src} holds no tokenizer (tokenizer.model or tokenizer.json); {out_dir} gets none. "
                f"Copy one in, or convert again with --tokenizer PATH.",
                stacklevel=2,
            )
        else:
            source.write_tokenizer(tmp_dir)
    return out_dir


def publish(tmp_dir: Path, out_dir: Path) -> None:
    """Give a finished `tmp_dir` the usual permissions and rename it to `out_dir`, replacing an old
    one (atomic.py's rule, for callers that fill a directory with a tool of their own)."""
    make_readable(tmp_dir)
    publish_dir(tmp_dir, out_dir)


# Names that moved from this file into its chapters (PEP 562): say where, in one line.
CHAPTERS = (convert_source, convert_vocab, convert_gguf, convert_hf)


# Names that did not just move to a chapter: what took their place.
REPLACED_NAMES = {
    "current_umask": "atomic.current_umask", "prepare_output": "atomic.atomic_dir",
    **{table: "convert_source.meta_tensor_name (one table of Meta / GGUF / HF names)"
       for table in ("GGUF_GLOBAL_NAMES", "GGUF_LAYER_NAMES", "HF_GLOBAL_NAMES", "HF_LAYER_NAMES")},
}


def __getattr__(name: str):
    if name in REPLACED_NAMES:
        raise AttributeError(f"convert.{name} moved: use {REPLACED_NAMES[name]}")
    for chapter in CHAPTERS:
        if not name.startswith("_") and hasattr(chapter, name):
            raise AttributeError(f"convert.{name} moved: use {chapter.__name__}.{name}")
    raise AttributeError(f"module 'convert' has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convert a Llama checkpoint (GGUF file or Hugging Face directory) into Meta's format.",
    )
    parser.add_argument("src", type=Path, help="a llama GGUF file, or a HF directory with config.json and safetensors")
    parser.add_argument("out_dir", type=Path, help="directory to create: consolidated.00.pth, params.json, tokenizer.model")
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="bfloat16",
        help="dtype of the saved weights (default: bfloat16; GGUF weights are dequantized first)",
    )
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer.model to copy when a HF directory holds none"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar (there is none in a pipe or a log anyway)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    try:
        out = convert(args.src, args.out_dir, DTYPES[args.dtype], args.force, args.tokenizer, progress=not args.quiet)
    except (ConversionError, OSError) as e:  # OSError: the disk, permissions; the message names the path
        raise SystemExit(f"convert.py: error: {e}") from None
    except KeyboardInterrupt:  # Ctrl-C: atomic_dir has removed the temporary directory on the way out
        print("convert.py: interrupted; nothing was written", file=sys.stderr)
        raise SystemExit(INTERRUPTED_STATUS) from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
