"""The README's Python snippets run as written, on a tiny random Llama 2 checkpoint.

Each ```python block is run on its own (a reader copies one at a time), from a folder that is not
the repository, with the repository put on the path the way the README says. The only edits are
the checkpoint paths ("path/to/ckpt_dir", "ckpt/...") pointing at the tiny checkpoint.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LLAMA2_TOKENIZER
from tiny import write_tiny_llama2_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SNIPPETS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_llama2_checkpoint(tmp_path_factory.mktemp("readme"), LLAMA2_TOKENIZER)


def test_the_readme_has_python_snippets():
    assert len(SNIPPETS) >= 4


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_a_readme_snippet_runs_as_written(ckpt, tmp_path, index):
    code = SNIPPETS[index].replace("path/to/ckpt_dir", str(ckpt)).replace('"ckpt/', f'"{ckpt}/')
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + code
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"snippet {index}:\n{SNIPPETS[index]}\n{result.stderr[-2000:]}"
