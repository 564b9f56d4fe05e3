"""Throughput of batch completion: continuous vs static batching, Hugging Face, and the server.

    python bench_batching.py                   # 64 mixed prompts at max_batch_size 8, then 16 server clients
    python bench_batching.py --no-server       # the batch engines only
    python bench_batching.py --json out.json   # also write every number as JSON ("-": to stdout)

The workload is what batch completion meets in practice: 64 chat requests to the demo model
(SmolLM2-135M-Instruct, demo_model.py), each a passage of text and a task about it ("Summarize ...",
"Continue ..."), with prompts of 16 to 256 tokens and max_gen_len of 16 to 256, both drawn at
random (seeded). Every engine decodes greedily and each answer ends at its natural end of turn or at
its own max_gen_len; only those tokens count (not padding, not the end-of-turn token).

    ours continuous   LLaMa.generate: continuous batching (batching.py), max_batch_size rows
    ours static       LLaMa.generate(continuous=False): batches of max_batch_size in order, each
                      running until its longest answer ends
    ... compile       the same with LLaMa.build(compile=True) (--compile; compiled before timing)
    HF generate       transformers' generate on the same batches (left-padded, max_new_tokens the
                      batch's largest max_gen_len; rows stop at the end-of-turn token)
    server            server.py in its own process, N concurrent clients (the `openai` package,
                      streaming) taking the 64 requests from one queue: total tokens/s, and the time
                      from sending a request to its first piece of text (median, p95)

All in the dtype our engine chooses for this CPU (HF in the same). The machine's load average is
printed: on a shared machine, compare only numbers from one run.
"""

import argparse
import os
import queue
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from bench import PASSAGE, machine_description, markdown_table, write_json

N_PROMPTS = 64
MIN_PROMPT_TOKENS, MAX_PROMPT_TOKENS = 16, 256
MIN_GEN_LEN, MAX_GEN_LEN = 16, 256
MAX_BATCH_SIZE = 8
SERVER_CLIENTS = 16
WORKLOAD_SEED = 0
MAX_SEQ_LEN = 1024  # room for the longest prompt and answer
SERVER_STARTUP_SECONDS = 300  # a bound for the server's start, not a timing
TARGETS = [  # issue 15's, on this machine, in one run
    ("ours continuous", "ours static", 2.0),
    ("ours continuous compile", "ours static compile", 2.0),
    ("ours continuous", "HF generate", 3.0),
    ("ours continuous compile", "HF generate", 3.0),
    ("server", "ours continuous", 0.8),
]
TASKS = ["Summarize this text in one sentence:", "What is this text about? Answer in a few words.",
         "Continue this text with a short paragraph:", "List three facts from this text:",
         "Rewrite this text for a child:", "Give this text a title:"]
MORE_TEXT = ("The city wakes before dawn. Bakers light their ovens, the first trams rattle along the avenue, and "
             "the market traders unload crates of apples, cabbages and cheese under the iron roof of the old hall. "
             "By eight the streets are full: clerks with coffee, students with bicycles, tourists with maps held "
             "upside down. At noon the bells of the cathedral ring over the square, and the pigeons rise all at "
             "once, circle the tower and settle again on the same ledges. In the evening the river reflects the "
             "lamps of the bridges, and the cafes put their chairs out on the pavement until the last tram has "
             "gone. Weather, too, has its habits here: fog in the mornings of November, sudden thunderstorms in "
             "July, and in January a dry cold that makes the stars look close enough to touch.")


@dataclass
class Job:
    """One request of the workload."""

    question: str
    prompt_tokens: list[int]
    max_gen_len: int


@dataclass
class Result:
    name: str
    tokens: int = 0  # answer tokens made (counted as described at the top)
    seconds: float = 0.0
    answers: list[list[int]] = field(default_factory=list)  # per job (batch engines)
    first_token_s: list[float] = field(default_factory=list)  # per request (server)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def make_workload(llama, n: int, seed: int) -> list[Job]:
    """n chat requests with prompts of MIN..MAX_PROMPT_TOKENS tokens and max_gen_len MIN..MAX_GEN_LEN."""
    rng = random.Random(seed)
    words = (PASSAGE + " " + MORE_TEXT).split()
    jobs = []
    for i in range(n):
        target, max_gen_len = rng.randint(MIN_PROMPT_TOKENS, MAX_PROMPT_TOKENS), rng.randint(MIN_GEN_LEN, MAX_GEN_LEN)
        start, task = rng.randrange(len(words)), TASKS[i % len(TASKS)]

        def encode(count: int) -> tuple[str, list[int]]:
            text = " ".join(words[(start + k) % len(words)] for k in range(count))
            question = f"{task}\n\n{text}" if count else task
            return question, llama.chat_format.encode_dialog_prompt([{"role": "user", "content": question}])

        count = 0
        while len(encode(count + 1)[1]) <= target:  # the most words that keep the prompt within its length
            count += 1
        jobs.append(Job(*encode(count), max_gen_len))
    return jobs


# --------------------------------------------------------------------------------------------
# The batch engines
# --------------------------------------------------------------------------------------------


def run_ours(llama, jobs: list[Job], continuous: bool) -> Result:
    from sampling import SamplingParams

    greedy = SamplingParams(temperature=0)
    stop = llama.chat_format.stop_tokens
    result = Result("ours continuous" if continuous else "ours static")
    started = time.perf_counter()
    if continuous:  # each request with its own max_gen_len
        from batching import ContinuousBatching, Request

        requests = [Request(j.prompt_tokens, j.max_gen_len, greedy, stop) for j in jobs]
        for _ in ContinuousBatching(llama).run(requests):
            pass
        result.answers = [r.row.tokens for r in requests]
    else:  # batches in order; a batch's rows share one max_gen_len, its largest, each cut to its own below
        for start in range(0, len(jobs), llama.args.max_batch_size):
            batch = jobs[start : start + llama.args.max_batch_size]
            generations = llama.generate([j.prompt_tokens for j in batch], max(j.max_gen_len for j in batch),
                                         greedy, stop_tokens=stop, continuous=False)
            result.answers += [g.tokens[: j.max_gen_len] for g, j in zip(generations, batch)]
    result.seconds = time.perf_counter() - started
    result.tokens = sum(len(a) for a in result.answers)
    return result


def run_hf(hf_dir: Path, llama, jobs: list[Job], batch_size: int, threads: int) -> Result:
    import torch
    import transformers

    dtype = llama.model.norm.weight.dtype
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
    stop = sorted(llama.chat_format.stop_tokens)
    result = Result("HF generate")
    torch.set_num_threads(threads)
    started = time.perf_counter()
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        width = max(len(j.prompt_tokens) for j in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, job in enumerate(batch):  # left padding, as HF wants for generation
            ids[row, width - len(job.prompt_tokens) :] = torch.tensor(job.prompt_tokens)
            mask[row, width - len(job.prompt_tokens) :] = 1
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max(j.max_gen_len for j in batch),
                                 do_sample=False, eos_token_id=stop, pad_token_id=stop[0])
        for row, job in enumerate(batch):
            answer = []
            for token in out[row, width:].tolist()[: job.max_gen_len]:
                if token in stop:
                    break
                answer.append(token)
            result.answers.append(answer)
    result.seconds = time.perf_counter() - started
    result.tokens = sum(len(a) for a in result.answers)
    return result


# --------------------------------------------------------------------------------------------
# The server, with concurrent clients
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(ckpt_dir: Path, dtype: str, batch_size: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, str(Path(__file__).with_name("server.py")), "--ckpt-dir", str(ckpt_dir),
               "--port", str(port), "--max-batch-size", str(batch_size), "--max-seq-len", str(MAX_SEQ_LEN),
               "--dtype", dtype, "--threads", str(threads), "--max-queue", str(N_PROMPTS)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the server did not answer /health within {SERVER_STARTUP_SECONDS} s")


def run_server(ckpt_dir: Path, dtype: str, jobs: list[Job], batch_size: int, clients: int, threads: int) -> Result:
    import openai

    process, url = start_server(ckpt_dir, dtype, batch_size, threads)
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    todo: queue.Queue = queue.Queue()
    for job in jobs:
        todo.put(job)
    result = Result(f"server ({clients} clients)")
    lock = threading.Lock()

    def client_loop() -> None:
        while True:
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            sent = time.perf_counter()
            first, made = None, 0
            stream = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": job.question}], max_tokens=job.max_gen_len,
                temperature=0, stream=True, stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content and first is None:
                    first = time.perf_counter() - sent
                if chunk.usage is not None:
                    made = chunk.usage.completion_tokens
            with lock:
                result.tokens += made
                result.first_token_s.append(first if first is not None else time.perf_counter() - sent)

    try:
        started = time.perf_counter()
        pool = [threading.Thread(target=client_loop) for _ in range(clients)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        result.seconds = time.perf_counter() - started
    finally:
        process.terminate()
        process.wait(timeout=60)
    return result


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def report(results: list[Result], jobs: list[Job], machine: dict) -> tuple[str, list[dict]]:
    by_name = {r.name.split(" (")[0]: r for r in results}
    rows = []
    for r in results:
        ttft = (f"{statistics.median(r.first_token_s):.2f} / {percentile(r.first_token_s, 0.95):.2f}"
                if r.first_token_s else "-")
        rows.append([r.name, str(r.tokens), f"{r.seconds:.1f}", f"{r.tok_s:.1f}", ttft])
    table = markdown_table(["engine", "answer tokens", "seconds", "tokens/s", "first token s (median / p95)"], rows)
    targets = []
    for ours, peer, factor in TARGETS:
        if ours in by_name and peer in by_name and by_name[peer].tok_s:
            ratio = by_name[ours].tok_s / by_name[peer].tok_s
            targets.append({"target": f"{ours} >= {factor}x {peer}", "ratio": ratio, "met": ratio >= factor})
    lines = [f"{len(jobs)} requests: prompts {min(len(j.prompt_tokens) for j in jobs)}-"
             f"{max(len(j.prompt_tokens) for j in jobs)} tokens, max_gen_len {min(j.max_gen_len for j in jobs)}-"
             f"{max(j.max_gen_len for j in jobs)}", "", table, ""]
    if "ours continuous" in by_name and "ours static" in by_name:
        same = sum(a == b for a, b in zip(by_name["ours continuous"].answers, by_name["ours static"].answers))
        lines.append(f"continuous and static answers identical: {same} of {len(jobs)} "
                     "(elsewhere they part where float noise tips a near-tie)")
    lines += [f"{t['target']}: {t['ratio']:.2f}x {'met' if t['met'] else 'NOT met'}" for t in targets]
    lines.append(f"machine: {machine['cpu']} ({machine['cpu_features']}), {machine['threads']} threads, "
                 f"load average {machine['load_average'][0]:.2f}")
    return "\n".join(lines), targets


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Batch completion throughput: continuous vs static batching, "
                                                 "Hugging Face generate, and the server.")
    parser.add_argument("--prompts", type=int, default=N_PROMPTS, help=f"requests (default {N_PROMPTS})")
    parser.add_argument("--max-batch-size", type=int, default=MAX_BATCH_SIZE,
                        help=f"rows decoded together (default {MAX_BATCH_SIZE})")
    parser.add_argument("--clients", type=int, default=SERVER_CLIENTS,
                        help=f"concurrent server clients (default {SERVER_CLIENTS})")
    parser.add_argument("--no-server", action="store_true", help="skip the server")
    parser.add_argument("--compile", action="store_true", help="also ours with --compile (continuous and static)")
    parser.add_argument("--no-hf", action="store_true", help="skip Hugging Face")
    parser.add_argument("--threads", type=int, help="CPU threads (default: every CPU this process may use)")
    parser.add_argument("--json", help="write the numbers as JSON to this file ('-': stdout)")
    args = parser.parse_args(argv)
    for name in ("prompts", "max_batch_size", "clients"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from cpu import choose_threads
    from inference import LLaMa

    threads = choose_threads(args.threads)
    from demo_model import demo_model_copies  # here, not at the top: it imports torch
    paths = demo_model_copies()
    llama = LLaMa.build(paths["ckpt_dir"], max_seq_len=MAX_SEQ_LEN, max_batch_size=args.max_batch_size,
                        progress=False, threads=threads)
    jobs = make_workload(llama, args.prompts, WORKLOAD_SEED)
    machine = machine_description(threads)
    print(f"load average before: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    results = [run_ours(llama, jobs, continuous=True), run_ours(llama, jobs, continuous=False)]
    if args.compile:
        compiled = LLaMa.build(paths["ckpt_dir"], max_seq_len=MAX_SEQ_LEN, max_batch_size=args.max_batch_size,
                               progress=False, threads=threads, compile=True)
        print("compiling (a warm-up run of 2 requests, not timed) ...", file=sys.stderr)
        run_ours(compiled, jobs[:2], continuous=True)
        run_ours(compiled, jobs[:2], continuous=False)
        for continuous in (True, False):
            result = run_ours(compiled, jobs, continuous)
            result.name += " compile"
            results.append(result)
        compiled.model = None
    if not args.no_hf:
        results.append(run_hf(paths["hf_dir"], llama, jobs, args.max_batch_size, threads))
    if not args.no_server:
        dtype = str(llama.model.norm.weight.dtype).removeprefix("torch.")
        llama.model = None  # the server loads its own copy
        results.append(run_server(paths["ckpt_dir"], dtype, jobs, args.max_batch_size, args.clients, threads))
    text, targets = report(results, jobs, {**machine, "load_average": os.getloadavg()})
    print(text)
    if args.json:
        write_json(args.json, {"machine": machine, "targets": targets,
                               "results": [{k: v for k, v in asdict(r).items() if k != "answers"} for r in results]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
