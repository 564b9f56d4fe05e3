"""Writing the tokenizer files that tokenizer.py reads (used by convert.py).

Two files describe a tiktoken vocabulary (see tokenizer.py for how they are read):

* `tokenizer.model`: one ``base64(token bytes) rank`` line per mergeable token, sorted by rank;
* `tokenizer_spec.json` (only for vocabularies other than Meta's Llama 3): the split regex, the
  special tokens, BOS/EOS/pad, the stop tokens, whether prompts start with BOS, and the chat template.

Both are validated before anything is written, and written atomically (atomic.py): a converted
directory never holds half a tokenizer. SentencePiece models (Llama 2) are protobufs written by
the sentencepiece library itself (see convert.py).
"""

import base64
import json
from pathlib import Path
from typing import Union

from atomic import write_text_atomically
from tokenizer import _is_token_id, validate_tokenizer_spec


def write_tiktoken_model(path: Union[str, Path], mergeable_ranks: dict[bytes, int]) -> None:
    """Write `mergeable_ranks` as a tiktoken `tokenizer.model`, sorted by rank, atomically."""
    path = Path(path)
    for token, rank in mergeable_ranks.items():
        if not isinstance(token, bytes) or not token or not _is_token_id(rank):
            raise ValueError(
                f"cannot write {path}: ranks must map non-empty bytes to non-negative ints, "
                f"got {token!r}: {rank!r}"
            )
    if len(set(mergeable_ranks.values())) != len(mergeable_ranks):
        raise ValueError(f"cannot write {path}: two tokens share a rank")
    lines = (
        f"{base64.b64encode(token).decode('ascii')} {rank}\n"
        for token, rank in sorted(mergeable_ranks.items(), key=lambda item: item[1])
    )
    write_text_atomically(path, "".join(lines))


def write_tokenizer_spec(path: Union[str, Path], spec: dict) -> None:
    """Validate `spec` and write it as `tokenizer_spec.json` at `path`, atomically.

    The loader looks for a file named `TOKENIZER_SPEC_FILENAME` next to `tokenizer.model`.
    """
    path = Path(path)
    validate_tokenizer_spec(spec, path)
    write_text_atomically(path, json.dumps(spec, indent=2, ensure_ascii=False) + "\n")
