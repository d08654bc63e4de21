"""RTN arithmetic by hand, coverage checks and exact bits per weight."""
import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from fixtures.adapters import load_adapter
from quantizers import api
from quantizers.bpw import LayerRecord, bits_per_weight
from quantizers.config import ActivationQuant, ConfigError, make_config
from quantizers.primitives import fake_quantize

ROOT = Path(__file__).resolve().parent.parent


def test_asymmetric_two_bit_by_hand():
    # xmin=-1, xmax=1 -> scale 2/3, zero round(1.5)=2; codes clamp(round(w/scale)+2, 0, 3)
    out = fake_quantize(torch.tensor([[-1.0, 0.0, 0.5, 1.0]]), bits=2)
    assert out.codes.tolist() == [[0, 2, 3, 3]]
    assert torch.allclose(out.dequantized, torch.tensor([[-4 / 3, 0.0, 2 / 3, 2 / 3]]))
    assert out.scale.item() == pytest.approx(2 / 3) and out.zero.item() == 2


def test_symmetric_four_bit_by_hand():
    # xmax = max(|-3|, 2) = 3 -> scale 6/15 = 0.4, zero 8; round half to even: -7.5 -> -8, 2.5 -> 2
    out = fake_quantize(torch.tensor([[-3.0, 1.0, 2.0]]), bits=4, sym=True)
    assert out.codes.tolist() == [[0, 10, 13]]
    assert torch.allclose(out.dequantized, torch.tensor([[-3.2, 0.8, 2.0]]))


def test_groups_match_per_group_quantization_including_a_short_last_group():
    w = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    grouped = fake_quantize(w, bits=3, group_size=8)
    assert grouped.scale.shape == (3, 3)
    for start in (0, 8, 16):
        alone = fake_quantize(w[:, start:start + 8], bits=3)
        assert torch.equal(grouped.dequantized[:, start:start + 8], alone.dequantized)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_error_within_half_a_step_and_shrinking_with_bits(bits):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(bits))
    out = fake_quantize(w, bits=bits, group_size=16)
    step = out.scale.repeat_interleave(16, dim=1)
    assert ((w - out.dequantized).abs() <= step / 2 + 1e-6).all()
    if bits < 8:
        finer = fake_quantize(w, bits=bits + 1, group_size=16)
        assert (w - finer.dequantized).pow(2).mean() < (w - out.dequantized).pow(2).mean()


def test_bits_per_weight_by_hand():
    model = nn.Sequential(nn.Linear(32, 4, bias=False), nn.Linear(4, 2))
    record = LayerRecord("0", "a", bits=4, numel=128, n_groups=4, sym=False)
    bpw = bits_per_weight(model, [record], {"a": "0", "b": "1"})
    # 4 bits x 128 + 4 rows x (16-bit scale + 16-bit zero); the 10 other parameters at 16 bits
    assert bpw["a"] == pytest.approx((4 * 128 + 4 * 32) / 128)
    assert bpw["b"] == 16
    assert bpw["model"] == pytest.approx((640 + 160) / 138)


@pytest.fixture(scope="module")
def tiny():
    return load_adapter("llava-tiny", "llava", "fixtures/tiny/llava-tiny", torch.device("cpu"), "float32", ROOT)


def test_every_targeted_linear_changes_and_nothing_else(tiny):
    adapter = copy.deepcopy(tiny)
    report, entry = api.quantize(adapter, make_config("q", "rtn", {"language": 3}))
    before, after = dict(tiny.model.named_parameters()), dict(adapter.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    linears = {f"{n}.weight" for n, m in adapter.model.named_modules()
               if isinstance(m, nn.Linear) and n.startswith("model.language_model.")}
    assert changed == linears and linears
    assert {r.name + ".weight" for r in report.layers} == linears
    assert "lm_head.weight" not in changed  # protected unless named
    assert 3 < report.bpw["language"] < 16 and report.bpw["vision"] == 16
    assert set(entry.weights) == linears and not entry.raw


def test_a_layer_silently_skipped_is_caught(tiny, monkeypatch):
    config = make_config("q", "rtn", {"connector": 4})
    original = config.method.quantize
    monkeypatch.setattr(config.method, "quantize", lambda adapter, targets, *args: original(adapter, targets[1:], *args))
    with pytest.raises(api.CoverageError, match="targeted but unchanged"):
        api.quantize(copy.deepcopy(tiny), config)


def test_unknown_component_and_unknown_method(tiny):
    with pytest.raises(ConfigError, match="no component 'qformer'"):
        api.quantize(copy.deepcopy(tiny), make_config("q", "rtn", {"qformer": 4}))
    with pytest.raises(ConfigError, match="unknown method 'qig'; known: "):
        make_config("q", "qig", {"language": 4})
    with pytest.raises(ConfigError, match="needs calibration data"):
        api.quantize(copy.deepcopy(tiny), make_config("q", "gptq", {"language": 4}))


def test_the_quantization_seconds_end_after_the_devices_queued_work(tiny, monkeypatch):
    """quantize() waits for the model's GPU work before it takes the report's seconds (on CPU
    there is none to wait for: the wait is a no-op, checked here to come before the report)."""
    events = []
    wait, report = api.finish_device_work, api.QuantReport
    monkeypatch.setattr(api, "finish_device_work", lambda model: events.append("wait") or wait(model))
    monkeypatch.setattr(api, "QuantReport", lambda *a, **k: events.append("report") or report(*a, **k))
    api.quantize(copy.deepcopy(tiny), make_config("q", "rtn", {"language": 3}))
    assert events == ["wait", "report", "wait"], "the last wait: the entry's host copies"


def test_the_entrys_host_copies_own_their_memory(tiny):
    """The entry's tensors are copies (on CPU too): quantizing or restoring the model afterwards
    does not change a cache entry being written behind the run."""
    from PIL import Image
    model = copy.deepcopy(tiny)
    batches = [model.model_inputs([Image.new("RGB", (64, 64), "red")] * 2,
                                  [model.calibration_text(q, "yes") for q in ("is it red", "what is it")])]
    _, entry = api.quantize(model, make_config("q", "awq", {"language": 4}, params={"n_grid": 4}), batches)
    assert entry.raw, "AWQ folds its scales into norms: changed parameters beside the weights"
    params = dict(model.model.named_parameters())
    for name, raw in entry.raw.items():
        before = raw.clone()
        params[name].data.add_(1.0)
        assert torch.equal(raw, before) and raw.data_ptr() != params[name].data_ptr()
    weight = next(iter(entry.weights.values()))
    assert weight.codes.device.type == "cpu" and weight.group_index.dtype == torch.long
    # Static activation ranges (the state a config leaves on the hooks) are copied too.
    model = copy.deepcopy(tiny)
    config = make_config("s", "rtn", {"language": 4}, a_bits=8, a_quant=ActivationQuant("tensor", "minmax"))
    _, entry = api.quantize(model, config, batches)
    held = [t for module in model.model.modules() for hook in module._forward_pre_hooks.values()
            for t in getattr(hook, "range", None) or ()]   # the ranges the quantizer hooks apply
    assert held and entry.state
    on_model = {t.data_ptr() for t in [*held, *model.model.buffers(), *model.model.parameters()]}
    assert not any(t.data_ptr() in on_model for t in entry.state.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: pinned memory needs one")
def test_a_gpu_tensors_host_copy_is_pinned_and_equal():
    from quantizers.primitives import host_copy
    tensor = torch.randn(1024, 1024, device="cuda")
    copied = host_copy(tensor)
    torch.cuda.synchronize()
    assert copied.is_pinned() and torch.equal(copied, tensor.cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: on CPU every op has finished when it returns")
def test_finish_device_work_leaves_nothing_queued():
    model = nn.Linear(4096, 4096).cuda()
    x = torch.randn(8192, 4096, device="cuda")
    for _ in range(20):
        x = model(x)
    api.finish_device_work(model)
    assert torch.cuda.current_stream().query()
