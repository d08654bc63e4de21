"""Activation quantization: arithmetic against hand-computed grids, range calibration, the grid's
a_quant field, and static ranges surviving the quantized-model cache."""
import copy

import pytest
import torch
from torch import nn

from fixtures.runtime.grid import GridError, load_grid
from quantizers import activations, api
from quantizers.config import ActivationQuant, ConfigError, make_config
from tests.llava_cases import MODEL, case_for

TENSOR_MINMAX = ActivationQuant("tensor", "minmax")


def test_dynamic_asymmetric_per_token_by_hand():
    # min -1, max 2, 4 bits: scale 3/15 = 0.2, zero round(1/0.2) = 5.
    # 0.5 / 0.2 = 2.5 rounds half to even (2): code 7, value 0.2 * (7 - 5) = 0.4.
    x = torch.tensor([[-1.0, 0.5, 2.0], [0.0, 0.0, 0.0]])
    out = activations.quantize_dynamic(x, 4)
    assert torch.allclose(out[0], torch.tensor([-1.0, 0.4, 2.0]), atol=1e-6)
    assert torch.equal(out[1], x[1])      # an all-zero token stays zero (its grid is [-1, 1])


def test_dynamic_symmetric_per_token_by_hand():
    # sym: max |x| = 2, range [-2, 2], scale 4/15, zero 8. -1 -> -3.75 -> -4 -> code 4 -> -16/15;
    # 0.5 -> 1.875 -> 2 -> code 10 -> 8/15; 2 -> 7.5 -> 8 (half to even) -> code 16, clamped to 15.
    x = torch.tensor([[-1.0, 0.5, 2.0]])
    out = activations.quantize_dynamic(x, 4, sym=True)
    assert torch.allclose(out[0], torch.tensor([-16 / 15, 8 / 15, 28 / 15]), atol=1e-6)


def test_static_per_tensor_clips_to_its_range():
    # range [0, 1.5], 4 bits asym: scale 0.1, zero 0. -1 clips to 0, 3 clips to 1.5.
    out = activations.quantize_static(torch.tensor([-1.0, 0.7, 3.0]), torch.tensor(0.0), torch.tensor(1.5), 4)
    assert torch.allclose(out, torch.tensor([0.0, 0.7, 1.5]), atol=1e-6)


def test_static_per_channel_gives_each_channel_its_own_grid():
    lo, hi = torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 3.0])
    x = torch.tensor([[0.3, 0.3], [5.0, 5.0]])
    out = activations.quantize_static(x, lo, hi, 2)   # 4 levels: [-1, 1] step 2/3; [0, 3] step 1
    # channel 0: zero round(1/(2/3)) = 2 (1.5 -> 2): 0.3 -> code round(0.45)+2 = 2 -> 0.0; 5 -> 1.0 (clip)
    # channel 1: 0.3 -> 0; 5 -> 3 (clip)
    assert torch.allclose(out, torch.tensor([[0.0, 0.0], [2 / 3 * (3 - 2), 3.0]]), atol=1e-6)


def test_observed_ranges_minmax_percentile_and_per_channel():
    x = torch.arange(1, 1001, dtype=torch.float32).reshape(500, 2)   # channel 0 odd, channel 1 even
    lo, hi = activations.observed_range(x, TENSOR_MINMAX)
    assert (lo.item(), hi.item()) == (1.0, 1000.0)
    lo, hi = activations.observed_range(x, ActivationQuant("tensor", "percentile", 0.99))
    assert (lo.item(), hi.item()) == (10.0, 990.0)                   # the 10th and 990th of 1000
    lo, hi = activations.observed_range(x, ActivationQuant("channel", "minmax"))
    assert lo.tolist() == [1.0, 2.0] and hi.tolist() == [999.0, 1000.0]
    both = [(torch.tensor(0.0), torch.tensor(4.0)), (torch.tensor(-2.0), torch.tensor(2.0))]
    assert [t.item() for t in activations.combine_ranges(both, TENSOR_MINMAX)] == [-2.0, 4.0]
    assert [t.item() for t in activations.combine_ranges(both, ActivationQuant("tensor", "percentile"))] == [-1.0, 3.0]


def test_calibrated_hook_quantizes_on_the_fitted_range():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    batches = [torch.randn(5, 8) for _ in range(3)]

    class Wrapper(nn.Module):   # calibrate_ranges calls model(**batch, use_cache=False)
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x, use_cache=False):
            return self.inner(x)

    modules = {"0": model[0]}
    ranges = activations.calibrate_ranges(Wrapper(), modules, [{"x": b} for b in batches], {"0": TENSOR_MINMAX})
    lo, hi = ranges["0"]
    assert lo.item() == min(b.min().item() for b in batches) and hi.item() == max(b.max().item() for b in batches)
    handles = activations.attach(modules, 4, {"0": TENSOR_MINMAX}, ranges)
    x = torch.randn(2, 8) * 3
    expected = model[0].weight @ activations.quantize_static(x, lo, hi, 4).T
    assert torch.allclose(model(x), expected.T + model[0].bias, atol=1e-6)
    for handle in handles:
        handle.remove()
    with pytest.raises(ValueError, match="no calibrated range"):
        activations.attach(modules, 4, {"0": TENSOR_MINMAX}, {})


@pytest.mark.parametrize("a_quant, message", [
    ({"granularity": "row"}, "granularity must be one of"),
    ({"clip": "percentile"}, "needs a static granularity"),
    ({"granularity": "tensor", "clip": "percentile", "percentile": 1.5}, "percentile must be"),
    ({"gran": "tensor"}, "unknown field"),
])
def test_bad_a_quant_is_one_clear_error(tmp_path, a_quant, message):
    grid = tmp_path / "grid.yaml"
    grid.write_text("models: {llava-tiny: {family: llava, path: fixtures/tiny/llava-tiny}}\n"
                    "tasks: {vqav2: {data: embedded}}\n"
                    f"configs: [{{name: x, method: rtn, bits: {{language: 4}}, a_bits: 4, a_quant: {a_quant}}}]\n")
    with pytest.raises(GridError, match=message):
        load_grid(grid)


def test_a_bits_outside_the_marked_widths_and_a_quant_without_a_bits_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="a_bits must be one of 4, 6, 8 or 16"):
        make_config("x", "rtn", {"language": 4}, a_bits=5)
    grid = tmp_path / "grid.yaml"
    grid.write_text("models: {llava-tiny: {family: llava, path: fixtures/tiny/llava-tiny}}\n"
                    "tasks: {vqav2: {data: embedded}}\n"
                    "configs: [{name: x, method: rtn, bits: {language: 4}, a_quant: {granularity: tensor}}]\n")
    with pytest.raises(GridError, match="needs a_bits"):
        load_grid(grid)


def test_weight_only_configs_keep_their_hash_and_static_activations_calibrate():
    weight_only = make_config("x", "rtn", {"language": 4})
    assert "a_quant" not in weight_only.fingerprint() and not weight_only.calibrates
    assert not make_config("x", "rtn", {"language": 4}, a_bits=8).calibrates        # dynamic: no data
    static = make_config("x", "rtn", {"language": 4}, a_bits=4, a_quant=TENSOR_MINMAX)
    assert static.calibrates and static.activation_label == "a4-tensor-minmax-asym"
    assert static.hash() != make_config("x", "rtn", {"language": 4}, a_bits=4).hash()


def test_static_ranges_are_stored_in_the_cache_entry_and_restored(bench):  # noqa: F811
    config = make_config("rtn-w4a4", "rtn", {"language": 4, "connector": 4}, a_bits=4,
                         a_quant=ActivationQuant("channel", "percentile", 0.99))
    case = case_for(config)
    fp = bench.models.fp(MODEL)
    quantized, restored = copy.deepcopy(fp), copy.deepcopy(fp)
    batches = bench.data.calibration_batches(case, quantized)
    _, entry = api.quantize(quantized, config, batches)
    ranges, method_state = activations.split_state(entry.state)
    assert not method_state and set(ranges) == {f"{t.name}" for t in api.select_targets(quantized, config)}
    api.restore(restored, config, entry)
    with torch.no_grad():
        a, b = quantized.model(**batches[0]).logits, restored.model(**batches[0]).logits
        plain = fp.model(**batches[0]).logits
    assert torch.equal(a, b) and not torch.equal(a, plain)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_sorted_ranks_equal_kthvalue_at_every_candidate(granularity):
    # The GPU path sorts once and reads each percentile's ranks; the host path selects with
    # kthvalue. Order statistics are exact: the two must agree bit for bit, ties included.
    x = torch.randn(3, 50, 16, generator=torch.Generator().manual_seed(4))
    x[0, :5] = 2.5                                              # ties at the top
    spec = ActivationQuant(granularity, "percentile", 0.98)
    candidates = [1.0, 0.995, 0.99, 0.985, 0.98]
    by_sort = activations.observed_ranges(x, spec, candidates, sort=True)
    by_select = activations.observed_ranges(x, spec, candidates, sort=False)
    for p in candidates:
        assert all(torch.equal(a, b) for a, b in zip(by_sort[p], by_select[p])), p
        assert all(torch.equal(a, b) for a, b in zip(by_select[p], activations.observed_range(x, spec, p)))


# -- issue 18: the authors' quantizers -----------------------------------------------------------
def _hooked(spec, value_range=None, tokens=None):
    quantizer = activations.ActivationQuantizer(4, spec, value_range, tokens)
    return lambda x: quantizer(None, (x,))[0]


def test_official_resolves_per_role_from_the_layout():
    from fixtures.adapters import layouts
    official = ActivationQuant("official")
    role = lambda component, name, layout=None: activations.resolve(official, component, name, layout).granularity
    assert role("language", "model.language_model.layers.0.self_attn.q_proj", layouts.LLAMA) == "channel"
    assert role("language", "model.language_model.layers.0.mlp.up_proj", layouts.LLAMA) == "channel"
    assert role("language", "model.language_model.layers.0.self_attn.o_proj", layouts.LLAMA) == "channel_dynamic"
    assert role("language", "model.language_model.layers.0.mlp.down_proj", layouts.LLAMA) == "channel_dynamic"
    assert role("language", "language_model.model.decoder.layers.0.fc2", layouts.OPT) == "channel_dynamic"
    assert role("language", "x.layers.3.mlp.down_proj") == "channel_dynamic"     # no layout: by name
    assert role("vision", "model.vision_tower.encoder.layers.0.mlp.fc1", layouts.CLIP) == "position"
    assert role("connector", "model.multi_modal_projector.linear_2", layouts.PLAIN) == "channel"
    assert activations.resolve(TENSOR_MINMAX, "vision", "anything") is TENSOR_MINMAX
    assert official.decode == "widen" and TENSOR_MINMAX.decode == "clip"


def test_decode_tokens_are_never_clipped_when_widened():
    lo, hi = torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 1.0])
    token = torch.tensor([[[5.0, 0.5]]])                       # a decode step: one token, out of range
    clipped = _hooked(ActivationQuant("channel", decode="clip"), (lo, hi))(token)
    widened = _hooked(ActivationQuant("channel", decode="widen"), (lo, hi))(token)
    # clipped: the top of [-1, 1] (within a step of 2/15); widened: 5 on the grid of [-1, 5]
    # (step 0.4), off by at most half a step, as any unclipped value
    assert abs(clipped[0, 0, 0] - 1.0) <= 2 / 15 and abs(widened[0, 0, 0] - 5.0) <= 0.2 + 1e-6
    # a prefill (several tokens) is quantized on the static range either way
    prefill = torch.tensor([[[5.0, 0.5], [0.0, 0.0]]])
    assert _hooked(ActivationQuant("channel", decode="widen"), (lo, hi))(prefill)[0, 0, 0] <= 1.0 + 2 / 15


def test_channel_dynamic_ranges_skip_padding_and_do_not_depend_on_the_batch():
    spec = ActivationQuant("channel_dynamic")
    tokens = activations.TokenMask()
    generator = torch.Generator().manual_seed(0)
    alone = torch.randn(1, 3, 4, generator=generator)
    padding = torch.full((1, 2, 4), 100.0)                     # huge values on the pad positions
    batch = torch.cat([torch.cat([padding, alone], dim=1), torch.randn(1, 5, 4, generator=generator)])
    tokens.set(torch.tensor([[1, 1, 1]]))
    one = _hooked(spec, tokens=tokens)(alone)
    tokens.set(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))
    both = _hooked(spec, tokens=tokens)(batch)
    assert torch.equal(both[0, 2:], one[0])
    # the range is each channel's own over the real tokens (and zero): every value within half a
    # step of that grid (the pad values of 100 would have made the step about 7)
    step = (alone[0].amax(dim=0).clamp(min=0) - alone[0].amin(dim=0).clamp(max=0)) / 15
    assert ((one[0] - alone[0]).abs() <= step / 2 + 1e-6).all()


def test_channel_dynamic_decode_reuses_the_prefill_range_widened_by_the_token():
    quantizer = activations.ActivationQuantizer(2, ActivationQuant("channel_dynamic", decode="widen"))
    prefill = torch.tensor([[[0.0, 0.0], [3.0, 3.0]]])          # range [0, 3] per channel, step 1
    quantizer(None, (prefill,))
    out = quantizer(None, (torch.tensor([[[1.4, 6.0]]]),))[0]  # 1.4 on the prefill grid; 6 widens it
    assert out[0, 0, 0] == 1.0 and out[0, 0, 1] == 6.0


def test_position_ranges_hold_one_range_per_token_position():
    x = torch.tensor([[[1.0, -1.0], [10.0, 0.0]], [[2.0, 0.0], [20.0, -5.0]]])   # (batch 2, positions 2, channels 2)
    spec = ActivationQuant("position")
    lo, hi = activations.observed_range(x, spec)
    assert lo.tolist() == [-1.0, -5.0] and hi.tolist() == [2.0, 20.0]
    out = _hooked(spec, (lo, hi))(x)
    assert out.shape == x.shape and out[1, 1, 0] == 20.0       # position 1's own range holds 20
    with pytest.raises(RuntimeError, match="positions"):
        _hooked(spec, (lo, hi))(x[:, :1])


def test_a_quant_parse_checks_the_decode_rule_and_types():
    assert ActivationQuant.parse({"granularity": "official"}, "x").decode == "widen"
    assert ActivationQuant.parse({"granularity": "position", "clip": "percentile"}, "x").static
    for bad in ({"decode": "maybe"}, {"granularity": "channel_dynamic", "clip": "percentile"},
                {"sym": "yes"}, {"granularity": 4}):
        with pytest.raises(ConfigError):
            ActivationQuant.parse(bad, "x")


def test_a_model_with_whole_prefill_ranges_is_not_generated_with_a_shared_prefix():
    model = nn.Sequential(nn.Linear(4, 4))
    assert not activations.needs_whole_prefill(model)
    activations.attach({"0": model[0]}, 4, {"0": ActivationQuant("channel_dynamic")})
    assert activations.needs_whole_prefill(model)
