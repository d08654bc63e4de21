"""The generic `hf` family end to end on CPU: down-scaled random-init LLaVA-OneVision, Qwen2-VL
and Qwen2.5-VL (tests/hf_tiny.py) saved with save_pretrained and loaded back through
load_adapter(family="hf"); components found from the structure; every component quantized with
RTN, GPTQ and AWQ (api.quantize proves coverage); VQAv2 evaluated on the embedded world.
Random weights: these check the plumbing, never accuracy."""
import copy
import json
import textwrap
from pathlib import Path

import pytest
import torch

from fixtures.adapters import load_adapter
from fixtures.adapters.hf import HFAdapter
from fixtures.runtime.grid import GridError, load_grid
from fixtures.world.generate import DEFAULT_SEED, generate_world
from quantizers import api, awq
from quantizers.bpw import bits_per_weight
from quantizers.config import ConfigError, make_config
from quantizers.targets import select_targets
from quantizers.walker import catch_inputs
from tasks import vqav2
from tests.hf_tiny import save_tiny, vocabulary

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
N_EVAL = 8
QWEN_VL = {"vision": "model.visual", "connector": "model.visual.merger",
           "language": "model.language_model", "lm_head": "lm_head"}
EXPECTED = {
    "llava_onevision": {"vision": "model.vision_tower", "connector": "model.multi_modal_projector",
                        "language": "model.language_model", "lm_head": "lm_head"},
    "qwen2_vl": QWEN_VL,
    "qwen2_5_vl": QWEN_VL,
}
# (component, block stack, how many norm folds its layout must keep)
STACKS = {
    "llava_onevision": [("vision", "encoder.layers", 2), ("connector", "", 0), ("language", "layers", 2)],
    "qwen2_vl": [("vision", "blocks", 2), ("connector", "", 0), ("language", "layers", 2)],
    "qwen2_5_vl": [("vision", "blocks", 2), ("connector", "", 0), ("language", "layers", 2)],
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    generate_world(root, seed=DEFAULT_SEED, layout={"vqav2": {"train": 4, "val": 4}}, progress=False)
    train = vqav2.load_official(root / "vqav2", "train2014")
    val = vqav2.load_official(root / "vqav2", "val2014")[:N_EVAL]
    words = vocabulary([s.question for s in train + val] + [a for s in train + val for a in s.answers])
    return {"train": train, "val": val, "words": words, "models": tmp_path_factory.mktemp("models")}


@pytest.fixture(scope="module", params=list(EXPECTED))
def tiny(request, world):
    """(architecture, FP adapter loaded through the hf family, calibration batches)."""
    architecture = request.param
    path = save_tiny(architecture, world["models"] / architecture, world["words"])
    adapter = load_adapter(architecture, "hf", str(path), CPU, "auto", ROOT)
    chosen = world["train"][:8]
    texts = [adapter.calibration_text(s.question, s.multiple_choice_answer) for s in chosen]
    batches = [adapter.model_inputs([s.image() for s in chosen[i:i + 4]], texts[i:i + 4]) for i in (0, 4)]
    return architecture, adapter, batches


def predictions(adapter, samples, batch_size):
    result = vqav2.evaluate(adapter, samples, batch_size, progress=False)
    assert result.n_samples == N_EVAL and 0.0 <= result.metrics["accuracy"] <= 100.0
    return [s["prediction"] for s in result.samples]


def test_components_are_found_and_disjoint(tiny):
    architecture, adapter, _ = tiny
    assert type(adapter) is HFAdapter and adapter.components == EXPECTED[architecture]
    assert adapter.quantizable == ("vision", "connector", "language")
    for component, stack, norm_folds in STACKS[architecture]:
        relative, blocks = adapter.block_stack(component)
        assert relative == stack and len(blocks) == (2 if stack else 1)
        assert len(adapter.layout(component).norm_folds) == norm_folds
    targets = select_targets(adapter, make_config("q", "rtn", {c: 4 for c in adapter.quantizable}))
    names = [t.name for t in targets]
    assert len(names) == len(set(names))   # no Linear is targeted by two components
    for target in targets:
        own = adapter.components[target.component]
        assert target.name.startswith(own + ".")
        deeper = [p for p in adapter.components.values() if p != own and p.startswith(own + ".")]
        assert not any(target.name.startswith(p + ".") for p in deeper)
    assert {t.component for t in targets} == set(adapter.quantizable)
    assert not any(n.startswith("lm_head") for n in names)


def test_layouts_fold_a_random_scale_exactly(tiny):
    """Every norm and Linear fold of each recognized layout leaves the block's output unchanged
    (Qwen2-VL's norm1 -> attn.qkv, norm2 -> mlp.fc1 and Qwen2.5-VL's gate/up among them)."""
    architecture, adapter, batches = tiny
    generator = torch.Generator().manual_seed(0)
    for component, stack, _ in STACKS[architecture]:
        if not stack:
            continue
        layout = adapter.layout(component)
        block = adapter.block_stack(component)[1][0]
        item = catch_inputs(adapter.model, block, batches[:1])[0]
        run = lambda module: _first(module(*item.args, **item.kwargs))
        with torch.no_grad():
            reference = run(block)
            pairs = list(layout.norm_folds) + [
                (a, (b,)) for a, b in layout.linear_folds
                if block.get_submodule(a).out_features == block.get_submodule(b).in_features]
            for producer, consumers in pairs:
                torch.testing.assert_close(run(folded_copy(block, producer, consumers, generator)), reference,
                                           rtol=1e-4, atol=1e-5, msg=f"{component}: {producer} -> {consumers}")
            # The check can fail: a norm folded into Linears it does not feed changes the output.
            (norm, _), (_, others) = layout.norm_folds
            assert not torch.allclose(run(folded_copy(block, norm, others, generator)), reference, atol=1e-3)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def folded_copy(block, producer, consumers, generator):
    """A copy of block with a random per-channel scale folded from producer (a norm or a
    Linear) into the consumer Linears."""
    block = copy.deepcopy(block)
    prev, linears = block.get_submodule(producer), [block.get_submodule(p) for p in consumers]
    s = torch.rand(linears[0].in_features, generator=generator) * 1.5 + 0.5
    (awq.fold_into_linear if isinstance(prev, torch.nn.Linear) else awq.fold_into_norm)(prev, linears, s)
    return block


def test_fp_batched_greedy_equals_batch_size_one(tiny, world):
    _, adapter, _ = tiny
    assert predictions(adapter, world["val"], N_EVAL) == predictions(adapter, world["val"], 1)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_every_component_quantized_then_vqav2(tiny, world, method):
    _, fp, batches = tiny
    adapter = copy.deepcopy(fp)
    # AWQ's searches on a coarse grid: the test is about coverage, not the best scale.
    params = {"n_grid": 5} if method == "awq" else None
    config = make_config(f"{method}-w4g16", method, {c: 4 for c in adapter.quantizable}, group_size=16,
                         params=params)
    report, entry = api.quantize(adapter, config, batches if method != "rtn" else None)   # coverage checked there
    assert {r.component for r in report.layers} == set(adapter.quantizable)
    assert len(entry.weights) == len(select_targets(adapter, config))
    assert all(report.bpw[c] < 16 for c in adapter.quantizable)
    predictions(adapter, world["val"], N_EVAL)


def test_grid_override_replaces_the_found_components(world):
    path = save_tiny("qwen2_vl", world["models"] / "override", world["words"])
    # The merger kept inside vision, no connector: quantizable and the carve-out follow the map.
    override = {"vision": "model.visual", "language": "model.language_model", "lm_head": "lm_head"}
    adapter = load_adapter("q", "hf", str(path), CPU, "auto", ROOT, components=override)
    assert adapter.components == override and adapter.quantizable == ("vision", "language")
    assert adapter.protected == ("lm_head",)
    names = {t.name for t in select_targets(adapter, make_config("q", "rtn", {"vision": 4}))}
    assert "model.visual.merger.mlp.0" in names
    with pytest.raises(ConfigError, match="no component 'connector'"):
        select_targets(adapter, make_config("q", "rtn", {"connector": 4}))
    # GPTQ reaches the merger, outside vision's block stack, as a window of its own (it stopped
    # with a coverage error naming the merger's Linears).
    chosen = world["train"][:4]
    texts = [adapter.calibration_text(s.question, s.multiple_choice_answer) for s in chosen]
    batches = [adapter.model_inputs([s.image() for s in chosen], texts)]
    report, _ = api.quantize(adapter, make_config("q", "gptq", {"vision": 4}, group_size=16), batches)
    assert {"model.visual.merger.mlp.0", "model.visual.merger.mlp.2"} <= {r.name for r in report.layers}


def test_per_component_bpw_counts_a_nested_component_once(tiny):
    """Qwen2-VL's merger is carved out of vision as the connector: its parameters count for the
    connector alone (vision's bpw included the unquantized merger)."""
    architecture, adapter, _ = tiny
    if architecture == "llava_onevision":
        pytest.skip("LLaVA-OneVision's connector is not nested in its vision tower")
    merger = sum(p.numel() for n, p in adapter.model.named_parameters() if n.startswith("model.visual.merger."))
    bpw = bits_per_weight(adapter.model, [], adapter.components)   # nothing quantized: all at 16 bits
    assert bpw["vision"] == bpw["connector"] == 16.0
    report, _ = api.quantize(copy.deepcopy(adapter), make_config("q", "rtn", {"connector": 4}))
    quantized_bits = sum(r.weight_bits for r in report.layers)
    merger_weights = sum(r.numel for r in report.layers)
    assert report.bpw["vision"] == 16.0   # the quantized merger is not vision's
    assert report.bpw["connector"] == pytest.approx((quantized_bits + 16 * (merger - merger_weights)) / merger)


def test_chat_template_on_the_tokenizer_is_used(world, tmp_path):
    """A processor that keeps its chat template on its tokenizer: prompts come from the
    tokenizer's template (every test was refused)."""
    source = save_tiny("qwen2_vl", world["models"] / "template", world["words"])
    reference = load_adapter("q", "hf", str(source), CPU, "auto", ROOT)
    template = reference.processor.chat_template
    moved = tmp_path / "moved"
    reference.processor.chat_template = reference.processor.tokenizer.chat_template = None
    reference.processor.save_pretrained(moved)
    reference.model.save_pretrained(moved)
    # The template only in tokenizer_config.json, where older checkpoints keep it.
    tokenizer_config = moved / "tokenizer_config.json"
    tokenizer_config.write_text(json.dumps({**json.loads(tokenizer_config.read_text()), "chat_template": template}))
    assert not (moved / "chat_template.jinja").exists() and not (moved / "chat_template.json").exists()
    adapter = load_adapter("q", "hf", str(moved), CPU, "auto", ROOT)
    assert not getattr(adapter.processor, "chat_template", None) and adapter.processor.tokenizer.chat_template
    expected = load_adapter("q", "hf", str(source), CPU, "auto", ROOT).short_answer_prompt("what is it")
    assert adapter.short_answer_prompt("what is it") == expected


GRID = """
models:
  qwen: {family: hf, path: some/qwen2-vl, components: {vision: model.visual, connector: model.visual.merger,
                                                        language: model.language_model, lm_head: lm_head}}
  onevision: {family: hf, path: some/llava-onevision}
tasks:
  vqav2: {data: embedded}
configs:
  - {name: fp16, method: fp}
  - {name: gptq-w4-all, method: gptq, bits: {all: 4}}
"""


def test_grid_with_hf_family_and_a_components_override(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(textwrap.dedent(GRID))
    grid = load_grid(path)
    assert sorted(c.id for c in grid.cases) == ["onevision-fp16", "onevision-gptq-w4-all", "qwen-fp16",
                                                 "qwen-gptq-w4-all"]
    qwen = next(c for c in grid.cases if c.id == "qwen-gptq-w4-all")
    assert dict(qwen.model.components)["connector"] == "model.visual.merger"
    assert qwen.config.bits == {"vision": 4, "connector": 4, "language": 4}
    path.write_text(textwrap.dedent(GRID).replace("family: hf, path: some/llava", "family: hff, path: some/llava"))
    with pytest.raises(GridError) as info:
        load_grid(path)
    assert "models.onevision.family" in str(info.value) and "'hff'" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("weighting", ["qig", "modality"])
def test_token_weighting_on_every_component(tiny, weighting):
    """QIG (issue 19) in the hf family: the language model and, when a config asks, the vision
    tower and the connector, each block weighted by its own integrated gradients."""
    _, fp, batches = tiny
    adapter = copy.deepcopy(fp)
    config = make_config(f"gptq-{weighting}", "gptq", {c: 4 for c in adapter.quantizable}, group_size=16,
                         params={"weighting": weighting, "ig_steps": 2})
    report, entry = api.quantize(adapter, config, batches)
    assert len(entry.weights) == len(select_targets(adapter, config))
    weighted_blocks = report.details["weighting"]
    assert any(name.startswith(adapter.components["vision"]) for name in weighted_blocks)
    assert any(name.startswith(adapter.components["language"]) for name in weighted_blocks)
