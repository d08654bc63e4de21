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


# -- The one-candidate-at-a-time searches as of commit 40de34e: the reference for the batched
# searches, which must choose the same scale, alpha, error and clip bounds bit for bit. The
# helpers they call (_grouped, _sample_rows, apply_clip, fake_quantize) are unchanged since.
def _old_output_mse(x, weight, weight_q, row_chunk):
    total = 0.0
    for start in range(0, x.shape[0], row_chunk):
        rows = slice(start, start + row_chunk)
        diff = x[rows] @ weight_q.T - x[rows] @ weight.T
        total += diff.pow(2).sum().item()
    return total / (x.shape[0] * weight.shape[0])


def _old_search_scale(x, linears, *, bits, group_size, sym, n_grid=20, row_chunk=4096):
    x = x.reshape(-1, x.shape[-1]).float()
    weights = [linear.weight.detach().float() for linear in linears]
    act_mean = x.abs().mean(dim=0)
    best = (torch.ones_like(act_mean), 0.0, float("inf"))
    for k in range(n_grid):
        alpha = k / n_grid
        s = act_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        error = sum(_old_output_mse(x, w, fake_quantize(w * s, bits, group_size, sym).dequantized
                                    / s, row_chunk) for w in weights)
        if error < best[2]:
            best = (s, alpha, error)
    return best


def _old_clip_chunk(xg, w, *, bits, g, sym, n_grid, n_shrink):
    wg = awq._grouped(w, g)
    original_max = wg.abs().amax(dim=-1)
    reference = torch.einsum("ngk,rgk->nrg", xg, wg)
    best_max, best_err = original_max.clone(), torch.full_like(original_max, float("inf"))
    for i in range(n_shrink):
        max_val = original_max * (1 - i / n_grid)
        clipped = awq.apply_clip(w, max_val, g)
        wq = awq._grouped(fake_quantize(clipped, bits, g, sym).dequantized, g)
        err = (torch.einsum("ngk,rgk->nrg", xg, wq) - reference).pow(2).mean(dim=0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, max_val, best_max)
    return best_max


def _old_search_clip(x, weight, *, bits, group_size, sym, n_grid=20, max_shrink=0.5,
                     n_sample_tokens=512, seed=0, budget=2 ** 24):
    w = weight.detach().float()
    g = w.shape[1] if group_size == -1 or group_size >= w.shape[1] else group_size
    xs = awq._sample_rows(x.reshape(-1, x.shape[-1]).float(), n_sample_tokens, seed)
    xg = awq._grouped(xs, g)
    n_shrink = max(1, int(max_shrink * n_grid))
    chunk = max(1, budget // (xg.shape[0] * xg.shape[1]))
    return torch.cat([_old_clip_chunk(xg, w[start:start + chunk], bits=bits, g=g, sym=sym,
                                      n_grid=n_grid, n_shrink=n_shrink)
                      for start in range(0, w.shape[0], chunk)])


def _random_layer(seed, rows, cols, out, n_linears=1):
    """Outlier input channels and heavy-tailed weights, so both searches have real choices."""
    g = _gen(seed)
    x = torch.randn(rows, cols, generator=g)
    x[:, [1, cols // 2]] *= 20
    linears = []
    for _ in range(n_linears):
        linear = nn.Linear(cols, out, bias=False)
        spikes = torch.rand(out, cols, generator=g) > 0.97
        linear.weight.data = torch.randn(out, cols, generator=g) * (1 + 4 * spikes)
        linears.append(linear)
    return x, linears


SEARCH_CASES = [dict(bits=2, group_size=16, sym=False), dict(bits=3, group_size=24, sym=True),
                dict(bits=4, group_size=-1, sym=False), dict(bits=4, group_size=16, sym=True)]
# (rows of x, in, out, Linears): 7 outputs and 40 inputs (groups of 24 padded) are odd sizes.
SEARCH_SHAPES = [(512, 64, 32, 1), (77, 40, 7, 3), (300, 96, 48, 2)]


@pytest.mark.parametrize("options", SEARCH_CASES)
@pytest.mark.parametrize("shape", SEARCH_SHAPES)
@pytest.mark.parametrize("n_grid", [20, 7])
def test_batched_scale_search_equals_the_one_candidate_loop(options, shape, n_grid):
    x, linears = _random_layer(sum(shape) + n_grid, *shape)
    s, alpha, error = awq.search_scale(x, linears, n_grid=n_grid, **options)
    s_old, alpha_old, error_old = _old_search_scale(x, linears, n_grid=n_grid, **options)
    assert torch.equal(s, s_old) and alpha == alpha_old and error == error_old


def test_scale_search_batches_and_row_chunks_change_nothing(monkeypatch):
    x, linears = _random_layer(3, 300, 64, 32, n_linears=2)
    # Three candidates per batch (20 = 3 x 6 + 2) and row chunks of 128 (300 = 2 x 128 + 44).
    monkeypatch.setattr(awq, "_SEARCH_BUDGET_CPU", 3 * 32 * 64)
    monkeypatch.setattr(awq, "_ROW_CHUNK", 128)
    s, alpha, error = awq.search_scale(x, linears, bits=3, group_size=16, sym=False)
    s_old, alpha_old, error_old = _old_search_scale(x, linears, bits=3, group_size=16, sym=False,
                                                    row_chunk=128)
    assert torch.equal(s, s_old) and alpha == alpha_old and error == error_old
    assert alpha > 0


@pytest.mark.parametrize("options", SEARCH_CASES)
@pytest.mark.parametrize("shape", SEARCH_SHAPES)
@pytest.mark.parametrize("n_grid,max_shrink", [(20, 0.5), (7, 0.6), (1, 0.5)])
def test_batched_clip_search_equals_the_one_candidate_loop(options, shape, n_grid, max_shrink):
    x, linears = _random_layer(sum(shape) + n_grid, *shape)
    w = linears[0].weight
    kwargs = dict(n_grid=n_grid, max_shrink=max_shrink, n_sample_tokens=256, **options)
    assert torch.equal(awq.search_clip(x, w, **kwargs), _old_search_clip(x, w, **kwargs))


def test_clip_search_row_chunks_candidate_batches_and_ties_keep_the_first_best(monkeypatch):
    x, linears = _random_layer(4, 256, 64, 32)
    x[:, 16:32] = 0   # group 1 never fires: every bound has error 0, and no clip must win
    w = linears[0].weight
    monkeypatch.setattr(awq, "_CLIP_BUDGET", 256 * 4 * 5)   # 5 rows per chunk: 32 = 6 x 5 + 2
    old = _old_search_clip(x, w, bits=3, group_size=16, sym=False, budget=256 * 4 * 5)
    for per_batch in (10, 3, 1):   # candidates per batch: 10 = 3 x 3 + 1
        monkeypatch.setattr(awq, "_SEARCH_BUDGET_CPU", per_batch * 5 * 64)
        max_val = awq.search_clip(x, w, bits=3, group_size=16, sym=False)
        assert torch.equal(max_val, old), per_batch
    assert torch.equal(max_val[:, 1], w.detach().abs()[:, 16:32].amax(dim=1))
    original_max = w.detach().abs().reshape(32, 4, 16).amax(-1)
    assert (max_val[:, [0, 2, 3]] < original_max[:, [0, 2, 3]]).any()   # elsewhere it did clip
