"""The calibration walker: windows of blocks, inputs shared by several Linears gathered once,
per-token weights carried beside the block inputs, and an optional gradient mode."""
from pathlib import Path

import pytest
import torch

from fixtures.adapters import load_adapter
from quantizers.config import make_config
from quantizers.targets import select_targets
from quantizers.walker import walk

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "model.language_model.layers."


@pytest.fixture(scope="module")
def tiny():
    return load_adapter("llava-tiny", "llava", "fixtures/tiny/llava-tiny", torch.device("cpu"), "float32", ROOT)


@pytest.fixture(scope="module")
def batches(tiny):
    from PIL import Image
    images = [Image.new("RGB", (64, 64), color) for color in ("red", "blue", "green", "white")]
    texts = [tiny.calibration_text(q, "yes") for q in ("is it red", "what is it", "how many", "where")]
    return [tiny.model_inputs(images[:2], texts[:2]), tiny.model_inputs(images[2:], texts[2:])]


def language_targets(tiny):
    return select_targets(tiny, make_config("q", "rtn", {"language": 4}))


def test_linears_reading_one_input_are_one_group(tiny, batches):
    groups = []

    def method(window, feed):
        feed.gather(window.targets, lambda group, x, weights: groups.append(
            tuple(t.name[len(window.blocks[0].name) + 1:] for t in group)))

    walk(tiny, language_targets(tiny), batches, method, progress=False)
    per_block = set(groups)
    assert per_block == {("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                         ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)}
    assert len(groups) == 4 * 3 * len(batches)   # 4 distinct inputs per block, 3 blocks, every batch


def test_windows_of_blocks_and_their_outputs(tiny, batches):
    windows, outputs = [], []

    def method(window, feed):
        windows.append([b.name for b in window.blocks])
        outputs.append(feed.run())

    walk(tiny, language_targets(tiny), batches, method, progress=False, window=2)
    assert windows == [[f"{PREFIX}0", f"{PREFIX}1"], [f"{PREFIX}2"]]
    # A window's output is its blocks run in turn: the second window starts from the first's.
    assert len(outputs[0]) == len(batches) and outputs[0][0].shape[:2] == batches[0]["input_ids"].shape


def test_token_weights_travel_with_the_inputs_and_grad_mode(tiny, batches):
    weights = [torch.rand(b["input_ids"].shape) for b in batches]
    seen, grads = [], []

    def method(window, feed):
        feed.gather(window.targets[:1], lambda group, x, w: seen.append((x.shape, None if w is None else w.clone())))
        grads.append(all(out.requires_grad for out in feed.run()))

    walk(tiny, language_targets(tiny), batches, method, progress=False, token_weights=weights, grad=True)
    assert all(w is not None and w.shape == (shape[0] * shape[1],) for shape, w in seen)
    assert torch.equal(seen[0][1], weights[0].reshape(-1))
    assert all(grads)
    with pytest.raises(ValueError, match="window must be >= 1"):
        walk(tiny, language_targets(tiny), batches, method, progress=False, window=0)
