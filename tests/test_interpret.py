"""interpret.py against independent references and invariants.

- Stepwise compute (embed, block by block, head), over every split of the layers into ranges and
  from a 2-shard checkpoint, gives exactly the full model's logits.
- Hidden states and attention weights equal Hugging Face's `output_hidden_states` and eager
  `output_attentions` on the same weights: a tiny random Llama (tests/tiny.py) and SmolLM2.
- Integrated gradients are complete (scores sum to F(input) - F(baseline)); gradient x input
  equals a finite-difference derivative; the logit lens at the last layer is the model's own
  next-token distribution; "why" draws the same tokens as `text_completion` with the same seed,
  and its top-p cut equals Hugging Face's TopPLogitsWarper.
- Bad input is a clear error, in Python and on the command line.
"""

import itertools
import struct
import os
import sys

import pytest
import torch

import interpret
from checkpoint import CheckpointError, load_model_args, load_transformer
from conftest import LLAMA2_TOKENIZER
from inference import LLaMa
from sampling import SamplingParams
from interpret import (
    LayerLoader,
    apply_head,
    embed,
    gradient_x_input,
    integrated_gradients,
    logit_lens,
    lens_probs,
    positions_for,
    run_block,
    streamed_logits,
    trace,
    why,
)
from test_checkpoint import copy_split
from tiny import LLAMA2_VOCAB_SIZE, TINY, hf_model, meta_state_dict, write_checkpoint

transformers = pytest.importorskip("transformers")

# Three layers, so that the layers can be split into ranges in four ways; grouped-query attention.
TINY3 = {**TINY, "n_layers": 3}
TEXT = "The quick brown fox jumps over the lazy dog"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF model, checkpoint dir) with the same random weights; params.json says vocab_size -1."""
    hf = hf_model(TINY3, LLAMA2_VOCAB_SIZE)
    ckpt = write_checkpoint(tmp_path_factory.mktemp("tiny3"), meta_state_dict(hf, TINY3),
                            {**TINY3, "vocab_size": -1}, LLAMA2_TOKENIZER)
    return hf, ckpt


@pytest.fixture(scope="module")
def llama(tiny):
    return LLaMa.build(tiny[1], max_seq_len=64, max_batch_size=1, device="cpu", dtype="float32", progress=False)


@pytest.fixture(scope="module")
def ids(llama):
    return llama.tokenizer.encode(TEXT, bos=True, eos=False)


def compositions(n: int) -> list[list[range]]:
    """Every way to cut layers 0..n-1 into consecutive non-empty ranges."""
    result = []
    for cuts in itertools.product([False, True], repeat=n - 1):
        ranges, start = [], 0
        for i, cut in enumerate(cuts, start=1):
            if cut:
                ranges.append(range(start, i))
                start = i
        result.append(ranges + [range(start, n)])
    return result


def run_in_ranges(ckpt, tokens: torch.Tensor, ranges: list[range]) -> torch.Tensor:
    """Embed, then each range of blocks loaded alone (the others unloaded), then the head."""
    loader = LayerLoader(ckpt, device="cpu", dtype="float32", max_seq_len=tokens.shape[1])
    loader.load(embedding=True)
    h = embed(loader.model, tokens)
    loader.unload(embedding=True)
    positions = positions_for(loader.model, tokens.shape[1], h.device, h.dtype)
    for layers in ranges:
        loader.load(layers=layers)
        assert loader.loaded_pieces() == [f"layers.{i}" for i in layers]  # nothing else is in memory
        for i in layers:
            h = run_block(loader.model, i, h, positions)
        loader.unload(layers=layers)
    loader.load(head=True)
    return apply_head(loader.model, h)


# --------------------------------------------------------------------------------------------
# Layer-range loading and stepwise compute
# --------------------------------------------------------------------------------------------


def test_stepwise_over_every_layer_range_equals_the_full_forward(tiny, llama, ids):
    tokens = torch.tensor([ids])
    expected = llama.model(tokens, start_pos=0)
    splits = compositions(TINY3["n_layers"])
    assert len(splits) == 4
    for ranges in splits:
        torch.testing.assert_close(run_in_ranges(tiny[1], tokens, ranges), expected, rtol=0, atol=0)
    torch.testing.assert_close(interpret.stepwise_logits(llama.model, tokens), expected, rtol=0, atol=0)


@pytest.mark.parametrize("embedding_dim", [1, 0], ids=["llama2-embedding-on-model-dim", "llama3-embedding-on-vocab"])
def test_two_shard_checkpoint_streams_to_the_same_logits(tiny, llama, ids, tmp_path, embedding_dim):
    two = copy_split(tiny[1], tmp_path / "two", 2, embedding_dim)
    tokens = torch.tensor([ids])
    expected = llama.model(tokens, start_pos=0)
    for layers_per_step in (1, 2):
        got = streamed_logits(two, tokens, layers_per_step, device="cpu", dtype="float32")
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert LayerLoader(two, device="cpu").checkpoint.n_shards == 2  # read through the one sharded reader


def test_loader_fills_only_the_pieces_asked_for_with_the_checkpoints_tensors(tiny):
    loader = LayerLoader(tiny[1], device="cpu", dtype="float32")
    assert loader.loaded_pieces() == []
    loader.load(layers=[1])
    assert loader.loaded_pieces() == ["layers.1"]
    saved = torch.load(tiny[1] / "consolidated.00.pth", weights_only=True)
    for name, tensor in loader.model.layers[1].state_dict().items():
        torch.testing.assert_close(tensor, saved[f"layers.1.{name}"], rtol=0, atol=0)
    assert all(p.is_meta for p in loader.model.layers[0].parameters())
    assert loader.args.vocab_size == LLAMA2_VOCAB_SIZE  # params.json's -1, resolved from the weights
    loader.unload(layers=[1])
    assert loader.loaded_pieces() == []
    with pytest.raises(ValueError, match=r"layers\.1 is not loaded"):
        run_block(loader.model, 1, torch.zeros(1, 2, TINY3["dim"]), positions_for(loader.model, 2, torch.device("cpu"), torch.float32))


# --------------------------------------------------------------------------------------------
# Hidden states and attention against Hugging Face
# --------------------------------------------------------------------------------------------


def assert_trace_matches_hf(hf, our_trace, model, tokens, atol):
    """HF's hidden_states: the embeddings, then after each layer, but the *last* one after the final
    norm (transformers applies model.norm before recording it); ours stay before the norm."""
    with torch.no_grad():
        out = hf(torch.tensor([tokens]), output_hidden_states=True, output_attentions=True)
    n_layers = len(out.attentions)
    assert our_trace.hidden.shape[0] == n_layers + 1
    for i in range(n_layers):
        torch.testing.assert_close(our_trace.hidden[i], out.hidden_states[i][0], rtol=1e-4, atol=atol)
        torch.testing.assert_close(our_trace.attention[i], out.attentions[i][0], rtol=1e-4, atol=atol)
    with torch.no_grad():
        torch.testing.assert_close(model.norm(our_trace.hidden[-1]), out.hidden_states[-1][0], rtol=1e-4, atol=atol)
    torch.testing.assert_close(our_trace.logits, out.logits[0], rtol=1e-4, atol=atol)


def test_hidden_states_and_attention_equal_hugging_face(tiny, llama, ids):
    hf, _ = tiny
    assert hf.config._attn_implementation == "eager"  # the only HF path that returns attention weights
    our_trace = trace(llama.model, ids)
    assert our_trace.attention.shape == (TINY3["n_layers"], TINY3["n_heads"], len(ids), len(ids))
    torch.testing.assert_close(our_trace.attention.sum(-1), torch.ones(our_trace.attention.shape[:-1]))
    assert_trace_matches_hf(hf, our_trace, llama.model, ids, atol=1e-5)
    # The written-out pass and model.forward agree (the full model reads keys from its KV cache).
    torch.testing.assert_close(our_trace.logits, llama.model(torch.tensor([ids]), start_pos=0)[0], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Logit lens, attribution
# --------------------------------------------------------------------------------------------


def test_logit_lens_at_the_last_layer_is_the_models_next_token_distribution(llama, ids):
    own = torch.softmax(llama.model(torch.tensor([ids]), start_pos=0)[0], dim=-1)  # (T, V)
    for position in (-1, 3):
        probs = lens_probs(llama.model, ids, position)
        assert probs.shape == (TINY3["n_layers"] + 1, LLAMA2_VOCAB_SIZE)
        torch.testing.assert_close(probs[-1], own[position], rtol=1e-5, atol=1e-6)
    rows = logit_lens(llama.model, ids, k=3)
    assert [r.layer for r in rows] == list(range(TINY3["n_layers"] + 1))
    assert rows[-1].token_ids == torch.topk(own[-1], 3).indices.tolist()


def test_gradient_x_input_equals_a_finite_difference_derivative(llama, ids):
    """Score of token t = d/de F(x + e * x_t) at e = 0: scale only token t's embedding, central differences."""
    model, target, position = llama.model, 1000, len(ids) - 1
    result = gradient_x_input(model, ids, target)
    x = interpret.input_embeddings(model, ids)
    step = 1e-2
    for t in range(len(ids)):
        direction = torch.zeros_like(x)
        direction[0, t] = x[0, t]
        with torch.no_grad():
            up, down = interpret.target_logit(model, torch.cat([x + step * direction, x - step * direction]), position, target)
        finite_difference = float(up - down) / (2 * step)
        assert result.scores[t].item() == pytest.approx(finite_difference, rel=2e-3, abs=2e-4), t
    assert result.scores.sum().item() != 0.0


def test_integrated_gradients_are_complete_and_converge(llama, ids):
    """Midpoint sums converge as 1/steps^2 on a smooth path. A random model's mean embedding is
    near the origin, where RMSNorm is singular, so the baseline here is the EOS token's embedding."""
    target, x = 1000, interpret.input_embeddings(llama.model, ids)
    baseline = interpret.token_baseline(llama.model, x, llama.tokenizer.eos_id)
    errors = [integrated_gradients(llama.model, ids, target, steps=n, baseline=baseline).completeness_error
              for n in (4, 16)]
    assert errors[1] < 1e-3  # the scores sum to F(input) - F(baseline)
    assert errors[1] < errors[0]
    result = integrated_gradients(llama.model, ids, target, steps=16, baseline=baseline)
    assert result.scores[0] == 0.0  # the first token is kept in the baseline: nothing to attribute
    logits = llama.model(torch.tensor([ids]), start_pos=0)[0, -1]
    assert result.logit == pytest.approx(float(logits[target]), abs=1e-4)
    with torch.no_grad():
        baseline_logits = llama.model.output(llama.model.norm(interpret.residual_stream(
            llama.model, baseline, positions_for(llama.model, len(ids), x.device, x.dtype))[0][-1]))
    assert result.baseline_logit == pytest.approx(float(baseline_logits[0, -1, target]), abs=1e-4)


def test_integrated_gradients_with_any_baseline(llama, ids):
    x = interpret.input_embeddings(llama.model, ids)
    result = integrated_gradients(llama.model, ids, 1000, steps=16, baseline=torch.full_like(x, 0.5))
    assert result.completeness_error < 1e-3
    assert result.scores[0] != 0.0  # this baseline differs from the input at every position


# --------------------------------------------------------------------------------------------
# Why this token
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("params, seed", [
    (SamplingParams(temperature=0.0), None),
    (SamplingParams(temperature=0.8, top_p=0.9), 3),
    (SamplingParams(temperature=1.3, top_p=0.5), 11),
    (SamplingParams(temperature=1.0, top_p=0.95, top_k=5, repetition_penalty=1.3), 5),
], ids=["greedy", "t0.8-p0.9", "t1.3-p0.5", "top-k-and-penalty"])
def test_why_draws_the_same_tokens_as_text_completion(llama, params, seed):
    (expected,), _ = llama.text_completion([TEXT], temperature=params.temperature, top_p=params.top_p,
                                           top_k=params.top_k, repetition_penalty=params.repetition_penalty,
                                           max_gen_len=6, seed=seed)
    steps = why(llama, llama.tokenizer.encode(TEXT, bos=True, eos=False), llama.tokenizer.stop_tokens,
                max_gen_len=6, params=params, show=4, seed=seed)
    assert [s.chosen for s in steps][: len(expected)] == expected
    for step in steps:
        chosen = [c for c in step.candidates if c.token == step.chosen]
        assert len(chosen) == 1 and chosen[0].cut is None and chosen[0].prob_final > 0
        if params.greedy:  # nothing is cut; the argmax gets all the mass
            assert not any(c.cut for c in step.candidates) and chosen[0].prob_final == 1.0


def test_why_distributions_equal_hugging_face_logits_processors(llama):
    """Every column of `why`, and what top-k and top-p cut, equal HF's processors chained in
    generate's order: RepetitionPenalty, Temperature, TopK, TopP (an independent implementation)."""
    params = SamplingParams(temperature=0.7, top_p=0.8, top_k=6, repetition_penalty=1.2)
    ids = llama.tokenizer.encode(TEXT, bos=True, eos=False)
    (step,) = why(llama, ids, set(), max_gen_len=1, params=params, show=12, seed=0)
    logits = llama.model(torch.tensor([ids]), start_pos=0, last_only=True)[:, -1]  # as generate computes them
    prompt = torch.tensor([ids])
    penalized = transformers.RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(prompt, logits.clone())
    tempered = transformers.TemperatureLogitsWarper(params.temperature)(prompt, penalized)
    top_k = transformers.TopKLogitsWarper(params.top_k)(prompt, tempered)
    top_p = transformers.TopPLogitsWarper(params.top_p)(prompt, top_k.clone())
    shaped, final = torch.softmax(top_k, dim=-1)[0], torch.softmax(top_p, dim=-1)[0]
    assert step.kept == int((final > 0).sum())
    cuts = set()
    for c in step.candidates:
        assert c.prob == pytest.approx(float(torch.softmax(logits[0], -1)[c.token]), abs=1e-6)
        assert c.prob_shaped == pytest.approx(float(shaped[c.token]), abs=1e-6)
        assert c.prob_final == pytest.approx(float(final[c.token]), abs=1e-6)
        expected_cut = "top-k" if shaped[c.token] == 0 else "top-p" if final[c.token] == 0 else None
        assert c.cut == expected_cut
        cuts.add(c.cut)
    assert cuts == {None, "top-k", "top-p"}  # this example exercises every case


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_attribution_on_a_prepacked_or_quantized_model_is_a_clear_error(tiny, ids):
    for kwargs in (dict(dtype="bfloat16"), dict(dtype="float32", quantize="int8")):
        fast = LLaMa.build(tiny[1], max_seq_len=64, max_batch_size=1, device="cpu", progress=False, **kwargs)
        if not any(isinstance(m, interpret.FAST_LINEAR_TYPES) for m in fast.model.modules()):
            continue  # no oneDNN bf16 kernels here: LLaMa.build kept nn.Linear
        with pytest.raises(ValueError, match=r"attribution needs gradients.*load_for_study"):
            gradient_x_input(fast.model, ids, 5)
    study = interpret.load_for_study(tiny[1], device="cpu", dtype="bfloat16", max_seq_len=64)
    assert gradient_x_input(study.model, ids, 5).scores.shape == (len(ids),)


def test_bad_input_is_a_clear_error(llama, ids, tiny):
    model = llama.model
    with pytest.raises(ValueError, match=r"layer 3 is out of range: this model has 3 layers, 0 \.\. 2"):
        interpret.attention_maps(model, ids, 3)
    with pytest.raises(ValueError, match=r"layer -1 is out of range"):
        LayerLoader(tiny[1], device="cpu", dtype="float32").load(layers=[-1])
    with pytest.raises(ValueError, match=r"target token id 32000 is not in the vocabulary \[0, 32000\)"):
        gradient_x_input(model, ids, LLAMA2_VOCAB_SIZE)
    with pytest.raises(ValueError, match=r"target token id -1"):
        integrated_gradients(model, ids, -1)
    with pytest.raises(ValueError, match=r"the text is 65 tokens, longer than max_seq_len=64"):
        trace(model, [1] * 65)
    with pytest.raises(ValueError, match=rf"position {len(ids)} is out of range for a text of {len(ids)} tokens"):
        logit_lens(model, ids, position=len(ids))
    with pytest.raises(ValueError, match=r"token ids \[32000\] are outside the vocabulary"):
        trace(model, [1, LLAMA2_VOCAB_SIZE])
    with pytest.raises(ValueError, match=r"no tokens"):
        trace(model, [])
    with pytest.raises(ValueError, match=r"baseline has shape"):
        integrated_gradients(model, ids, 5, baseline=torch.zeros(1, 2, 3))


def test_a_directory_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"params\.json is missing"):
        LayerLoader(tmp_path, device="cpu", dtype="float32")
    (tmp_path / "params.json").write_text('{"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 100}')
    with pytest.raises(CheckpointError, match=r"no consolidated\.\*\.pth files"):
        LayerLoader(tmp_path, device="cpu", dtype="float32")
    with pytest.raises(CheckpointError, match=r"does not exist"):
        LayerLoader(tmp_path / "nope", device="cpu", dtype="float32")


# --------------------------------------------------------------------------------------------
# Command line (on the tiny checkpoint; the demo model below)
# --------------------------------------------------------------------------------------------


def cli(capsys, *argv):
    code = interpret.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return struct.unpack(">II", data[16:24])  # IHDR: width, height


def test_cli_attention_writes_a_heatmap_png(tiny, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "attn.png"
    code, stdout, err = cli(capsys, "attention", "--ckpt-dir", str(tiny[1]), "--text", TEXT, "--layer", "1",
                            "--out", str(out), "--device", "cpu")
    assert code == 0, err
    width, height = png_size(out)
    assert width > 100 and height > 100
    assert "layer 1" in stdout and "'▁quick'" in stdout


def test_cli_every_command_runs_on_a_checkpoint(tiny, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    common = ["--ckpt-dir", str(tiny[1]), "--text", TEXT, "--device", "cpu"]
    code, out, err = cli(capsys, "hidden", *common, "--out", str(tmp_path / "h.pt"))
    assert code == 0, err
    assert out.splitlines()[2].startswith("embedding") and "block 2" in out
    assert torch.load(tmp_path / "h.pt")["hidden"].shape[0] == TINY3["n_layers"] + 1
    code, out, err = cli(capsys, "lens", *common, "--show", "2")
    assert code == 0 and "top 2" in out and "block 2" in out, err
    code, out, err = cli(capsys, "attribute", *common, "--target-id", "1000", "--steps", "8", "--out",
                         str(tmp_path / "a.png"))
    assert code == 0, err
    assert "completeness error" in out and "'▁quick'" in out
    png_size(tmp_path / "a.png")
    code, out, err = cli(capsys, "why", *common, "--temperature", "0.8", "--seed", "1", "--max-gen-len", "2",
                         "--top-k", "3", "--repetition-penalty", "1.1", "--show", "4")
    assert code == 0 and "p (penalty, temperature, top-k)" in out and "p (after top-p)" in out, err
    assert "cut by top-k" in out


@pytest.mark.parametrize("argv, message", [
    (["attention", "--layer", "7"], r"layer 7 is out of range: this model has 3 layers"),
    (["attention", "--layer", "0", "--head", "4"], r"head 4 is out of range: layer 0 has 4 heads"),
    (["attribute", "--target-id", "40000"], r"target token id 40000 is not in the vocabulary"),
    (["attribute", "--target", "quick brown"], r"--target 'quick brown' is 2 tokens \['▁quick', '▁brown'\]"),
    (["lens", "--text", "word " * 80], r"the text is \d+ tokens, longer than max_seq_len=64"),
    (["lens", "--text", ""], r"--text is empty"),
])
def test_cli_bad_input_is_one_clear_line(tiny, capsys, argv, message):
    code, _, err = cli(capsys, *argv, "--ckpt-dir", str(tiny[1]), "--max-seq-len", "64", "--device", "cpu")
    assert code == 2
    assert err.startswith("error: ") and "Traceback" not in err
    assert __import__("re").search(message, err), err


@pytest.mark.parametrize("command", [["hidden"], ["attention", "--layer", "0"]])
def test_cli_out_into_a_missing_directory_is_one_line_and_leaves_nothing(tiny, tmp_path, capsys, command):
    out = tmp_path / "no" / "such" / "file.png"
    code, _, err = cli(capsys, *command, "--ckpt-dir", str(tiny[1]), "--device", "cpu", "--out", str(out))
    assert code == 2 and err.count("\n") == 1 and f"its directory {out.parent} does not exist" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_out_is_written_atomically_with_the_usual_mode(tiny, tmp_path, capsys):
    out = tmp_path / "hidden.pt"
    code, _, _ = cli(capsys, "hidden", "--ckpt-dir", str(tiny[1]), "--device", "cpu", "--out", str(out))
    umask = os.umask(0)
    os.umask(umask)
    assert code == 0 and [p.name for p in tmp_path.iterdir()] == ["hidden.pt"]
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_cli_not_a_checkpoint_dir(tmp_path, capsys):
    code, _, err = cli(capsys, "hidden", "--ckpt-dir", str(tmp_path))
    assert code == 2 and "params.json is missing" in err


def test_missing_matplotlib_says_how_to_install_it(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    code, _, err = cli(capsys, "attention", "--ckpt-dir", str(tiny[1]), "--layer", "0", "--out", str(tmp_path / "x.png"))
    assert code == 2 and "pip install matplotlib" in err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(interpret.MissingDependencyError, match="pip install matplotlib"):
        interpret.save_attention_png(torch.zeros(1, 2, 2), ["a", "b"], tmp_path / "y.png", "t")


def test_every_command_has_help(capsys):
    for command in ("hidden", "attention", "lens", "attribute", "why"):
        with pytest.raises(SystemExit) as exit_info:
            interpret.parse_args([command, "--help"])
        assert exit_info.value.code == 0
        assert "--ckpt-dir" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# The demo model: SmolLM2-135M-Instruct, fp32, against Hugging Face on the same GGUF
# --------------------------------------------------------------------------------------------

SMOL_TEXT = "The capital of France is Paris. The capital of Germany is"
# SMOL_TEXT in SmolLM2's vocabulary (HF's tokenizer), so that these tests do not depend on ours.
SMOL_IDS = [504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282, 4521, 314]
SMOL_BERLIN = 11452  # " Berlin"
SMOL_PARIS = 7042  # " Paris"
SMOL_FRANCE = 4649  # " France"


@pytest.fixture(scope="module")
def smol(demo_ckpt):
    args = load_model_args(demo_ckpt, max_seq_len=64, max_batch_size=1)
    return load_transformer(demo_ckpt, args, torch.device("cpu"), torch.float32, progress=False)


@pytest.fixture
def hf_smol_eager(hf_smollm2):
    """conftest's shared HF SmolLM2, switched to eager attention (the only kind that returns
    attention weights) for one test, then switched back."""
    saved = hf_smollm2.config._attn_implementation
    hf_smollm2.set_attn_implementation("eager")
    yield hf_smollm2
    hf_smollm2.set_attn_implementation(saved)


def test_demo_hidden_states_and_attention_equal_hugging_face(smol, hf_smol_eager):
    our_trace = trace(smol, SMOL_IDS)
    # SmolLM2's residual stream reaches ~2e4 at the first position (a "massive activation"):
    # float32 noise there is ~1e-4 absolute (2e-7 relative); elsewhere the match is far closer.
    assert_trace_matches_hf(hf_smol_eager, our_trace, smol, SMOL_IDS, atol=1e-3)
    assert int(our_trace.logits[-1].argmax()) == SMOL_BERLIN


def test_demo_integrated_gradients_are_complete_with_the_default_baseline(smol):
    # "The capital of France is" -> " Paris". Measured: completeness error 0.46% at 32 steps,
    # 0.006% at 64; the 12-token example above needs the default 128 (0.09%; 64 gives 7%).
    result = integrated_gradients(smol, SMOL_IDS[:5], SMOL_PARIS, steps=32)
    assert result.completeness_error < 0.02
    assert int(result.scores.argmax()) == SMOL_IDS.index(SMOL_FRANCE)  # " France" matters most


def test_demo_cli_attention_with_the_issues_spelling(demo_ckpt, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "layer17.png"
    code, stdout, err = cli(capsys, "attention", "--ckpt-dir", str(demo_ckpt), "--text", SMOL_TEXT, "--layer", "17",
                            "--out", str(out))
    assert code == 0, err
    assert png_size(out)[0] > 300
    rows = {line.split("  ")[0]: line for line in stdout.splitlines()}
    assert "' Germany'" in rows and "' is'" in rows  # SmolLM2's tokens label the rows


def test_demo_logit_lens_ends_at_the_models_answer(smol):
    rows = logit_lens(smol, SMOL_IDS, k=2)
    assert len(rows) == 31 and rows[-1].token_ids[0] == SMOL_BERLIN
    assert rows[0].token_ids[0] == SMOL_IDS[-1]  # tied embeddings: the embedding reads back as itself


@pytest.mark.parametrize("labels", [["'Hi'"], ["'Hi'", "' there'"], [f"'t{i}'" for i in range(40)]])
def test_a_pictures_title_stays_inside_it_at_any_number_of_tokens(tmp_path, labels):
    """Figures are sized by their tokens; a title longer than the figure is wrapped, and the picture
    grows to hold every title and label, never cutting one off at its edges."""
    pytest.importorskip("matplotlib")
    from PIL import Image

    import interpret

    title = "attribution of ' Berlin' (id 11452) as the next token after position 11 (' is'), integrated gradients"
    path = interpret.save_attribution_png({"grad x input": torch.ones(len(labels))}, labels, tmp_path / "a.png", title)
    width, _ = Image.open(path).size
    plt = interpret.require_matplotlib()
    fig = plt.figure(dpi=interpret.PNG_DPI)
    lines = interpret.wrapped(title, interpret.MIN_FIGURE_WIDTH).splitlines()
    assert len(lines) > 1 or len(labels) > 20  # wrapped where the figure is narrow
    rendered = [fig.text(0, 0, line, fontsize=10) for line in lines]
    fig.canvas.draw()
    assert max(t.get_window_extent().width for t in rendered) <= width
    plt.close(fig)
