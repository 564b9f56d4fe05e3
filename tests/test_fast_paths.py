"""Every fast path of the engine against its reference path: same logits, same greedy tokens.

* fused attention (`F.scaled_dot_product_attention`, GQA in place, query heads folded in decode)
  against the explicit `model.scaled_dot_product_attention` (`ModelArgs.reference_attention`);
* last-position-only logits against the last row of all logits;
* decoding late in a long context (position ~2000, through the KV cache) against a full recompute;
* prepacked bf16 linear layers against `F.linear`; widened ones and those held in float16 (CPUs
  without native bf16) against a float64 product, and the float16 copy against the bf16 weights;
* the compiled decode step against the eager one, also beside speculative decoding's passes;
* RoPE in real numbers (what a compiled step runs) against its complex form.

Tiny random-weight models keep these fast; the compiled test compiles one small graph.
"""

import dataclasses
import gc
import platform

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import bf16_layers
import checkpoint
import cpu
import quantize
from checkpoint import load_model_args, load_transformer
from memory import release_file_pages
from cli import how_it_runs
from conftest import LLAMA2_TOKENIZER
from cpu import CpuFeatures, cpu_features
from inference import LLaMa
from model import ModelArgs, Transformer, apply_rotary_emb, apply_rotary_emb_real, precompute_freqs_cis
from bf16_layers import (WIDENED_ROWS, X86_MACHINES, HalfLinear, PackedLinear, WidenedLinear,
                         chunk_multiply, onednn_linear, onednn_linear_transposed, prepacking_helps,
                         widened_in_onednn)
from quantize import HALF, PREPACKED, WIDENED, linear_storage
from sampling import SamplingParams
from tiny import replay_prompt, write_tiny_llama2_checkpoint

VOCAB_SIZE = 256
SMALL = dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, vocab_size=VOCAB_SIZE)
FP32_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
# bf16 keeps 8 bits of mantissa: the fused kernel accumulates in float32, the reference rounds the
# (T, S) scores to bf16 first, so logits of size ~5 may differ by a few bf16 steps (2^-8 * 4 each).
BF16_TOLERANCE = dict(rtol=0.05, atol=0.15)


def twin_models(n_kv_heads: int, dtype=torch.float32, max_seq_len: int = 64, max_batch_size: int = 2):
    """(fast, reference): two Transformers with the same random weights, differing only in attention."""
    args = ModelArgs(**SMALL, n_kv_heads=n_kv_heads, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    torch.manual_seed(0)
    fast = Transformer(args)
    with torch.no_grad():
        for name, p in fast.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # not all ones: a norm applied wrongly must show
    reference = Transformer(dataclasses.replace(args, reference_attention=True))
    reference.load_state_dict(fast.state_dict(), strict=True)
    for model in (fast, reference):
        model.to(dtype)
        model.setup_caches(torch.device("cpu"), dtype)
    return fast.eval(), reference.eval()


def prefill_chunk_and_decode(model: Transformer, tokens: torch.Tensor, pad_lens=None) -> torch.Tensor:
    """Logits of every position, fed as a prefill, a second chunk after it, then one token at a time."""
    pieces = [model(tokens[:, :10], 0, pad_lens), model(tokens[:, 10:16], 10, pad_lens)]
    pieces += [model(tokens[:, pos:pos + 1], pos, pad_lens) for pos in range(16, tokens.shape[1])]
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["multi-head", "grouped-query", "multi-query"])
def test_fused_attention_equals_the_explicit_reference(n_kv_heads):
    fast, reference = twin_models(n_kv_heads)
    tokens = torch.randint(0, VOCAB_SIZE, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(prefill_chunk_and_decode(fast, tokens),
                               prefill_chunk_and_decode(reference, tokens), **FP32_TOLERANCE)


def test_fused_attention_equals_the_reference_on_a_left_padded_batch():
    fast, reference = twin_models(2)
    tokens = torch.randint(0, VOCAB_SIZE, (2, 22), generator=torch.Generator().manual_seed(2))
    pad_lens = torch.tensor([5, 0])
    torch.testing.assert_close(prefill_chunk_and_decode(fast, tokens, pad_lens),
                               prefill_chunk_and_decode(reference, tokens, pad_lens), **FP32_TOLERANCE)


def test_fused_attention_is_close_to_the_reference_in_bf16():
    fast, reference = twin_models(2, dtype=torch.bfloat16)
    tokens = torch.randint(0, VOCAB_SIZE, (2, 24), generator=torch.Generator().manual_seed(3))
    got, expected = prefill_chunk_and_decode(fast, tokens), prefill_chunk_and_decode(reference, tokens)
    torch.testing.assert_close(got, expected, **BF16_TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_in_real_numbers_equals_the_complex_rotation(dtype):
    """torch.compile runs `apply_rotary_emb_real` (Inductor has no complex numbers); eager runs the
    complex form. The same products in float32, so the same result up to float32 rounding, which
    the final rounding to bf16 absorbs almost always."""
    generator = torch.Generator().manual_seed(0)
    xq = torch.randn(2, 5, 4, 16, generator=generator).to(dtype)  # (B, T, H, D)
    xk = torch.randn(2, 5, 2, 16, generator=generator).to(dtype)  # (B, T, K, D)
    freqs_cis = precompute_freqs_cis(16, 4096, 10000.0)[4000:4005].unsqueeze(0)  # (1, T, D/2): late positions
    complex_q, complex_k = apply_rotary_emb(xq, xk, freqs_cis)
    real_q, real_k = apply_rotary_emb_real(xq, xk, freqs_cis)
    assert real_q.dtype == dtype and real_q.shape == xq.shape and real_k.shape == xk.shape
    one_bf16_step = dict(rtol=2 ** -7, atol=1e-6)
    tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else one_bf16_step
    torch.testing.assert_close(real_q, complex_q, **tolerance)
    torch.testing.assert_close(real_k, complex_k, **tolerance)


def test_last_only_gives_the_last_row_of_all_logits():
    fast, _ = twin_models(2)
    tokens = torch.randint(0, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(4))
    every = fast(tokens, 0)
    last = fast(tokens, 0, last_only=True)
    assert last.shape == (2, 1, VOCAB_SIZE)
    # Not bit-exact: a matmul over 1 row and over 12 rows may sum in different orders.
    torch.testing.assert_close(last, every[:, -1:], **FP32_TOLERANCE)


def test_decoding_at_position_2000_equals_a_full_recompute():
    context, steps = 2000, 4
    fast, _ = twin_models(2, max_seq_len=context + steps, max_batch_size=1)
    tokens = torch.randint(0, VOCAB_SIZE, (1, context + steps), generator=torch.Generator().manual_seed(5))
    fast(tokens[:, :context], 0, last_only=True)
    decoded = [fast(tokens[:, pos:pos + 1], pos) for pos in range(context, context + steps)]
    # From scratch: the whole sequence in one pass (it rewrites the cache from position 0).
    recomputed = fast(tokens, 0)[:, context:]
    torch.testing.assert_close(torch.cat(decoded, dim=1), recomputed, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not prepacking_helps(torch.device("cpu"), torch.bfloat16), reason="no oneDNN bf16 here")
@pytest.mark.parametrize("shape", [(1, 64), (8, 64), (2, 3, 64)], ids=["one-row", "batch-8", "3-d"])
def test_prepacked_linear_is_bit_exact_with_f_linear(shape):
    weight = torch.randn(96, 64, dtype=torch.bfloat16)
    x = torch.randn(shape, dtype=torch.bfloat16)
    torch.testing.assert_close(PackedLinear(weight)(x), F.linear(x, weight), rtol=0, atol=0)


@pytest.mark.skipif(not prepacking_helps(torch.device("cpu"), torch.bfloat16), reason="no oneDNN bf16 here")
def test_a_compiled_prepacked_layer_calls_its_packed_weight_through_the_operator_with_the_same_bits():
    # The packed weight is opaque to torch.compile: the graph calls our operator with the layer's
    # number, which multiplies by the very weight the eager layer uses, so the same bits.
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = PackedLinear(torch.randn(300, 64, dtype=torch.bfloat16))
    graphs = []

    def keep_graph(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    torch.compile(layer, backend=keep_graph, dynamic=False)(x)
    (graph,) = graphs
    called = {node.target for node in graph.graph.nodes if node.op == "call_function"}
    assert torch.ops.llama_from_scratch.packed_linear.default in called
    assert torch.ops.mkldnn._linear_pointwise.default not in called and F.linear not in called
    compiled = torch.compile(layer, dynamic=True)
    for rows in (1, 8, 11):
        x = torch.randn(rows, 1, 64, dtype=torch.bfloat16)
        assert torch.equal(compiled(x), layer(x)), rows


@pytest.mark.skipif(not prepacking_helps(torch.device("cpu"), torch.bfloat16), reason="no oneDNN bf16 here")
def test_packed_layers_are_found_by_their_number_and_forgotten_with_their_model():
    layer = PackedLinear(torch.randn(96, 64, dtype=torch.bfloat16))
    other = PackedLinear(torch.randn(96, 64, dtype=torch.bfloat16))
    assert layer.key != other.key and bf16_layers.PACKED_LAYERS[layer.key] is layer
    key = layer.key
    del layer
    gc.collect()
    assert key not in bf16_layers.PACKED_LAYERS  # a weak reference: the registry keeps no model alive


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return write_tiny_llama2_checkpoint(tmp_path_factory.mktemp("tiny"), LLAMA2_TOKENIZER)


@pytest.mark.skipif(linear_storage("cpu", torch.bfloat16) != PREPACKED,
                    reason="bf16 layers are not prepacked here (no oneDNN, or bf16 emulated: the widened tests below)")
def test_bf16_on_cpu_is_prepacked_by_default_and_gives_the_same_logits_as_nn_linear(tiny_ckpt):
    llama = LLaMa.build(tiny_ckpt, max_seq_len=64, device="cpu", dtype="bfloat16", progress=False)
    assert isinstance(llama.model.layers[0].attention.wqkv, PackedLinear)  # fused: wq|wk|wv
    assert isinstance(llama.model.output, PackedLinear)
    plain = load_transformer(tiny_ckpt, llama.args, torch.device("cpu"), torch.bfloat16, progress=False,
                             needs_gradients=True)  # gradients need nn.Linear: never prepacked
    assert isinstance(plain.layers[0].attention.wq, torch.nn.Linear)
    tokens = torch.tensor([llama.tokenizer.encode("Prepacked weights, same numbers", bos=True, eos=False)])
    packed_logits, plain_logits = llama.model(tokens, 0), plain(tokens, 0)
    # Both sum in float32 and round to bf16, but not always in the same order: where nn.Linear's
    # bf16 matmul and the prepacked weight run different oneDNN kernels (CPUs without native bf16,
    # e.g. at 2 threads) their K-blocking differs, and a sum that lands next to a rounding boundary
    # rounds to the neighbouring bf16 value. So: within one bf16 step (eps relative) everywhere.
    torch.testing.assert_close(packed_logits, plain_logits, rtol=torch.finfo(torch.bfloat16).eps,
                               atol=torch.finfo(torch.bfloat16).tiny)


class LinearDtypes(TorchFunctionMode):
    """Records, for every F.linear call and every call of oneDNN's linear operator made while it is
    active, the dtype of x (`seen`), whether oneDNN was switched on (`onednn`), which was called
    (`by`: "F.linear" or "oneDNN") and the rows of its first operand (`first_rows`: x's, or the
    weight's where the product is transposed)."""

    def __init__(self):
        super().__init__()
        self.seen, self.onednn, self.by, self.first_rows = [], [], [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear or func is torch.ops.mkldnn._linear_pointwise:
            self.seen.append(args[0].dtype)
            self.onednn.append(torch.backends.mkldnn.enabled)
            self.by.append("F.linear" if func is F.linear else "oneDNN")
            self.first_rows.append(args[0].shape[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bf16_in_onednn", [True, False], ids=["avx512-onednn-emulates-bf16", "avx2-pytorchs-own-loops"])
@pytest.mark.parametrize("rows", [1, 4, WIDENED_ROWS, 8, 11, 16, 24, 32, 100])
def test_widened_linear_multiplies_one_row_and_a_few_in_bf16_and_many_in_float32(
        rows, bf16_in_onednn, monkeypatch):
    # Whether PyTorch hands bf16 matmuls to oneDNN (its own test, as in prepacking_helps: AVX-512) or
    # multiplies them in its own loops (AVX2), a batch of 8 or 11 drafts is already widened; on x86
    # with AVX2 only, multiplied by oneDNN rather than F.linear (MKL).
    monkeypatch.setattr(bf16_layers, "prepacking_helps", lambda device, dtype: bf16_in_onednn)
    torch.manual_seed(0)
    weight = torch.randn(96, 64, dtype=torch.bfloat16)
    x = torch.randn(rows, 64, dtype=torch.bfloat16)
    layer = WidenedLinear(weight)
    assert layer.widen_from_rows == WIDENED_ROWS
    with LinearDtypes() as matmuls:
        y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 96)
    # Within one bf16 step of the float64 product: summed in float32, rounded once to bf16.
    exact, one_bf16_step = x.double() @ weight.double().T, dict(rtol=torch.finfo(torch.bfloat16).eps, atol=1e-6)
    if rows < WIDENED_ROWS:  # decoding one sequence, a small batch, or drafts: the bf16 matmul itself
        assert matmuls.seen == [torch.bfloat16] and matmuls.onednn == [True]
        torch.testing.assert_close(y, F.linear(x, weight), rtol=0, atol=0)
        torch.testing.assert_close(y.double(), exact, **one_bf16_step)
    else:  # prompts: in float32, the product rounded once to bf16
        assert matmuls.seen == [torch.float32]
        own_loops_on_x86 = not bf16_in_onednn and platform.machine() in X86_MACHINES
        assert matmuls.by == ["oneDNN" if own_loops_on_x86 else "F.linear"]
        # On AVX2, oneDNN multiplies 8, 16 or 24 rows as (W x^T)^T: the weight is its first operand.
        transposed = own_loops_on_x86 and rows in (8, 16, 24)
        assert matmuls.first_rows == [96 if transposed else rows]
        torch.testing.assert_close(y.double(), exact, **one_bf16_step)


@pytest.mark.parametrize("machine, bf16_in_onednn, expected", [
    ("x86_64", False, True),  # AVX2 (a Zen 3): MKL's float32 matmul measured 1.06-1.5x slower than oneDNN's
    ("AMD64", False, True),  # the same CPU under Windows
    ("x86_64", True, False),  # oneDNN emulates bf16 (AVX-512: an Ice Lake): F.linear, as measured there
    ("aarch64", False, False),  # arm64 without BF16: not measured, so PyTorch's usual float32 matmul
])
def test_widened_chunks_go_to_onednn_only_on_x86_cpus_whose_bf16_runs_in_pytorchs_own_loops(
        monkeypatch, machine, bf16_in_onednn, expected):
    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert widened_in_onednn(bf16_in_onednn) == expected


@pytest.mark.parametrize("multiply", [onednn_linear, onednn_linear_transposed])
@pytest.mark.parametrize("rows", [2, 8, 11, 64])
def test_onednn_linear_multiplies_float32_as_f_linear_does_and_so_does_its_transposed_product(multiply, rows):
    torch.manual_seed(0)
    x, weight = torch.randn(rows, 576), torch.randn(1536, 576)
    y = multiply(x, weight)
    assert y.dtype == torch.float32 and y.shape == (rows, 1536)
    # Both sum 576 float32 products, in their own orders: equal within float32 rounding of such a sum.
    torch.testing.assert_close(y, F.linear(x, weight), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows, in_onednn, expected", [
    (6, True, onednn_linear),  # a part-filled AVX2 register: x W^T (the transposed one took 1.0x)
    (8, True, onednn_linear_transposed),  # a batch of 8: one whole register (0.87x on a Zen 3)
    (11, True, onednn_linear),  # 10 drafts and a token: part-filled (the transposed one took 1.13-1.18x)
    (16, True, onednn_linear_transposed),
    (24, True, onednn_linear_transposed),
    (32, True, onednn_linear),  # many rows: x W^T is as fast
    (8, False, F.linear),  # oneDNN emulates bf16 (AVX-512), or not x86: MKL, whatever the rows
])
def test_widened_chunks_of_a_batch_of_whole_avx2_registers_are_multiplied_transposed(rows, in_onednn, expected):
    assert chunk_multiply(rows, in_onednn) is expected


@pytest.mark.parametrize("rows, in_onednn, expected", [
    (WIDENED_ROWS, False, bf16_layers.FEW_ROWS_CHUNK_ELEMENTS),  # MKL's few rows: chunks that stay in L2
    (8, False, bf16_layers.FEW_ROWS_CHUNK_ELEMENTS),  # a batch of 8 (0.84x the time on an Intel core)
    (11, False, bf16_layers.FEW_ROWS_CHUNK_ELEMENTS),  # 10 drafts and a token (0.82x)
    (bf16_layers.FEW_ROWS, False, bf16_layers.FEW_ROWS_CHUNK_ELEMENTS),
    (bf16_layers.FEW_ROWS + 1, False, bf16_layers.WIDEN_CHUNK_ELEMENTS),  # many rows: big chunks (1.16x at 512)
    (512, False, bf16_layers.WIDEN_CHUNK_ELEMENTS),
    (8, True, bf16_layers.WIDEN_CHUNK_ELEMENTS),  # oneDNN's chunks (AVX2): big at any rows (2 MB: 1.12x on a Zen 3)
])
def test_few_rows_multiplied_by_mkl_widen_chunks_small_enough_to_stay_in_l2(rows, in_onednn, expected):
    assert bf16_layers.FEW_ROWS_CHUNK_ELEMENTS * 4 <= 2 * 1024 * 1024  # float32: at most 2 MB, 1 MB a core of two
    assert bf16_layers.widen_chunk_elements(rows, in_onednn) == expected


@pytest.mark.parametrize("bf16_in_onednn", [True, False], ids=["avx512-onednn-emulates-bf16", "avx2-pytorchs-own-loops"])
def test_a_compiled_widened_layer_multiplies_every_row_count_exactly_as_the_eager_one(monkeypatch, bf16_in_onednn):
    # One row and a few: Inductor calls the mm F.linear calls; the widened rows go through an operator
    # that Inductor cannot look into (`widened_linear_op`): the same kernels as eager, so the same bits.
    monkeypatch.setattr(bf16_layers, "prepacking_helps", lambda device, dtype: bf16_in_onednn)
    torch.manual_seed(0)
    layer = WidenedLinear(torch.randn(300, 64, dtype=torch.bfloat16))
    compiled = torch.compile(layer, dynamic=False)
    for rows in (1, 3, layer.widen_from_rows, WIDENED_ROWS + 24):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        assert torch.equal(compiled(x), layer(x)), rows


@pytest.mark.parametrize("rows, traced", [(1, True), (WIDENED_ROWS - 1, True), (WIDENED_ROWS, False), (11, False)])
def test_a_compiled_step_leaves_one_row_and_a_few_to_inductor_and_widens_the_rest_in_the_operator(rows, traced):
    # Traced, one row or a few become F.linear in the graph: Inductor calls PyTorch's mm, the kernel
    # F.linear calls, without our operator's dispatch. The widened rows: the operator.
    torch._dynamo.reset()  # no graph of another test's layer reused: this one is traced afresh
    layer = WidenedLinear(torch.randn(96, 64, dtype=torch.bfloat16))
    graphs = []

    def keep_graph(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch.compile(layer, backend=keep_graph, dynamic=False)(torch.randn(rows, 64, dtype=torch.bfloat16))
    (graph,) = graphs
    called = {node.target for node in graph.graph.nodes if node.op == "call_function"}
    operator = torch.ops.llama_from_scratch.widened_linear.default
    assert called == ({F.linear} if traced else {operator})


@pytest.mark.parametrize("chunk_elements, chunks, buffer_elements", [
    (40 * 64, (3, 2), 40 * 64),  # 40 rows a chunk: 40 + 40 + 16 rows of the first's 96, 40 + 10 of the second's 50
    (32, (96, 50), 64),  # not even one row of 64 fits: a row at a time, the buffer grown to one row
])
def test_widened_layers_share_one_buffer_and_widen_a_chunk_of_rows_at_a_time(
        monkeypatch, chunk_elements, chunks, buffer_elements):
    monkeypatch.setattr(bf16_layers, "WIDEN_CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(bf16_layers, "FEW_ROWS_CHUNK_ELEMENTS", chunk_elements)  # whoever multiplies the rows
    monkeypatch.setattr(bf16_layers, "WIDENING_BUFFERS", {})
    torch.manual_seed(0)
    first, second = (WidenedLinear(torch.randn(n, 64, dtype=torch.bfloat16)) for n in (96, 50))
    x = torch.randn(WIDENED_ROWS + 24, 64, dtype=torch.bfloat16)  # widened on every CPU
    with LinearDtypes() as matmuls:
        y_first, y_second = first(x), second(x)
    assert matmuls.seen == [torch.float32] * sum(chunks)
    (buffer,) = bf16_layers.WIDENING_BUFFERS.values()  # one for the device, shared by both layers
    assert buffer.numel() == buffer_elements
    for layer, y in ((first, y_first), (second, y_second)):  # the second layer's chunks left the first's y alone
        exact = x.double() @ layer.weight.double().T
        torch.testing.assert_close(y.double(), exact, rtol=torch.finfo(torch.bfloat16).eps, atol=1e-6)


NO_BF16_CPU = CpuFeatures(name="x86_64: AVX512 (avx512_vnni), made up", native_bf16=False, int8_dot=True)


@pytest.fixture
def cpu_without_native_bf16(monkeypatch):
    """The engine's view of an Ice Lake: the decisions change, the arithmetic stays this CPU's."""
    monkeypatch.setattr(cpu, "cpu_features", lambda: NO_BF16_CPU)
    monkeypatch.setattr(quantize, "cpu_features", lambda: NO_BF16_CPU)


def test_bf16_on_a_cpu_without_native_bf16_is_widened_and_gives_the_logits_of_nn_linear(
        tiny_ckpt, cpu_without_native_bf16):
    llama = LLaMa.build(tiny_ckpt, max_seq_len=64, device="cpu", progress=False)  # the default dtype
    assert llama.linear_storage == WIDENED and next(llama.model.parameters()).dtype == torch.bfloat16
    assert isinstance(llama.model.layers[0].attention.wqkv, WidenedLinear)
    assert isinstance(llama.model.output, WidenedLinear)
    plain = load_transformer(tiny_ckpt, llama.args, torch.device("cpu"), torch.bfloat16, progress=False,
                             needs_gradients=True)
    tokens = torch.tensor([list(range(3, 3 + 2 * WIDENED_ROWS))])  # a prompt: widened to float32
    widened_logits, plain_logits = llama.model(tokens, 0).float(), plain(tokens, 0).float()
    # bf16 rounds each layer's output either way; float32 products differ from bf16 ones by those roundings.
    torch.testing.assert_close(widened_logits, plain_logits, **BF16_TOLERANCE)


@pytest.mark.parametrize("bf16_in_onednn", [True, False], ids=["avx512-onednn-emulates-bf16", "avx2-pytorchs-own-loops"])
def test_the_loaded_line_says_from_how_many_rows_widened_layers_multiply_in_float32(
        tiny_ckpt, cpu_without_native_bf16, monkeypatch, bf16_in_onednn):
    rows = WIDENED_ROWS
    monkeypatch.setattr(bf16_layers, "prepacking_helps", lambda device, dtype: bf16_in_onednn)  # AVX-512 or AVX2
    llama = LLaMa.build(tiny_ckpt, max_seq_len=64, device="cpu", progress=False)
    assert all(layer.widen_from_rows == rows for layer in llama.model.modules() if isinstance(layer, WidenedLinear))
    assert f"bfloat16; linear layers bf16, {rows}+ rows in float32" in how_it_runs(llama)


def test_compiled_widened_layers_decode_the_eager_logits(tiny_ckpt, cpu_without_native_bf16):
    kwargs = dict(max_seq_len=64, max_batch_size=2, device="cpu", progress=False)
    eager, compiled = LLaMa.build(tiny_ckpt, **kwargs), LLaMa.build(tiny_ckpt, compile=True, **kwargs)
    assert compiled.linear_storage == WIDENED

    def steps(llama):
        decoding = llama.decode([replay_prompt(eager, "Hello, my name is")], 8, SamplingParams(temperature=0))
        return [(step.tokens.clone(), step.logits.float()) for step in decoding]

    # Every step's logits agree while both have the same tokens behind them, within two bf16 steps at
    # the largest logit (the compiled graph fuses the element-wise work in float32, rounding less
    # often; the tiny model's logits reach ~40, where a bf16 step is 0.25). In bf16 a near-tie may be
    # broken either way by those roundings, and then the inputs differ: the comparison stops there.
    for (eager_tokens, eager_logits), (compiled_tokens, compiled_logits) in zip(steps(eager), steps(compiled)):
        two_steps = 2 * torch.finfo(torch.bfloat16).eps * eager_logits.abs().max().item()
        torch.testing.assert_close(compiled_logits, eager_logits, rtol=0, atol=two_steps)
        if not torch.equal(compiled_tokens, eager_tokens):
            break


needs_fbgemm = pytest.mark.skipif(not cpu.has_fp16_weight_matmul(), reason="this PyTorch has no FBGEMM (not x86)")
DEMO_K = 576  # the demo's dim: one block of FBGEMM's 512 packed, 64 columns in float32
ICE_LAKE = CpuFeatures(name="x86_64: AVX512 (avx512_vnni), made up", native_bf16=False, int8_dot=True,
                       fp16_weight_matmul=True)


@needs_fbgemm
@pytest.mark.parametrize("scale", [1e-36, 2.0 ** -12, 0.02, 1.0, 3e4, 1e6],
                         ids=["near-float32-min", "tiny", "llama-like", "one", "near-max", "beyond-float16"])
def test_a_half_layer_holds_every_bf16_weight_exactly(scale):
    # Weights of every size, down to bf16 numbers far below float16's smallest (2^-24) and up beyond
    # its largest (65504): times the identity, the layer gives back each weight exactly, in float32.
    torch.manual_seed(0)
    weight = (torch.randn(96, DEMO_K) * scale).to(torch.bfloat16)
    weight[0, :6] = torch.tensor([2.0 ** -30, -(2.0 ** -20), 3e-6, 0.0, 1.0 + 2.0 ** -7, -7.0]).to(torch.bfloat16) * scale
    weight[1, -3:] = weight[0, :3]  # and in the columns kept in float32
    layer = HalfLinear(weight)
    assert layer.packed_columns == bf16_layers.FBGEMM_K_BLOCK and layer.rest.shape == (DEMO_K - layer.packed_columns, 96)
    y = layer(torch.eye(DEMO_K))  # (K, N): row k is column k of W
    assert y.dtype == torch.float32
    assert torch.equal(y.T, weight.float())


@needs_fbgemm
@pytest.mark.parametrize("in_features", [64, 512, DEMO_K, 1536])
def test_the_memory_planner_counts_a_half_layers_float16_blocks_and_float32_columns(in_features):
    from memory import linear_bytes

    layer = HalfLinear(torch.randn(96, in_features, dtype=torch.bfloat16))
    assert layer.packed_bytes() + layer.rest.nbytes == linear_bytes(96, in_features, HALF, torch.bfloat16)
    assert layer.packed_bytes() == 96 * (in_features // 512) * 512 * 2


@needs_fbgemm
def test_a_half_layer_narrower_than_one_fbgemm_block_keeps_its_weights_in_float32():
    # FBGEMM would pad 64 columns to 512: the memory of 8 layers. Float32 holds them exactly.
    weight = torch.randn(96, 64, dtype=torch.bfloat16)
    layer = HalfLinear(weight)
    assert layer.packed_parts == [] and layer.packed_bytes() == 0 and layer.rest.dtype == torch.float32
    assert torch.equal(layer(torch.eye(64)).T, weight.float())


@needs_fbgemm
def test_a_half_layer_packed_in_parts_holds_every_weight_and_scales_them_all_alike(monkeypatch):
    # FBGEMM packs from a float32 copy of the matrix: parts of PART_ROWS rows bound it. The scaling is
    # the whole matrix's: its largest weight in the first part, a weight needing it in the last.
    monkeypatch.setattr(bf16_layers, "PART_ROWS", 40)
    torch.manual_seed(0)
    weight = (torch.randn(96, DEMO_K) * 0.02).to(torch.bfloat16)  # parts of 40, 40 and 16 rows
    weight[0, 0], weight[95, 0] = 3.0, (1 + 2.0 ** -7) * 2.0 ** -20
    weight[50, -1] = 100.0  # in the float32 columns: not part of the scaling
    layer = HalfLinear(weight)
    assert len(layer.packed_parts) == 3 and layer.exponent == 14  # 3 * 2^14 <= 65504
    assert torch.equal(layer(torch.eye(DEMO_K)).T, weight.float())
    x = torch.randn(8, DEMO_K, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x).double(), x.double() @ weight.double().T,
                               rtol=torch.finfo(torch.bfloat16).eps, atol=1e-6)


@pytest.mark.parametrize("weights, expected", [
    ([0.5, -3.0, 2.0 ** -17, 0.0], 0),  # all float16 numbers as they are: not scaled
    ([0.5, -3.0, 2.0 ** -17, 2.0 ** -24], 0),  # a power of two down to 2^-24 is a float16 number too
    ([0.5, -3.0, (1 + 2.0 ** -7) * 2.0 ** -20], 14),  # 8 bits at 2^-20 are not; 3 * 2^14 = 49152 <= 65504 < 3 * 2^15
    ([1e5, 1.0], -1),  # beyond float16's largest: scaled down
    ([float("inf"), (1 + 2.0 ** -7) * 2.0 ** -20], None),  # not finite: not held in float16 (make_linear widens it)
    ([0.5, float("-inf")], None),
    ([0.5, float("nan")], None),
    ([1e-36, 3e-37], 126),  # tiny: scaled up as far as 2^126, beyond which 2^-s would not be a normal float32
])
def test_a_weight_is_scaled_by_the_largest_power_of_two_that_keeps_it_in_float16_only_where_needed(weights, expected):
    assert bf16_layers.float16_exponent(torch.tensor([weights]).to(torch.bfloat16)) == expected


@needs_fbgemm
def test_a_half_layer_reads_its_weight_a_part_at_a_time_and_hands_each_part_on_once_read(monkeypatch):
    # The loader lets a part's file pages go once it is read: every row handed on, in order, once per
    # pass (the scaling's pass and the packing's).
    monkeypatch.setattr(bf16_layers, "PART_ROWS", 40)
    weight = torch.randn(96, DEMO_K, dtype=torch.bfloat16)
    handed = []
    layer = quantize.make_linear("layers.0.feed_forward.w2", weight, HALF, torch.bfloat16,
                                 done_with_part=lambda part: handed.append((part.data_ptr(), part.shape[0])))
    row_bytes = DEMO_K * weight.element_size()
    parts = [(weight.data_ptr() + start * row_bytes, rows) for start, rows in ((0, 40), (40, 40), (80, 16))]
    assert isinstance(layer, HalfLinear) and handed == parts + parts
    assert torch.equal(layer(torch.eye(DEMO_K)).T, weight.float())


@needs_fbgemm
def test_a_non_finite_weight_in_a_later_part_still_leaves_the_layer_widened(monkeypatch):
    monkeypatch.setattr(bf16_layers, "PART_ROWS", 40)
    weight = torch.randn(96, DEMO_K, dtype=torch.bfloat16)
    weight[90, 7] = float("nan")  # in the third part, after two were handed on
    handed = []
    layer = quantize.make_linear("layers.0.feed_forward.w2", weight, HALF, torch.bfloat16,
                                 done_with_part=lambda part: handed.append(part.shape[0]))
    assert isinstance(layer, WidenedLinear) and handed == [40, 40]
    assert torch.isnan(layer(torch.ones(1, DEMO_K, dtype=torch.bfloat16))[0, 90])


@needs_fbgemm
@pytest.mark.parametrize("rows", [1, 8, 11, 100])
def test_a_half_layer_multiplies_bf16_rows_in_float32(rows):
    torch.manual_seed(0)
    weight = (torch.randn(300, DEMO_K) * 0.02).to(torch.bfloat16)
    x = torch.randn(2, rows, DEMO_K, dtype=torch.bfloat16)
    y = HalfLinear(weight)(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, rows, 300)
    # Within one bf16 step of the float64 product: summed in float32, rounded once to bf16.
    exact = x.double() @ weight.double().T
    torch.testing.assert_close(y.double(), exact, rtol=torch.finfo(torch.bfloat16).eps, atol=1e-6)


@needs_fbgemm
def test_a_compiled_half_layer_calls_its_packed_weight_through_the_operator_with_the_same_bits():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = HalfLinear(torch.randn(300, DEMO_K, dtype=torch.bfloat16))
    graphs = []

    def keep_graph(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch.compile(layer, backend=keep_graph, dynamic=False)(torch.randn(2, 3, DEMO_K, dtype=torch.bfloat16))
    (graph,) = graphs
    called = {node.target for node in graph.graph.nodes if node.op == "call_function"}
    # FBGEMM's product through our operator; the casts and the float32 columns left to the graph.
    assert torch.ops.llama_from_scratch.half_columns.default in called
    assert torch.ops.llama_from_scratch.packed_linear.default not in called
    compiled = torch.compile(layer, dynamic=True)
    for rows in (1, 8, 11):
        x = torch.randn(rows, 1, DEMO_K, dtype=torch.bfloat16)
        assert torch.equal(compiled(x), layer(x)), rows


@pytest.fixture
def ice_lake(monkeypatch):
    """The engine's view of an Ice Lake with FBGEMM (x86 PyTorch): bf16 emulated, float16 weights run."""
    monkeypatch.setattr(cpu, "cpu_features", lambda: ICE_LAKE)
    monkeypatch.setattr(quantize, "cpu_features", lambda: ICE_LAKE)
    # FBGEMM blocks of 32 input columns, so that the tiny model's layers (64, 96, 192 wide) are packed
    # whole, as the demo's are all but 64 of 576 columns.
    monkeypatch.setattr(bf16_layers, "FBGEMM_K_BLOCK", 32)


@needs_fbgemm
def test_bf16_on_an_x86_cpu_without_native_bf16_is_held_in_float16_and_gives_the_logits_of_nn_linear(tiny_ckpt, ice_lake):
    llama = LLaMa.build(tiny_ckpt, max_seq_len=64, device="cpu", progress=False)  # the default dtype
    assert llama.linear_storage == HALF and next(llama.model.parameters()).dtype == torch.bfloat16
    assert isinstance(llama.model.layers[0].attention.wqkv, HalfLinear)
    assert isinstance(llama.model.output, HalfLinear)
    assert "bfloat16; linear layers bf16, held as float16 for FBGEMM's float32 matmul" in how_it_runs(llama)
    plain = load_transformer(tiny_ckpt, llama.args, torch.device("cpu"), torch.bfloat16, progress=False,
                             needs_gradients=True)
    for tokens in (torch.tensor([[3]]), torch.tensor([list(range(3, 20))])):  # a token and a prompt
        # bf16 rounds each layer's output either way; float32 products differ from bf16 ones by those roundings.
        torch.testing.assert_close(llama.model(tokens, 0).float(), plain(tokens, 0).float(), **BF16_TOLERANCE)


@pytest.fixture(scope="module")
def tiny_bf16_ckpt(tmp_path_factory):
    """The tiny model stored in bf16, as the demo is: its tensors can stay in the memory-mapped file."""
    return write_tiny_llama2_checkpoint(tmp_path_factory.mktemp("tiny-bf16"), LLAMA2_TOKENIZER, dtype=torch.bfloat16)


@needs_fbgemm
def test_loading_into_half_layers_gives_back_the_file_pages_of_each_part_of_the_head_once_packed(
        tiny_bf16_ckpt, ice_lake, monkeypatch):
    # The head (32,000 x 64) is read in parts of 8,192 rows; each part's pages go back as soon as it
    # is read, so the file's copy of the head and its float16 copy are never both in memory.
    monkeypatch.setattr(bf16_layers, "PART_ROWS", 8192)
    args = load_model_args(tiny_bf16_ckpt, max_seq_len=32, max_batch_size=1)
    kept = load_transformer(tiny_bf16_ckpt, args, torch.device("cpu"), torch.bfloat16, progress=False)
    released = []

    def recording(tensors):
        released.extend(tuple(t.shape) for t in tensors)
        release_file_pages(tensors)

    monkeypatch.setattr(checkpoint, "release_file_pages", recording)
    model = load_transformer(tiny_bf16_ckpt, args, torch.device("cpu"), torch.bfloat16, progress=False)
    assert isinstance(model.output, HalfLinear)
    assert released.count((8192, args.dim)) == 2 * 3  # the head's three whole parts, in both passes
    tokens = torch.tensor([list(range(3, 20))])
    assert torch.equal(model(tokens, 0), kept(tokens, 0))  # pages read back from the file: the same weights


@needs_fbgemm
def test_a_layer_with_non_finite_weights_is_widened_instead_so_decoding_still_names_it():
    weight = torch.randn(96, 64, dtype=torch.bfloat16)
    assert isinstance(quantize.make_linear("layers.0.attention.wq", weight, HALF, torch.bfloat16), HalfLinear)
    weight[3, 5] = float("inf")  # FBGEMM would clip it to 65504: a finite, silently wrong layer
    layer = quantize.make_linear("layers.0.attention.wq", weight, HALF, torch.bfloat16)
    assert isinstance(layer, WidenedLinear)
    assert not torch.isfinite(layer(torch.ones(1, 64, dtype=torch.bfloat16))).all()


@needs_fbgemm
def test_compiled_half_layers_decode_the_eager_tokens_and_logits(tiny_ckpt, ice_lake):
    kwargs = dict(max_seq_len=64, max_batch_size=2, device="cpu", progress=False)
    eager, compiled = LLaMa.build(tiny_ckpt, **kwargs), LLaMa.build(tiny_ckpt, compile=True, **kwargs)
    assert compiled.linear_storage == HALF
    prompts = [replay_prompt(eager, "Hello, my name is"), replay_prompt(eager, "1 2 3")]

    def steps(llama):
        return [(step.tokens.clone(), step.logits.float()) for step in llama.decode(prompts, 8, SamplingParams(temperature=0))]

    # The same kernels for the matmuls, eager and compiled; the compiled graph fuses the element-wise
    # work in float32 and rounds less often: within two bf16 steps at the largest logit, while both
    # have the same tokens behind them (as for the widened layers above).
    for (eager_tokens, eager_logits), (compiled_tokens, compiled_logits) in zip(steps(eager), steps(compiled)):
        two_steps = 2 * torch.finfo(torch.bfloat16).eps * eager_logits.abs().max().item()
        torch.testing.assert_close(compiled_logits, eager_logits, rtol=0, atol=two_steps)
        if not torch.equal(compiled_tokens, eager_tokens):
            break


def test_compiled_decode_gives_the_eager_greedy_tokens_and_logprobs(tiny_ckpt):
    prompts = ["Hello, my name is", "1 2 3", "The quick brown fox jumps over"]  # ragged: padding masks too
    kwargs = dict(max_seq_len=64, max_batch_size=4, device="cpu", dtype="float32", progress=False)
    eager = LLaMa.build(tiny_ckpt, **kwargs)
    compiled = LLaMa.build(tiny_ckpt, compile=True, **kwargs)
    def greedy_with_logprobs(llama):
        generations = llama.generate(llama.encode_prompts(prompts), 10, SamplingParams(temperature=0), logprobs=True)
        return [g.tokens for g in generations], [g.logprobs for g in generations]

    eager_tokens, eager_logprobs = greedy_with_logprobs(eager)
    compiled_tokens, compiled_logprobs = greedy_with_logprobs(compiled)
    assert compiled_tokens == eager_tokens
    for got, expected in zip(compiled_logprobs, eager_logprobs):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-4, atol=1e-4)
    # Speculative decoding (tests/test_speculative.py) calls the model itself for its verification
    # passes, beside the compiled step, which serves the passes that have no draft.
    prompt = replay_prompt(eager, prompts[0])
    expected = [int(step.tokens[0]) for step in eager.decode([prompt], 20, SamplingParams(temperature=0))]
    decoding = compiled.decode([prompt], 20, SamplingParams(temperature=0), speculate=4)
    assert [int(step.tokens[0]) for step in decoding] == expected
    assert decoding.drafted > decoding.accepted > 0


def test_compiled_engines_of_different_models_and_kinds_side_by_side_each_give_their_eager_tokens(
        tiny_ckpt, tmp_path):
    """torch.compile keeps graphs per function and the module guards are skipped: without a compiled
    step of its own, a second engine ran the first one's graph (KeyError: 'weight' for another kind of
    layer; for the same kind, silently the first model's frozen weights)."""
    other_ckpt = write_tiny_llama2_checkpoint(tmp_path / "other", LLAMA2_TOKENIZER, seed=1)  # other weights
    kwargs = dict(max_seq_len=32, max_batch_size=1, device="cpu", dtype="float32", progress=False)
    kinds = [(tiny_ckpt, None), (other_ckpt, None), (tiny_ckpt, "int8"), (tiny_ckpt, "int4")]
    if cpu_features().int8_dot:
        kinds.append((tiny_ckpt, "w8a8"))
    compiled = [LLaMa.build(ckpt, compile=True, quantize=quantize, **kwargs) for ckpt, quantize in kinds]
    eager = [LLaMa.build(ckpt, quantize=quantize, **kwargs) for ckpt, quantize in kinds]
    prompt = [compiled[0].tokenizer.encode("Hello, my name is", bos=True, eos=False)]

    def greedy(llama):
        return llama.generate(prompt, 6, SamplingParams(temperature=0))[0].tokens

    compiled_tokens = [greedy(llama) for llama in compiled]  # each compiled after the others exist
    assert compiled_tokens == [greedy(llama) for llama in eager]
    assert compiled_tokens[0] != compiled_tokens[1]  # the two models differ, so the test can tell them apart


def test_warm_up_compiles_every_graph_a_generation_needs(tiny_ckpt):
    """After `warm_up` on a ragged batch, generating for it compiles nothing more, so the CLI's
    tokens/s measures generation, not compilation."""
    from torch._dynamo.utils import counters

    from cli import warm_up

    torch._dynamo.reset()
    llama = LLaMa.build(tiny_ckpt, max_seq_len=64, max_batch_size=4, device="cpu", dtype="float32",
                        progress=False, compile=True)
    prompts = ["Hello, my name is", "1 2 3"]  # ragged: a graph with a padding mask too
    warm_up(llama, llama.encode_prompts(prompts))
    graphs_after_warm_up = counters["stats"]["unique_graphs"]
    assert graphs_after_warm_up > 0
    llama.text_completion(prompts, temperature=0, max_gen_len=12)
    assert counters["stats"]["unique_graphs"] == graphs_after_warm_up


def test_compiled_steps_serve_every_later_position_without_compiling_again(tiny_ckpt):
    """Static batching of a ragged batch (an int position and a padding mask) and continuous batching
    (a position per row): longer runs reuse the graphs of a short one, and give the eager tokens. A
    position turned into a constant would compile a graph per token, until torch's recompile limit."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    kwargs = dict(max_seq_len=64, max_batch_size=4, device="cpu", dtype="float32", progress=False)
    compiled, eager = LLaMa.build(tiny_ckpt, compile=True, **kwargs), LLaMa.build(tiny_ckpt, **kwargs)
    prompt_tokens = compiled.encode_prompts(["Hello, my name is", "1 2 3", "The quick brown fox"])
    greedy = SamplingParams(temperature=0)
    for continuous in (False, True):
        compiled.generate(prompt_tokens, 4, greedy, continuous=continuous)
        graphs = counters["stats"]["unique_graphs"]
        tokens = [g.tokens for g in compiled.generate(prompt_tokens, 24, greedy, continuous=continuous)]
        assert counters["stats"]["unique_graphs"] == graphs
        assert tokens == [g.tokens for g in eager.generate(prompt_tokens, 24, greedy, continuous=continuous)]


def test_cli_compile_reports_compiling_apart_and_prints_what_eager_prints(tiny_ckpt, capsys):
    from cli import main

    argv = ["--ckpt-dir", str(tiny_ckpt), "--prompt", "Hello", "--prompt", "1 2 3", "--temperature", "0",
            "--max-gen-len", "5", "--device", "cpu", "--dtype", "float32"]
    assert main(argv) == 0
    eager = capsys.readouterr()
    assert main(argv + ["--compile"]) == 0
    compiled = capsys.readouterr()
    assert compiled.out == eager.out
    assert "compiled in" in compiled.err and "compiled in" not in eager.err


# --------------------------------------------------------------------------------------------
# Fused projections: wq|wk|wv and w1|w3 as one matmul each
# --------------------------------------------------------------------------------------------


def test_fused_layers_hold_metas_weights_row_by_row(tiny_ckpt):
    args = load_model_args(tiny_ckpt, 32, 1)
    fused = load_transformer(tiny_ckpt, args, torch.device("cpu"), torch.float32, progress=False,
                             fuse_projections=True)
    meta = torch.load(tiny_ckpt / "consolidated.00.pth", weights_only=True)
    attention, feed_forward = fused.layers[1].attention, fused.layers[1].feed_forward
    assert not hasattr(attention, "wq") and not hasattr(feed_forward, "w1")
    expected_qkv = torch.cat([meta[f"layers.1.attention.{w}.weight"] for w in ("wq", "wk", "wv")])
    expected_13 = torch.cat([meta[f"layers.1.feed_forward.{w}.weight"] for w in ("w1", "w3")])
    assert torch.equal(attention.wqkv.weight, expected_qkv) and torch.equal(feed_forward.w13.weight, expected_13)


@pytest.mark.parametrize("dtype, quantize", [
    (torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "int8"), (torch.bfloat16, "int4"),
    pytest.param(torch.bfloat16, "w8a8", marks=pytest.mark.skipif(not cpu_features().int8_dot, reason="no VNNI")),
])
def test_fused_and_separate_projections_give_the_same_logits(tiny_ckpt, dtype, quantize):
    """Every output row is the same dot product either way; quantization is per row (or per token,
    the same input for all the fused parts), so only a matmul kernel's summation order can differ."""
    args = load_model_args(tiny_ckpt, 32, 2)
    kwargs = dict(progress=False, quantize=quantize)
    separate = load_transformer(tiny_ckpt, args, torch.device("cpu"), dtype, **kwargs)
    fused = load_transformer(tiny_ckpt, args, torch.device("cpu"), dtype, fuse_projections=True, **kwargs)
    tokens = torch.randint(0, args.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    # A few steps of the dtype: fused, a kernel may sum in another order, and a rounding difference
    # in a hidden state grows through the layers (float32: none seen; a wrong fusion is off by O(1)).
    step = 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(fused(tokens, 0), separate(tokens, 0), rtol=step, atol=step)
    torch.testing.assert_close(fused(tokens[:, :1], 7), separate(tokens[:, :1], 7), rtol=step, atol=step)  # decoding


# --------------------------------------------------------------------------------------------
# The static KV cache (fixed shapes for CUDA graphs), on a CPU
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_static_kv_cache_gives_the_same_tokens_and_logprobs_as_todays_cache(tiny_ckpt, compile):
    """The static step writes at a position tensor and attends to the whole (zeroed) cache under a
    mask; the result must be the dynamic step's, for a ragged batch too (padding masks)."""
    prompts = ["Hello, my name is", "1 2 3", "The quick brown fox jumps over"]
    kwargs = dict(max_seq_len=48, max_batch_size=4, device="cpu", dtype="float32", progress=False)
    dynamic = LLaMa.build(tiny_ckpt, **kwargs)
    static = LLaMa.build(tiny_ckpt, static_cache=True, compile=compile, **kwargs)
    assert torch.equal(static.model.layers[0].attention.cache.cache_k, torch.zeros_like(
        static.model.layers[0].attention.cache.cache_k))  # zeroed: masked positions are multiplied by 0

    def greedy(llama, batch):
        generations = llama.generate(llama.encode_prompts(batch), 12, SamplingParams(temperature=0), logprobs=True)
        return [g.tokens for g in generations], [g.logprobs for g in generations]

    for batch in (prompts[:1], prompts):
        expected_tokens, expected_logprobs = greedy(dynamic, batch)
        tokens, logprobs = greedy(static, batch)
        assert tokens == expected_tokens
        for got, expected in zip(logprobs, expected_logprobs):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-4, atol=1e-4)


def test_static_cache_is_on_by_default_only_for_compiled_cuda():
    from decoding import choose_static_cache

    assert choose_static_cache(None, torch.device("cuda"), compile=True)
    assert not choose_static_cache(None, torch.device("cuda"), compile=False)
    assert not choose_static_cache(None, torch.device("cpu"), compile=True)
    assert choose_static_cache(True, torch.device("cpu"), compile=False)
    with pytest.raises(ValueError, match="static_cache must be True, False or None, got 'yes'"):
        choose_static_cache("yes", torch.device("cpu"), compile=False)
