"""AWQ core: exact folds on real transformers blocks, the explicit input scale, the scale and clip
searches against RTN, and the one-group driver."""
import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from quantizers import awq
from fixtures.adapters.layouts import CLIP, LLAMA
from quantizers.folds import norm_linear_pairs
from quantizers.primitives import fake_quantize


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _positive_scale(n, seed):
    return torch.rand(n, generator=_gen(seed)) * 3 + 0.25


def _randomize_norms(layer, seed):
    # Unit gains would hide a fold that forgot the norm; random ones (and biases) expose it.
    g = _gen(seed)
    for module in layer.modules():
        if "norm" in type(module).__name__.lower():
            module.weight.data = torch.rand(module.weight.shape, generator=g) + 0.5
            if getattr(module, "bias", None) is not None:
                module.bias.data = torch.randn(module.bias.shape, generator=g)


def _outlier_input(rows=512, cols=64, seed=0):
    x = torch.randn(rows, cols, generator=_gen(seed))
    x[:, [3, 17, 40]] *= 20   # a few salient channels, as in LLM/ViT activations
    return x


def _mse(a, b):
    return (a - b).pow(2).mean().item()


@torch.no_grad()
def test_folds_preserve_a_llama_decoder_layer():
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                         intermediate_size=128, num_hidden_layers=1, vocab_size=32)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, layer_idx=0).eval()
    _randomize_norms(layer, 1)
    h = torch.randn(2, 7, 64, generator=_gen(2))
    position_embeddings = LlamaRotaryEmbedding(config)(h, torch.arange(7)[None].expand(2, -1))

    def run():
        return layer(h, attention_mask=None, position_embeddings=position_embeddings)

    before = run()
    folds = norm_linear_pairs(layer, LLAMA)
    assert [f.name for f in folds] == ["input_layernorm", "post_attention_layernorm"]
    for i, fold in enumerate(folds):
        awq.fold_into_norm(fold.norm, fold.linears, _positive_scale(64, 10 + i))
    attn, mlp = layer.self_attn, layer.mlp
    awq.fold_into_linear(attn.v_proj, [attn.o_proj], _positive_scale(64, 20))
    awq.fold_into_linear(mlp.up_proj, [mlp.down_proj], _positive_scale(128, 21))
    after = run()
    assert not torch.equal(layer.input_layernorm.weight, torch.ones(64))
    assert (after - before).abs().max().item() <= 1e-5


@torch.no_grad()
def test_folds_preserve_a_clip_encoder_layer():
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    layer = CLIPEncoderLayer(config).eval()
    _randomize_norms(layer, 3)
    h = torch.randn(2, 9, 64, generator=_gen(4))
    before = layer(h, attention_mask=None)
    folds = norm_linear_pairs(layer, CLIP)
    assert [f.name for f in folds] == ["layer_norm1", "layer_norm2"]
    for i, fold in enumerate(folds):
        awq.fold_into_norm(fold.norm, fold.linears, _positive_scale(64, 30 + i))
    attn = layer.self_attn
    awq.fold_into_linear(attn.v_proj, [attn.out_proj], _positive_scale(64, 40))
    after = layer(h, attention_mask=None)
    assert (after - before).abs().max().item() <= 1e-5


@torch.no_grad()
def test_explicit_input_scale_preserves_a_linear_and_is_counted():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    x = torch.randn(10, 64, generator=_gen(5))
    before = linear(x)
    original = linear.weight.clone()
    s = _positive_scale(64, 6)
    handle = awq.attach_input_scale(linear, s)
    assert torch.allclose(linear.weight, original * s)
    assert (linear(x) - before).abs().max().item() <= 1e-5
    assert awq.SCALE_BUFFER in linear.state_dict()
    assert awq.input_scale_bits(linear) == 16 * 64
    assert awq.input_scale_bits(nn.Linear(64, 32)) == 0
    handle.remove()
    assert (linear(x) - before).abs().max().item() > 1e-3   # the hook was doing the work


def test_fold_into_linear_refuses_mismatched_shapes():
    prev, nxt = nn.Linear(64, 32), nn.Linear(48, 16)
    with pytest.raises(ValueError):
        awq.fold_into_linear(prev, [nxt], torch.ones(32))
    with pytest.raises(ValueError):
        awq.fold_into_linear(prev, [nn.Linear(32, 8)], torch.ones(48))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [16, -1])
def test_awq_beats_rtn_on_outlier_channels(bits, group_size):
    x = _outlier_input()
    w = torch.randn(32, 64, generator=_gen(7))
    rtn = _mse(x @ fake_quantize(w, bits, group_size).dequantized.T, x @ w.T)
    linear = nn.Linear(64, 32, bias=False)
    linear.weight.data = w.clone()
    s, alpha, _ = awq.search_scale(x, [linear], bits=bits, group_size=group_size, sym=False)
    assert alpha > 0
    ws, xs = w * s, x / s
    max_val = awq.search_clip(xs, ws, bits=bits, group_size=group_size, sym=False)
    wq = fake_quantize(awq.apply_clip(ws, max_val, group_size), bits, group_size).dequantized
    assert _mse(xs @ wq.T, x @ w.T) < rtn


@pytest.mark.parametrize("group_size", [16, -1])
def test_alpha_zero_is_rtn_exactly(group_size):
    x = _outlier_input()
    linear = nn.Linear(64, 32)
    s, alpha, error = awq.search_scale(x, [linear], bits=3, group_size=group_size, sym=False, n_grid=1)
    assert alpha == 0 and torch.equal(s, torch.ones(64))
    w = linear.weight.detach()
    rtn = fake_quantize(w, 3, group_size)
    assert error == pytest.approx(_mse(x @ rtn.dequantized.T, x @ w.T), rel=1e-6)


def test_equal_channel_activations_keep_alpha_zero():
    # mean|x| equal on every channel: every alpha gives s = 1, and the tie must go to RTN.
    x = torch.randint(0, 2, (128, 64), generator=_gen(15)).float() * 2 - 1
    s, alpha, _ = awq.search_scale(x, [nn.Linear(64, 32)], bits=3, group_size=16, sym=False)
    assert alpha == 0 and torch.equal(s, torch.ones(64))


def _group_errors(x, w, wq, g):
    return torch.tensor([_mse(x[:, c:c + g] @ wq[:, c:c + g].T, x[:, c:c + g] @ w[:, c:c + g].T)
                         for c in range(0, w.shape[1], g)])


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [16, -1])
def test_clip_never_increases_the_error(bits, group_size):
    x = _outlier_input(rows=256, seed=8)
    # Heavy-tailed weights: a few large entries make shrinking the range worthwhile.
    spikes = torch.rand(32, 64, generator=_gen(10)) > 0.97
    w = torch.randn(32, 64, generator=_gen(9)) * (1 + 4 * spikes)
    max_val = awq.search_clip(x, w, bits=bits, group_size=group_size, sym=False)
    g = 64 if group_size == -1 else group_size
    assert max_val.shape == (32, 64 // g)
    original_max = w.abs().reshape(32, -1, g).amax(dim=-1)
    assert (max_val <= original_max).all() and (max_val >= 0.5 * original_max - 1e-6).all()
    assert (max_val < original_max).any()   # the search did clip somewhere
    clipped = awq.apply_clip(w, max_val, group_size)
    assert clipped.abs().max() <= max_val.max()
    plain = fake_quantize(w, bits, group_size).dequantized
    with_clip = fake_quantize(clipped, bits, group_size).dequantized
    for r in range(32):   # the objective is per (row, group): check it there
        before = _group_errors(x, w[r:r + 1], plain[r:r + 1], g)
        after = _group_errors(x, w[r:r + 1], with_clip[r:r + 1], g)
        assert (after <= before * (1 + 1e-5) + 1e-9).all()
