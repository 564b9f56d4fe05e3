"""Side-by-side speed: our engine and its peers, in one run, on the same model and the same prompts.

    python bench.py                          # every configuration of ours, HF, llama.cpp (if installed)
    python bench.py --quantize int4 --compile   # one configuration of ours against the peers
    python bench.py --json results.json      # also write every number as JSON ("-": to stdout)
    python bench.py --speculate 0            # without the speculative-decoding section

The model is the demo model, SmolLM2-135M-Instruct (demo_model.py), which exists here in all three
engines' formats: our Meta-format directory (bf16), a Hugging Face safetensors copy made from it once
(`transformers` reads the same GGUF, bf16), and the original Q4_1 GGUF for llama.cpp.

What is measured (every engine generates greedily, exactly N tokens: stop tokens are ignored):

    load s           from the engine's load call to a ready model (imports excluded; warm page cache)
    load RSS MB      peak resident memory of the engine's process once loaded (VmHWM)
    peak RSS MB      peak resident memory after every measurement
    first call s     the very first generation (3 tokens): with --compile, this is when it compiles
    prefill tok/s    512-token prompt, batch 1: 512 / (time to the first new token)
    decode tok/s     batch 1, 128 new tokens after a 16-token prompt
    batch-8 tok/s    8 prompts of 16 tokens, 128 new tokens each: 8 * 128 tokens in total
    decode@2000      batch 1, 32 new tokens after a 2000-token prompt (cost late in a long context)

Speculative decoding (prompt lookup, `--speculate N`, decoding.py) is its own section, never mixed
into the numbers above: a request whose answer copies its input ("Repeat the following passage
exactly: ..." in the model's chat format, ~150 words), greedy, SPECULATIVE_TOKENS new tokens, run
plainly and with up to N drafts per pass, by ours and by Hugging Face (`prompt_lookup_num_tokens`;
llama-cpp-python's generator has no prompt lookup). Drafts make tokens arrive in bursts (HF's
first burst comes with its first verification), so this section counts new tokens over the whole
call, prefill included, plain and speculative alike; ours also reports how many drafts it kept.

Each engine notes when its first new token is ready (ours: the first call of the decode step; HF:
its streamer; llama.cpp: the first token its generator yields). The time before it is the prefill;
a decode rate counts the tokens after it over the time after it. Each number is the median of
--repeats runs after one warm-up run. Every engine runs in its own process (so RSS is its own, and
imports do not mix), and the engines take turns on each repeat, so a slow spell on the machine falls
on all of them alike; each target also shows its ratio in every round. The machine's load average is
printed: on a shared machine, compare only numbers from one run.

Peers: Hugging Face transformers (`LlamaForCausalLM`, SDPA attention, bf16) and llama.cpp through
`llama-cpp-python` on the Q4_1 GGUF. llama-cpp-python is not a requirement (it builds from source in
about 10 minutes: `CMAKE_BUILD_PARALLEL_LEVEL=2 pip install llama-cpp-python==0.3.36`); without it,
that column is skipped with a note. llama-cpp-python's Python API decodes one sequence at a time, so
it has no batch-8 number.
"""

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from atomic import write_text_atomically

# --------------------------------------------------------------------------------------------
# What to run
# --------------------------------------------------------------------------------------------

PREFILL_LEN = 512  # the prefill prompt
SHORT_PROMPT_LEN = 16  # "decode at position ~16"
DECODE_TOKENS = 128
BATCH_SIZE = 8
LONG_PROMPT_LEN = 2000  # "decode at position ~2000"
LATE_DECODE_TOKENS = 32
FIRST_CALL_TOKENS = 3  # the first call decodes at two positions: a compiled step compiles for both
# Room for the longest run, rounded up to a multiple of 64 (our KV cache and llama.cpp's n_ctx).
MAX_SEQ_LEN = 2048 + 64
PROMPT_SEED = 0
# SmolLM2's ids 0-16 are special tokens (<|endoftext|>, <|im_start|>, ...); prompts avoid them.
FIRST_ORDINARY_TOKEN = 17
LLAMA_CPP_BATCH = 512  # llama.cpp's n_batch: prompt tokens per forward pass
MB = 1024 * 1024

# The speculative section: a request grounded in its input, which the answer copies.
DEFAULT_SPECULATE = 10  # drafts per pass: Saxena's `num_pred_tokens=10`, also HF's documented example
SPECULATIVE_TOKENS = 128  # fewer than the passage's ~170 tokens: every new token is still copying
COPY_REQUEST = "Repeat the following passage exactly:\n\n"
PASSAGE = ("The river begins as a thin stream high in the mountains, where snow melts each spring and runs "
           "down over smooth grey stones. By the time it reaches the valley it has gathered the water of a dozen "
           "smaller brooks, and it moves slowly past farms, orchards and the old stone mill that once ground the "
           "grain of the whole district. Children swim in its shallow bends in summer, and in autumn the "
           "fishermen wait on its banks for the salmon that return from the sea. Further on, the river widens "
           "and turns brown with the soil it carries, until at last it passes under the long iron bridge of the "
           "harbour town and disappears into the grey water of the bay, where the tide takes it out to the "
           "open ocean.")


@dataclass(frozen=True)
class EngineSpec:
    """One column of the table: an engine and its settings."""

    name: str  # shown in the table
    kind: str  # "ours", "hf" or "llamacpp"
    quantize: Optional[str] = None  # ours: None or one of quantize.SCHEMES
    compile: bool = False  # ours: torch.compile the decode step
    dtype: Optional[str] = None  # the dtype asked for; None: ours chooses for this CPU (HF needs one)


OUR_CONFIGS = {
    "default": EngineSpec("ours default", "ours"),
    "default+compile": EngineSpec("ours default compile", "ours", compile=True),
    "int8": EngineSpec("ours int8", "ours", quantize="int8"),
    "int8+compile": EngineSpec("ours int8 compile", "ours", quantize="int8", compile=True),
    "int4": EngineSpec("ours int4", "ours", quantize="int4"),
    "int4+compile": EngineSpec("ours int4 compile", "ours", quantize="int4", compile=True),
    "w8a8": EngineSpec("ours w8a8", "ours", quantize="w8a8"),
    "w8a8+compile": EngineSpec("ours w8a8 compile", "ours", quantize="w8a8", compile=True),
    "fp32": EngineSpec("ours fp32", "ours", dtype="float32"),
}
HF = EngineSpec("HF bf16", "hf", dtype="bfloat16")
HF_FP32 = EngineSpec("HF fp32", "hf", dtype="float32")
LLAMA_CPP = EngineSpec("llama.cpp Q4_1", "llamacpp")


@dataclass(frozen=True)
class Timing:
    """One generation to time: `batch` prompts of `prompt_len` tokens, `new_tokens` new tokens each."""

    batch: int
    prompt_len: int
    new_tokens: int


@dataclass(frozen=True)
class SpeculativeRun:
    """The speculative section's generation: `prompt` (ids), `new_tokens`, up to `speculate` drafts per pass."""

    prompt: list[int]
    speculate: int
    new_tokens: int = SPECULATIVE_TOKENS


def copy_request_prompt(ckpt_dir: Path) -> list[int]:
    """The ids of "Repeat the following passage exactly: PASSAGE", a user turn in the model's chat format."""
    from chat_format import chat_format_for
    from tokenizer import Tokenizer

    chat_format = chat_format_for(Tokenizer(Path(ckpt_dir) / "tokenizer.model"), required=True)
    return chat_format.encode_dialog_prompt([{"role": "user", "content": COPY_REQUEST + PASSAGE}])


@dataclass(frozen=True)
class Metric:
    """A rate from one kind of timed run: prompt tokens per second of prefill, or new tokens per second
    of decoding (after the first new token)."""

    key: str
    label: str
    run: Timing
    phase: str  # "prefill" or "decode"

    def rate(self, first_token_s: float, total_s: float) -> float:
        if self.phase == "prefill":
            return self.run.batch * self.run.prompt_len / first_token_s
        return self.run.batch * (self.run.new_tokens - 1) / (total_s - first_token_s)


METRICS = [
    Metric("prefill_tok_s", "prefill tok/s", Timing(1, PREFILL_LEN, 1), "prefill"),
    Metric("decode_tok_s", "decode tok/s", Timing(1, SHORT_PROMPT_LEN, 1 + DECODE_TOKENS), "decode"),
    Metric("batch8_tok_s", "batch-8 tok/s", Timing(BATCH_SIZE, SHORT_PROMPT_LEN, 1 + DECODE_TOKENS), "decode"),
    Metric("late_decode_tok_s", "decode@2000 tok/s", Timing(1, LONG_PROMPT_LEN, 1 + LATE_DECODE_TOKENS), "decode"),
]


def prompts_for(timing: Timing, vocab_size: int) -> list[list[int]]:
    """The same pseudo-random prompts for every engine (ids only: no tokenizer is involved)."""
    rng = random.Random(f"{PROMPT_SEED}-{timing.batch}-{timing.prompt_len}")
    return [[rng.randrange(FIRST_ORDINARY_TOKEN, vocab_size) for _ in range(timing.prompt_len)]
            for _ in range(timing.batch)]


# --------------------------------------------------------------------------------------------
# Workers: one process per engine, answering "generate" requests on stdin
# --------------------------------------------------------------------------------------------


def memory_status_mb(field_name: str) -> float:
    """A field of /proc/self/status in MB: VmRSS (resident now) or VmHWM (its peak, the "high water
    mark"). Unlike ru_maxrss, VmHWM starts afresh at exec, so the parent's memory does not leak in."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024  # the value is in kB
    raise RuntimeError(f"no {field_name} in /proc/self/status: the memory columns need Linux")


def peak_rss_mb() -> float:
    return memory_status_mb("VmHWM")


def current_rss_mb() -> float:
    return memory_status_mb("VmRSS")


class FirstToken:
    """When the first new token of the current generation was ready (perf_counter seconds)."""

    def __init__(self):
        self.at: Optional[float] = None

    def mark(self) -> None:
        if self.at is None:
            self.at = time.perf_counter()


class OurEngine:
    def __init__(self, spec: EngineSpec, paths: dict, threads: int, first_token: FirstToken):
        from cli import how_it_runs
        from inference import LLaMa
        from sampling import SamplingParams

        started = time.perf_counter()
        self.llama = LLaMa.build(paths["ckpt_dir"], max_seq_len=MAX_SEQ_LEN, max_batch_size=BATCH_SIZE,
                                 device="cpu", dtype=spec.dtype, quantize=spec.quantize, compile=spec.compile,
                                 progress=False, threads=threads)  # build sets the thread count itself
        self.load_s = time.perf_counter() - started
        self.path = how_it_runs(self.llama)  # the dtype and kernels this configuration got on this CPU
        self.greedy = SamplingParams(temperature=0)
        self.first_token = first_token

    def generate(self, prompts: list[list[int]], new_tokens: int, speculate: int = 0) -> dict:
        # The engine's own decode loop: it ends rows only when told to, so exactly `new_tokens` are
        # made (no stop token cuts a run short). Its first step comes once the prefill is done and
        # the first new token sampled.
        decoding = self.llama.decode(prompts, new_tokens, self.greedy, speculate=speculate)
        for _ in decoding:
            self.first_token.mark()
        return {"drafted": decoding.drafted, "accepted": decoding.accepted}


class HFEngine:
    def __init__(self, spec: EngineSpec, paths: dict, threads: int, first_token: FirstToken):
        import torch
        import transformers

        torch.set_num_threads(threads)
        self.torch = torch
        transformers.logging.set_verbosity_error()
        started = time.perf_counter()
        dtype = getattr(torch, spec.dtype)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(paths["hf_dir"], dtype=dtype).eval()
        self.load_s = time.perf_counter() - started
        self.path = f"{spec.dtype}, SDPA attention"

        class Streamer(transformers.generation.streamers.BaseStreamer):
            """generate() calls put() with the prompt, then with each new token."""

            def __init__(self):
                self.calls = 0

            def put(self, value):
                self.calls += 1
                if self.calls == 2:
                    first_token.mark()

            def end(self):
                pass

        self.streamer_class = Streamer

    def generate(self, prompts: list[list[int]], new_tokens: int, speculate: int = 0) -> dict:
        ids = self.torch.tensor(prompts)
        with self.torch.inference_mode():
            self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                streamer=self.streamer_class(), prompt_lookup_num_tokens=speculate or None)
        return {}  # HF does not say how many drafts it kept


class LlamaCppEngine:
    def __init__(self, spec: EngineSpec, paths: dict, threads: int, first_token: FirstToken):
        import llama_cpp

        self.first_token = first_token
        started = time.perf_counter()
        self.llm = llama_cpp.Llama(model_path=str(paths["gguf"]), n_ctx=MAX_SEQ_LEN, n_batch=LLAMA_CPP_BATCH,
                                   n_threads=threads, n_threads_batch=threads, verbose=False)
        self.load_s = time.perf_counter() - started
        self.path = "Q4_1 weights, Q8 activations"

    def generate(self, prompts: list[list[int]], new_tokens: int, speculate: int = 0) -> dict:
        if len(prompts) != 1 or speculate:
            raise ValueError("llama-cpp-python generates one sequence at a time, without prompt lookup")
        self.llm.reset()  # forget the previous prompt: otherwise its cached prefix would be reused
        for count, _ in enumerate(self.llm.generate(prompts[0], top_k=1, temp=0.0), start=1):
            self.first_token.mark()
            if count == new_tokens:
                break
        return {}


ENGINES = {"ours": OurEngine, "hf": HFEngine, "llamacpp": LlamaCppEngine}


def worker_main(spec_json: str) -> int:
    """Load one engine, report, then time each generation request read from stdin (one JSON per line)."""
    request = json.loads(spec_json)
    spec, paths, threads = EngineSpec(**request["spec"]), request["paths"], request["threads"]
    rss_before_load = current_rss_mb()
    first_token = FirstToken()
    engine = ENGINES[spec.kind](spec, paths, threads, first_token)
    reply({"load_s": engine.load_s, "load_rss_mb": peak_rss_mb(), "rss_before_load_mb": rss_before_load,
           "path": engine.path})
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "quit":
            break
        first_token.at = None
        started = time.perf_counter()
        drafts = engine.generate(command["prompts"], command["new_tokens"], command.get("speculate", 0))
        ended = time.perf_counter()
        first_token_s = (first_token.at or ended) - started  # one new token: the whole run is prefill
        reply({"seconds": ended - started, "first_token_s": first_token_s, "peak_rss_mb": peak_rss_mb(), **drafts})
    return 0


def reply(message: dict) -> None:
    print(json.dumps(message), flush=True)


class Worker:
    """The parent's handle on one engine's process."""

    def __init__(self, spec: EngineSpec, paths: dict, threads: int):
        self.spec = spec
        request = json.dumps({"spec": asdict(spec), "paths": {k: str(v) for k, v in paths.items()}, "threads": threads})
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self.process = subprocess.Popen([sys.executable, __file__, "--worker", request], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).parent)
        self.loaded = self.receive()

    def receive(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise RuntimeError(f"the {self.spec.name} worker exited (code {code}); its error is printed above")
        return json.loads(line)

    def time(self, timing: Timing, vocab_size: int) -> dict:
        return self.time_prompts(prompts_for(timing, vocab_size), timing.new_tokens)

    def time_prompts(self, prompts: list[list[int]], new_tokens: int, speculate: int = 0) -> dict:
        command = {"op": "generate", "prompts": prompts, "new_tokens": new_tokens, "speculate": speculate}
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self.receive()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.process.stdin.close()
            self.process.wait()


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


@dataclass
class EngineResult:
    name: str
    load_s: float
    load_rss_mb: float
    first_call_s: float
    peak_rss_mb: float = 0.0
    path: str = ""  # the dtype and kernels it ran with (ours: as the "loaded ..." line says)
    metrics: dict = field(default_factory=dict)  # Metric.key -> median tok/s (None: not supported)
    runs: dict = field(default_factory=dict)  # Metric.key -> tok/s of every timed run
    # The speculative section, apart from the metrics: COPY_KEYS -> median tok/s, and (ours) "drafted"
    # and "accepted" drafts (greedy: every run drafts alike); empty when it did not run.
    speculative: dict = field(default_factory=dict)


COPY_KEYS = {False: "plain_copy_tok_s", True: "speculative_copy_tok_s"}  # by whether the run speculates


def supports(spec: EngineSpec, timing: Timing) -> bool:
    return not (spec.kind == "llamacpp" and timing.batch > 1)


def supports_speculation(spec: EngineSpec) -> bool:
    return spec.kind in ("ours", "hf")


def time_speculative(worker: "Worker", result: EngineResult, run: SpeculativeRun, record: bool) -> None:
    """The copy request, plainly and with drafts: new tokens over the whole call (see the top of this file)."""
    for speculates, key in COPY_KEYS.items():
        answer = worker.time_prompts([run.prompt], run.new_tokens, run.speculate if speculates else 0)
        result.peak_rss_mb = answer["peak_rss_mb"]
        if record:
            result.runs.setdefault(key, []).append(run.new_tokens / answer["seconds"])
            if speculates and "drafted" in answer:
                result.speculative.update(drafted=answer["drafted"], accepted=answer["accepted"])


def measure(specs: list[EngineSpec], paths: dict, threads: int, repeats: int, vocab_size: int,
            speculative: Optional[SpeculativeRun] = None) -> list[EngineResult]:
    workers, results = [], []
    try:
        for spec in specs:  # loading one at a time: each load has the machine to itself
            print(f"loading {spec.name} ...", file=sys.stderr)
            workers.append(Worker(spec, paths, threads))
        for worker in workers:
            first = worker.time(Timing(1, SHORT_PROMPT_LEN, FIRST_CALL_TOKENS), vocab_size)
            results.append(EngineResult(worker.spec.name, worker.loaded["load_s"], worker.loaded["load_rss_mb"],
                                        first["seconds"], path=worker.loaded["path"]))
        for round_ in range(1 + repeats):  # round 0 is the warm-up
            print(f"{'warm-up' if round_ == 0 else f'repeat {round_}/{repeats}'} ...", file=sys.stderr)
            for metric in METRICS:
                for worker, result in zip(workers, results):
                    if not supports(worker.spec, metric.run):
                        continue
                    answer = worker.time(metric.run, vocab_size)
                    result.peak_rss_mb = answer["peak_rss_mb"]
                    if round_ > 0:
                        rate = metric.rate(answer["first_token_s"], answer["seconds"])
                        result.runs.setdefault(metric.key, []).append(rate)
            for worker, result in zip(workers, results):
                if speculative is not None and supports_speculation(worker.spec):
                    time_speculative(worker, result, speculative, record=round_ > 0)
    finally:
        for worker in workers:
            worker.close()
    for worker, result in zip(workers, results):
        for metric in METRICS:
            runs = result.runs.get(metric.key)
            result.metrics[metric.key] = statistics.median(runs) if runs else None
        for key in COPY_KEYS.values():
            if key in result.runs:
                result.speculative[key] = statistics.median(result.runs[key])
    return results


# --------------------------------------------------------------------------------------------
# The report: table, ratios, targets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One target of issue 17: ours / peer on one metric must be >= at_least. With peer None it is
    ours against itself: rate of `base_metric` / rate of `metric` (how much more a token costs on
    `metric`) must be <= at_most."""

    label: str
    ours: list[str]  # the configurations of ours that may meet it: the best one counts
    metric: str
    peer: Optional[str] = None
    at_least: Optional[float] = None
    base_metric: Optional[str] = None
    at_most: Optional[float] = None


QUANTIZED = [f"ours {q}{c}" for q in ("int8", "int4", "w8a8") for c in ("", " compile")]
DEFAULT = ["ours default", "ours default compile"]  # `python inference.py`: bf16, layers as chosen for this CPU
TARGETS = [  # issue 17's, on every CPU
    Target("default decode >= 1.3x HF bf16", DEFAULT, "decode_tok_s", HF.name, 1.3),
    Target("default prefill >= 1.5x HF bf16", ["ours default"], "prefill_tok_s", HF.name, 1.5),
    Target("default batch-8 decode >= 2.0x HF bf16", DEFAULT, "batch8_tok_s", HF.name, 2.0),
    Target("fastest quantized decode >= 1.3x llama.cpp Q4_1", QUANTIZED, "decode_tok_s", LLAMA_CPP.name, 1.3),
    Target("w8a8 prefill >= 3x HF bf16", ["ours w8a8"], "prefill_tok_s", HF.name, 3.0),
    Target("decode at ~2000 costs <= 1.5x decode at ~16", DEFAULT, "late_decode_tok_s",
           base_metric="decode_tok_s", at_most=1.5),
]
LOAD_RSS_FACTOR, LOAD_RSS_ALLOWANCE_MB = 1.3, 300  # issue 6: peak RSS during load <= 1.3 x checkpoint + 300 MB


def by_round(numerators: list[float], denominators: list[float]) -> str:
    """Each timed round's ratio, as the target's text shows it: " (by round: 1.74, 1.90, 1.82)". The
    engines take turns within a round, so each pair met the same spell of a machine whose speed wanders
    (a shared VM's can, by 1.5-2x); the spread shows how far the median ratio can be trusted."""
    ratios = [a / b for a, b in zip(numerators, denominators)]
    return f" (by round: {', '.join(f'{r:.2f}' for r in ratios)})" if ratios else ""


def evaluate_target(target: Target, by_name: dict) -> Optional[dict]:
    """The best of ours against the target, or None if an engine it needs did not run."""
    candidates = [by_name[n] for n in target.ours if n in by_name and by_name[n].metrics.get(target.metric)]
    if not candidates:
        return None
    if target.peer is None:  # a cost ratio: lower is better
        costs = {c.name: c.metrics[target.base_metric] / c.metrics[target.metric] for c in candidates}
        best = min(costs, key=costs.get)
        runs = by_name[best].runs
        rounds = by_round(runs.get(target.base_metric, []), runs.get(target.metric, []))
        return {"target": target.label, "ours": best, "value": costs[best], "met": costs[best] <= target.at_most,
                "text": f"{costs[best]:.2f}x{rounds}"}
    peer = by_name.get(target.peer)
    if peer is None or not peer.metrics.get(target.metric):
        return None
    ratios = {c.name: c.metrics[target.metric] / peer.metrics[target.metric] for c in candidates}
    best = max(ratios, key=ratios.get)
    rounds = by_round(by_name[best].runs.get(target.metric, []), peer.runs.get(target.metric, []))
    return {"target": target.label, "ours": best, "value": ratios[best], "met": ratios[best] >= target.at_least,
            "text": f"{ratios[best]:.2f}x{rounds}"}


def evaluate_load_memory(results: list[EngineResult], checkpoint_size_mb: float) -> list[dict]:
    budget_mb = LOAD_RSS_FACTOR * checkpoint_size_mb + LOAD_RSS_ALLOWANCE_MB
    label = (f"load peak RSS <= {LOAD_RSS_FACTOR} x checkpoint ({checkpoint_size_mb:.0f} MB) + "
             f"{LOAD_RSS_ALLOWANCE_MB} MB = {budget_mb:.0f} MB")
    return [{"target": label, "ours": r.name, "value": r.load_rss_mb, "met": r.load_rss_mb <= budget_mb,
             "text": f"{r.load_rss_mb:.0f} MB"} for r in results if r.name.startswith("ours")]


def machine_description(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for module in ("torch", "transformers", "llama_cpp"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = None
    from cpu import cpu_features

    return {"cpu": cpu, "cpu_features": cpu_features().name, "cores": os.cpu_count(), "threads": threads,
            "python": platform.python_version(), "load_average": os.getloadavg(), **versions}


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in [header] + rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def format_table(results: list[EngineResult]) -> str:
    columns = [("load s", lambda r: f"{r.load_s:.2f}"), ("load RSS MB", lambda r: f"{r.load_rss_mb:.0f}"),
               ("peak RSS MB", lambda r: f"{r.peak_rss_mb:.0f}"), ("first call s", lambda r: f"{r.first_call_s:.2f}")]
    columns += [(m.label, lambda r, k=m.key: "n/a" if r.metrics[k] is None else f"{r.metrics[k]:.1f}") for m in METRICS]
    rows = [[r.name] + [fmt(r) for _, fmt in columns] for r in results]
    paths = "\n".join(f"- {r.name}: {r.path}" for r in results)
    return markdown_table(["engine"] + [c[0] for c in columns], rows) + "\n\nHow each ran:\n" + paths


def format_speculative(results: list[EngineResult], run: SpeculativeRun) -> str:
    """The speculative section: plain and speculative tok/s of each engine that ran it, and drafts kept."""
    title = (f"Speculative decoding (prompt lookup, up to {run.speculate} drafts per pass): greedy, {run.new_tokens} "
             f"new tokens copying a {len(PASSAGE.split())}-word passage ({len(run.prompt)}-token prompt); new tokens "
             f"/ whole call, prefill included")
    rows = []
    for r in results:
        if not r.speculative:
            continue
        plain, fast = r.speculative[COPY_KEYS[False]], r.speculative[COPY_KEYS[True]]
        kept = "n/a"
        if r.speculative.get("drafted"):
            drafted, accepted = r.speculative["drafted"], r.speculative["accepted"]
            kept = f"{accepted}/{drafted} ({accepted / drafted:.0%})"
        rows.append([r.name, f"{plain:.1f}", f"{fast:.1f}", f"{fast / plain:.2f}x", kept])
    header = ["engine", "plain tok/s", "speculative tok/s", "speedup", "drafts kept"]
    return title + "\n\n" + markdown_table(header, rows)


def format_targets(evaluations: list[dict]) -> str:
    return "\n".join(f"- {e['target']}: {e['text']} ({e['ours']}) -- {'met' if e['met'] else 'NOT met'}"
                     for e in evaluations)


def checkpoint_mb(ckpt_dir: Path) -> float:
    return sum(p.stat().st_size for p in Path(ckpt_dir).glob("consolidated.*.pth")) / MB


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quantize", choices=["int8", "int4", "w8a8"],
                        help="run only this configuration of ours (with --compile: compiled) against the peers")
    parser.add_argument("--compile", action="store_true", help="with --quantize, or alone for the default: compile ours")
    parser.add_argument("--ours", default=",".join(OUR_CONFIGS),
                        help=f"configurations of ours to run, comma-separated, from: {', '.join(OUR_CONFIGS)}")
    parser.add_argument("--peers", default="hf,llamacpp", help="peers to run: hf, llamacpp (comma-separated; '' for none)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the median is shown)")
    parser.add_argument("--threads", type=int, help="CPU threads for every engine (default: as inference.py's)")
    parser.add_argument("--speculate", type=int, default=DEFAULT_SPECULATE, metavar="N",
                        help="the speculative-decoding section: up to N prompt-lookup drafts per pass (0: skip it)")
    parser.add_argument("--json", metavar="PATH", help="write all results as JSON to PATH ('-': stdout)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one engine
    return parser.parse_args(argv)


def runnable_here(specs: list[EngineSpec], named: bool, features=None) -> list[EngineSpec]:
    """Our configurations this CPU can run (`features`, None: this CPU's). One it refuses (w8a8 without
    int8 dot products) is a one-line error when the user `named` it, else left out with a note."""
    import torch
    from quantize import QuantizationError, check_scheme_runs_here
    runnable = []
    for spec in specs:
        try:
            check_scheme_runs_here(spec.quantize, torch.device("cpu"), torch.bfloat16, features)
            runnable.append(spec)
        except QuantizationError as error:
            if named:
                raise SystemExit(f"error: {error}") from None
            print(f"note: {spec.name} is skipped on this CPU: {error}", file=sys.stderr)
    return runnable


def chosen_specs(args: argparse.Namespace) -> list[EngineSpec]:
    if args.quantize or args.compile:
        names = [(args.quantize or "default") + ("+compile" if args.compile else "")]
    else:
        names = [n for n in args.ours.split(",") if n]
    unknown = [n for n in names if n not in OUR_CONFIGS]
    if unknown:
        raise SystemExit(f"error: unknown configuration(s) {unknown} for --ours; choose from {', '.join(OUR_CONFIGS)}")
    named = bool(args.quantize or args.compile) or args.ours != ",".join(OUR_CONFIGS)
    specs = runnable_here([OUR_CONFIGS[n] for n in names], named)
    peers = [p for p in args.peers.split(",") if p]
    if "hf" in peers:
        specs += [HF, HF_FP32]
    if "llamacpp" in peers:
        try:
            import llama_cpp  # noqa: F401 -- only to see whether it is installed
            specs.append(LLAMA_CPP)
        except ImportError:
            print("note: llama-cpp-python is not installed, so llama.cpp is skipped (CMAKE_BUILD_PARALLEL_LEVEL=2 "
                  "pip install llama-cpp-python==0.3.36 builds it in ~10 min)", file=sys.stderr)
    return specs


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.repeats < 1:
        raise SystemExit("error: --repeats must be >= 1")
    from cpu import choose_threads  # here, not at the top: a llama.cpp worker does not import torch
    try:
        args.threads = choose_threads(args.threads)  # defaulted and checked as inference.py's --threads
    except ValueError as error:
        raise SystemExit(f"error: --{error}") from None
    if args.speculate < 0:
        raise SystemExit(f"error: --speculate must be >= 0 (0 skips the speculative section), got {args.speculate}")
    if args.json and args.json != "-" and not Path(args.json).resolve().parent.is_dir():
        raise SystemExit(f"error: --json {args.json}: the directory {Path(args.json).resolve().parent} does not exist")
    specs = chosen_specs(args)
    from demo_model import demo_model_copies  # here, not at the top: it imports torch
    paths = demo_model_copies()
    vocab_size = json.loads((Path(paths["ckpt_dir"]) / "params.json").read_text())["vocab_size"]
    machine = machine_description(args.threads)
    speculative = SpeculativeRun(copy_request_prompt(paths["ckpt_dir"]), args.speculate) if args.speculate else None
    results = measure(specs, paths, args.threads, args.repeats, vocab_size, speculative)
    machine["load_average_after"] = os.getloadavg()

    by_name = {r.name: r for r in results}
    evaluations = [e for e in (evaluate_target(t, by_name) for t in TARGETS) if e is not None]
    evaluations += evaluate_load_memory(results, checkpoint_mb(paths["ckpt_dir"]))

    title = (f"SmolLM2-135M-Instruct, {machine['cpu']} [{machine['cpu_features']}] ({machine['cores']} cores), "
             f"{args.threads} threads, "
             f"torch {machine['torch']}, transformers {machine['transformers']}, llama-cpp-python "
             f"{machine['llama_cpp'] or '(not installed)'}; median of {args.repeats} after a warm-up; "
             f"load average {machine['load_average'][0]:.1f} before, {machine['load_average_after'][0]:.1f} after")
    report = f"{title}\n\n{format_table(results)}\n\nTargets (issue 17), ours / peer in this run:\n{format_targets(evaluations)}"
    if speculative is not None:
        report += f"\n\n{format_speculative(results, speculative)}"
    if args.json != "-":
        print(report)
    if args.json:
        write_json(args.json, {"machine": machine, "results": [asdict(r) for r in results], "targets": evaluations})
    return 0


def write_json(where: str, data: dict) -> None:
    """--json: `data` to the file `where` (written safely), or to stdout for "-"."""
    text = json.dumps(data, indent=2)
    if where == "-":
        print(text)
    else:
        write_text_atomically(Path(where), text + "\n")


if __name__ == "__main__":
    sys.exit(main())
