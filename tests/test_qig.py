"""QIG: integrated gradients' completeness, the token weights' normalization and IQR clipping,
uniform weighting = plain AWQ/GPTQ bit for bit, the vision mask from a real processor's output,
and a QIG-weighted AWQ/GPTQ run on the tiny LLaVA."""
import copy

import pytest
import torch

from quantizers import api, awq, qig
from quantizers.config import ConfigError, make_config
from quantizers.gptq import HessianAccumulator
from quantizers.targets import select_targets
from quantizers.weighting import TokenWeighting
from tests.llava_cases import MODEL, case_for, params


def test_integrated_gradients_are_complete():
    # f is smooth and non-linear; the midpoint rule's error falls as 1/steps^2.
    f = lambda z: (torch.sin(z) * z ** 2).sum()
    x = torch.tensor([[0.5, -1.2, 2.0], [1.5, 0.3, -0.7]], dtype=torch.float64)
    baseline = torch.tensor([[0.1, 0.0, 1.0], [-0.5, 0.3, 0.2]], dtype=torch.float64)
    attributions = qig.integrated_gradients(f, x, baseline, steps=32)
    assert attributions.shape == x.shape
    assert attributions.sum().item() == pytest.approx((f(x) - f(baseline)).item(), rel=1e-3)
    assert attributions[1, 1].item() == 0.0           # an element equal to its baseline gets nothing


def test_token_weights_are_normalized_and_iqr_clipped_by_hand():
    scores = torch.tensor([[1.0, 1.0, 2.0, 2.0, 100.0, 7.0]])
    real = torch.tensor([[1, 1, 1, 1, 1, 0]])
    unclipped = qig.token_weights(scores, real, iqr_clip=False)
    assert unclipped[0, 5] == 0 and unclipped[0, :5].mean().item() == pytest.approx(1.0)
    # over the 5 real scores: Q1 = 1, Q3 = 2, IQR 1 -> the 100 is clipped to 3.5 (after the first
    # normalization the same quantiles scale along), then everything renormalized to mean 1
    clipped = qig.token_weights(scores, real)
    expected = torch.tensor([1.0, 1.0, 2.0, 2.0, 3.5]) / 1.9
    assert torch.allclose(clipped[0, :5], expected, atol=1e-5) and clipped[0, 5] == 0
    # no signal at all (inputs equal to the baseline): uniform over the real tokens
    assert torch.equal(qig.token_weights(torch.zeros(1, 3), torch.tensor([[1, 1, 0]])), torch.tensor([[1.0, 1.0, 0.0]]))


def test_modality_weights_give_each_modality_its_mean():
    weights = torch.tensor([[2.0, 4.0, 1.0, 1.0, 2.0]])
    vision = torch.tensor([[1, 1, 0, 0, 0]])
    found = qig.modality_weights(weights, vision)
    assert found[0, 0] == found[0, 1] and found[0, 2] == found[0, 3] == found[0, 4]
    assert (found[0, 0] / found[0, 2]).item() == pytest.approx(3.0 / (4 / 3))
    assert found.mean().item() == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_uniform_weighting_is_the_plain_method_bit_for_bit(bench, method):  # noqa: F811
    plain = make_config(method, method, {"language": 3}, group_size=32, layers="0")
    uniform = make_config(method, method, {"language": 3}, group_size=32, layers="0", params={"weighting": "uniform"})
    assert plain.hash() == uniform.hash()             # the same computation, the same identity
    fp = bench.models.fp(MODEL)
    results = []
    for config in (plain, uniform):
        adapter = copy.deepcopy(fp)
        api.quantize(adapter, config, bench.data.calibration_batches(case_for(config), adapter))
        results.append(params(adapter))
    assert all(torch.equal(results[0][name], results[1][name]) for name in results[0])


def test_weights_of_one_leave_the_awq_search_and_the_gptq_hessian_as_they_were():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=generator) * torch.linspace(0.1, 4, 32)
    linear = torch.nn.Linear(32, 16)
    ones = torch.ones(256)
    plain = awq.search_scale(x, [linear], bits=3, group_size=-1, sym=False)
    weighted = awq.search_scale(x, [linear], bits=3, group_size=-1, sym=False, row_weights=ones)
    assert plain[1] == weighted[1] and weighted[2] == pytest.approx(plain[2], rel=1e-5)
    h_plain, h_weighted = HessianAccumulator(32), HessianAccumulator(32)
    h_plain.add_batch(x)
    h_weighted.add_batch(x, ones)
    assert torch.equal(h_plain.hessian, h_weighted.hessian)
    # a weight of 0 removes a row: the Hessian of the other rows, over the same count
    h_drop, h_rest = HessianAccumulator(32), HessianAccumulator(32)
    h_drop.add_batch(x, torch.cat([torch.zeros(128), torch.ones(128)]))
    h_rest.add_batch(x[128:])
    assert torch.allclose(h_drop.hessian * 2, h_rest.hessian, rtol=1e-5, atol=1e-6)


def test_vision_mask_comes_from_the_processors_image_tokens(bench):  # noqa: F811
    adapter = bench.models.fp(MODEL)
    config = make_config("q", "awq", {"language": 3}, params={"weighting": "modality"})
    batch = bench.data.calibration_batches(case_for(config), adapter)[0]
    vision = batch["input_ids"] == adapter.image_token_id
    # the processor expands <image> into one token per patch the projector feeds the LM (LLaVA's
    # "default" feature selection drops the class token)
    vision_config = adapter.model.config.vision_config
    per_image = (vision_config.image_size // vision_config.patch_size) ** 2
    assert vision.sum(dim=1).tolist() == [per_image] * batch["input_ids"].shape[0]


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_a_qig_run_weights_tokens_unevenly_and_quantizes_every_target(bench, method):  # noqa: F811
    config = make_config(f"{method}-qig", method, {"language": 3}, group_size=32, layers="1-2",
                         params={"weighting": "qig", "ig_steps": 4})
    assert config.params.marks() == ("qig",)
    fp = bench.models.fp(MODEL)
    adapter = copy.deepcopy(fp)
    batches = bench.data.calibration_batches(case_for(config), adapter)
    weighting = TokenWeighting(adapter, select_targets(adapter, config), batches, config)
    report, _ = api.quantize(adapter, config, batches)
    spread = report.details["weighting"]
    assert len(spread) == 2                                   # one entry per quantized block
    assert any(d["weight_max"] > 1.5 * d["weight_min"] for d in spread.values())
    targets = [f"{t.name}.weight" for t in select_targets(adapter, config)]
    assert all(not torch.equal(params(adapter)[n], params(fp)[n]) for n in targets)
    assert weighting.enabled
    if method == "gptq":   # the weighted Hessian moves GPTQ's result; AWQ's 20-point alpha grid may
        plain = copy.deepcopy(fp)   # pick the same scales under both losses on these tiny blocks
        api.quantize(plain, make_config(method, method, {"language": 3}, group_size=32, layers="1-2"), batches)
        assert any(not torch.equal(params(adapter)[n], params(plain)[n]) for n in targets)


def test_bad_weighting_parameters_are_one_error():
    for bad in ({"weighting": "tokens"}, {"ig_baseline": "noise", "weighting": "qig"}, {"ig_steps": 0, "weighting": "qig"}):
        for method in ("awq", "gptq"):
            with pytest.raises(ConfigError, match=next(iter(bad))):
                make_config("q", method, {"language": 3}, params=bad)
    # params built in code skip the grid's parsing: the config checks their values when made
    from quantizers.methods.awq import AWQParams
    with pytest.raises(ConfigError, match="weighting"):
        make_config("q", "awq", {"language": 3}, params=AWQParams(weighting="tokens"))
