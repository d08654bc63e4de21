"""The calibration walker shared by the calibrated methods (GPTQ, AWQ, and Q-VLM/QIG to come).

For each component, in the model's forward order (vision, then Q-Former/connector, then
language): run the whole model on the calibration batches and catch the inputs of the
component's first block (so they already pass through every component quantized before it);
then window by window (one block by default, or several consecutive blocks): let the method
gather its statistics from the window's inputs, quantize the window, recompute the window's
outputs with its quantized weights, and feed those to the next window. A component without a
stack of blocks (the LLaVA projector) is one block. Targets outside the component's stack (a
merger after a vision tower, a connector's projection before its resampler, the blocks of a
second stack) are calibrated in windows of their own, in forward order with the stack: each
such module's inputs are caught by running the whole model (blocks_outside_stack). A block the
model calls with its hidden state by keyword (`layer(hidden_state=...)`) is fed the same way.

What a method can ask of the walker:
- `window`: how many consecutive blocks it quantizes together (Q-VLM's blocks of up to 3 layers);
- `grad`: run the window's forward passes with autograd on (methods that optimize through it);
- per-token weights: `walk(..., token_weights=[one tensor per batch])` travels beside each
  batch's block inputs and reaches the method's input callbacks (QIG's weighted Hessian);
- Feed.gather(): Linears that read the very same input tensor (q/k/v, gate/up) are reported as
  one group with that input once, so a statistic shared by the group is computed once.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from quantizers.targets import Target


class _Caught(Exception):
    """Raised from a pre-hook to stop the forward pass once the block's inputs are caught."""


class CalibrationBatch(dict):
    """One calibration batch: the model's inputs (a dict, passed as model(**batch)), and beside
    them per-token masks a method may use, each (batch, tokens) like the attention mask:
    `answer_mask` marks the calibration answer's tokens and the token before them (whose output
    predicts the answer's first token); None where the data has no answer."""

    def __init__(self, inputs: dict, answer_mask: torch.Tensor | None = None):
        super().__init__(inputs)
        self.answer_mask = answer_mask


@dataclass
class BlockInput:
    """What one calibration batch feeds a block: its positional and keyword arguments, and the
    optional per-token weights that travel with it."""
    args: tuple
    kwargs: dict
    token_weights: torch.Tensor | None = None
    # The keyword the hidden state came by when the model calls the block by keyword (Mllama's
    # and Llama 4's vision layers); None: the first positional argument.
    hidden_key: str | None = None

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.hidden_key is None else self.kwargs[self.hidden_key]

    def with_hidden(self, x: torch.Tensor) -> "BlockInput":
        """The same inputs with another hidden state (the previous block's output)."""
        if self.hidden_key is None:
            return BlockInput((x, *self.args[1:]), self.kwargs, self.token_weights)
        return BlockInput(self.args, {**self.kwargs, self.hidden_key: x}, self.token_weights, self.hidden_key)


@dataclass
class Block:
    component: str
    name: str                  # qualified module name
    module: nn.Module
    targets: list[Target]


@dataclass
class Window:
    """Consecutive blocks of one component, quantized together."""
    component: str
    blocks: list[Block]
    layout: Any = None          # the component's quantizers.folds.BlockLayout

    @property
    def targets(self) -> list[Target]:
        return [t for block in self.blocks for t in block.targets]


InputCallback = Callable[[list[Target], torch.Tensor, "torch.Tensor | None"], None]


@dataclass
class Feed:
    """The window's calibration inputs, and ways for a method to run the window on them."""
    window: Window
    inputs: list[BlockInput]
    grad: bool = False
    _groups: list[list[Target]] | None = field(default=None, repr=False)

    def run(self, each: Callable[[BlockInput], None] | None = None) -> list[torch.Tensor]:
        """The window's outputs for every batch (forward hooks the method registered see them);
        each(item), when given, is called before each batch's forward pass."""
        outputs = []
        with nullcontext() if self.grad else torch.no_grad():
            for item in self.inputs:
                if each is not None:
                    each(item)
                outputs.append(run_window(self.window, item))
        return outputs

    def gather(self, targets: list[Target], on_input: InputCallback) -> None:
        """Run the window once; for each batch and each distinct input tensor that reaches the
        targets, call on_input(targets reading it, x, token_weights or None) once."""
        seen: list[tuple[Target, torch.Tensor]] = []
        handles = [t.module.register_forward_hook(lambda m, args, out, t=t: seen.append((t, args[0])))
                   for t in targets]
        try:
            with nullcontext() if self.grad else torch.no_grad():
                for item in self.inputs:
                    seen.clear()
                    run_window(self.window, item)
                    for group, x in _by_input(seen):
                        on_input(group, x, _row_weights(item.token_weights, x))
        finally:
            for handle in handles:
                handle.remove()
        seen.clear()


def _by_input(seen: list[tuple[Target, torch.Tensor]]) -> list[tuple[list[Target], torch.Tensor]]:
    """Group the (target, input) pairs of one forward pass by the identity of the input tensor."""
    groups: dict[int, tuple[list[Target], torch.Tensor]] = {}
    for target, x in seen:
        groups.setdefault(id(x), ([], x))[0].append(target)
    return list(groups.values())


def _row_weights(weights: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """Per-token weights as one value per input row, when they match x's leading dimensions."""
    if weights is None or tuple(weights.shape) != tuple(x.shape[:-1]):
        return None
    return weights.reshape(-1)


def blocks_of(adapter, component: str, targets: list[Target]) -> list[Block]:
    prefix = adapter.components[component]
    relative, modules = adapter.block_stack(component)
    blocks = []
    for index, module in enumerate(modules):
        name = f"{prefix}.{relative}.{index}" if relative else prefix
        mine = [t for t in targets if t.name == name or t.name.startswith(name + ".")]
        blocks.append(Block(component, name, module, mine))
    return blocks


def catch_inputs(model: nn.Module, block: nn.Module, batches: Iterable[dict],
                 token_weights: list[torch.Tensor] | None = None) -> list[BlockInput]:
    """Run the model on each batch and keep what reaches `block` (positional and keyword args)."""
    caught: list[BlockInput] = []

    def hook(module, args, kwargs):
        # Called by keyword: the hidden state is the first floating tensor passed.
        key = None if args else next((k for k, v in kwargs.items() if torch.is_tensor(v) and v.is_floating_point()),
                                     None)
        if key is not None:
            kwargs = {**kwargs, key: kwargs[key].detach()}
        caught.append(BlockInput(tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs),
                                 hidden_key=key))
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
    for item, weights in zip(caught, token_weights or []):
        item.token_weights = weights
    return caught


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def run_window(window: Window, item: BlockInput) -> torch.Tensor:
    """The window's output for one batch: its blocks in turn, each fed the previous output."""
    for block in window.blocks:
        item = item.with_hidden(_first(block.module(*item.args, **item.kwargs)))
    return item.hidden


def _unit_path(root: nn.Module, relative: str, stack: str) -> str:
    """The module (relative to the component) that a Linear outside the stack is calibrated
    with: the first module on its path that does not hold the stack, or, below that, the entry
    of the first ModuleList on the path (one block of a second stack, one of several mergers)."""
    parts = relative.split(".")
    path, depth = "", 0
    while depth < len(parts):
        path = ".".join(parts[:depth + 1])
        depth += 1
        if not (stack == path or stack.startswith(path + ".")):
            break
    while depth < len(parts):
        if isinstance(root.get_submodule(path), nn.ModuleList):
            return ".".join(parts[:depth + 1])
        path = ".".join(parts[:depth + 1])
        depth += 1
    return path


def blocks_outside_stack(adapter, component: str, targets: list[Target], stack_blocks: list[Block]) -> list[Block]:
    """Blocks (one per calling module, see _unit_path) for the component's targets that are in
    none of its stack's blocks."""
    inside = {id(t) for block in stack_blocks for t in block.targets}
    prefix = adapter.components[component]
    relative_stack, _ = adapter.block_stack(component)
    root = adapter.model.get_submodule(prefix)
    units: dict[str, list[Target]] = {}
    for target in targets:
        if target.component == component and id(target) not in inside:
            units.setdefault(_unit_path(root, target.name[len(prefix) + 1:], relative_stack), []).append(target)
    return [Block(component, f"{prefix}.{path}", root.get_submodule(path), mine) for path, mine in units.items()]


def forward_order(model: nn.Module, blocks: list[Block], batch: dict) -> list[Block]:
    """The blocks in the order the model first calls them on one batch (never called: last)."""
    first_call: dict[int, int] = {}

    def seen(index: int) -> None:   # a pre-hook's return value would replace the module's inputs
        first_call.setdefault(index, len(first_call))

    handles = [block.module.register_forward_pre_hook(lambda module, args, i=i: seen(i))
               for i, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [blocks[i] for i in sorted(range(len(blocks)), key=lambda i: first_call.get(i, len(blocks) + i))]


PartitionCallback = Callable[[str, list[Block], list[BlockInput]], list[int]]


def walk(adapter, targets: list[Target], batches: list[dict],
         quantize_window: Callable[[Window, Feed], Any], progress: bool = True, *, window: int = 1,
         grad: bool = False, token_weights: list[torch.Tensor] | None = None,
         partition: PartitionCallback | None = None) -> list[Any]:
    """Quantize every window that holds a target, in forward order; returns the windows' results.

    quantize_window(window, feed) must quantize window.targets in place; feed.run() and
    feed.gather() run the window on all of its calibration inputs. Windows are `window` blocks
    each, or the sizes partition(component, blocks, first block's inputs) returns (Q-VLM's
    entropy-guided blocks), which must add up to the number of blocks it was given.
    """
    if window < 1:
        raise ValueError(f"walker: window must be >= 1, got {window}")
    results = []
    order = [c for c in adapter.components if any(t.component == c for t in targets)]
    for component in order:
        blocks = blocks_of(adapter, component, targets)
        # Targets outside the stack: windows of their own, before or after it in forward order.
        before, after = _outside_in_order(adapter, component, targets, blocks, batches)
        results += [_quantize_alone(adapter, unit, batches, quantize_window, grad, token_weights) for unit in before]
        if not any(b.targets for b in blocks):
            results += [_quantize_alone(adapter, unit, batches, quantize_window, grad, token_weights) for unit in after]
            continue
        last = max(i for i, b in enumerate(blocks) if b.targets)
        inputs = catch_inputs(adapter.model, blocks[0].module, batches, token_weights)
        sizes = partition(component, blocks[:last + 1], inputs) if partition else None
        if sizes is None:
            sizes = [min(window, last + 1 - i) for i in range(0, last + 1, window)]
        if sum(sizes) != last + 1 or min(sizes) < 1:
            raise ValueError(f"walker: window sizes {sizes} do not partition {last + 1} blocks")
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        windows = [Window(component, blocks[start:start + size], adapter.layout(component))
                   for start, size in zip(starts, sizes)]
        bar = tqdm(windows, desc=f"calibrate {component}", unit="window" if window > 1 else "block",
                   disable=not progress, leave=False)
        for current in bar:
            feed = Feed(current, inputs, grad)
            if current.targets:
                results.append(quantize_window(current, feed))
            if current is windows[-1]:
                break  # later blocks hold no target: no need to propagate further
            outputs = Feed(current, inputs).run()   # with the window's quantized weights
            inputs = [item.with_hidden(out.detach()) for out, item in zip(outputs, inputs)]
        results += [_quantize_alone(adapter, unit, batches, quantize_window, grad, token_weights) for unit in after]
    return results


def _outside_in_order(adapter, component: str, targets: list[Target], blocks: list[Block],
                      batches: list[dict]) -> tuple[list[Block], list[Block]]:
    """The component's blocks outside its stack, split into those the model calls before the
    stack's first block and those after it (one traced forward pass, only when there are any)."""
    outside = blocks_outside_stack(adapter, component, targets, blocks)
    if not outside:
        return [], []
    ordered = forward_order(adapter.model, [blocks[0], *outside], batches[0])
    split = ordered.index(blocks[0])
    return ordered[:split], ordered[split + 1:]


def _quantize_alone(adapter, unit: Block, batches: list[dict], quantize_window: Callable[[Window, Feed], Any],
                    grad: bool, token_weights: list[torch.Tensor] | None) -> Any:
    """Quantize a block outside the stack as a window of its own; its inputs come from running
    the whole model, as quantized so far."""
    try:
        inputs = catch_inputs(adapter.model, unit.module, batches, token_weights)
    except RuntimeError as err:
        raise RuntimeError(f"calibration: {unit.name} (targets {', '.join(t.name for t in unit.targets)}) is never "
                           f"called by the model's forward pass on the calibration batches") from err
    alone = Window(unit.component, [unit], adapter.layout(unit.component))
    return quantize_window(alone, Feed(alone, inputs, grad))
