"""Token weightings of calibration (issue 19): how much each calibration token counts in AWQ's
scale search and GPTQ's Hessian (X^T diag(lambda) X). A parameter both methods accept:

- `uniform` (default): every token alike: no weights at all, so AWQ and GPTQ give their
  unweighted results bit for bit (tests/test_qig.py);
- `qig`: QIG's per-token scores (quantizers/qig.py): integrated gradients, per block, of the
  per-token output difference between the block with its FP weights and the block with its
  weights rounded (RTN at the config's bits), from a baseline to the block's FP input; the
  baseline is the block's input propagated through the already-quantized blocks (`ig_baseline:
  quantized`, the paper's) or zero (`zero`, the authors' code's); IQR clipping switchable;
- `modality`: MBQ-style, one weight per modality and sample (the qig scores' mean over the image
  tokens and over the text tokens), so the two rows differ only in granularity.

The FP input of each block comes from a second stream kept beside the walker's: the first block's
inputs caught on the FP model before anything is quantized, then each window's FP outputs,
computed before the window is rounded. Windows outside a component's block stack (a merger, a
connector's projection: walker.blocks_outside_stack) are weighted uniformly. One weight vector per block serves every equalization
group in it (the authors' code computes one per inspected sub-module: attention, MLP).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch

from quantizers import qig
from quantizers.params import MethodParams
from quantizers.primitives import fake_quantize
from quantizers.walker import Block, BlockInput, Feed, Window, blocks_of, catch_inputs, run_window

WEIGHTINGS = ("uniform", "modality", "qig")
IG_BASELINES = ("quantized", "zero")
_WEIGHTING_FIELDS = ("weighting", "ig_steps", "ig_baseline", "iqr_clip")


@dataclass(frozen=True)
class WeightedParams(MethodParams):
    """The token-weighting parameters AWQ and GPTQ share. With `uniform` they are left out of the
    config's identity: such a config computes what it did before they existed."""
    weighting: str = "uniform"
    ig_steps: int = 32            # integrated-gradient steps along the path
    ig_baseline: str = "quantized"
    iqr_clip: bool = True

    def as_dict(self) -> dict:
        found = super().as_dict()
        if self.weighting == "uniform":
            for name in _WEIGHTING_FIELDS:
                found.pop(name)
        return found

    def marks(self) -> tuple[str, ...]:
        return () if self.weighting == "uniform" else (self.weighting,)

    def validate(self, where: str) -> None:
        self._require(where, "weighting", self.weighting in WEIGHTINGS, f"one of {', '.join(WEIGHTINGS)}")
        self._require(where, "ig_baseline", self.ig_baseline in IG_BASELINES, f"one of {', '.join(IG_BASELINES)}")
        self._require(where, "ig_steps", self.ig_steps >= 1, ">= 1")


def _vision_mask(adapter, batch: dict) -> torch.Tensor | None:
    image_token = adapter.image_token_id
    if image_token is None or "input_ids" not in batch:
        return None
    return batch["input_ids"] == image_token


class TokenWeighting:
    """Per-window token weights for a calibrated method; `weights_for(window, feed)` must be
    called once per window, in the walker's order, before the window is quantized."""

    def __init__(self, adapter, targets, batches: list[dict], config):
        self.params: WeightedParams = config.params   # checked when the config was made
        self.config = config
        self.enabled = self.params.weighting != "uniform"
        self.details: dict[str, dict] = {}
        if not self.enabled:
            return
        self.real = [batch.get("attention_mask") for batch in batches]
        self.vision = [_vision_mask(adapter, batch) for batch in batches]
        # The FP stream: every component's first block inputs, caught before anything is rounded,
        # and where along its stack the stream stands.
        self._fp: dict[str, list[BlockInput]] = {}
        self._stack: dict[str, list[Block]] = {}
        for component in dict.fromkeys(t.component for t in targets):
            blocks = blocks_of(adapter, component, targets)
            self._stack[component] = blocks
            self._fp[component] = catch_inputs(adapter.model, blocks[0].module, batches)

    def weights_for(self, window: Window, feed: Feed) -> list[torch.Tensor] | None:
        """Each batch's (batch, tokens) weights for this window (None: uniform), and the FP stream
        moved past the window (its FP outputs, so call this before rounding it)."""
        if not self.enabled:
            return None
        stack = self._stack[window.component]
        names = [block.name for block in stack]
        if window.blocks[0].name not in names:
            return None   # a window outside the component's block stack (a merger): uniform
        # Blocks the walker passed without a target (a `layers` subset) move the FP stream too.
        skipped = stack[:names.index(window.blocks[0].name)]
        if skipped:
            self._advance(Window(window.component, skipped))
        del stack[:len(skipped) + len(window.blocks)]
        fp_inputs = self._fp[window.component]
        rounded = self._rounded_copy(window)
        weights = []
        for index, (fp_item, item) in enumerate(zip(fp_inputs, feed.inputs)):
            weights.append(self._batch_weights(window, rounded, fp_item, item, index))
        self._advance(window)
        first = window.blocks[0].name
        self.details[first] = {"weight_max": round(max(w.max().item() for w in weights), 3),
                               "weight_min": round(min(w.min().item() for w in weights), 3)}
        return weights

    @torch.no_grad()
    def _advance(self, window: Window) -> None:
        """The FP stream moved past the window (its blocks still FP: call before rounding them)."""
        self._fp[window.component] = [item.with_hidden(run_window(window, item)) for item in self._fp[window.component]]

    def _batch_weights(self, window: Window, rounded: Window, fp_item: BlockInput, item: BlockInput,
                       index: int) -> torch.Tensor:
        x = fp_item.hidden
        baseline = item.hidden if self.params.ig_baseline == "quantized" else torch.zeros_like(x)

        def output_difference(z):   # summed over tokens: one backward gives every token's gradient
            inputs = item.with_hidden(z)
            return (run_window(window, inputs) - run_window(rounded, inputs)).float().abs().mean(dim=-1).sum()

        attributions = qig.integrated_gradients(output_difference, x, baseline, self.params.ig_steps)
        # (batch, tokens); a block fed one flat sequence of tokens (Qwen2-VL's vision blocks) is one row
        scores = qig.token_scores(attributions).reshape(-1, x.shape[-2])
        real = self._rows(self.real[index], scores)
        weights = qig.token_weights(scores, real, self.params.iqr_clip)
        if self.params.weighting == "modality":
            vision = self._rows(self.vision[index], scores) if window.component == "language" else None
            weights = qig.modality_weights(weights, vision if vision is not None else torch.ones_like(weights), real)
        return weights.reshape(x.shape[:-1]).to(x.device)

    @staticmethod
    def _rows(mask: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor | None:
        """A (batch, tokens) mask where it matches the window's tokens (the language model's
        sequence), else None (the vision tower's patches: every one real)."""
        if mask is None or tuple(mask.shape) != tuple(scores.shape):
            return None
        return mask.to(scores.device) > 0

    def _rounded_copy(self, window: Window) -> Window:
        """The window's blocks with their targeted weights rounded (RTN at the config's bits)."""
        blocks = []
        for block in window.blocks:
            module = copy.deepcopy(block.module)
            for target in block.targets:
                relative = target.name[len(block.name) + 1:]
                linear = module.get_submodule(relative) if relative else module
                with torch.no_grad():
                    linear.weight.copy_(fake_quantize(linear.weight, target.bits, self.config.group_size,
                                                      self.config.sym).dequantized)
            blocks.append(replace(block, module=module, targets=[]))
        return Window(window.component, blocks, window.layout)


def weighted(feed: Feed, weights: list[torch.Tensor] | None) -> Feed:
    """The feed with `weights` as its inputs' token weights (the input callbacks get one per
    row); the feed itself when there are none."""
    if weights is None:
        return feed
    return replace(feed, inputs=[replace(item, token_weights=w) for item, w in zip(feed.inputs, weights)])
