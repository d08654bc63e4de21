"""Greedy decoding with a static KV cache at padded prompt lengths (fixtures/adapters/static_decode.py)
gives generate's own predictions; on a GPU it differs only in that the decode step is compiled."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fixtures.adapters import base, load_adapter, static_decode
from fixtures.adapters.static_decode import LENGTH_MULTIPLE, pad_prompt_length
from fixtures.world.generate import generate_world
from tasks import vqav2

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    generate_world(root, seed=5, layout={"vqav2": {"train": 2, "val": 30}}, progress=False)
    return vqav2.load_official(root / "vqav2", "val2014")[:30]


def test_prompts_are_left_padded_to_the_multiple():
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    padded = pad_prompt_length({"input_ids": ids, "attention_mask": mask, "pixel_values": torch.ones(2, 1)}, 4, 0)
    assert padded["input_ids"].tolist() == [[0, 0, 5, 6], [0, 7, 8, 9]]
    assert padded["attention_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    assert torch.equal(padded["pixel_values"], torch.ones(2, 1))
    again = pad_prompt_length(padded, 4, 0)
    assert again["input_ids"] is padded["input_ids"]
    assert LENGTH_MULTIPLE % 8 == 0


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("family,path", [("llava", "fixtures/tiny/llava-tiny"), ("blip2", "fixtures/tiny/blip2-tiny")])
def test_static_cache_gives_generates_predictions(samples, family, path, beams, monkeypatch):
    adapter = load_adapter("t", family, path, torch.device("cpu"), "float32", ROOT)
    calls = []
    real = base.generate_static
    monkeypatch.setattr(base, "generate_static", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    # 30 samples at batch 16: a full batch and a shorter tail, both padded to the same length.
    decoding = replace(vqav2.GENERATION, num_beams=beams)
    plain = vqav2.evaluate(adapter, samples, batch_size=16, progress=False, generation=decoding)
    static = vqav2.evaluate(adapter, samples, batch_size=16, progress=False,
                            generation=replace(decoding, static_cache=True))
    assert [s["prediction"] for s in static.samples] == [s["prediction"] for s in plain.samples]
    assert static.metrics == plain.metrics
    assert [kw["num_beams"] for kw in calls] == [beams] * 2, "both batches took the static path"
    # Greedy, LLaVA's prompt is prefilled into the held static cache by the path's own (on a GPU,
    # compiled) forward; BLIP-2's generate builds its language model's inputs itself, and beam
    # search leaves the prefill to generate (it widens the cache rows to the beams).
    assert [kw["own_prefill"] for kw in calls] == [family == "llava"] * 2
    held = static_decode._HELD.get(adapter.model)
    assert (held is not None and held.cache is not None) == (family == "llava" and beams == 1)
    static_decode.release(adapter.model)
    assert held is None or held.cache is None


def test_activation_quantized_models_decode_the_usual_way(samples, monkeypatch):
    adapter = load_adapter("t", "llava", "fixtures/tiny/llava-tiny", torch.device("cpu"), "float32", ROOT)

    def refuse(*args, **kwargs):
        raise AssertionError("the static path ran on a model with activation quantizers")
    monkeypatch.setattr(base, "generate_static", refuse)
    monkeypatch.setattr(base, "has_activation_quantizers", lambda model: True)
    result = vqav2.evaluate(adapter, samples[:4], batch_size=4, progress=False,
                            generation=replace(vqav2.GENERATION, static_cache=True))
    assert len(result.samples) == 4


def test_a_cache_that_miscounts_its_prefill_falls_back_to_generates_own_filling(samples, monkeypatch):
    """Where the cache would not report the tokens prefilled into it (transformers releases that
    count them from the first row's keys), the own-prefill path steps aside."""
    adapter = load_adapter("t", "llava", "fixtures/tiny/llava-tiny", torch.device("cpu"), "float32", ROOT)
    plain = vqav2.evaluate(adapter, samples, batch_size=16, progress=False)
    asked = []
    monkeypatch.setattr(static_decode, "holds", lambda cache, tokens: asked.append(tokens) and False)
    result = vqav2.evaluate(adapter, samples, batch_size=16, progress=False,
                            generation=replace(vqav2.GENERATION, static_cache=True))
    assert [s["prediction"] for s in result.samples] == [s["prediction"] for s in plain.samples]
    assert len(asked) == 2


def test_a_cache_filled_under_compile_is_tagged_for_cuda_graphs(samples, monkeypatch):
    """On a GPU the prefill is compiled, and transformers tags a static cache's tensors as fixed
    addresses only when they are first filled outside torch.compile (without the tag inductor
    skips CUDA graphs for the decode step). Filled as under compile, the held cache's keys,
    values and fill counter are tagged all the same."""
    import transformers.cache_utils
    adapter = load_adapter("t", "llava", "fixtures/tiny/llava-tiny", torch.device("cpu"), "float32", ROOT)
    monkeypatch.setattr(transformers.cache_utils, "is_torchdynamo_compiling", lambda: True)
    vqav2.evaluate(adapter, samples[:4], batch_size=4, progress=False,
                   generation=replace(vqav2.GENERATION, static_cache=True))
    layers = static_decode._HELD[adapter.model].cache.layers
    tensors = [getattr(layer, name) for layer in layers for name in ("keys", "values", "cumulative_length")]
    assert len(tensors) == 3 * adapter.model.config.text_config.num_hidden_layers
    assert all(getattr(t, "_dynamo_static_input_type", None) for t in tensors)
    static_decode.release(adapter.model)


def test_the_compiled_prefill_only_fills_caches_already_made(samples):
    """transformers makes a static cache's tensors on its first fill; a prefill compiled over an
    unmade cache is compiled again for the made one (27 s on an H100). So a new cache's first
    batch goes through the model itself, later batches of its shape through the compiled one."""
    adapter = load_adapter("t", "llava", "fixtures/tiny/llava-tiny", torch.device("cpu"), "float32", ROOT)
    plain = vqav2.evaluate(adapter, samples, batch_size=10, progress=False)
    seen = []

    widths = []

    def compiled_stand_in(**kwargs):
        seen.append(all(layer.is_initialized for layer in kwargs[static_decode.cache_argument(adapter.model)].layers))
        widths.append(kwargs["input_ids"].shape[1] + 1)   # all of the prompt but its last token
        return adapter.model(**kwargs)
    static_decode._HELD.setdefault(adapter.model, static_decode._Held()).prefill = compiled_stand_in
    static = vqav2.evaluate(adapter, samples, batch_size=10, progress=False,
                            generation=replace(vqav2.GENERATION, static_cache=True))
    assert [s["prediction"] for s in static.samples] == [s["prediction"] for s in plain.samples]
    assert static_decode._HELD[adapter.model].shape[0] == 10, "three batches of one shape"
    assert seen == [True, True], "the first batch filled the new cache; the next two the compiled prefill"
    # The prompt padded for the prefill's shape only; the cache for the decode graphs' shape.
    assert all(width % static_decode.PREFILL_MULTIPLE == 0 and width < LENGTH_MULTIPLE for width in widths)
    cache_length = static_decode._HELD[adapter.model].shape[1]
    assert cache_length == LENGTH_MULTIPLE + vqav2.GENERATION.max_new_tokens
    static_decode.release(adapter.model)
