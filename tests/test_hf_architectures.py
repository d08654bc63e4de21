"""The `hf` family on every architecture it claims beyond tests/test_hf_family.py: LLaVA-NeXT,
Mistral3 (Pixtral), InternVL, Idefics2, Idefics3, Gemma 3, PaliGemma, Qwen3-VL, Llama 4 (MoE),
Mllama and Florence-2 (encoder-decoder), each down-scaled with random weights
(tests/hf_tiny.py), saved and loaded back through load_adapter(family="hf"). For each: the
components found, the block stacks and fold layouts, fp16 and RTN/GPTQ/AWQ W4 of `all` with no
weight of a targeted component left at 16 bits without a declared reason, and VQAv2 evaluated
on the embedded world. Then the failure modes of issue 20, one test each. Random weights: these
check the plumbing, never accuracy."""
import copy
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from fixtures.adapters import hf_experts, layouts, load_adapter
from fixtures.adapters.base import ComponentMissing, ModelMissing
from fixtures.adapters.hf import HFAdapter
from fixtures.runtime.grid import load_grid
from fixtures.runtime.models import ModelPool
from fixtures.world.generate import DEFAULT_SEED, generate_world
from quantizers import api, awq
from quantizers.api import CoverageError
from quantizers.config import make_config
from quantizers.targets import unaccounted_weights
from quantizers.walker import catch_inputs
from tasks import vqav2
from tasks.requests import Generation
from tests.hf_tiny import save_tiny, vocabulary

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
N_EVAL = 2
LLAVA_LIKE = {"vision": "model.vision_tower", "connector": "model.multi_modal_projector",
              "language": "model.language_model", "lm_head": "lm_head"}
IDEFICS = {"vision": "model.vision_model", "connector": "model.connector", "language": "model.text_model",
           "lm_head": "lm_head"}
# architecture -> (components found, {component: (block stack, its blocks, norm folds its layout keeps)})
ARCHITECTURES = {
    "llava_next": (LLAVA_LIKE, {"vision": ("encoder.layers", 2, 2), "connector": ("", 1, 0), "language": ("layers", 2, 2)}),
    "mistral3": (LLAVA_LIKE, {"vision": ("transformer.layers", 2, 2), "connector": ("", 1, 0), "language": ("layers", 2, 2)}),
    "internvl": (LLAVA_LIKE, {"vision": ("encoder.layer", 2, 2), "connector": ("", 1, 0), "language": ("layers", 2, 2)}),
    "idefics2": (IDEFICS, {"vision": ("encoder.layers", 2, 2), "connector": ("perceiver_resampler.layers", 1, 0),
                           "language": ("layers", 2, 2)}),
    "idefics3": (IDEFICS, {"vision": ("encoder.layers", 2, 2), "connector": ("", 1, 0), "language": ("layers", 2, 2)}),
    # Gemma's (1 + weight) RMSNorms fold no scale exactly: its LM layout keeps no norm fold.
    "gemma3": ({"vision": "model.vision_tower", "language": "model.language_model", "lm_head": "lm_head"},
               {"vision": ("encoder.layers", 2, 2), "language": ("layers", 2, 0)}),
    "paligemma": (LLAVA_LIKE, {"vision": ("encoder.layers", 2, 2), "connector": ("", 1, 0), "language": ("layers", 2, 0)}),
    "qwen3_vl": ({"vision": "model.visual", "connector": "model.visual.merger", "language": "model.language_model",
                  "lm_head": "lm_head"},
                 {"vision": ("blocks", 2, 2), "connector": ("", 1, 0), "language": ("layers", 2, 2)}),
    "llama4": ({"vision": "vision_model", "connector": "multi_modal_projector", "language": "language_model.model",
                "lm_head": "language_model.lm_head"},
               {"vision": ("model.layers", 2, 2), "connector": ("", 1, 0), "language": ("layers", 2, 1)}),
    "mllama": ({"vision": "model.vision_model", "connector": "model.multi_modal_projector",
                "language": "model.language_model", "lm_head": "lm_head"},
               {"vision": ("transformer.layers", 2, 2), "connector": ("", 1, 0), "language": ("layers", 2, 3)}),
    # BART is post-LN (its norms also feed the residual): nothing folds, said in a warning.
    "florence2": (LLAVA_LIKE, {"vision": ("blocks.0", 1, 0), "connector": ("", 1, 0), "language": ("encoder.layers", 1, 0)}),
}
# A plain text template for PaliGemma, whose processor (like the released pt/mix ones) has none.
PLAIN_TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
                  "{% endif %}{% endfor %}{% endfor %}\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    generate_world(root, seed=DEFAULT_SEED, layout={"vqav2": {"train": 2, "val": 2}}, progress=False)
    train = vqav2.load_official(root / "vqav2", "train2014")
    val = vqav2.load_official(root / "vqav2", "val2014")[:N_EVAL]
    words = vocabulary([s.question for s in train + val] + [a for s in train + val for a in s.answers])
    template = tmp_path_factory.mktemp("templates") / "plain.jinja"
    template.write_text(PLAIN_TEMPLATE)
    return {"train": train, "val": val, "words": words, "models": tmp_path_factory.mktemp("models"),
            "template": template, "saved": {}}


def saved(world, architecture: str) -> Path:
    """The architecture's saved folder, built once per module."""
    if architecture not in world["saved"]:
        world["saved"][architecture] = save_tiny(architecture, world["models"] / architecture, world["words"])
    return world["saved"][architecture]


def load(world, architecture: str, **options):
    template = str(world["template"]) if architecture == "paligemma" else None
    return load_adapter(architecture, "hf", str(saved(world, architecture)), CPU, "auto", ROOT,
                        chat_template=template, **options)


def calibration(adapter, samples) -> list[dict]:
    texts = [adapter.calibration_text(s.question, s.multiple_choice_answer) for s in samples]
    return [adapter.model_inputs([s.image() for s in samples], texts)]


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def tiny(request, world):
    """(architecture, FP adapter, calibration batches, the hf family's warnings on loading)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = load(world, request.param)
        for component in adapter.quantizable:
            adapter.layout(component)
    said = [str(w.message) for w in caught if str(w.message).startswith("hf family")]
    return request.param, adapter, calibration(adapter, world["train"]), said


def test_components_stacks_and_layouts_are_found(tiny):
    architecture, adapter, _, said = tiny
    components, stacks = ARCHITECTURES[architecture]
    assert type(adapter) is HFAdapter and adapter.components == components
    assert adapter.quantizable == tuple(stacks)
    for component, (stack, n_blocks, norm_folds) in stacks.items():
        relative, blocks = adapter.block_stack(component)
        assert (relative, len(blocks)) == (stack, n_blocks), component
        assert len(adapter.layout(component).norm_folds) == norm_folds, component
    # An unknown block layout is said once, with what AWQ does instead.
    unknown = [c for c, (stack, _, _) in stacks.items() if stack and not adapter.layout(c).norm_folds
               and not adapter.layout(c).linear_folds]
    for component in unknown:
        assert sum(f"no known fold layout for the {component} blocks" in line and "explicit input scales" in line
                   for line in said) == 1


def test_layouts_fold_a_random_scale_exactly(tiny):
    """Every fold of each recognized layout leaves each kind of block's output unchanged, on the
    inputs the model really gives it (Mllama's and Llama 4's vision layers get them by keyword)."""
    architecture, adapter, batches, _ = tiny
    generator = torch.Generator().manual_seed(0)
    for component, (stack, _, _) in ARCHITECTURES[architecture][1].items():
        if not stack:
            continue
        layout = adapter.layout(component)
        for block in {type(b): b for b in adapter.block_stack(component)[1]}.values():
            item = catch_inputs(adapter.model, block, batches)[0]
            run = lambda module: _first(module(*item.args, **item.kwargs))
            pairs = [(norm, linears) for norm, linears in layout.norm_folds if _has(block, norm, *linears)]
            pairs += [(a, (b,)) for a, b in layout.linear_folds if _has(block, a, b)
                      and block.get_submodule(a).out_features == block.get_submodule(b).in_features]
            with torch.no_grad():
                reference = run(block)
                for producer, consumers in pairs:
                    torch.testing.assert_close(run(folded_copy(block, producer, consumers, generator)), reference,
                                               rtol=1e-4, atol=1e-5, msg=f"{component}: {producer} -> {consumers}")


def _has(block, *paths) -> bool:
    try:
        return all(block.get_submodule(p) is not None for p in paths)
    except AttributeError:
        return False


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def folded_copy(block, producer, consumers, generator):
    block = copy.deepcopy(block)
    prev, linears = block.get_submodule(producer), [block.get_submodule(p) for p in consumers]
    s = torch.rand(linears[0].in_features, generator=generator) * 1.5 + 0.5
    (awq.fold_into_linear if isinstance(prev, torch.nn.Linear) else awq.fold_into_norm)(prev, linears, s)
    return block


def evaluate(adapter, world) -> list[str]:
    result = vqav2.evaluate(adapter, world["val"], N_EVAL, progress=False)
    assert result.n_samples == N_EVAL and 0.0 <= result.metrics["accuracy"] <= 100.0
    return [s["prediction"] for s in result.samples]


@pytest.mark.parametrize("method", ["fp", "rtn", "gptq", "awq"])
def test_all_components_at_w4_with_no_silent_16_bit_weight(tiny, world, method):
    _, fp, batches, _ = tiny
    if method == "fp":
        evaluate(fp, world)
        return
    adapter = copy.deepcopy(fp)
    params = {"n_grid": 4} if method == "awq" else None   # coverage is the point, not the best scale
    config = make_config(f"{method}-w4g16", method, {c: 4 for c in adapter.quantizable}, group_size=16, params=params)
    report, _ = api.quantize(adapter, config, batches if method != "rtn" else None)   # the truth check runs there
    quantized = {f"{r.name}.weight" for r in report.layers}
    assert {r.component for r in report.layers} == set(adapter.quantizable)
    assert unaccounted_weights(adapter, config, quantized) == []
    for component in adapter.quantizable:
        kept = adapter.protected_weights(component)
        weights = own_weights(adapter, component)
        assert all(kept.values()) and set(weights) - quantized <= set(kept), component
        assert set(weights) & quantized and report.bpw[component] < 16, component
    evaluate(adapter, world)


def own_weights(adapter, component: str) -> list[str]:
    """The component's parameters of more than one dimension, less those of a component nested in it."""
    own = adapter.components[component]
    nested = [p for p in adapter.components.values() if p.startswith(own + ".")]
    return [n for n, p in adapter.model.named_parameters() if n.startswith(own + ".") and p.dim() > 1
            and not any(n.startswith(q + ".") for q in nested)]


# -- the failure modes of issue 20 --------------------------------------------------------------
def test_all_means_what_the_model_has_and_a_missing_component_skips_in_one_line(world, tmp_path):
    """Gemma 3's projector is a bare matrix: `all` is vision + language (at grid load, from the
    architecture), and a config naming the connector is skipped before any work, in one line
    that says why (it crashed with a bare KeyError: 'connector')."""
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(textwrap.dedent(f"""
        models:
          gemma: {{family: hf, path: {saved(world, "gemma3")}}}
        tasks:
          vqav2: {{data: embedded}}
        configs:
          - {{name: rtn-w4-all, method: rtn, bits: {{all: 4}}}}
          - {{name: rtn-w4-connector, method: rtn, bits: {{connector: 4}}}}
        """))
    cases = {case.config.name: case for case in load_grid(grid_file).cases}
    assert cases["rtn-w4-all"].config.bits == {"vision": 4, "language": 4}
    pool = ModelPool(CPU, tmp_path / "cache")
    adapter, report = pool.quantized(cases["rtn-w4-all"], lambda a: None)
    assert {r.component for r in report.layers} == {"vision", "language"}
    with pytest.raises(ComponentMissing) as info:
        pool.quantized(cases["rtn-w4-connector"], lambda a: None)
    message = str(info.value)
    assert "\n" not in message and "'connector'" in message and "mm_input_projection_weight" in message


def test_llama4_moe_experts_are_quantized_each_on_its_routed_tokens(world):
    """The 3-D expert tensors become one Linear per expert with the same function; every expert
    is quantized (it was left at 16 bits while coverage passed), and GPTQ's Hessian of an
    expert holds only the tokens routed to it."""
    adapter = load(world, "llama4")
    experts = adapter.model.get_submodule("language_model.model.layers.0.feed_forward.experts")
    assert isinstance(experts, hf_experts.RoutedExperts) and len(experts) == 4
    # Same function as the fused module it replaced, on score-weighted routed input (top-1 of 4).
    torch.manual_seed(0)
    fused = type("Fused", (), {})()
    fused.gate_up_proj = torch.stack([e.gate_up_proj.weight.T for e in experts]).detach()
    fused.down_proj = torch.stack([e.down_proj.weight.T for e in experts]).detach()
    x = torch.randn(6, 64)
    scores = torch.zeros(4, 6)
    scores[torch.randint(0, 4, (6,)), torch.arange(6)] = torch.rand(6) + 0.5
    routed = (x.repeat(4, 1) * scores.reshape(-1, 1))
    gate, up = torch.bmm(routed.view(4, -1, 64), fused.gate_up_proj).chunk(2, dim=-1)
    expected = torch.bmm(up * experts.act_fn(gate), fused.down_proj).view(-1, 64)
    with torch.no_grad():
        torch.testing.assert_close(experts(routed), expected, rtol=1e-5, atol=1e-6)
    # Each expert's Linears see exactly its routed rows.
    seen = {}

    def rows(index, inputs):   # a forward hook's return value would replace the output
        seen[index] = inputs[0].shape[0]

    hooks = [e.gate_up_proj.register_forward_hook(lambda m, a, o, i=i: rows(i, a)) for i, e in enumerate(experts)]
    with torch.no_grad():
        experts(routed)
    for hook in hooks:
        hook.remove()
    assert seen == {i: int((scores[i] > 0).sum()) for i in range(4) if (scores[i] > 0).any()}
    batches = calibration(adapter, world["train"])
    config = make_config("gptq", "gptq", {c: 4 for c in adapter.quantizable}, group_size=16)
    report, _ = api.quantize(copy.deepcopy(adapter), config, batches)
    names = {r.name for r in report.layers}
    assert {f"language_model.model.layers.{i}.feed_forward.experts.{e}.{p}" for i in range(2) for e in range(4)
            for p in ("gate_up_proj", "down_proj")} <= names
    fallback = [n for n, d in report.details.items() if isinstance(d, dict) and "fallback" in d]
    assert all(".experts." in n for n in fallback)   # only an expert no token reached falls back to RTN


def test_fused_experts_left_unknown_fail_the_truth_check(world, monkeypatch):
    """A fused-expert layout the family cannot split stays 3-D: quantizing its component fails
    with one line naming the tensors (before, nothing said the experts were at 16 bits)."""
    monkeypatch.setattr(hf_experts, "UNFUSERS", {})
    adapter = load(world, "llama4")
    with pytest.raises(CoverageError) as info:
        api.quantize(adapter, make_config("rtn", "rtn", {"language": 4}))
    message = str(info.value)
    assert "\n" not in message and "language_model.model.layers.0.feed_forward.experts.gate_up_proj" in message


def test_mixed_layer_stack_is_walked_in_order_and_said(world):
    """Mllama's LM list mixes self- and cross-attention layers: it is the language stack (it was
    taken as one block, silently), with one warning naming both classes."""
    with pytest.warns(UserWarning, match="mixes MllamaCrossAttentionDecoderLayer, MllamaSelfAttentionDecoderLayer"):
        adapter = load(world, "mllama")
        adapter.layout("language")
    relative, blocks = adapter.block_stack("language")
    assert relative == "layers" and len({type(b) for b in blocks}) == 2


def test_encoder_decoder_answers_are_decoded_whole(world):
    """Florence-2's generate returns decoder tokens only: nothing is cut off as a prompt (all of
    its answers came back empty)."""
    adapter = load(world, "florence2")
    generation = Generation(max_new_tokens=3, min_length=3)
    encoded = adapter.encode([world["val"][0].image()], [adapter.short_answer_prompt("what is it")])
    output, prompt_length = adapter.generate_ids(encoded, generation)
    assert prompt_length == 0 and encoded["input_ids"].shape[1] > output.shape[1]
    expected = adapter.processor.tokenizer.decode(output[0], skip_special_tokens=True).strip()
    assert adapter.generate_encoded(encoded, generation) == [expected] and expected


def test_a_processor_without_any_chat_template_names_the_grid_option(world):
    with pytest.raises(ValueError) as info:
        load_adapter("pali", "hf", str(saved(world, "paligemma")), CPU, "auto", ROOT)
    assert "\n" not in str(info.value) and "chat_template: FILE.jinja" in str(info.value)
    with pytest.raises(ValueError, match="chat_template: no file"):
        load_adapter("pali", "hf", str(saved(world, "paligemma")), CPU, "auto", ROOT, chat_template="nowhere.jinja")


def test_example_grid_names_models_by_id_and_loads_without_them(tmp_path):
    """benchmarks/grids/hf.yaml loads offline: a model absent from the local cache keeps the
    family's declared components at grid load, and is a skip naming its id when loaded."""
    grid = load_grid(ROOT / "benchmarks" / "grids" / "hf.yaml")
    assert {m.family for m in grid.models.values()} == {"hf"}
    assert all(m.path.count("/") == 1 for m in grid.models.values())
    assert any(set(case.config.components) == {"vision", "connector", "language"} for case in grid.cases)
    model = grid.models["qwen2.5-vl-3b"]
    with pytest.raises(ModelMissing, match="Qwen/Qwen2.5-VL-3B-Instruct"):
        ModelPool(CPU, tmp_path).fp(model)


@pytest.mark.parametrize("architecture", ["cohere2", "glm4"])
def test_text_decoder_layouts_of_aya_vision_and_glm4v_fold_exactly(architecture):
    """Aya Vision's LM (Cohere2: one input_layernorm feeds attention and MLP in parallel) and
    GLM-4V's (GLM-4: sandwich norms, a fused gate_up_proj): their tables are recognized and every
    fold leaves a decoder layer's output unchanged (they were not recognized: explicit scales)."""
    from transformers import Cohere2Config, Cohere2Model, Glm4Config, Glm4Model
    from fixtures.adapters.hf import recognize_layout
    config_class, model_class, expected = {"cohere2": (Cohere2Config, Cohere2Model, layouts.COHERE_PARALLEL),
                                           "glm4": (Glm4Config, Glm4Model, layouts.GLM4)}[architecture]
    torch.manual_seed(0)
    model = model_class(config_class(vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=32,
                                     intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8)).eval()
    for norm in model.modules():   # random gains, so that a fold into the wrong Linears shows
        if "Norm" in type(norm).__name__ and getattr(norm, "weight", None) is not None:
            torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    block = model.layers[0]
    layout = recognize_layout([block])
    assert layout.norm_folds == expected.norm_folds and layout.linear_folds
    item = catch_inputs(model, block, [{"input_ids": torch.randint(0, 64, (2, 7))}])[0]
    run = lambda module: _first(module(*item.args, **item.kwargs))
    generator = torch.Generator().manual_seed(0)
    # AWQ folds v -> o only when the widths match (not with grouped key/value heads, as here).
    pairs = list(layout.norm_folds) + [(a, (b,)) for a, b in layout.linear_folds
                                       if block.get_submodule(a).out_features == block.get_submodule(b).in_features]
    with torch.no_grad():
        reference = run(block)
        for producer, consumers in pairs:
            torch.testing.assert_close(run(folded_copy(block, producer, consumers, generator)), reference,
                                       rtol=1e-4, atol=1e-5, msg=f"{producer} -> {consumers}")


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_linear_no_calibration_row_reaches_is_rounded_to_nearest_and_said(method):
    """An expert no calibration token is routed to has no statistics: GPTQ would zero it (all its
    columns dead) and AWQ had no rows to search; both round it to nearest and say so (both
    stopped with a KeyError)."""
    from quantizers.primitives import fake_quantize
    from quantizers.targets import Target
    from quantizers.walker import Block, BlockInput, Feed, Window

    class TwoExperts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.routed, self.unrouted = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)

        def forward(self, x):
            return self.routed(x)   # every token goes to the first expert

    torch.manual_seed(0)
    module = TwoExperts()
    expected = fake_quantize(module.unrouted.weight, 4, 16, False).dequantized
    targets = [Target(f"e.{name}", "language", getattr(module, name), 4) for name in ("routed", "unrouted")]
    window = Window("language", [Block("language", "e", module, targets)], layouts.PLAIN)
    config = make_config(method, method, {"language": 4}, group_size=16, params={"n_grid": 4} if method == "awq" else None)
    out = config.method.quantize_window(window, Feed(window, [BlockInput((torch.randn(2, 8, 32),), {})]), config)
    assert torch.equal(module.unrouted.weight, expected) and module.unrouted.weight.abs().sum() > 0
    assert "no calibration input" in out.details["e.unrouted"]["fallback"]
    assert "fallback" not in out.details.get("e.routed", {})
    assert {record.name for record in out.layers} == {"e.routed", "e.unrouted"}
