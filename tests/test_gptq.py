"""GPTQ: exactness against RTN where it must agree, lower layer-output error where it must win,
codes that rebuild the weight bit for bit, dead columns, damping retries, the Hessian, the same
bits as the earlier column-at-a-time code, stacked weights equal to one weight at a time."""
import pytest
import torch

from quantizers.gptq import (HessianAccumulator, dequantize, gptq_quantize, gptq_quantize_full,
                             gptq_quantize_stacked)
from quantizers.primitives import fake_quantize
from tests import reference_quant

ROWS, COLS = 32, 64


def generator(seed):
    return torch.Generator().manual_seed(seed)


def correlated_inputs(seed=0, n=512):
    """Mixed features (X = Z A) so columns interact, plus two x10 outlier channels."""
    g = generator(seed)
    x = torch.randn(n, COLS, generator=g) @ torch.randn(COLS, COLS, generator=g) / COLS ** 0.5
    x[:, [3, 40]] *= 10
    return x


def hessian_of(x):
    acc = HessianAccumulator(x.shape[1], "cpu")
    acc.add_batch(x)
    return acc.hessian


def output_error(x, w, w_hat):
    return (x @ w_hat.T - x @ w.T).pow(2).sum().item()


@pytest.fixture
def layer():
    x = correlated_inputs()
    w = torch.randn(ROWS, COLS, generator=generator(1))
    return x, w, hessian_of(x)


@pytest.mark.parametrize("group_size,act_order", [(-1, False), (16, False), (-1, True)])
def test_diagonal_hessian_gives_exactly_rtn(group_size, act_order):
    # Hinv is diagonal, so every error update is multiplied by an exact zero: nothing to compensate.
    w = torch.randn(ROWS, COLS, generator=generator(2))
    h = torch.diag(torch.rand(COLS, generator=generator(3)) + 0.1)
    out = gptq_quantize(w, h, bits=3, group_size=group_size, act_order=act_order)
    assert torch.equal(out, fake_quantize(w, bits=3, group_size=group_size).dequantized)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [-1, 16])
@pytest.mark.parametrize("act_order", [False, True])
def test_lower_layer_output_error_than_rtn(layer, bits, group_size, act_order):
    x, w, h = layer
    gptq = gptq_quantize(w, h, bits=bits, group_size=group_size, act_order=act_order)
    rtn = fake_quantize(w, bits=bits, group_size=group_size).dequantized
    assert output_error(x, w, gptq) < 0.8 * output_error(x, w, rtn)


@pytest.mark.parametrize("options", [
    dict(), dict(group_size=16), dict(group_size=16, act_order=True),
    dict(group_size=16, act_order=True, static_groups=True), dict(group_size=24, sym=True),
])
def test_codes_scale_zero_rebuild_dequantized_bit_for_bit(layer, options):
    _, w, h = layer
    for dtype in (torch.float32, torch.bfloat16):
        res = gptq_quantize_full(w.to(dtype), h, bits=3, **options)
        assert res.dequantized.dtype == dtype and res.codes.dtype == torch.uint8
        assert res.codes.max() <= 7
        rebuilt = dequantize(res.codes, res.scale, res.zero, res.group_index, dtype)
        assert torch.equal(rebuilt, res.dequantized)


def test_group_index_follows_act_order_unless_static(layer):
    _, w, h = layer
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    dynamic = gptq_quantize_full(w, h, bits=4, group_size=16, act_order=True)
    static = gptq_quantize_full(w, h, bits=4, group_size=16, act_order=True, static_groups=True)
    # The four highest-curvature columns (incl. both outliers) were quantized first, in group 0.
    assert dynamic.group_index[perm[:16]].eq(0).all() and dynamic.group_index[perm[48:]].eq(3).all()
    assert torch.equal(static.group_index, torch.arange(COLS) // 16)
    assert dynamic.scale.shape == static.scale.shape == (ROWS, 4)
    # Static grids come from the original weights, exactly as RTN's groups do.
    assert torch.equal(static.scale, fake_quantize(w, bits=4, group_size=16).scale)


def test_dead_input_column_is_zeroed_without_nans(layer):
    x, w, _ = layer
    x = x.clone()
    x[:, 5] = 0
    for options in (dict(), dict(group_size=16, act_order=True)):
        res = gptq_quantize_full(w, hessian_of(x), bits=3, **options)
        assert torch.isfinite(res.dequantized).all()
        assert res.dequantized[:, 5].eq(0).all() and w[:, 5].ne(0).all()


def test_rank_deficient_hessian_without_damping_is_retried():
    # All-ones H: the second Cholesky pivot is exactly 1 - 1 = 0, so damp=0 must fail; the retry
    # uses 0.01 (x10 of zero would never help) and succeeds.
    w = torch.randn(ROWS, COLS, generator=generator(4))
    res = gptq_quantize_full(w, torch.ones(COLS, COLS), bits=4, damp=0.0)
    assert res.retries == 1 and res.damp_used == pytest.approx(0.01)
    assert torch.isfinite(res.dequantized).all()


def test_well_conditioned_hessian_needs_no_retry(layer):
    _, w, h = layer
    res = gptq_quantize_full(w, h, bits=4, damp=0.01)
    assert res.retries == 0 and res.damp_used == 0.01


def test_negative_definite_hessian_raises_after_bounded_retries():
    w = torch.randn(ROWS, COLS, generator=generator(5))
    with pytest.raises(ValueError, match="not positive definite even with damping raised 3 times"):
        gptq_quantize(w, -torch.eye(COLS), bits=4)


def test_caller_hessian_and_weight_are_not_modified(layer):
    x, w, _ = layer
    x = x.clone()
    x[:, 7] = 0
    h = hessian_of(x)
    h_before, w_before = h.clone(), w.clone()
    gptq_quantize(w, h, bits=3, group_size=16, act_order=True)
    assert torch.equal(h, h_before) and torch.equal(w, w_before)


@pytest.mark.parametrize("options", [
    dict(), dict(act_order=True), dict(group_size=16), dict(group_size=32, act_order=True),
    dict(group_size=24), dict(group_size=16, act_order=True, static_groups=True),
])
@pytest.mark.parametrize("block_size", [16, 10, 1])
def test_lazy_block_updates_are_exact(layer, options, block_size):
    # Includes groups that straddle blocks (group 32 / block 16, group 24 / block 10): their grid
    # must see the block's pending updates, or the result would depend on block_size.
    _, w, h = layer
    small = gptq_quantize(w, h, bits=3, block_size=block_size, **options)
    full = gptq_quantize(w, h, bits=3, block_size=128, **options)
    assert torch.allclose(small, full, atol=1e-5)


def test_invalid_arguments_are_one_clear_error(layer):
    _, w, h = layer
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize(w, h, bits=9)
    with pytest.raises(ValueError, match="hessian"):
        gptq_quantize(w, h[:10, :10], bits=4)


def test_accumulator_matches_one_shot_hessian_over_uneven_chunks():
    x = torch.randn(2, 50, 16, generator=generator(6))  # (batch, tokens, features)
    acc = HessianAccumulator(16, "cpu")
    flat = x.reshape(-1, 16)
    for chunk in (flat[:7], flat[7:70].reshape(3, 21, 16), flat[70:]):
        acc.add_batch(chunk)
    assert acc.rows_seen == 100
    assert torch.allclose(acc.hessian, 2 / 100 * flat.T @ flat, atol=1e-5)


def test_weighted_accumulator_matches_token_weighted_formula():
    x = torch.randn(90, 8, generator=generator(7))
    lam = torch.rand(90, generator=generator(8))
    acc = HessianAccumulator(8, "cpu")
    acc.add_batch(x[:40], weights=lam[:40])
    acc.add_batch(x[40:], weights=lam[40:])
    assert torch.allclose(acc.hessian, 2 / 90 * x.T @ torch.diag(lam) @ x, atol=1e-5)
    with pytest.raises(ValueError, match="non-negative"):
        acc.add_batch(x[:2], weights=torch.tensor([1.0, -1.0]))


RESULT_FIELDS = ("dequantized", "codes", "scale", "zero", "group_index", "damp_used", "retries")
# Option sets that reach every path: per channel, dynamic groups inside blocks and straddling
# them (the pending-update matmul), act_order, static groups, symmetric, dead columns.
PATHS = [
    dict(), dict(group_size=16), dict(group_size=16, act_order=True),
    dict(group_size=16, act_order=True, static_groups=True), dict(group_size=24, sym=True),
    dict(group_size=16, block_size=10), dict(group_size=24, act_order=True, block_size=10),
    dict(group_size=32, sym=True, block_size=16), dict(act_order=True, block_size=7),
]


def assert_same_result(a, b):
    for field in RESULT_FIELDS:
        x, y = getattr(a, field), getattr(b, field)
        assert (torch.equal(x, y) and x.dtype == y.dtype) if torch.is_tensor(x) else x == y, field


@pytest.fixture(scope="module")
def frozen():
    """The cores as of commit 40de34e, kept as test data in tests/reference_quant.py."""
    return reference_quant


@pytest.mark.parametrize("options", PATHS)
@pytest.mark.parametrize("dead", [False, True])
def test_same_bits_as_the_frozen_column_at_a_time_code(frozen, options, dead):
    x = correlated_inputs()
    if dead:
        x[:, 5] = 0
    w, h = torch.randn(ROWS, COLS, generator=generator(11)), hessian_of(x)
    for bits in (2, 4):
        assert_same_result(gptq_quantize_full(w, h, bits=bits, **options),
                           frozen.gptq_quantize_full(w, h, bits=bits, **options))


@pytest.mark.parametrize("options", PATHS)
def test_stacked_weights_equal_one_weight_at_a_time_bit_for_bit(options):
    # 7 rows: without the 16-row alignment the third weight would start off a 64-byte boundary,
    # and with block_size 10 MKL's small-matrix kernels then round some of its lazy updates in
    # the last bit (this test fails with STACK_ALIGN_ROWS = 1), enough to move a code.
    cols = 100
    g = generator(12)
    x = torch.randn(512, cols, generator=g) @ torch.randn(cols, cols, generator=g) / cols ** 0.5
    x[:, 3] *= 10
    h = hessian_of(x)
    weights = [torch.randn(rows, cols, generator=g) for rows in (32, 7, 48)]
    weights[1] = weights[1].to(torch.bfloat16)
    stacked = gptq_quantize_stacked(weights, h, bits=3, **options)
    assert len(stacked) == len(weights)
    for weight, result in zip(weights, stacked):
        assert_same_result(result, gptq_quantize_full(weight, h, bits=3, **options))


def test_stacked_rejects_a_weight_of_another_width(layer):
    _, w, h = layer
    assert gptq_quantize_stacked([], h, bits=4) == []
    with pytest.raises(ValueError, match="hessian"):
        gptq_quantize_stacked([w, w[:, :10]], h, bits=4)


# Block-graph path: every group grid known at a block start (per channel, static groups, dynamic
# groups of one or more whole blocks, with and without act_order), and a last partial block.
GRAPH_PATHS = [dict(block_size=16), dict(group_size=16, block_size=16), dict(group_size=32, block_size=16),
               dict(group_size=16, static_groups=True, block_size=32),
               dict(group_size=16, act_order=True, block_size=16), dict(group_size=-1, act_order=True, block_size=24)]


@pytest.mark.parametrize("options", GRAPH_PATHS)
def test_block_graph_path_gives_the_eager_bits(monkeypatch, options):
    # On CUDA each full block is one graph replay over static buffers; on CPU _BlockGraph sweeps
    # the same buffers eagerly, so this checks everything but the capture: inputs copied in,
    # per-column grids gathered, dynamic grids set at block starts, the partial block eager.
    import quantizers.gptq as gptq

    cols = 100   # not a multiple of 16 or 24: the last block is partial
    g = generator(13)
    x = torch.randn(512, cols, generator=g) @ torch.randn(cols, cols, generator=g) / cols ** 0.5
    x[:, 7] *= 10
    h = hessian_of(x)
    weights = [torch.randn(rows, cols, generator=g) for rows in (32, 48)]
    eager = gptq_quantize_stacked(weights, h, bits=3, **options)
    used = []
    real_graph = gptq._BlockGraph

    def graph(*args):
        used.append(args)
        return real_graph(*args)

    monkeypatch.setattr(gptq, "_BlockGraph", graph)
    monkeypatch.setattr(gptq, "_GRAPHS", type(gptq._GRAPHS)())   # captured here, none reused from elsewhere
    monkeypatch.setattr(gptq, "use_block_graphs", lambda device, dynamic, group, block_size:
                        not dynamic or group % block_size == 0)
    with_graph = gptq_quantize_stacked(weights, h, bits=3, **options)
    assert used, "the block-graph path did not run"
    for a, b in zip(with_graph, eager):
        assert_same_result(a, b)


def test_one_block_graph_serves_every_weight_of_its_shape(monkeypatch):
    """Graphs are captured once per (rows, width, grid, device) and reused: a second weight of
    the same shape, swept over buffers the first one left behind, gets the eager bits too."""
    import quantizers.gptq as gptq

    monkeypatch.setattr(gptq, "_GRAPHS", type(gptq._GRAPHS)())
    monkeypatch.setattr(gptq, "MAX_GRAPHS", 2)
    monkeypatch.setattr(gptq, "use_block_graphs", lambda device, dynamic, group, block_size: True)
    g = generator(5)
    x = torch.randn(256, 64, generator=g)
    h = hessian_of(x)
    weights = [torch.randn(32, 64, generator=g) for _ in range(3)]
    with_graphs = [gptq_quantize_stacked([w], h, bits=4, group_size=16, block_size=16) for w in weights]
    assert len(gptq._GRAPHS) == 1
    monkeypatch.setattr(gptq, "use_block_graphs", lambda device, dynamic, group, block_size: False)
    for w, result in zip(weights, with_graphs):
        for a, b in zip(result, gptq_quantize_stacked([w], h, bits=4, group_size=16, block_size=16)):
            assert_same_result(a, b)
    for rows in (8, 16, 24):   # the oldest shapes leave first
        gptq.block_graph(rows, 16, 15, torch.device("cpu"))
    assert [key[0] for key in gptq._GRAPHS] == [16, 24]


def test_block_graphs_only_where_grids_are_known_at_block_starts(monkeypatch):
    from quantizers.gptq import use_block_graphs

    cuda = torch.device("cuda")
    assert not use_block_graphs(torch.device("cpu"), False, 64, 64)
    assert use_block_graphs(cuda, False, 32, 128)          # static groups, per channel
    assert use_block_graphs(cuda, True, 256, 128) and not use_block_graphs(cuda, True, 32, 128)
    monkeypatch.setenv("VQB_GPTQ_GRAPHS", "0")
    assert not use_block_graphs(cuda, False, 32, 128)
