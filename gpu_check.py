"""One prepared device check: every way the engine can run on a GPU, against a CPU fp32 reference.

    python gpu_check.py                              # one CUDA GPU, the demo model: 3-4 minutes
    python gpu_check.py --device cpu --tokens 8 --configs fp32,bf16,int8-bf16,int4   # on the CPU
    python gpu_check.py --out run.json --time-budget 120 --configs fp16,int4

The tests run on CPUs only. This script is what to run the first time a GPU is at hand: one command,
one JSON file (`--out`, written atomically after every configuration, so a run cut short still leaves
what it measured), one table on the terminal. It answers four questions per configuration (a row of
`CONFIGURATIONS`: a dtype and `LLaMa.build`'s quantize / compile / static_cache keywords):

1. **Same tokens?** The demo model completes a few fixed prompts greedily (64 new tokens each),
   once on the CPU in float32 (the reference, computed in this same run, on the path the test suite
   checks against Hugging Face), then in the configuration. Where a row's tokens first differ we
   record the step, the largest logit difference there, and the reference's top-2 margin there.
   Float noise flips a near tie: two candidates whose logits were closer than the noise this
   configuration already showed on the steps before, while its tokens still agreed (verdict "near
   tie"). A bug flips choices that were not close, or shows as a large difference from the first
   token on (verdict "look closer"; the numbers are in the JSON to judge by).
2. **How fast?** Decode tokens per second at batch 1 after a warm-up (the device synchronized
   before each clock reading), and the speed of a 1,024-token prefill.
3. **Which attention kernel?** `F.scaled_dot_product_attention` picks a backend (flash, memory
   efficient, cuDNN, math) from the inputs' dtype, shapes and mask. The profiler names the aten op it
   ran, so three calls are profiled (the prefill, a ragged batch's prefill, where padding needs a
   mask, and one decode step) and each op name is mapped to its backend (none, when no op was
   dispatched: a replayed CUDA graph launches its kernels directly).
4. **Memory as planned?** `torch.cuda.max_memory_allocated()` over the whole configuration against
   `memory.plan_memory` (weights + KV cache + activations), and the bytes allocated by loading
   against the plan's weights + KV cache. (CUDA only: the CPU has no such counter.)

Each configuration runs inside try/except: a failure is recorded as its error line and the next one
runs. A requirement it cannot meet (int4 on a GPU older than sm80, bf16 where the GPU has none) is
recorded as "skipped: ..." instead (so is w8a8 anywhere but on a CPU with int8 dot products). When
`--time-budget` seconds have passed, the configurations not yet started are skipped with a note. A
new way to build the model is one more row in `CONFIGURATIONS`.
"""

import argparse
import gc
import json
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.profiler import ProfilerActivity, profile

from atomic import write_text_atomically
from checkpoint import CheckpointError, choose_device
from cli import DEMO_PROMPTS, WARM_UP_TOKENS
from cpu import cpu_features
from inference import LLaMa
from memory import plan_memory
from sampling import SamplingParams
from tokenizer import TokenizerFileError

DEFAULT_TOKENS = 64  # new tokens per prompt, greedy
PREFILL_TOKENS = 1024  # the prompt whose prefill is timed and profiled
DEFAULT_OUT = "gpu_check.json"
# On a CPU, PyTorch's int8/int4 kernels are fast with bf16 activations only (over 10x slower per
# matmul in fp16 or fp32 on a Sapphire Rapids Xeon), so the CPU smoke test runs the rows that finish
# in a minute or two.
CPU_SMOKE_TEST = "python gpu_check.py --device cpu --tokens 8 --configs fp32,bf16,int8-bf16,int4"
# The whole run should end within 5 minutes on one GPU. The budget is checked before each row, and a
# compiled row started just before it runs out may take ~90 s more (compiling), so it leaves that.
DEFAULT_TIME_BUDGET_S = 200.0
GREEDY = SamplingParams(temperature=0)
MIB = 1024**2
# PyTorch's CUDA int4 kernel (tinygemm) is compiled only for sm80 and newer
# (aten/src/ATen/native/cuda/int4mm.cu: `__CUDA_ARCH__ >= 800`); older GPUs fail when it is called.
INT4_MIN_CAPABILITY = (8, 0)
# The aten op each attention backend runs, as the profiler names it (native_functions.yaml), in the
# order they are matched: "flash" is also part of the CPU kernel's name.
SDPA_BACKEND_OPS = (
    ("_scaled_dot_product_flash_attention_for_cpu", "flash (cpu)"),
    ("_scaled_dot_product_flash_attention", "flash"),
    ("_scaled_dot_product_efficient_attention", "efficient"),
    ("_scaled_dot_product_cudnn_attention", "cudnn"),
    ("_scaled_dot_product_fused_attention_overrideable", "overrideable"),
    ("_scaled_dot_product_attention_math", "math"),
)
SDPA_OP_FAMILY = "scaled_dot_product"  # every profiler key of an attention op contains this
ERROR_LINE_CHARS = 300  # an error's first line, cut to this (CUDA errors can run long)
REPOSITORY = Path(__file__).resolve().parent

# --------------------------------------------------------------------------------------------
# What to run: one row per configuration
# --------------------------------------------------------------------------------------------


def needs_bf16(device: torch.device) -> Optional[str]:
    """Why bf16 cannot run on `device` (None: it can)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"skipped: {torch.cuda.get_device_name(device)} has no bf16"
    return None


def needs_int4_kernel(device: torch.device) -> Optional[str]:
    """Why PyTorch's int4 kernel cannot run on `device` (None: it can)."""
    if device.type != "cuda":
        return None
    capability = torch.cuda.get_device_capability(device)
    if capability < INT4_MIN_CAPABILITY:
        return f"skipped: sm<80 (this GPU is sm{capability[0]}{capability[1]}; the CUDA int4 kernel needs sm80+)"
    return None


def needs_cpu_int8_dot(device: torch.device) -> Optional[str]:
    """Why w8a8 (integer matmuls with oneDNN) cannot run on `device` (None: it can)."""
    if device.type != "cpu":
        return "skipped: w8a8 runs on CPUs only"
    if not cpu_features().int8_dot:
        return "skipped: this CPU has no int8 dot-product instructions (VNNI, AMX)"
    return None


@dataclass(frozen=True)
class Configuration:
    """One row of the check: the dtype, the other keywords of `LLaMa.build`, and what it needs."""

    name: str  # as typed after --configs
    dtype: Optional[torch.dtype]  # None: the engine's default for the device and the quantization
    build: dict = field(default_factory=dict)  # e.g. {"quantize": "int4"}, {"compile": True}
    needs: tuple[Callable[[torch.device], Optional[str]], ...] = ()  # each returns why not, or None


CONFIGURATIONS = [
    Configuration("fp16", torch.float16),  # the default on a GPU
    Configuration("bf16", torch.bfloat16, needs=(needs_bf16,)),
    Configuration("fp32", torch.float32),
    Configuration("int8-fp16", torch.float16, {"quantize": "int8"}),
    Configuration("int8-bf16", torch.bfloat16, {"quantize": "int8"}, needs=(needs_bf16,)),  # the CPU's default
    # `--quantize int4` with the default dtype: bf16 on CUDA, whose int4 kernel takes nothing else.
    Configuration("int4", None, {"quantize": "int4"}, needs=(needs_bf16, needs_int4_kernel)),
    Configuration("w8a8", None, {"quantize": "w8a8"}, needs=(needs_cpu_int8_dot,)),  # CPUs only
    # The static KV cache uncompiled: what the CUDA graph below runs (its decode attends the whole cache).
    Configuration("fp16-static", torch.float16, {"static_cache": True}),
    # On CUDA, compile=True decodes with the static KV cache as one CUDA graph (mode "reduce-overhead");
    # static_cache=False keeps today's cache and a dynamic-shape graph. Each compiles for ~1 minute.
    Configuration("fp16-compile", torch.float16, {"compile": True}),
    Configuration("fp16-compile-dynamic", torch.float16, {"compile": True, "static_cache": False}),
]


def skip_reason(config: Configuration, device: torch.device) -> Optional[str]:
    for need in config.needs:
        reason = need(device)
        if reason is not None:
            return reason
    return None


# --------------------------------------------------------------------------------------------
# Greedy runs, and comparing one with the reference
# --------------------------------------------------------------------------------------------


@dataclass
class GreedyRun:
    """The decode loop's output for a batch: B prompts, N new tokens each."""

    tokens: torch.Tensor  # (B, N) the sampled ids
    logits: torch.Tensor  # (B, N, V) float32 on the CPU: the logits each id was chosen from
    seconds: float


def greedy(llama: LLaMa, prompt_tokens: list[list[int]], new_tokens: int) -> GreedyRun:
    """Exactly `new_tokens` greedy tokens per prompt (stop tokens do not end the loop)."""
    started = time.perf_counter()
    tokens, logits = [], []
    for step in llama.decode(prompt_tokens, new_tokens, GREEDY):
        # Copied out at once: a step's tensors may be buffers that the next step overwrites.
        tokens.append(step.tokens.to("cpu", copy=True))
        logits.append(step.logits.to("cpu", torch.float32, copy=True))
    return GreedyRun(torch.stack(tokens, dim=1), torch.stack(logits, dim=1), time.perf_counter() - started)


def compare_row(reference_tokens: torch.Tensor, reference_logits: torch.Tensor, tokens: torch.Tensor,
                logits: torch.Tensor) -> dict:
    """One prompt's tokens (N,) and logits (N, V) against the reference's: where they first differ and why.

    Up to the first differing step both runs saw the same ids, so their logits there are comparable.
    """
    step_diffs = (logits - reference_logits).abs().amax(dim=-1)  # (N,) largest logit difference per step
    differing = (tokens != reference_tokens).nonzero()
    result = {"tokens": tokens.tolist(), "first_divergence": None}
    if len(differing) == 0:
        return {**result, "max_abs_logit_diff": float(step_diffs.max()), "verdict": "identical"}
    step = int(differing[0])
    top2 = reference_logits[step].topk(2).values
    margin = float(top2[0] - top2[1])
    noise_before = float(step_diffs[:step].max()) if step > 0 else None
    near_tie = noise_before is not None and margin <= noise_before
    return {
        **result,
        "first_divergence": step,
        "max_abs_logit_diff_before": noise_before,  # the noise while the tokens still agreed
        "max_abs_logit_diff": float(step_diffs[step]),  # at the divergence
        "reference_top2_margin": margin,
        "reference_token": int(reference_tokens[step]),
        "token": int(tokens[step]),
        "verdict": "near tie" if near_tie else "look closer",
    }


def compare(reference: GreedyRun, run: GreedyRun) -> dict:
    rows = [compare_row(reference.tokens[b], reference.logits[b], run.tokens[b], run.logits[b])
            for b in range(reference.tokens.shape[0])]
    return {"identical_rows": sum(r["first_divergence"] is None for r in rows), "rows": rows}


# --------------------------------------------------------------------------------------------
# Speed, attention kernels, memory
# --------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: a clock read before it would time the queueing only."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def decode_rate(llama: LLaMa, prompt: list[int], new_tokens: int) -> float:
    """Batch-1 decode tokens per second, counted after the first new token (the prefill is not decoding)."""
    for _ in llama.decode([prompt], WARM_UP_TOKENS, GREEDY):  # a compiled step compiles this shape now
        pass
    first_token_at, count = None, 0
    for _ in llama.decode([prompt], new_tokens, GREEDY):
        if first_token_at is None:
            synchronize(llama.device)
            first_token_at = time.perf_counter()
        count += 1
    synchronize(llama.device)
    return (count - 1) / (time.perf_counter() - first_token_at)


def sdpa_backend(op_name: str) -> Optional[str]:
    """The attention backend an aten op name belongs to ("aten::_scaled_dot_product_flash_attention" -> "flash")."""
    name = op_name.removeprefix("aten::")
    return next((backend for prefix, backend in SDPA_BACKEND_OPS if name.startswith(prefix)), None)


def attention_ops(run: Callable[[], None], device: torch.device) -> list[str]:
    """The attention ops `run` calls, as the profiler names them (the dispatcher's op names, recorded on
    the CPU side whatever the device)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
        synchronize(device)
    return sorted({event.key for event in prof.key_averages() if SDPA_OP_FAMILY in event.key})


def backends_of(ops: list[str]) -> list[str]:
    return sorted({backend for backend in map(sdpa_backend, ops) if backend is not None})


def prefill_check(llama: LLaMa, prompt: list[int], ragged_batch: list[list[int]]) -> dict:
    """Time a prefill of `prompt` and name the attention backends of it, of one decode step after it,
    and of the prefill of a ragged batch (left-padded: attention gets a padding mask)."""
    device = llama.device

    def prefill(prompts: list[list[int]]) -> None:
        for _ in llama.decode(prompts, 1, GREEDY):  # the prefill, the first token, no decode step
            pass

    prefill([prompt])  # warm-up: kernels loaded, workspaces allocated
    synchronize(device)
    started = time.perf_counter()
    prefill([prompt])
    synchronize(device)
    seconds = time.perf_counter() - started
    prefill_ops = attention_ops(lambda: prefill([prompt]), device)

    def one_decode_step() -> None:  # position len(prompt), right after the prefill in the KV cache
        with torch.inference_mode():
            llama.decode_step(llama.model, torch.tensor([prompt[-1:]], device=device), len(prompt), None)

    decode_ops = attention_ops(one_decode_step, device)
    padded_ops = attention_ops(lambda: prefill(ragged_batch), device)
    return {"tokens": len(prompt), "seconds": seconds, "tok_s": len(prompt) / seconds,
            "sdpa_backends": backends_of(prefill_ops), "sdpa_ops": prefill_ops,
            "decode_sdpa_backends": backends_of(decode_ops), "decode_sdpa_ops": decode_ops,
            "padded_sdpa_backends": backends_of(padded_ops), "padded_sdpa_ops": padded_ops}


def model_dtype(llama: LLaMa) -> torch.dtype:
    """The dtype the model computes in (what `LLaMa.build` chose when the configuration left it open)."""
    return llama.model.norm.weight.dtype


def memory_plan(llama: LLaMa, config: Configuration) -> dict:
    plan = plan_memory(llama.args, model_dtype(llama), config.build.get("quantize"), llama.device)
    return {"weights": plan.weights, "kv_cache": plan.kv_cache, "activations": plan.activations,
            "attention_scores": plan.attention_scores, "total": plan.total}


def release_device_memory(device: torch.device) -> int:
    """Free what earlier configurations left (compiled graphs hold their weights); the bytes still allocated."""
    torch.compiler.reset()
    gc.collect()
    if device.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


# --------------------------------------------------------------------------------------------
# One configuration, start to end
# --------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """What every configuration runs: the same checkpoint, prompts, lengths and reference."""

    ckpt_dir: Path
    device: torch.device
    prompt_tokens: list[list[int]]
    prefill_prompt: list[int]
    new_tokens: int
    max_seq_len: int
    threads: Optional[int]
    reference: Optional[GreedyRun] = None
    reference_texts: list[str] = field(default_factory=list)  # the reference completions, to read

    def build(self, device: torch.device, dtype: torch.dtype, **options) -> LLaMa:
        return LLaMa.build(self.ckpt_dir, max_seq_len=self.max_seq_len, max_batch_size=len(DEMO_PROMPTS),
                           device=device, dtype=dtype, progress=False, threads=self.threads, **options)


def dtype_name(dtype: Optional[torch.dtype]) -> str:
    return "default" if dtype is None else str(dtype).removeprefix("torch.")


def error_line(error: BaseException) -> str:
    """`TypeName: first line of the message`, cut short; where it was raised comes separately."""
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first}"[:ERROR_LINE_CHARS]


def raised_at(error: BaseException) -> str:
    """file:line (function) of the innermost frame of ours in the error's traceback (the innermost of
    all when none is ours): the line of the engine that called the kernel, not torch's dispatcher."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if Path(f.filename).resolve().parent == REPOSITORY]
    frame = (ours or frames)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} ({frame.name})"


def run_configuration(config: Configuration, work: Workload) -> dict:
    """Every measurement of one configuration; an error is recorded with what was measured before it."""
    row = {"name": config.name, "dtype": dtype_name(config.dtype), "build": config.build, "status": "running"}
    reason = skip_reason(config, work.device)
    if reason is not None:
        return {**row, "status": "skipped", "note": reason}
    device = work.device
    llama = None
    try:
        baseline = release_device_memory(device)
        started = time.perf_counter()
        llama = work.build(device, config.dtype, **config.build)
        row["load_s"] = time.perf_counter() - started
        row["dtype"] = dtype_name(model_dtype(llama))
        row["linear_storage"] = llama.linear_storage  # how quantize.py stored the linear layers
        if device.type == "cuda":
            row["memory"] = {"plan": memory_plan(llama, config),
                             "allocated_after_load": torch.cuda.memory_allocated(device) - baseline}
        run = greedy(llama, work.prompt_tokens, work.new_tokens)
        row["first_call_s"] = run.seconds  # with compile=True this includes compiling
        row["greedy"] = compare(work.reference, run)
        row["decode_tok_s"] = decode_rate(llama, work.prompt_tokens[0], work.new_tokens)
        row["prefill"] = prefill_check(llama, work.prefill_prompt, work.prompt_tokens)
        if device.type == "cuda":
            memory = row["memory"]
            memory["peak_allocated"] = torch.cuda.max_memory_allocated(device) - baseline
            memory["peak_within_plan"] = memory["peak_allocated"] <= memory["plan"]["total"]
            planned_at_load = memory["plan"]["weights"] + memory["plan"]["kv_cache"]
            memory["load_vs_plan"] = memory["allocated_after_load"] / planned_at_load
        row["status"] = "ok"
    except Exception as e:  # recorded, and the next configuration runs
        row.update(status="error", error=error_line(e), raised_at=raised_at(e))
    finally:
        del llama
        release_device_memory(device)
    return row


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def machine_description(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    info = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "cpu": cpu, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name, capability=list(torch.cuda.get_device_capability(device)),
            gpu_memory_bytes=props.total_memory, cudnn=torch.backends.cudnn.version(),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            float32_matmul_precision=torch.get_float32_matmul_precision(),
            sdpa_enabled={"flash": torch.backends.cuda.flash_sdp_enabled(),
                          "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                          "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                          "math": torch.backends.cuda.math_sdp_enabled()},
        )
    return info


def tokens_cell(row: dict) -> str:
    greedy_result = row.get("greedy")
    if greedy_result is None:
        return ""
    rows = greedy_result["rows"]
    cell = f"{greedy_result['identical_rows']}/{len(rows)} identical"
    diverged = [(i, r) for i, r in enumerate(rows) if r["first_divergence"] is not None]
    if diverged:
        i, r = diverged[0]
        cell += (f"; prompt {i} @{r['first_divergence']}: {r['verdict']} (Δ {r['max_abs_logit_diff']:.3g}, "
                 f"margin {r['reference_top2_margin']:.3g})")
    return cell


def number_cell(value: Optional[float], digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def memory_cell(row: dict) -> str:
    memory = row.get("memory") or {}
    if "peak_allocated" not in memory:
        return ""
    return f"{memory['peak_allocated'] / MIB:.0f} / {memory['plan']['total'] / MIB:.0f}"


BACKEND_COLUMNS = ("sdpa_backends", "padded_sdpa_backends", "decode_sdpa_backends")


def backends_cell(backends: list[str]) -> str:
    # None at all: no attention op was dispatched, e.g. a replayed CUDA graph launches its kernels directly.
    return ",".join(backends) or "none dispatched"


def format_table(rows: list[dict]) -> str:
    header = ["config", "status", "tokens vs CPU fp32", "decode tok/s", "prefill tok/s",
              "SDPA prefill / padded / decode", "peak / plan MiB", "note"]
    lines = []
    for row in rows:
        prefill = row.get("prefill") or {}
        backends = " / ".join(backends_cell(prefill[key]) for key in BACKEND_COLUMNS) if prefill else ""
        note = row.get("note") or row.get("error") or ""
        lines.append([row["name"], row["status"], tokens_cell(row), number_cell(row.get("decode_tok_s")),
                      number_cell(prefill.get("tok_s"), 0), backends, memory_cell(row), note])
    widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]
    text = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(r, widths)) + " |" for r in [header] + lines]
    text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(text)


def write_report(path: Path, report: dict) -> None:
    write_text_atomically(path, json.dumps(report, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, mps, or cpu (the same checks as a smoke test)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="greedy new tokens per prompt (at least 2)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="the JSON report (written atomically)")
    parser.add_argument("--time-budget", type=float, default=DEFAULT_TIME_BUDGET_S,
                        help="seconds; configurations not started by then are skipped with a note")
    parser.add_argument("--configs", default=",".join(c.name for c in CONFIGURATIONS),
                        help="configurations to run, comma-separated")
    parser.add_argument("--ckpt-dir", help="a Meta checkpoint dir (default: the demo model, fetched and converted "
                        "once)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: as inference.py's --threads)")
    return parser.parse_args(argv)


def chosen_configurations(names: str) -> list[Configuration]:
    by_name = {c.name: c for c in CONFIGURATIONS}
    chosen = [n for n in names.split(",") if n]
    unknown = [n for n in chosen if n not in by_name]
    if unknown or not chosen:
        raise ValueError(f"--configs: unknown or no configuration(s) {unknown}; choose from {', '.join(by_name)}")
    return [by_name[n] for n in chosen]


def check_device_visible(device_name: str) -> None:
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        why = "this PyTorch is a CPU-only build" if torch.version.cuda is None else "torch.cuda.is_available() is False"
        raise ValueError(f"no CUDA GPU is visible ({why}): run this on a machine with one, or smoke-test the same "
                         f"checks on the CPU with `{CPU_SMOKE_TEST}`")


def prefill_prompt(llama: LLaMa, length: int) -> list[int]:
    """`length` ids of ordinary text: the demo prompts, repeated and cut."""
    text, repeats = " ".join(DEMO_PROMPTS) + " ", 1
    while len(ids := llama.encode_prompt(text * repeats, "the prefill prompt")) < length:
        repeats *= 2
    return ids[:length]


def prepare(args: argparse.Namespace) -> Workload:
    """The device, the checkpoint, the prompts and the CPU fp32 reference (bad input: ValueError)."""
    if args.tokens < 2:
        raise ValueError(f"--tokens must be at least 2 (a decode rate needs a token after the first), "
                         f"got {args.tokens}")
    if args.time_budget < 0:
        raise ValueError(f"--time-budget must be >= 0 seconds, got {args.time_budget}")
    out = Path(args.out)
    if not out.resolve().parent.is_dir():
        raise ValueError(f"--out {out}: the directory {out.resolve().parent} does not exist")
    check_device_visible(args.device)
    device = choose_device(args.device)
    if args.ckpt_dir is not None:
        ckpt_dir = Path(args.ckpt_dir)
    else:
        from demo_model import DemoModelError, ensure_demo_model
        try:
            ckpt_dir = ensure_demo_model(progress=False)
        except DemoModelError as e:
            raise ValueError(str(e)) from None
    cpu = torch.device("cpu")
    work = Workload(ckpt_dir, device, [], [], args.tokens, max_seq_len=PREFILL_TOKENS + 1, threads=args.threads)
    reference = work.build(cpu, torch.float32, load_model=False)  # the tokenizer, to size the run
    work.prompt_tokens = reference.encode_prompts(DEMO_PROMPTS)
    work.prefill_prompt = prefill_prompt(reference, PREFILL_TOKENS)
    work.max_seq_len = max(PREFILL_TOKENS + 1, max(map(len, work.prompt_tokens)) + args.tokens)
    print(f"reference: {ckpt_dir.name} on the CPU in float32, {args.tokens} greedy tokens x "
          f"{len(DEMO_PROMPTS)} prompts ...", file=sys.stderr)
    work.reference = greedy(work.build(cpu, torch.float32), work.prompt_tokens, args.tokens)
    work.reference_texts = [reference.tokenizer.decode(row) for row in work.reference.tokens.tolist()]
    release_device_memory(cpu)
    return work


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        configs = chosen_configurations(args.configs)
        work = prepare(args)
    except (CheckpointError, TokenizerFileError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = {
        "tool": "gpu_check.py", "finished": False, "machine": machine_description(work.device),
        "checkpoint": str(work.ckpt_dir),
        "settings": {"tokens": args.tokens, "prompts": DEMO_PROMPTS, "prefill_tokens": PREFILL_TOKENS,
                     "max_seq_len": work.max_seq_len, "time_budget_s": args.time_budget},
        "reference": {"device": "cpu", "dtype": "float32", "seconds": work.reference.seconds,
                      "tokens": work.reference.tokens.tolist(), "texts": work.reference_texts},
        "configurations": [],
    }
    out = Path(args.out)
    for config in configs:
        elapsed = time.perf_counter() - started
        if elapsed > args.time_budget:
            row = {"name": config.name, "dtype": dtype_name(config.dtype), "build": config.build,
                   "status": "skipped",
                   "note": f"skipped: the time budget ({args.time_budget:g} s) was spent ({elapsed:.0f} s) "
                           f"before it started"}
        else:
            print(f"{config.name} ...", file=sys.stderr)
            row = run_configuration(config, work)
        report["configurations"].append(row)
        report["seconds"] = time.perf_counter() - started
        write_report(out, report)  # after every row: a run cut short keeps what it measured
    report["finished"] = True
    write_report(out, report)
    machine = report["machine"].get("gpu") or report["machine"]["cpu"]
    print(f"{machine}, torch {torch.__version__}: {args.tokens} greedy tokens x {len(DEMO_PROMPTS)} prompts against "
          f"CPU float32, {report['seconds']:.0f} s\n\n{format_table(report['configurations'])}\n\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
