"""Ready for a GPU, checked without one: gpu_check.py on the CPU, its no-GPU message, and the torch floor.

1. `gpu_check.py --device cpu` runs every check end to end on a tiny random checkpoint: the JSON has
   each field a GPU run fills, and the fp32 row, which computes exactly what the reference does (same
   device, same dtype), has the reference's tokens. The comparison behind the "tokens" column is
   checked on made-up logits, where the answer is known.
2. Without a visible GPU, the default run (`--device cuda`) is one line that says so and how to
   smoke-test instead (CUDA_VISIBLE_DEVICES is emptied, so this holds on a GPU machine too).
3. requirements.txt's torch floor is at least the oldest release that has each torch API the code
   calls (the table below, each row with where its date comes from: the files of PyTorch's own
   release wheels, compared between the release that has it and the one before), and every one of
   them exists in the installed torch. Every private torch symbol the code calls must be in the
   table, and every row must still be used, so the table cannot silently go stale.
4. Loading onto a GPU goes through two reused pinned buffers (`memory.HostToDevice`); the pieces and
   their reassembly are device-independent, checked here on the CPU with ordinary buffers.
"""

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from packaging.requirements import Requirement
from packaging.version import Version

import checkpoint
import gpu_check
from checkpoint import choose_dtype, load_model_args, load_transformer
from memory import N_STAGING_BUFFERS, HostToDevice
from conftest import LLAMA2_TOKENIZER
from tiny import write_tiny_llama2_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SMOKE_TOKENS = 4
SMOKE_CONFIGS = ["fp32", "bf16", "int4", "w8a8"]  # no compile: it alone takes a minute on 2 cores
CPU = torch.device("cpu")
KNOWN_BACKENDS = {backend for _, backend in gpu_check.SDPA_BACKEND_OPS}


# --------------------------------------------------------------------------------------------
# 1. gpu_check.py on the CPU
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return write_tiny_llama2_checkpoint(tmp_path_factory.mktemp("gpu-check"), LLAMA2_TOKENIZER)


def run_gpu_check(*args: str, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "gpu_check.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.fixture(scope="module")
def smoke_report(tiny_ckpt, tmp_path_factory):
    """The JSON of one CPU run: the smoke configurations, a few tokens, one thread."""
    out = tmp_path_factory.mktemp("gpu-check-out") / "report.json"
    result = run_gpu_check("--device", "cpu", "--tokens", str(SMOKE_TOKENS), "--threads", "1", "--ckpt-dir",
                           str(tiny_ckpt), "--configs", ",".join(SMOKE_CONFIGS), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| config" in result.stdout and "fp32" in result.stdout  # the table
    return json.loads(out.read_text())


def ran(report: dict) -> list[dict]:
    """The report's rows that ran; every other one must have been skipped for a reason this CPU gives
    (w8a8 where it has no int8 dot products)."""
    configs = {c.name: c for c in gpu_check.CONFIGURATIONS}
    rows = []
    for row in report["configurations"]:
        reason = gpu_check.skip_reason(configs[row["name"]], CPU)
        assert (row["status"], row.get("note")) == (("skipped", reason) if reason else ("ok", None)), row
        if reason is None:
            rows.append(row)
    return rows


def test_the_smoke_run_writes_one_finished_report_with_every_field(smoke_report):
    assert smoke_report["finished"] is True
    assert smoke_report["machine"]["device"] == "cpu" and smoke_report["machine"]["torch"] == torch.__version__
    settings = smoke_report["settings"]
    assert settings["tokens"] == SMOKE_TOKENS and settings["prefill_tokens"] == gpu_check.PREFILL_TOKENS
    reference = smoke_report["reference"]["tokens"]
    assert [len(row) for row in reference] == [SMOKE_TOKENS] * len(settings["prompts"])
    assert len({tuple(row) for row in reference}) == len(reference)  # each prompt made its own completion
    assert [row["name"] for row in smoke_report["configurations"]] == SMOKE_CONFIGS
    for row in ran(smoke_report):
        assert row["load_s"] > 0 and row["first_call_s"] > 0 and row["decode_tok_s"] > 0
        greedy_rows = row["greedy"]["rows"]
        assert len(greedy_rows) == len(reference) and all(len(r["tokens"]) == SMOKE_TOKENS for r in greedy_rows)
        assert row["greedy"]["identical_rows"] == sum(r["first_divergence"] is None for r in greedy_rows)
        prefill = row["prefill"]
        assert prefill["tokens"] == gpu_check.PREFILL_TOKENS and prefill["tok_s"] > 0
        for key in gpu_check.BACKEND_COLUMNS:
            assert prefill[key] and set(prefill[key]) <= KNOWN_BACKENDS, prefill
        assert "memory" not in row  # CUDA only


def test_the_cpu_fp32_row_has_exactly_the_reference_tokens(smoke_report):
    """Same device, same dtype as the reference: any difference is a fault of the check itself."""
    [fp32] = [row for row in smoke_report["configurations"] if row["name"] == "fp32"]
    reference = smoke_report["reference"]["tokens"]
    assert fp32["dtype"] == "float32" and fp32["build"] == {}
    assert [r["tokens"] for r in fp32["greedy"]["rows"]] == reference
    assert fp32["greedy"]["identical_rows"] == len(reference)
    assert all(r["first_divergence"] is None and r["verdict"] == "identical" for r in fp32["greedy"]["rows"])


def test_a_row_in_another_dtype_is_compared_with_its_own_logits(smoke_report):
    """bf16 rounds every weight: its logits cannot all equal the fp32 reference's. (Were the check to
    compare the reference with itself, every difference would be 0.)"""
    [bf16] = [row for row in smoke_report["configurations"] if row["name"] == "bf16"]
    assert all(r["max_abs_logit_diff"] > 0 for r in bf16["greedy"]["rows"])


def test_a_row_left_to_the_default_dtype_records_the_dtype_the_engine_chose(smoke_report):
    [int4] = [row for row in smoke_report["configurations"] if row["name"] == "int4"]
    assert int4["dtype"] == gpu_check.dtype_name(choose_dtype(None, CPU, "int4"))
    assert int4["linear_storage"] == "int4"


def test_configurations_not_started_within_the_time_budget_are_skipped_with_a_note(tiny_ckpt, tmp_path):
    out = tmp_path / "report.json"
    code = gpu_check.main(["--device", "cpu", "--tokens", "2", "--threads", "1", "--ckpt-dir", str(tiny_ckpt),
                           "--configs", "fp32,bf16", "--time-budget", "0", "--out", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["configurations"]
    assert [(r["name"], r["status"]) for r in rows] == [("fp32", "skipped"), ("bf16", "skipped")]
    assert all("time budget" in r["note"] for r in rows)


def logits_with_top(values: list[float], vocab_size: int = 5) -> torch.Tensor:
    """(V,) logits: `values` for ids 0, 1, ..., and well below them for the rest."""
    row = torch.full((vocab_size,), -10.0)
    row[: len(values)] = torch.tensor(values)
    return row


def reference_logits() -> torch.Tensor:
    """(N=4, V=5): id 0 wins every step by 2.0, except step 2, where it leads id 1 by only 0.01."""
    return torch.stack([logits_with_top([2.0, 0.0])] * 2 + [logits_with_top([1.0, 0.99])]
                       + [logits_with_top([2.0, 0.0])])


def test_a_flip_of_a_near_tie_within_the_noise_already_seen_is_a_near_tie():
    reference = reference_logits()
    logits = reference + torch.tensor([0.0, 0.05, 0.0, 0.0, 0.0])  # id 1 up by 0.05 at every step
    row = gpu_check.compare_row(reference.argmax(-1), reference, logits.argmax(-1), logits)
    assert row["first_divergence"] == 2 and (row["reference_token"], row["token"]) == (0, 1)
    assert row["reference_top2_margin"] == pytest.approx(0.01, abs=1e-6)
    assert row["max_abs_logit_diff"] == pytest.approx(0.05) and row["max_abs_logit_diff_before"] == pytest.approx(0.05)
    assert row["verdict"] == "near tie"


def test_a_flip_of_a_clear_choice_or_of_the_first_token_is_for_a_closer_look():
    reference = reference_logits()
    logits = reference.clone()
    logits[3] = logits_with_top([0.0, 2.0])  # step 3 flips a choice that led by 2.0; no noise before
    row = gpu_check.compare_row(reference.argmax(-1), reference, logits.argmax(-1), logits)
    assert row["first_divergence"] == 3 and row["reference_top2_margin"] == pytest.approx(2.0)
    assert row["max_abs_logit_diff"] == pytest.approx(2.0) and row["max_abs_logit_diff_before"] == 0.0
    assert row["verdict"] == "look closer"
    first = gpu_check.compare_row(reference.argmax(-1), reference, torch.tensor([1, 0, 0, 0]), reference)
    assert first["first_divergence"] == 0 and first["verdict"] == "look closer"


def test_the_same_tokens_are_identical_whatever_the_logits_and_their_difference_is_kept():
    reference = reference_logits()
    row = gpu_check.compare_row(reference.argmax(-1), reference, reference.argmax(-1), reference + 0.001)
    assert row["first_divergence"] is None and row["verdict"] == "identical"
    assert row["max_abs_logit_diff"] == pytest.approx(0.001, abs=1e-6)


@pytest.mark.parametrize("op, backend", [
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "flash (cpu)"),
    ("aten::_scaled_dot_product_flash_attention", "flash"),
    ("aten::_scaled_dot_product_efficient_attention", "efficient"),
    ("aten::_scaled_dot_product_cudnn_attention", "cudnn"),
    ("aten::_scaled_dot_product_attention_math", "math"),
    ("aten::_scaled_dot_product_attention_math_for_mps", "math"),
    ("aten::scaled_dot_product_attention", None),  # the front door every backend goes through
])
def test_each_attention_op_the_profiler_names_maps_to_its_backend(op, backend):
    assert gpu_check.sdpa_backend(op) == backend


def test_w8a8_is_skipped_anywhere_but_on_a_cpu():
    assert gpu_check.needs_cpu_int8_dot(torch.device("cuda")) == "skipped: w8a8 runs on CPUs only"


def test_int4_on_a_gpu_older_than_sm80_is_recorded_as_skipped_not_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    [int4] = [c for c in gpu_check.CONFIGURATIONS if c.name == "int4"]
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    row = gpu_check.run_configuration(int4, gpu_check.Workload(Path("unused"), cuda, [], [], 2, 8, 1))
    assert row["status"] == "skipped" and row["note"].startswith("skipped: sm<80")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert gpu_check.skip_reason(int4, cuda) is None


# --------------------------------------------------------------------------------------------
# 2. No GPU visible
# --------------------------------------------------------------------------------------------


def test_without_a_visible_gpu_the_default_run_is_one_line_saying_how_to_smoke_test(tmp_path):
    out = tmp_path / "report.json"
    result = run_gpu_check("--out", str(out), env={"CUDA_VISIBLE_DEVICES": ""})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: no CUDA GPU is visible") and "--device cpu" in lines[0]
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# 3. The torch floor
# --------------------------------------------------------------------------------------------

# Every wheel ships the table of its ops and their kernels per device (CPU-only builds too).
NATIVE_FUNCTIONS = Path(torch.__file__).parent.parent / "torchgen/packaged/ATen/native/native_functions.yaml"


def declared_kernels(op: str) -> set[str]:
    """The dispatch keys (CPU, CUDA, ...) the installed release declares a kernel for `op` under,
    read from its own native_functions.yaml."""
    if not NATIVE_FUNCTIONS.is_file():
        pytest.skip(f"{NATIVE_FUNCTIONS} is not installed: cannot read which kernels this torch declares")
    block = NATIVE_FUNCTIONS.read_text().split(f"- func: {op}(", 1)[1].split("\n- func:", 1)[0]
    return set(re.findall(r"^\s+([A-Za-z]+): ", block, flags=re.MULTILINE)) - {"dispatch"}


def runs_sdpa_with_enable_gqa() -> bool:
    query, key = torch.zeros(1, 4, 2, 8), torch.zeros(1, 2, 2, 8)  # 4 query heads share 2 K/V heads
    return F.scaled_dot_product_attention(query, key, key, enable_gqa=True).shape == query.shape


def runs_int_mm_on_uint8() -> bool:
    codes, weight = torch.zeros(2, 32, dtype=torch.uint8), torch.zeros(32, 16, dtype=torch.int8)
    return torch._int_mm(codes, weight).shape == (2, 16)


CPU_PROBES = ("_is_vnni_supported", "_is_amx_tile_supported", "_is_avx512_bf16_supported")


def has_mkldnn_op(name: str) -> bool:
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN (mkldnn): bf16_layers.PackedLinear is not used with it")
    return hasattr(torch.ops.mkldnn, name)


@dataclass(frozen=True)
class TorchApi:
    """A torch API the code calls, and the oldest release known to have it."""

    what: str  # the API, as a reader would name it
    used: str  # a regular expression that finds its use in our *.py files
    needs: str  # the oldest release known to have it
    source: str  # how that is known
    present: Callable[[], bool]  # whether the installed torch has it
    symbols: tuple[str, ...] = ()  # its private or torch.compiler/torch.ops names, as the code spells them
    gated: bool = False  # only one feature needs it, and refuses to run on an older torch (not the floor)


WHEELS = "the files of PyTorch's release wheels"
OLDEST_CHECKED = "2.4.1's wheel has it (the oldest release checked)"
TORCH_APIS = [
    TorchApi("F.scaled_dot_product_attention(enable_gqa=True)", r"enable_gqa=", "2.5",
             f"{WHEELS}: in 2.5.1's native_functions.yaml signature, not in 2.4.1's", runs_sdpa_with_enable_gqa),
    TorchApi("nn.Module.set_submodule", r"\.set_submodule\(", "2.5",
             f"{WHEELS}: torch/nn/modules/module.py defines it in 2.5.1, not in 2.4.1",
             lambda: hasattr(torch.nn.Module, "set_submodule")),
    TorchApi("torch._convert_weight_to_int4pack with uint8 [N, K/2] input (CUDA)",
             r"torch\._convert_weight_to_int4pack\(",
             "2.5", "pytorch/pytorch#129940 (in 2.5) changed its input from int32 [N, K] to uint8 [N, K/2]",
             lambda: "CUDA" in declared_kernels("_convert_weight_to_int4pack"),
             symbols=("torch._convert_weight_to_int4pack",)),
    TorchApi("torch._weight_int4pack_mm (CUDA)", r"torch\._weight_int4pack_mm\(", "2.4",
             f"{OLDEST_CHECKED}, with a CUDA kernel", lambda: "CUDA" in declared_kernels("_weight_int4pack_mm"),
             symbols=("torch._weight_int4pack_mm",)),
    TorchApi("torch._convert_weight_to_int4pack_for_cpu", r"torch\._convert_weight_to_int4pack_for_cpu\(", "2.6",
             f"{WHEELS}: in 2.6.0's native_functions.yaml, not in 2.5.1's",
             lambda: "CPU" in declared_kernels("_convert_weight_to_int4pack_for_cpu"),
             symbols=("torch._convert_weight_to_int4pack_for_cpu",)),
    TorchApi("torch._weight_int4pack_mm_for_cpu", r"torch\._weight_int4pack_mm_for_cpu\(", "2.6",
             f"{WHEELS}: in 2.6.0's native_functions.yaml, not in 2.5.1's",
             lambda: "CPU" in declared_kernels("_weight_int4pack_mm_for_cpu"),
             symbols=("torch._weight_int4pack_mm_for_cpu",)),
    TorchApi("torch._weight_int8pack_mm (CPU)", r"torch\._weight_int8pack_mm\(", "2.4",
             f"{OLDEST_CHECKED}, with a CPU kernel", lambda: "CPU" in declared_kernels("_weight_int8pack_mm"),
             symbols=("torch._weight_int8pack_mm",)),
    TorchApi("torch._weight_int8pack_mm on CUDA (--quantize int8 on a GPU)", r"torch\._weight_int8pack_mm\(", "2.9",
             f"{WHEELS}: 2.9.0's native_functions.yaml declares a CUDA kernel for it, 2.8.0's does not",
             lambda: "CUDA" in declared_kernels("_weight_int8pack_mm")),
    TorchApi("torch.compiler.skip_guard_on_all_nn_modules_unsafe", r"skip_guard_on_all_nn_modules_unsafe", "2.8",
             f"{WHEELS}: torch/compiler/__init__.py defines it in 2.8.0, not in 2.7.1",
             lambda: hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe"),
             symbols=("torch.compiler.skip_guard_on_all_nn_modules_unsafe",)),
    TorchApi('torch.compile(options={"guard_filter_fn": ...})', r'"guard_filter_fn"', "2.8",
             f"{WHEELS}: torch.compile (torch/__init__.py) takes it from options in 2.8.0, not in 2.7.1",
             lambda: "guard_filter_fn" in (torch.compile.__doc__ or "")),
    TorchApi("torch.compiler.reset (gpu_check.py)", r"torch\.compiler\.reset\(", "2.4", OLDEST_CHECKED,
             lambda: hasattr(torch.compiler, "reset"), symbols=("torch.compiler.reset",)),
    TorchApi("torch.compiler.is_compiling (model.apply_rotary_emb)", r"torch\.compiler\.is_compiling\(", "2.4",
             OLDEST_CHECKED, lambda: hasattr(torch.compiler, "is_compiling"), symbols=("torch.compiler.is_compiling",)),
    TorchApi("torch.ops.mkldnn._reorder_linear_weight", r"_reorder_linear_weight", "2.4",
             f"{OLDEST_CHECKED} (its inductor calls it)", lambda: has_mkldnn_op("_reorder_linear_weight"),
             symbols=("torch.ops.mkldnn._reorder_linear_weight",)),
    TorchApi("torch.ops.mkldnn._is_mkldnn_bf16_supported", r"_is_mkldnn_bf16_supported", "2.4",
             "Inductor's freezing pass (torch/_inductor/fx_passes/mkldnn_fusion.py, `_is_packable_linear`) calls "
             "it in its 2.1-era form already, so every release from the oldest checked (2.4.1) on has it",
             lambda: has_mkldnn_op("_is_mkldnn_bf16_supported"),
             symbols=("torch.ops.mkldnn._is_mkldnn_bf16_supported",)),
    TorchApi("torch.ops.mkldnn._linear_pointwise", r"_linear_pointwise", "2.4",
             f"{OLDEST_CHECKED} (its inductor calls it)", lambda: has_mkldnn_op("_linear_pointwise"),
             symbols=("torch.ops.mkldnn._linear_pointwise",)),
    TorchApi("torch.ops.quantized.linear_prepack_fp16, linear_dynamic_fp16 (bf16_layers.HalfLinear)",
             r"linear_(?:prepack|dynamic)_fp16", "2.4",
             "PyTorch's float16 dynamic quantization of nn.Linear (torch.ao.nn.quantized.dynamic.Linear, "
             "dtype=torch.float16) calls both, and has since the 1.x releases",
             lambda: all(hasattr(torch.ops.quantized, name) for name in ("linear_prepack_fp16", "linear_dynamic_fp16")),
             symbols=("torch.ops.quantized.linear_prepack_fp16", "torch.ops.quantized.linear_dynamic_fp16")),
    TorchApi("torch._int_mm with uint8 activations on a CPU (--quantize w8a8)", r"torch\._int_mm\(", "2.12",
             f"{WHEELS}: 2.12.0's libtorch_cpu takes 'int8 or uint8' for _int_mm's first argument, 2.11.0's "
             f"only 'type int8'", runs_int_mm_on_uint8, symbols=("torch._int_mm",), gated=True),
    TorchApi("torch.cpu._is_vnni_supported, _is_amx_tile_supported, _is_avx512_bf16_supported",
             r"torch\.cpu\._is_", "2.5", f"{WHEELS}: torch/cpu/__init__.py defines them in 2.5.1, not in 2.4.1",
             lambda: all(hasattr(torch.cpu, name) for name in CPU_PROBES),
             symbols=tuple(f"torch.cpu.{name}" for name in CPU_PROBES)),
    TorchApi("torch.load(mmap=True)", r"mmap=True", "2.4", OLDEST_CHECKED,
             lambda: "mmap" in torch.load.__doc__),
    TorchApi("Module.load_state_dict(assign=True)", r"assign=True", "2.4", OLDEST_CHECKED,
             lambda: "assign" in torch.nn.Module.load_state_dict.__doc__),
]
# A private torch symbol anywhere in torch's namespace (torch._int_mm, torch.cpu._is_vnni_supported; not
# a dunder like torch.__version__), or one of torch.compiler / torch.ops, as the code spells it.
TORCH_SYMBOL = re.compile(r"torch(?:\.[a-z][A-Za-z0-9]*)*\._(?!_)[A-Za-z0-9_]+|torch\.compiler\.[A-Za-z_]+"
                          r"|torch\.ops\.[A-Za-z_]+\.[A-Za-z0-9_]+")


def our_code() -> str:
    return "\n".join(path.read_text() for path in sorted(ROOT.glob("*.py")))


def torch_floor() -> Version:
    """The version after `torch>=` in requirements.txt."""
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and Requirement(line).name == "torch":
            floors = [Version(s.version) for s in Requirement(line).specifier if s.operator == ">="]
            assert len(floors) == 1, f"requirements.txt: {line!r} should have one >= floor"
            return floors[0]
    raise AssertionError("requirements.txt has no torch requirement")


FLOOR_APIS = [api for api in TORCH_APIS if not api.gated]


@pytest.mark.parametrize("api", FLOOR_APIS, ids=lambda api: api.what)
def test_the_torch_floor_is_at_least_the_release_each_api_needs(api):
    assert torch_floor() >= Version(api.needs), f"{api.what} needs torch {api.needs} ({api.source})"


def test_the_torch_floor_is_what_the_newest_api_needs():
    """Raising the floor for another reason is one more row in TORCH_APIS, saying why."""
    assert torch_floor() == max(Version(api.needs) for api in FLOOR_APIS)


def test_w8a8_asks_for_the_release_its_int_mm_needs_and_refuses_an_older_torch(monkeypatch):
    """The one API above the floor is gated: w8a8 checks the running torch and says what to do."""
    import cpu
    import quantize

    (gated,) = [api for api in TORCH_APIS if api.gated]
    assert Version(".".join(map(str, quantize.W8A8_MIN_TORCH))) == Version(gated.needs) > torch_floor()
    assert quantize.torch_release("2.11.0+cu126") == (2, 11)
    monkeypatch.setattr(quantize, "torch_release", lambda: (2, 11))
    with pytest.raises(quantize.QuantizationError, match=r"w8a8 needs PyTorch 2.12 or newer .* use --quantize int8"):
        quantize.linear_storage("cpu", torch.bfloat16, "w8a8", features=cpu.CpuFeatures("x", True, True))


@pytest.mark.parametrize("api", TORCH_APIS, ids=lambda api: api.what)
def test_each_api_exists_in_the_installed_torch(api):
    assert api.present(), f"torch {torch.__version__} lacks {api.what}"


@pytest.mark.parametrize("api", TORCH_APIS, ids=lambda api: api.what)
def test_each_api_in_the_table_is_still_used(api):
    assert re.search(api.used, our_code()), f"{api.what} is no longer used: remove its row"


def test_every_private_torch_symbol_the_code_calls_is_in_the_table():
    listed = {symbol for api in TORCH_APIS for symbol in api.symbols}
    unlisted = sorted(set(TORCH_SYMBOL.findall(our_code())) - listed)
    assert unlisted == [], f"add a row to TORCH_APIS (with the release that introduced it) for {unlisted}"


# --------------------------------------------------------------------------------------------
# 4. Copies to a GPU through pinned buffers, their pieces checked on the CPU
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.bool])
def test_a_tensor_copied_in_pieces_through_the_staging_buffers_arrives_whole(dtype):
    staging = HostToDevice(CPU, staged=True, staging_bytes=1000)  # 1000 bytes: pieces cut through elements
    tensors = [(torch.randn(37, 53) * 100).to(dtype), (torch.randn(3, 1) * 100).to(dtype),
               (torch.randn(64, 48) * 100).to(dtype).t()]  # the last one not contiguous
    for source in tensors:
        copied = staging.to(source)
        assert copied.dtype == source.dtype and copied.shape == source.shape
        assert torch.equal(copied, source) and copied.data_ptr() != source.data_ptr()
    assert len(staging.buffers) == N_STAGING_BUFFERS  # reused, not one per tensor or piece
    staging.close()
    assert staging.buffers == []


def test_off_a_gpu_the_loader_keeps_each_tensor_as_read_and_staged_loading_gives_the_same_model(tiny_ckpt,
                                                                                                 monkeypatch):
    assert HostToDevice(CPU).to(tensor := torch.randn(4)) is tensor  # no copy: the memory-mapped tensor stays
    args = load_model_args(tiny_ckpt, max_seq_len=16, max_batch_size=1)
    plain = load_transformer(tiny_ckpt, args, CPU, torch.float32, progress=False)
    monkeypatch.setattr(checkpoint, "HostToDevice", lambda device: HostToDevice(device, staged=True, staging_bytes=4096))
    staged = load_transformer(tiny_ckpt, args, CPU, torch.float32, progress=False)
    expected = plain.state_dict()
    assert staged.state_dict().keys() == expected.keys()
    for name, value in staged.state_dict().items():
        assert torch.equal(value, expected[name]), name
