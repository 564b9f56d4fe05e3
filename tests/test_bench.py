"""bench.py: what it computes from its timings, and that a whole measurement runs end to end.

No test here asserts on speed (the benchmark itself does the timing); they check the arithmetic that
turns timings into the table's rates and the issue's target verdicts, and the worker protocol.
"""

import json
import os

import pytest

import bench
from bench import EngineResult, Metric, Target, Timing
from conftest import LLAMA2_TOKENIZER
from cpu import CpuFeatures
from tiny import LLAMA2_VOCAB_SIZE, write_tiny_llama2_checkpoint


def result(name: str, **metrics) -> EngineResult:
    return EngineResult(name, load_s=1.0, load_rss_mb=100.0, first_call_s=0.1, metrics=metrics)


def test_prefill_rate_is_prompt_tokens_over_the_time_to_the_first_new_token():
    metric = Metric("prefill_tok_s", "prefill", Timing(batch=2, prompt_len=512, new_tokens=1), "prefill")
    assert metric.rate(first_token_s=0.5, total_s=0.5) == pytest.approx(2 * 512 / 0.5)


def test_decode_rate_counts_only_the_tokens_after_the_first_over_the_time_after_it():
    metric = Metric("decode_tok_s", "decode", Timing(batch=8, prompt_len=16, new_tokens=129), "decode")
    # The prefill (first 0.2 s) is not decoding: 8 rows x 128 further tokens in the remaining 4 s.
    assert metric.rate(first_token_s=0.2, total_s=4.2) == pytest.approx(8 * 128 / 4.0)


def test_a_peer_target_takes_the_best_of_our_configurations_and_compares_it_with_the_peer():
    target = Target("int4 >= 1.0x peer", ["ours int4", "ours int4 compile"], "decode_tok_s", "peer", at_least=1.0)
    by_name = {"ours int4": result("ours int4", decode_tok_s=60.0),
               "ours int4 compile": result("ours int4 compile", decode_tok_s=90.0),
               "peer": result("peer", decode_tok_s=100.0)}
    verdict = bench.evaluate_target(target, by_name)
    assert verdict["ours"] == "ours int4 compile"
    assert verdict["value"] == pytest.approx(0.9)
    assert verdict["met"] is False
    by_name["ours int4"] = result("ours int4", decode_tok_s=120.0)
    assert bench.evaluate_target(target, by_name)["met"] is True


def test_the_late_context_target_is_the_cost_of_a_token_at_2000_relative_to_one_at_16():
    target = Target("cost <= 1.5x", ["ours bf16"], "late_decode_tok_s", base_metric="decode_tok_s", at_most=1.5)
    slow_late = {"ours bf16": result("ours bf16", decode_tok_s=30.0, late_decode_tok_s=15.0)}
    assert bench.evaluate_target(target, slow_late)["value"] == pytest.approx(2.0)
    assert bench.evaluate_target(target, slow_late)["met"] is False
    flat = {"ours bf16": result("ours bf16", decode_tok_s=30.0, late_decode_tok_s=25.0)}
    assert bench.evaluate_target(target, flat)["met"] is True


def test_a_target_shows_its_ratio_in_every_round_as_well_as_the_ratio_of_the_medians():
    # The engines take turns within a round, so each round's ratio pairs runs that met the same spell
    # of the machine; the verdict stays on the medians.
    target = Target("batch-8 >= 2.0x", ["ours bf16"], "batch8_tok_s", "peer", at_least=2.0)
    ours = EngineResult("ours bf16", 1.0, 100.0, 0.1, metrics={"batch8_tok_s": 80.0},
                        runs={"batch8_tok_s": [70.0, 80.0, 90.0]})
    peer = EngineResult("peer", 1.0, 100.0, 0.1, metrics={"batch8_tok_s": 40.0},
                        runs={"batch8_tok_s": [50.0, 40.0, 30.0]})
    verdict = bench.evaluate_target(target, {"ours bf16": ours, "peer": peer})
    assert verdict["value"] == pytest.approx(2.0) and verdict["met"] is True
    assert verdict["text"] == "2.00x (by round: 1.40, 2.00, 3.00)"
    late = Target("cost <= 1.5x", ["ours bf16"], "late_decode_tok_s", base_metric="decode_tok_s", at_most=1.5)
    ours.metrics.update(decode_tok_s=30.0, late_decode_tok_s=20.0)
    ours.runs.update(decode_tok_s=[30.0, 33.0], late_decode_tok_s=[20.0, 22.0])
    assert bench.evaluate_target(late, {"ours bf16": ours})["text"] == "1.50x (by round: 1.50, 1.50)"


def test_a_target_whose_peer_was_not_run_is_left_out():
    target = Target("vs llama.cpp", ["ours int4"], "decode_tok_s", "llama.cpp Q4_1", at_least=1.0)
    assert bench.evaluate_target(target, {"ours int4": result("ours int4", decode_tok_s=60.0)}) is None


def test_load_memory_budget_is_1_3_times_the_checkpoint_plus_300_mb():
    results = [EngineResult("ours int4", 1.0, load_rss_mb=689.0, first_call_s=0.1),
               EngineResult("ours bf16", 1.0, load_rss_mb=691.0, first_call_s=0.1),
               EngineResult("HF bf16", 1.0, load_rss_mb=9999.0, first_call_s=0.1)]
    verdicts = bench.evaluate_load_memory(results, checkpoint_size_mb=300.0)  # budget: 1.3 x 300 + 300 = 690 MB
    assert [(v["ours"], v["met"]) for v in verdicts] == [("ours int4", True), ("ours bf16", False)]


def test_every_engine_gets_the_same_prompts_of_ordinary_tokens():
    timing = Timing(batch=3, prompt_len=40, new_tokens=1)
    prompts = bench.prompts_for(timing, vocab_size=1000)
    assert prompts == bench.prompts_for(timing, vocab_size=1000)
    assert [len(p) for p in prompts] == [40, 40, 40]
    assert all(bench.FIRST_ORDINARY_TOKEN <= t < 1000 for p in prompts for t in p)


def test_unknown_configuration_and_missing_json_directory_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="unknown configuration.*int3"):
        bench.main(["--ours", "int3", "--peers", ""])
    with pytest.raises(SystemExit, match="--json .* does not exist"):
        bench.main(["--peers", "", "--json", str(tmp_path / "no" / "such" / "dir.json")])


def test_threads_are_checked_as_inference_pys_are():
    for bad in ("0", str(os.cpu_count() + 1)):
        with pytest.raises(SystemExit, match="^error: --threads must be an integer from 1 to "):
            bench.main(["--threads", bad, "--peers", ""])
    assert bench.parse_args([]).threads is None  # then cpu.choose_threads(None): inference.py's default


def test_compile_alone_benchmarks_the_compiled_default():
    args = bench.parse_args(["--compile", "--peers", ""])
    assert [spec.name for spec in bench.chosen_specs(args)] == ["ours default compile"]
    assert bench.OUR_CONFIGS["default"].dtype is None  # the engine chooses, as `python inference.py` does


AVX2_CPU = CpuFeatures(name="x86_64: AVX2, made up", native_bf16=False, int8_dot=False)
VNNI_CPU = CpuFeatures(name="x86_64: AVX512 (avx512_vnni), made up", native_bf16=False, int8_dot=True)


def test_a_configuration_this_cpu_refuses_is_skipped_with_a_note_unless_named(capsys):
    # w8a8 without int8 dot products (an AVX2 CPU): the default list goes on without it ...
    every = list(bench.OUR_CONFIGS.values())
    kept = bench.runnable_here(every, named=False, features=AVX2_CPU)
    assert [spec.name for spec in kept] == [spec.name for spec in every if spec.quantize != "w8a8"]
    assert "note: ours w8a8 is skipped on this CPU: --quantize w8a8 needs a CPU with int8 dot-product" in capsys.readouterr().err
    assert bench.runnable_here(every, named=False, features=VNNI_CPU) == every
    # ... and asking for it by name is a one-line error naming what to use instead.
    with pytest.raises(SystemExit, match="^error: --quantize w8a8 needs .* use --quantize int8$"):
        bench.runnable_here([bench.OUR_CONFIGS["w8a8"]], named=True, features=AVX2_CPU)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return write_tiny_llama2_checkpoint(tmp_path_factory.mktemp("tiny"), LLAMA2_TOKENIZER)


def test_a_whole_measurement_of_our_engine_runs_in_its_worker_process(tiny_ckpt):
    """Every metric of the table and the speculative section, through the real worker protocol (a
    subprocess per engine), on a tiny model: each comes back as a positive rate, memory as a positive
    number of MB, and the drafts as counts."""
    run = bench.SpeculativeRun(prompt=[1] + [400, 500, 600] * 5, speculate=3, new_tokens=8)
    [measured] = bench.measure([bench.OUR_CONFIGS["int8"]], {"ckpt_dir": tiny_ckpt}, threads=1, repeats=1,
                               vocab_size=LLAMA2_VOCAB_SIZE, speculative=run)
    assert measured.name == "ours int8"
    assert set(measured.metrics) == {m.key for m in bench.METRICS}
    assert all(rate > 0 for rate in measured.metrics.values()), measured.metrics
    assert set(measured.speculative) == {*bench.COPY_KEYS.values(), "drafted", "accepted"}
    assert all(measured.speculative[key] > 0 for key in bench.COPY_KEYS.values())
    assert measured.speculative["drafted"] >= measured.speculative["accepted"] >= 0
    assert measured.load_rss_mb > 0 and measured.peak_rss_mb >= measured.load_rss_mb
    json.dumps(measured.__dict__)  # what --json writes


def test_the_speculative_section_is_its_own_table_of_plain_and_speculative_rates():
    ours = result("ours bf16")
    ours.speculative = {"plain_copy_tok_s": 40.0, "speculative_copy_tok_s": 100.0, "drafted": 120, "accepted": 90}
    peer = result("HF bf16")
    peer.speculative = {"plain_copy_tok_s": 25.0, "speculative_copy_tok_s": 50.0}
    section = bench.format_speculative([ours, result("llama.cpp Q4_1"), peer], bench.SpeculativeRun([1] * 200, 10))
    lines = section.splitlines()
    assert "up to 10 drafts" in lines[0] and "200-token prompt" in lines[0]
    assert [line.split("|")[1].strip() for line in lines[4:]] == ["ours bf16", "HF bf16"]  # llama.cpp did not run it
    assert "| 2.50x" in lines[4] and "90/120 (75%)" in lines[4]
    assert "| 2.00x" in lines[5] and "n/a" in lines[5]


# --------------------------------------------------------------------------------------------
# bench_batching.py
# --------------------------------------------------------------------------------------------


def test_the_batching_workload_has_mixed_lengths_within_the_issues_bounds_and_is_seeded(demo_ckpt):
    import bench_batching as bb
    from inference import LLaMa

    llama = LLaMa.build(demo_ckpt, load_model=False)
    jobs = bb.make_workload(llama, 64, bb.WORKLOAD_SEED)
    assert [j.prompt_tokens for j in jobs] == [j.prompt_tokens for j in bb.make_workload(llama, 64, bb.WORKLOAD_SEED)]
    lengths = [len(j.prompt_tokens) for j in jobs]
    assert max(lengths) <= bb.MAX_PROMPT_TOKENS and max(lengths) > bb.MAX_PROMPT_TOKENS * 0.9
    assert min(lengths) < 64  # short ones too (the chat format's own tokens come first)
    assert all(bb.MIN_GEN_LEN <= j.max_gen_len <= bb.MAX_GEN_LEN for j in jobs)
    assert len({j.max_gen_len for j in jobs}) > 32
    assert jobs[0].prompt_tokens == llama.chat_format.encode_dialog_prompt([{"role": "user", "content": jobs[0].question}])


def test_the_batching_report_compares_throughputs_as_ratios_and_names_the_misses():
    import bench_batching as bb

    results = [bb.Result("ours continuous", tokens=600, seconds=10), bb.Result("ours static", tokens=600, seconds=20),
               bb.Result("HF generate", tokens=500, seconds=25), bb.Result("server (16 clients)", tokens=560,
                                                                           seconds=10, first_token_s=[1.0, 2.0, 3.0])]
    machine = {"cpu": "a CPU", "cpu_features": "x", "threads": 2, "load_average": (0.1, 0.1, 0.1)}
    jobs = [bb.Job("q", [1, 2, 3], 16)]
    text, targets = bb.report(results, jobs, machine)
    by_target = {t["target"]: t for t in targets}
    assert by_target["ours continuous >= 2.0x ours static"]["ratio"] == 2.0
    assert by_target["ours continuous >= 2.0x ours static"]["met"]
    assert by_target["ours continuous >= 3.0x HF generate"]["ratio"] == 3.0
    assert by_target["server >= 0.8x ours continuous"]["ratio"] == pytest.approx(56 / 60)
    assert "ours continuous compile" not in text  # not run: no target for it
    assert "2.00 / 3.00" in text  # median / p95 time to the first token
