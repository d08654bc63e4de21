"""The language model's elementwise code compiled (Generation.fused_elementwise, a GPU's default
path where it is on): the eager predictions on the tiny LLaVA, compiled once per model, and
nothing changed outside the call. Run here on the CPU through the same context the GPU uses."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fixtures.adapters import load_adapter
from fixtures.adapters.fused_elementwise import fusable_modules, fused_elementwise, warm_up
from tasks import vqav2

ROOT = Path(__file__).resolve().parent.parent


def predictions(adapter, samples, **settings):
    generation = replace(vqav2.GENERATION, **settings)
    result = vqav2.evaluate(adapter, samples, batch_size=20, progress=False, generation=generation)
    return [s["prediction"] for s in result.samples]


def test_compiled_elementwise_code_gives_the_eager_predictions_and_compiles_once(bench_world):
    from transformers.models.llama import modeling_llama

    adapter = load_adapter("t", "llava", "fixtures/tiny/llava-tiny", torch.device("cpu"), "float32", ROOT)
    samples = vqav2.load_official(bench_world / "vqav2", "val2014")[:40]   # 10 images: shared batches pack
    language = adapter.component("language")
    eager = {shared: predictions(adapter, samples, share_image_prefix=shared) for shared in (False, True)}
    rotary = modeling_llama.apply_rotary_pos_emb
    graphs = lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]  # noqa: E731

    warm_up(language)
    compiled = graphs()
    assert compiled >= 3, "the norm, the MLP and the rotary application compile"
    with fused_elementwise(language):
        assert modeling_llama.apply_rotary_pos_emb is not rotary
        assert all("forward" in module.__dict__ for module in fusable_modules(language))
        fused = {shared: predictions(adapter, samples, share_image_prefix=shared) for shared in (False, True)}
        with torch.no_grad():   # another config's weights: the same graphs (parameters are inputs)
            for parameter in language.parameters():
                parameter.mul_(0.99)
        predictions(adapter, samples, share_image_prefix=True)
    assert fused == eager
    assert graphs() == compiled, "evaluation compiled nothing the warm-up had not"
    # Nothing outside the call changed.
    assert modeling_llama.apply_rotary_pos_emb is rotary
    assert not any("forward" in module.__dict__ for module in fusable_modules(language))
    assert len(fusable_modules(language)) == 3 * language.config.num_hidden_layers + 1   # 2 norms + MLP a layer, final norm


def test_a_failed_compile_turns_the_fused_code_off_with_one_warning(monkeypatch):
    """A GPU machine whose compiler fails (no working Triton) evaluates with eager code, said once."""
    from fixtures.adapters import llava

    adapter = load_adapter("t", "llava", "fixtures/tiny/llava-tiny", torch.device("cpu"), "float32", ROOT)
    monkeypatch.setattr(adapter, "device", torch.device("cuda"))   # compile_for_evaluation acts on a GPU only

    def broken(language):
        raise RuntimeError("Cannot find a working triton installation.\nmore detail")

    monkeypatch.setattr(llava, "warm_up", broken)
    with pytest.warns(UserWarning, match=r"fused_elementwise off, its compile failed \(RuntimeError: Cannot find"):
        adapter.compile_for_evaluation()
    assert adapter.fused_off == "RuntimeError: Cannot find a working triton installation."


def test_the_rotary_graph_keeps_head_sizes_static_and_rows_and_positions_dynamic():
    """dynamic=True alone makes every size symbolic; the rotary code then finds each element's head
    and offset by run-time division (1.1 ms a full-size prefill call on an H100, where its bytes
    take 0.4 ms). The compiled rotary fixes the head count and width, leaving rows and positions
    dynamic: the sizes the graph is traced with show which are which."""
    from transformers.models.llama import modeling_llama

    from fixtures.adapters.fused_elementwise import with_static_head_sizes

    traced = []

    def record(graph, example_inputs):   # the traced shapes: ints where fixed, SymInts where dynamic
        values = [node.meta.get("example_value") for node in graph.graph.nodes if node.op == "placeholder"]
        traced.append([tuple(value.shape) for value in values if isinstance(value, torch.Tensor)])
        return graph.forward

    torch._dynamo.reset()
    for prepare in (lambda rotary: rotary, with_static_head_sizes):
        rotary = torch.compile(prepare(modeling_llama.apply_rotary_pos_emb), backend=record, dynamic=True)
        q = torch.zeros(3, 5, 4, 8).transpose(1, 2)   # (rows, heads, positions, width), as attention makes it
        cos = torch.ones(1, 5, 8)
        rotary(q, q.clone(), cos, cos.clone())
    plain, static = ([shape for shape in shapes if len(shape) == 4][0] for shapes in traced)
    assert all(isinstance(size, torch.SymInt) for size in plain), "dynamic=True alone: every size symbolic"
    assert static[1] == 4 and static[3] == 8, "head count and width fixed"
    assert isinstance(static[0], torch.SymInt) and isinstance(static[2], torch.SymInt), "rows, positions dynamic"
