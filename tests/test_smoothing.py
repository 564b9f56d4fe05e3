"""w8a8's smoothing (smoothing.py): the scales are SmoothQuant's, folding them in leaves the float
function unchanged, and a loaded w8a8 model holds the smoothed layers. Its accuracy on a real model
is tested with w8a8's in tests/test_quantize.py (through the integer matmuls too)."""

import pytest
import torch

from checkpoint import ShardedCheckpoint, load_model_args, load_transformer
from conftest import LLAMA2_TOKENIZER
from model import RMSNorm
from cpu import cpu_features
from quantize import W8A8, W8A8Linear
from smoothing import CALIBRATION_SEED, activation_maxima, fold_into_norm, smoothing_scales
from tiny import LLAMA2_VOCAB_SIZE, write_tiny_llama2_checkpoint

CPU = torch.device("cpu")
needs_int8_dot = pytest.mark.skipif(not cpu_features().int8_dot, reason="w8a8 needs int8 dot-product instructions")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return write_tiny_llama2_checkpoint(tmp_path_factory.mktemp("tiny"), LLAMA2_TOKENIZER)


def test_smoothing_scales_are_smoothquants_max_x_to_the_alpha_over_max_w_to_one_minus_alpha():
    activation_max = torch.tensor([8.0, 1.0, 0.25])
    weight = torch.tensor([[1.0, -4.0, 0.5],
                           [-0.5, 2.0, -2.0]])  # column maxima of |W|: 1, 4, 2
    expected = torch.tensor([8.0 ** 0.5 / 1.0, 1.0 / 4.0 ** 0.5, 0.25 ** 0.5 / 2.0 ** 0.5])
    torch.testing.assert_close(smoothing_scales(activation_max, weight, alpha=0.5), expected)
    # alpha = 1: all of x's range moves into W (s = max|x|); alpha = 0: none of it (s = 1 / max|W|)
    torch.testing.assert_close(smoothing_scales(activation_max, weight, alpha=1.0), activation_max)
    torch.testing.assert_close(smoothing_scales(activation_max, weight, alpha=0.0), 1 / torch.tensor([1.0, 4.0, 2.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folding_scales_into_the_norm_leaves_the_norm_times_the_weight_unchanged(dtype):
    """gamma / s is stored in the norm's dtype, rounded; the returned column scales undo that rounding,
    so in float64 the product is the original to float32 precision (bf16's rounding alone would
    leave errors ~1e-3), a zero gamma included."""
    generator = torch.Generator().manual_seed(0)
    dim, rows = 48, 80
    norm = RMSNorm(dim, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=generator))
        norm.weight[5] = 0
    gamma = norm.weight.detach().double().clone()
    weight = torch.randn(rows, dim, generator=generator)
    scales = torch.exp(torch.randn(dim, generator=generator) * 3)  # spread over ~1e-4 ... 1e4
    x = torch.randn(7, dim, generator=generator).double()
    normalized = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)

    column_scales = fold_into_norm(norm, scales)

    assert not torch.equal(norm.weight.detach().double(), gamma)
    before = (normalized * gamma) @ weight.double().T
    after = (normalized * norm.weight.detach().double()) @ (weight * column_scales).double().T
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_calibration_maxima_of_the_first_norm_are_those_of_the_normalized_embeddings(tiny_ckpt):
    """Layer 0's attention norm reads the embeddings of the calibration ids: its maxima, computed here
    by hand from the embedding table and the norm, are what the hooks kept."""
    args = load_model_args(tiny_ckpt, max_seq_len=16, max_batch_size=1, vocab_size=LLAMA2_VOCAB_SIZE)
    model = load_transformer(tiny_ckpt, args, CPU, torch.float32, progress=False)
    maxima = activation_maxima(model, n_tokens=64)  # more than max_seq_len: trimmed to 16

    ids = torch.randint(args.vocab_size, (1, 16), generator=torch.Generator().manual_seed(CALIBRATION_SEED))
    h = model.tok_embeddings.weight.detach()[ids[0]].double()  # (T, C)
    normalized = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + args.norm_eps)
    expected = (normalized * model.layers[0].attention_norm.weight.detach().double()).abs().amax(dim=0)
    torch.testing.assert_close(maxima["layers.0.attention_norm"].double(), expected, rtol=1e-5, atol=1e-6)
    assert set(maxima) == {f"layers.{i}.{norm}" for i in range(args.n_layers) for norm in ("attention_norm", "ffn_norm")}


@needs_int8_dot
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_a_loaded_w8a8_model_holds_smoothed_layers_equal_to_the_checkpoint_up_to_int8_rounding(tiny_ckpt, fuse):
    """After loading, each block's norm weight is gamma / s and the layers reading it hold W * s: the
    norm times the dequantized weights equals the checkpoint's gamma times W, to int8's rounding."""
    args = load_model_args(tiny_ckpt, max_seq_len=16, max_batch_size=1, vocab_size=LLAMA2_VOCAB_SIZE)
    model = load_transformer(tiny_ckpt, args, CPU, torch.float32, progress=False, quantize=W8A8,
                             fuse_projections=fuse)
    checkpoint = ShardedCheckpoint(tiny_ckpt, args)
    readers = {"attention_norm": ["attention.wq", "attention.wk", "attention.wv"],
               "ffn_norm": ["feed_forward.w1", "feed_forward.w3"]}
    fused = {"attention_norm": "attention.wqkv", "ffn_norm": "feed_forward.w13"}
    for i, block in enumerate(model.layers):
        for norm_name, parts in readers.items():
            gamma = checkpoint.read(f"layers.{i}.{norm_name}.weight").float()
            original = torch.cat([checkpoint.read(f"layers.{i}.{part}.weight").float() for part in parts]) * gamma
            layers = [fused[norm_name]] if fuse else parts
            assert all(isinstance(block.get_submodule(name), W8A8Linear) for name in layers)
            dequantized = torch.cat([block.get_submodule(name).dequantize() for name in layers])
            smoothed = dequantized * getattr(block, norm_name).weight.detach().float()
            assert not torch.allclose(getattr(block, norm_name).weight.detach().float(), gamma)
            relative_error = (smoothed - original).norm() / original.norm()
            assert relative_error < 0.01, (i, norm_name, relative_error)
