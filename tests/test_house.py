"""The shape of the house: one home per idea, imports only "down" the reading order, short rooms.

The README's map lists the files in reading order; `READING_ORDER` below is that list. A file may
import only files that stand before it (tools stand on the engine, the engine on the model,
never back), which also rules out import circles, lazy imports included: every import statement
anywhere in a file counts, inside functions and `if TYPE_CHECKING:` blocks too.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SPINE = ["model", "tokenizer", "sampling", "cpu", "bf16_layers", "quantize", "memory", "smoothing", "checkpoint", "decoding", "streaming",
         "batching", "chat_format", "inference"]
AROUND_THE_SPINE = ["atomic", "tokenizer_files", "convert_source", "convert_vocab", "convert_gguf", "convert_hf",
                    "convert", "demo_model", "chat", "tensor_parallel", "cli"]
TOOLS = ["inspect_checkpoint", "reshard", "layers", "attribution", "interpret", "bench", "bench_batching", "gpu_check",
         "openai_api", "server"]
READING_ORDER = SPINE + AROUND_THE_SPINE + TOOLS

# What `import inference` may load of ours: the engine and the small modules it needs.
ENGINE = set(SPINE)
MAX_FILE_LINES = 700
MAX_INFERENCE_LINES = 500


def our_modules() -> dict[str, Path]:
    return {p.stem: p for p in ROOT.glob("*.py")}


def imports_of(path: Path) -> set[str]:
    """Every top-level module of ours that `path` imports, wherever the import statement stands."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(our_modules())


def test_the_reading_order_names_every_file_of_ours_once():
    assert sorted(READING_ORDER) == sorted(our_modules())
    assert len(set(READING_ORDER)) == len(READING_ORDER)


@pytest.mark.parametrize("module", READING_ORDER)
def test_a_file_imports_only_files_before_it_in_the_reading_order(module):
    before = set(READING_ORDER[: READING_ORDER.index(module)])
    upward = sorted(imports_of(our_modules()[module]) - before - {module})
    assert upward == [], f"{module}.py imports {upward}, which stand after it in the reading order"


def test_model_tokenizer_and_sampling_stand_alone():
    """The README's "pieces" snippet samples a token with these three files and nothing else of ours."""
    for module in ("model", "tokenizer", "sampling"):
        assert imports_of(our_modules()[module]) == set(), module


def loaded_by(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return set(out.split()) & set(our_modules())


def test_importing_the_engine_loads_only_the_engine():
    loaded = loaded_by("import inference")
    assert loaded <= ENGINE, f"import inference also loads {sorted(loaded - ENGINE)}"
    assert {"model", "tokenizer", "sampling", "checkpoint", "decoding", "inference"} <= loaded


def test_sampling_a_token_from_the_pieces_needs_three_files():
    loaded = loaded_by("import model, tokenizer, sampling")
    assert loaded == {"model", "tokenizer", "sampling"}


@pytest.mark.parametrize("module", READING_ORDER)
def test_no_file_is_longer_than_a_chapter(module):
    lines = len(our_modules()[module].read_text().splitlines())
    limit = MAX_INFERENCE_LINES if module == "inference" else MAX_FILE_LINES
    assert lines <= limit, f"{module}.py has {lines} lines (at most {limit})"


def test_python_inference_py_is_still_the_command_line():
    result = subprocess.run([sys.executable, "inference.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("usage: inference.py")
    assert "--ckpt-dir" in result.stdout and "--chat" in result.stdout


@pytest.mark.parametrize("statement, new_spelling", [
    ("import inference; inference.main", "cli.main"),
    ("import inference; inference.check_stop_strings", "sampling.check_stop_strings"),
    ("from tokenizer import Tokenizer; Tokenizer('tests/data/llama2-tokenizer.model').encode_dialog_prompt",
     "LLaMa.chat_format.encode_dialog_prompt"),
    ("from tokenizer import Tokenizer; Tokenizer('tests/data/llama2-tokenizer.model').stream_decoder",
     "streaming.StreamDecoder"),
    ("from tokenizer import Tokenizer; Tokenizer('tests/data/llama2-tokenizer.model').chat_format",
     "chat_format.chat_format_for"),
    ("import checkpoint; checkpoint.choose_threads", "cpu.choose_threads"),
    ("import checkpoint; checkpoint.fit_default_dtype", "checkpoint.choose_dtype"),
    ("import quantize; quantize.cpu_flags", "cpu.cpu_flags"),
])
def test_a_name_that_moved_says_where_it_went_in_one_line(statement, new_spelling):
    result = subprocess.run([sys.executable, "-c", statement], cwd=ROOT, capture_output=True, text=True)
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and "moved: use" in last_line and new_spelling in last_line, last_line
