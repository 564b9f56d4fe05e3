"""Issue 13: every bad input is a one-line error that names the culprit and what is expected.

One test per class of bad input, each over several inputs of that class, on the tiny random
checkpoint (tests/tiny.py) with the real Llama 2 tokenizer. Every message is checked to be one line.
"""

import json
import shutil

import pytest
import torch

from checkpoint import CheckpointError, load_model_args
from conftest import LLAMA2_TOKENIZER
from decoding import NonFiniteLogitsError, all_finite
from inference import LLaMa
from sampling import SamplingParams, logits_to_probs, sample
from tensor_parallel import TensorParallel, init_from_torchrun
from tiny import LLAMA2_VOCAB_SIZE, write_tiny_llama2_checkpoint
from tokenizer import InvalidTextError, Tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    yield write_tiny_llama2_checkpoint(root, LLAMA2_TOKENIZER)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def llama(ckpt):
    return LLaMa.build(ckpt, max_seq_len=64, max_batch_size=2, device="cpu", dtype="float32", progress=False)


@pytest.fixture(autouse=True)
def remove_copies(tmp_path):
    """Each test's broken copies (~16 MB each) are removed as soon as it ends."""
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


def one_line_error(error_type, call, *fragments: str) -> str:
    """The message of the error `call()` raises: of `error_type`, one line, holding every fragment."""
    with pytest.raises(error_type) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def copy_with(ckpt, tmp_path, params=None, edit_state=None):
    """A copy of the checkpoint with params.json keys replaced, and/or its state dict edited."""
    out = tmp_path / "broken"
    shutil.copytree(ckpt, out)
    if params is not None:
        path = out / "params.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **params}))
    if edit_state is not None:
        state = torch.load(out / "consolidated.00.pth", weights_only=True)
        edit_state(state)
        torch.save(state, out / "consolidated.00.pth")
    return out


# -- 1. params.json: every key against its type ----------------------------------------------

@pytest.mark.parametrize("params, fragments", [
    (dict(dim=64.5), ["dim is 64.5, expected an integer"]),
    (dict(n_layers="2"), ['n_layers is "2", expected an integer']),
    (dict(n_heads=None), ["n_heads is null, expected an integer"]),
    (dict(norm_eps="tiny"), ['norm_eps is "tiny", expected a number']),
    (dict(rope_theta=None), ["rope_theta is null, expected a number"]),
    (dict(multiple_of=True), ["multiple_of is true, expected an integer"]),
    (dict(use_scaled_rope=1), ["use_scaled_rope is 1, expected true or false"]),
    (dict(ffn_dim_multiplier="1.3"), ['ffn_dim_multiplier is "1.3", expected a number or null']),
    (dict(rope_scaling=[1]), ["rope_scaling is [1], expected an object or null"]),
    (dict(use_scaled_rope=True, rope_scaling={"factor": "8"}), ['rope_scaling: factor is "8", expected a number']),
    (dict(use_scaled_rope=True, rope_scaling={"factr": 8.0}), ["rope_scaling: unknown key(s) ['factr']"]),
])
def test_params_json_values_of_the_wrong_type_name_key_value_and_type(ckpt, tmp_path, params, fragments):
    broken = copy_with(ckpt, tmp_path, params=params)
    one_line_error(CheckpointError, lambda: LLaMa.build(broken, device="cpu", progress=False), "params.json", *fragments)


def test_null_where_params_json_allows_it_means_the_default(ckpt, tmp_path):
    broken = copy_with(ckpt, tmp_path, params=dict(ffn_dim_multiplier=None, rope_scaling=None))
    assert load_model_args(broken, 16, 1).ffn_dim_multiplier is None


# -- 2. checkpoint entries that are not tensors ----------------------------------------------

class RunsCode:
    """A pickle that would call print() if loaded without weights_only."""

    def __reduce__(self):
        return (print, ("this must never be printed",))


def test_an_entry_that_is_not_a_tensor_names_file_and_key(ckpt, tmp_path):
    broken = copy_with(ckpt, tmp_path, edit_state=lambda s: s.__setitem__("norm.weight", [1.0, 2.0]))
    one_line_error(CheckpointError, lambda: LLaMa.build(broken, device="cpu", progress=False),
                   "consolidated.00.pth", "'norm.weight' holds a list, expected a tensor")


def test_a_pickle_with_objects_is_refused_in_one_line_without_advice_to_disable_the_protection(ckpt, tmp_path, capsys):
    broken = copy_with(ckpt, tmp_path, edit_state=lambda s: s.__setitem__("norm.weight", RunsCode()))
    message = one_line_error(CheckpointError, lambda: LLaMa.build(broken, device="cpu", progress=False),
                             "consolidated.00.pth contains objects other than tensors",
                             "will not be loaded, because loading it could run code")
    assert "weights_only" not in message
    assert "must never be printed" not in capsys.readouterr().out


# -- 3. non-finite logits ------------------------------------------------------------------

@pytest.mark.parametrize("dtype, advice", [("float32", "its weights hold NaN/inf"),
                                           ("float16", "--dtype bfloat16")])
@pytest.mark.parametrize("temperature", [0, 0.8])
def test_nan_weights_stop_decoding_with_the_first_bad_layer(ckpt, tmp_path, dtype, advice, temperature):
    def poison(state):
        state["layers.1.ffn_norm.weight"][0] = float("nan")

    broken = copy_with(ckpt, tmp_path, edit_state=poison)
    llama = LLaMa.build(broken, max_seq_len=32, max_batch_size=1, device="cpu", dtype=dtype, progress=False)
    sampling = SamplingParams(temperature=temperature, seed=0)
    for call in (lambda: llama.text_completion(["Hello"], temperature=temperature, max_gen_len=4, seed=0),
                 lambda: list(llama.stream("Hello", 4, sampling))):
        one_line_error(NonFiniteLogitsError, call, "the checkpoint produced NaN/inf logits", "layer 1", dtype, advice)


def test_a_column_of_inf_logits_is_caught_before_sampling(llama, monkeypatch):
    """Non-finite logits that appear only while decoding (not in the prefill) are caught too."""
    real_step = llama.decode_step

    def step_that_overflows(model, tokens, start_pos, pad_lens):
        return torch.full_like(real_step(model, tokens, start_pos, pad_lens), float("inf"))

    monkeypatch.setattr(llama, "decode_step", step_that_overflows)
    one_line_error(NonFiniteLogitsError, lambda: llama.generate([[1, 15043]], 4, SamplingParams(temperature=0)),
                   "at position 3")


# -- 4. extreme sampling values ------------------------------------------------------------

def test_a_tiny_temperature_is_greedy():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0 - 1e-6], [0.5, -2.0, 0.25, 0.0]])
    for temperature in (1e-300, 1e-45, 1e-30, 1e-8):
        probs = logits_to_probs(logits, temperature)
        assert torch.isfinite(probs).all()
        assert probs.argmax(-1).tolist() == logits.argmax(-1).tolist()
        drawn = sample(logits, SamplingParams(temperature=temperature, top_p=1.0), generator=torch.Generator().manual_seed(0))
        assert drawn.tolist() == logits.argmax(-1).tolist()


def test_a_tiny_temperature_generates_the_greedy_text(llama):
    greedy = llama.text_completion(["Hello, my name is"], temperature=0, max_gen_len=6)
    assert llama.text_completion(["Hello, my name is"], temperature=1e-300, max_gen_len=6, seed=0) == greedy


@pytest.mark.parametrize("knobs, fragments", [
    (dict(repetition_penalty=1e-300), ["repetition_penalty must be a number from 0.01 to 100", "1e-300"]),
    (dict(repetition_penalty=1e300), ["repetition_penalty must be a number from 0.01 to 100"]),
    (dict(seed=2**64), ["seed must be an integer from -2**63 to 2**64 - 1", str(2**64)]),
    (dict(seed=-(2**63) - 1), ["seed must be an integer from -2**63 to 2**64 - 1"]),
    (dict(temperature=float("inf")), ["temperature must be a number >= 0"]),
])
def test_sampling_values_outside_their_range_give_the_range(knobs, fragments):
    one_line_error(ValueError, lambda: SamplingParams(**knobs), *fragments)


def test_the_edges_of_the_ranges_are_accepted(llama):
    for knobs in (dict(seed=2**64 - 1), dict(seed=-(2**63)), dict(repetition_penalty=0.01), dict(repetition_penalty=100)):
        llama.generate([[1, 15043]], 2, SamplingParams(temperature=0.7, **knobs))


# -- 5. token ids outside the vocabulary ---------------------------------------------------

@pytest.mark.parametrize("bad", [-1, LLAMA2_VOCAB_SIZE, 10**12, 2.0, True, "5"])
def test_token_ids_outside_the_vocabulary_name_prompt_and_id(llama, bad):
    expected = [f"token id {bad!r} at position 1 is not in the vocabulary", f"0 to {LLAMA2_VOCAB_SIZE - 1}"]
    one_line_error(ValueError, lambda: llama.generate([[1, 15043], [1, bad]], 2), "prompt 1:", *expected)
    one_line_error(ValueError, lambda: list(llama.stream([1, bad], 2)), "prompt 0:", *expected)
    one_line_error(ValueError, lambda: llama.decode([[1, bad]], 2), "prompt 0:", *expected)


# -- 6. LLaMa.build's arguments --------------------------------------------------------------

@pytest.mark.parametrize("kwargs, start", [
    (dict(max_seq_len=0), "max_seq_len must be an integer >= 1, got 0"),
    (dict(max_seq_len=-5), "max_seq_len must be an integer >= 1, got -5"),
    (dict(max_seq_len="64"), "max_seq_len must be an integer >= 1, got '64'"),
    (dict(max_batch_size=0), "max_batch_size must be an integer >= 1, got 0"),
    (dict(max_batch_size=2.0), "max_batch_size must be an integer >= 1, got 2.0"),
    (dict(max_batch_size=True), "max_batch_size must be an integer >= 1, got True"),
])
def test_build_sizes_are_named_by_their_argument(ckpt, kwargs, start):
    message = one_line_error(ValueError, lambda: LLaMa.build(ckpt, device="cpu", progress=False, **kwargs))
    assert message.startswith(start) and "params.json" not in message
    # load_model_args (inspect_checkpoint.py, tensor_parallel.py) says the same
    sizes = {"max_seq_len": 16, "max_batch_size": 1, **kwargs}
    assert str(pytest.raises(ValueError, load_model_args, ckpt, sizes["max_seq_len"], sizes["max_batch_size"]).value) == message


@pytest.mark.parametrize("kwargs, start", [
    (dict(ckpt_dir=3), "ckpt_dir must be a path (str or pathlib.Path), got int 3"),
    (dict(tokenizer_path=7), "tokenizer_path must be a path (str or pathlib.Path) or None, got int 7"),
    (dict(progress="yes"), "progress must be True or False, got 'yes'"),
    (dict(load_model=1), "load_model must be True or False, got 1"),
    (dict(compile=None), "compile must be True or False, got None"),
])
def test_build_arguments_of_the_wrong_type_are_named(ckpt, kwargs, start):
    kwargs = {"ckpt_dir": ckpt, "device": "cpu", **kwargs}
    message = one_line_error(TypeError, lambda: LLaMa.build(**kwargs))
    assert message.startswith(start)


# -- 7. text that is not valid Unicode -------------------------------------------------------

def test_a_prompt_with_a_lone_surrogate_is_named(llama):
    what = ["is '\\udcff', a lone surrogate that UTF-8 cannot encode"]
    one_line_error(InvalidTextError, lambda: llama.text_completion(["fine", "caf\udcff"], max_gen_len=2), "prompt 1:", *what)
    one_line_error(InvalidTextError, lambda: list(llama.stream("caf\udcff", 2)), "prompt:", "character 3", *what)
    one_line_error(InvalidTextError, lambda: llama.encode_prompts(["\ud800"]), "prompt 0:")
    one_line_error(InvalidTextError, lambda: Tokenizer(LLAMA2_TOKENIZER).encode("\udcff", bos=False, eos=False), *what)


# -- 8. torchrun: what can be checked before the process group joins ---------------------------

@pytest.mark.parametrize("env, fragment", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' in the environment is not a count"),
    ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK='-1' in the environment is not a count"),
    ({"WORLD_SIZE": "2"}, "RANK is not set: start several processes with torchrun"),
])
def test_torchrun_environment_errors_name_the_variable(monkeypatch, env, fragment):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    one_line_error(ValueError, lambda: init_from_torchrun("cpu"), fragment)


def test_a_world_size_that_does_not_divide_n_kv_heads_fails_even_without_loading_weights(ckpt):
    tp = TensorParallel(rank=0, world_size=4, device=torch.device("cpu"))
    one_line_error(ValueError, lambda: LLaMa.build(ckpt, load_model=False, tensor_parallel=tp, progress=False),
                   "world size 4 does not divide n_kv_heads=2", "use a world size (nodes x --nproc_per_node) in [1, 2]")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_finite_logits_check_catches_any_nan_or_infinity_and_never_a_finite_extreme(dtype):
    largest = torch.finfo(dtype).max
    assert all_finite(torch.full((8, 49152), largest, dtype=dtype))  # no overflow of the float64 sum
    assert all_finite(torch.full((8, 49152), -largest, dtype=dtype))
    for bad in ([float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("-inf")]):
        logits = torch.randn(8, 49152).to(dtype)
        logits[3, 100 : 100 + len(bad)] = torch.tensor(bad, dtype=dtype)
        assert not all_finite(logits), bad
