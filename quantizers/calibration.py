"""The calibration walker shared by the calibrated methods (GPTQ, AWQ, ...).

For each component, in the model's forward order (vision, then Q-Former/connector, then
language): run the whole model on the calibration batches and catch the inputs of the
component's first block (so they already pass through every component quantized before it);
then block by block: let the method gather its statistics from the block's inputs, quantize the
block, recompute the block's outputs with its quantized weights, and feed those to the next block.
A component without a stack of blocks (the LLaVA projector) is one block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from quantizers.targets import Target, block_stack

BlockInputs = list[tuple[tuple, dict]]


class _Caught(Exception):
    """Raised from a pre-hook to stop the forward pass once the block's inputs are caught."""


@dataclass
class Block:
    component: str
    name: str                  # qualified module name
    module: nn.Module
    targets: list[Target]


def blocks_of(adapter, component: str, targets: list[Target]) -> list[Block]:
    prefix = adapter.components[component]
    relative, modules = block_stack(adapter.model.get_submodule(prefix))
    blocks = []
    for index, module in enumerate(modules):
        name = f"{prefix}.{relative}.{index}" if relative else prefix
        mine = [t for t in targets if t.name == name or t.name.startswith(name + ".")]
        blocks.append(Block(component, name, module, mine))
    return blocks


def catch_inputs(model: nn.Module, block: nn.Module, batches: Iterable[dict]) -> BlockInputs:
    """Run the model on each batch and keep what reaches `block` (positional and keyword args)."""
    caught: BlockInputs = []

    def hook(module, args, kwargs):
        caught.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        raise _Caught

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(**batch, use_cache=False)
                except _Caught:
                    pass
    finally:
        handle.remove()
    if not caught:
        raise RuntimeError("calibration: the block was never reached by the model's forward pass")
    return caught


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return [_first(block(*args, **kwargs)) for args, kwargs in inputs]


def walk(adapter, targets: list[Target], batches: list[dict],
         quantize_block: Callable[[Block, Callable[[], None]], Any], progress: bool = True) -> list[Any]:
    """Quantize every block that holds a target, in forward order; returns the blocks' results.

    quantize_block(block, feed) must quantize block.targets in place; calling feed() runs the
    block on all of its calibration inputs (so forward hooks the method registered see them).
    """
    results = []
    order = [c for c in adapter.components if any(t.component == c for t in targets)]
    for component in order:
        blocks = blocks_of(adapter, component, targets)
        inputs = catch_inputs(adapter.model, blocks[0].module, batches)
        last = max(i for i, b in enumerate(blocks) if b.targets)
        bar = tqdm(blocks[:last + 1], desc=f"calibrate {component}", unit="block",
                   disable=not progress, leave=False)
        for block in bar:
            if block.targets:
                results.append(quantize_block(block, lambda b=block, x=inputs: run_block(b.module, x)))
            if block is blocks[last]:
                break  # later blocks hold no target: no need to propagate further
            outputs = run_block(block.module, inputs)
            inputs = [((out, *args[1:]), kwargs) for out, (args, kwargs) in zip(outputs, inputs)]
    return results
