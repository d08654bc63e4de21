"""Q-VLM (NeurIPS 2024) as a method: weights and static activation ranges of every target,
searched block by block over the calibration walker (the tensor-level pieces are in
quantizers/qvlm.py). Two parts, each with its switch, as in the paper's ablation:

(a)-(c) `dependency`: for each component's stack, the dependency H(Q_k+1 | Q_k) between the
    FP activations entering consecutive layers; layers grouped into blocks of at most
    `max_depth` while it exceeds the threshold; per block, after its weights are rounded, the
    activation clipping percentile in 1.0 .. 0.98 (step 0.005) that minimizes the block's output
    error, its inputs coming from the blocks before it with their weights and activations
    quantized. The chosen ranges become the config's static activation ranges.
(d) `encoder_optimization`: before anything is rounded, the vision encoder's targeted weights
    are tuned (Adam, rounding in the loop through a straight-through estimator) on
    `encoder_samples` calibration pairs to minimize
        LM loss + lambda1 x entropy of the vision blocks' quantized activations
        + lambda2 x (vision output error + eta x LM output error),
    errors measured against the model before tuning.
Without (a)-(c) the activation ranges are the config's a_quant (min-max by default), fitted by
quantizers.api like any other method's.

The paper leaves these constants unstated; our defaults and why:
- threshold h0: negative means the mean dependency of the component's stack (the issue's and our
  reading of "layers with above-average dependency are optimized together");
- temperature 1.0: with exponent -(x - q)^2 / step an element one step from a level keeps
  e^-1 of the weight of the nearest one, so assignments are soft across neighbouring levels only;
- lambda1 0.1: the entropy term (a few nats) then weighs about a tenth of the LM loss;
- lambda2 1.0 and eta 0.1: output errors are mean squared errors of hidden states (vision) and
  logits (LM, whose scale is larger and which the LM loss already constrains);
- encoder_lr 1e-4: Adam on weights of magnitude 1e-2 .. 1e-1 moves them by about 0.1-1% per
  epoch of 8 steps; larger rates undid the FP model's behaviour on the tiny checkpoints.
"""
from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn
from torch.nn.utils import parametrize

from quantizers import activations, qvlm
from quantizers.methods import METHODS, Method, QuantOutput, register_method
from quantizers.params import ActivationQuant, ConfigError, MethodParams
from quantizers.primitives import fake_quantize
from quantizers.walker import Block, BlockInput, Feed, Window, blocks_of, run_window, walk

# The inner methods Q-VLM may round each block's weights with (the paper's and its code's
# choices); each quantizes window by window (Method.quantize_window).
WEIGHT_ROUNDING = ("rtn", "gptq")
OBJECTIVES = ("block", "answer")


@dataclass(frozen=True)
class QVLMParams(MethodParams):
    weights: str = "rtn"               # the inner method that rounds each block's weights: rtn | gptq
    dependency: bool = True            # (a)-(c): entropy-guided blocks and the clipping search
    encoder_optimization: bool = True  # (d): tune the vision encoder (when vision is targeted)
    threshold: float = -1.0            # h0 in nats; negative: the stack's mean dependency
    max_depth: int = 3                 # layers per block at most
    temperature: float = 1.0           # soft assignment: softmax(-(x - q)^2 / (temperature * step))
    entropy_samples: int = 16384       # activation elements per layer and batch for entropies (seeded)
    p_max: float = 1.0                 # clipping percentiles searched: p_max down to p_min
    p_min: float = 0.98
    p_step: float = 0.005
    # What the clipping search minimizes: "block" is the paper's block-output error, every real
    # token alike; "answer" gives the calibration answer's tokens (and the one before them, which
    # predicts the first) `answer_share` of it, so the search cannot buy error on the ~30 image and
    # prompt tokens with the few tokens that decide what is generated and when it stops.
    objective: str = "answer"
    answer_share: float = 0.5
    encoder_samples: int = 64          # (d): calibration pairs, batch size, epochs, learning rate
    encoder_batch: int = 8
    encoder_epochs: int = 10
    encoder_lr: float = 1e-4
    lambda1: float = 0.1               # weight of the entropy term
    lambda2: float = 1.0               # weight of the output errors
    eta: float = 0.1                   # LM output error relative to the vision output error
    seed: int = 0

    @cached_property
    def inner(self) -> Method:
        """The `weights` method as an object, resolved through the registry once: validate asks
        for it when the config is made, the search rounds each window with it."""
        return METHODS.get(self.weights, "params.weights")()

    def validate(self, where: str) -> None:
        self._require(where, "weights", self.weights in WEIGHT_ROUNDING and self.inner.quantizes_windows(),
                      f"one of {', '.join(WEIGHT_ROUNDING)}")
        for name in ("max_depth", "entropy_samples", "encoder_samples", "encoder_batch"):
            self._require(where, name, getattr(self, name) >= 1, ">= 1")
        for name in ("encoder_epochs", "lambda1", "lambda2", "eta", "seed"):
            self._require(where, name, getattr(self, name) >= 0, ">= 0")
        for name in ("temperature", "p_step", "encoder_lr"):
            self._require(where, name, getattr(self, name) > 0, "> 0")
        self._require(where, "p_max", 0 < self.p_max <= 1, "in (0, 1]")
        self._require(where, "p_min", 0 < self.p_min <= self.p_max, "in (0, p_max]")
        self._require(where, "objective", self.objective in OBJECTIVES, f"one of {', '.join(OBJECTIVES)}")
        self._require(where, "answer_share", 0 < self.answer_share < 1, "in (0, 1)")


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@register_method
class QVLM(Method):
    name = "qvlm"
    Params = QVLMParams
    calibrates = True
    relative_cost = 1.5
    # The quantizers of the authors' code (quantizers/activations.py, "official"); the paper's
    # per-tensor ranges stay an option (a_quant: {granularity: tensor}).
    default_a_quant = ActivationQuant("official")

    def validate(self, config, where: str) -> None:
        super().validate(config, where)
        if not (config.quantizes_activations and config.a_quant.static):
            raise ConfigError(f"{where}: qvlm searches static activation ranges: set a_bits and a static "
                              "a_quant.granularity (official, the default, or tensor, channel, position)")

    def quantize(self, adapter, targets, config, batches, progress=False) -> QuantOutput:
        params: QVLMParams = config.params
        device = next(adapter.model.parameters()).device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        details: dict = {}
        started = time.perf_counter()
        vision = [t for t in targets if t.component == "vision"]
        if params.encoder_optimization and vision:
            details["encoder"] = optimize_encoder(adapter, vision, batches, config)
        details["encoder_seconds"] = round(time.perf_counter() - started, 3)
        search_started = time.perf_counter()
        search = _BlockSearch(config, activations.plan(targets, config.a_quant, adapter.layout))
        try:
            # Token weights travel with the batches: padding never steers a range or an error.
            results = walk(adapter, targets, batches, search.quantize_window, progress,
                           partition=search.partition if params.dependency else None,
                           token_weights=objective_weights(batches, params))
        finally:
            search.remove_hooks()
        details["search_seconds"] = round(time.perf_counter() - search_started, 3)
        details["peak_mem_mb"] = round(_peak_memory_mb(device), 1)
        details["blocks"] = search.blocks
        out = QuantOutput.merge(results)
        out.details["qvlm"] = details
        return out


def objective_weights(batches: list[dict], params: QVLMParams) -> list[torch.Tensor] | None:
    """Per-token weights of the search's error, one (batch, tokens) tensor per batch: 0 on padding,
    1 on real tokens; with objective "answer", the answer span scaled so that it carries
    answer_share of each sequence's weight."""
    if "attention_mask" not in batches[0]:
        return None
    weights = []
    for batch in batches:
        real = batch["attention_mask"].float()
        answer = getattr(batch, "answer_mask", None)
        if params.objective == "answer" and answer is not None:
            answer = answer.float() * real
            n_answer, n_other = answer.sum(dim=1, keepdim=True), (real - answer).sum(dim=1, keepdim=True)
            scale = torch.where(n_answer > 0, params.answer_share / (1 - params.answer_share)
                                * n_other / n_answer.clamp_min(1), torch.ones_like(n_answer))
            real = real - answer + answer * scale
        weights.append(real)
    return weights


class _BlockSearch:
    """(a)-(c) over the walker: the partition callback and the per-window search."""

    def __init__(self, config, specs: dict[str, activations.ActivationQuant]):
        self.config = config
        self.params: QVLMParams = config.params
        self.specs = specs                 # each target's concrete activation quantizer
        self.tokens = activations.TokenMask()
        self.blocks: dict[str, dict] = {}
        self._handles: list = []

    # (a) + (b)
    def partition(self, component: str, blocks: list[Block], inputs: list[BlockInput]) -> list[int]:
        params = self.params
        layer_values: list[torch.Tensor] = []
        current = inputs
        with torch.no_grad():
            for index, block in enumerate(blocks):
                layer_values.append(torch.cat([qvlm.sample_elements(item.hidden, params.entropy_samples,
                                                                    params.seed + b)
                                               for b, item in enumerate(current)]))
                if index + 1 < len(blocks):
                    window = Window(component, [block])
                    current = [item.with_hidden(run_window(window, item)) for item in current]
        dependency = qvlm.dependencies(layer_values, self.config.a_bits, params.temperature)
        threshold = None if params.threshold < 0 else params.threshold
        sizes = qvlm.partition(dependency, threshold, params.max_depth)
        self.blocks[component] = {"dependency": [round(d, 4) for d in dependency], "sizes": sizes}
        return sizes

    # (c), after the window's weights are rounded
    def quantize_window(self, window: Window, feed: Feed) -> QuantOutput:
        # channel_dynamic quantizers take their ranges from the real tokens of the language
        # model's sequences: the window's token weights say which (the walker runs blocks alone).
        def each(item):
            self.tokens.set(item.token_weights if window.component == "language" else None)

        with torch.no_grad():
            reference = [out.detach() for out in feed.run(each)]
        out = self._round_weights(window, feed)
        specs = {t.name: self.specs[t.name] for t in window.targets}
        modules = {t.name: t.module for t in window.targets}
        searched = [t for t in window.targets if specs[t.name].static]
        if not self.params.dependency or not searched:
            if self.params.dependency:   # only dynamic quantizers here: nothing to search, keep them on
                self._handles += activations.attach(modules, self.config.a_bits, specs, {}, self.tokens)
            return out
        candidates = qvlm.clip_candidates(self.params.p_max, self.params.p_min, self.params.p_step)
        seen: dict[str, dict[float, list]] = {t.name: {p: [] for p in candidates} for t in searched}

        def observe(group, x, token_weights):
            spec = specs[group[0].name]
            if token_weights is not None and spec.granularity != "position":   # real tokens only
                x = x.reshape(-1, x.shape[-1])[token_weights.reshape(-1) > 0]
            # the candidates differ only in the clipping point: one call serves every one of them
            by_p = activations.observed_ranges(x, _clipped_at(spec, candidates[-1]), candidates)
            for p in candidates:
                for target in group:
                    seen[target.name][p].append(by_p[p])

        feed.gather(searched, observe)
        errors, chosen = {}, None
        for p in candidates:
            ranges = {name: activations.combine_ranges(by_p[p], _clipped_at(specs[name], p))
                      for name, by_p in seen.items()}
            handles = activations.attach(modules, self.config.a_bits, specs, ranges, self.tokens)
            try:
                with torch.no_grad():
                    outputs = feed.run(each)
                    errors[p] = sum(_weighted_mse(o, r, item.token_weights)
                                    for o, r, item in zip(outputs, reference, feed.inputs))
            finally:
                for handle in handles:
                    handle.remove()
            if chosen is None or errors[p] < errors[chosen[0]]:
                chosen = (p, ranges)
        best, ranges = chosen
        # Kept on the model while the walk goes on: later blocks see quantized activations.
        self._handles += activations.attach(modules, self.config.a_bits, specs, ranges, self.tokens)
        out.activation_ranges.update(ranges)
        first = window.blocks[0].name
        out.details[first] = {"layers": len(window.blocks), "percentile": best,
                              "errors": {str(p): e for p, e in errors.items()}}
        return out

    def _round_weights(self, window: Window, feed: Feed) -> QuantOutput:
        """The inner method rounds the window, under this config with its own default parameters."""
        inner = self.params.inner
        return inner.quantize_window(window, feed, dataclasses.replace(self.config, method=inner, params=inner.Params()))

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _clipped_at(spec: activations.ActivationQuant, p: float) -> activations.ActivationQuant:
    """spec clipping at percentile p; p = 1 is plain min-max (the baseline's own ranges)."""
    return dataclasses.replace(spec, clip="minmax" if p >= 1.0 else "percentile", percentile=p)


def _weighted_mse(output: torch.Tensor, reference: torch.Tensor, token_weights: torch.Tensor | None) -> float:
    """Squared error per token (mean over channels), averaged with the token weights (all tokens
    alike when no weights match the shape)."""
    error = ((output.float() - reference.float()) ** 2).mean(dim=-1)
    if token_weights is not None and tuple(token_weights.shape) == tuple(error.shape):
        weights = token_weights.to(error.device).float()
        return ((error * weights).sum() / weights.sum().clamp_min(1e-12)).item()
    return error.mean().item()


# (d) -------------------------------------------------------------------------------------------
class _RoundThrough(nn.Module):
    """Weight parametrization: forward sees the rounded weight, the gradient reaches the FP one."""

    def __init__(self, bits: int, group_size: int, sym: bool):
        super().__init__()
        self.bits, self.group_size, self.sym = bits, group_size, sym

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rounded = fake_quantize(weight, self.bits, self.group_size, self.sym).dequantized
        return weight + (rounded - weight).detach()


def _chunks(batches: list[dict], size: int, limit: int) -> list[dict]:
    """Re-batch calibration batches into batches of `size` samples, `limit` samples in all."""
    out, taken = [], 0
    for batch in batches:
        rows = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
        for start in range(0, rows, size):
            if taken >= limit:
                return out
            stop = min(start + size, rows, start + limit - taken)
            out.append({k: v[start:stop] if torch.is_tensor(v) else v for k, v in batch.items()})
            taken += stop - start
    return out


def _labels(model: nn.Module, batch: dict) -> torch.Tensor:
    """Next-token labels over the text: padding and image placeholder tokens are ignored."""
    labels = batch["input_ids"].clone()
    if "attention_mask" in batch:
        labels[batch["attention_mask"] == 0] = -100
    image_token = getattr(model.config, "image_token_id", None) or getattr(model.config, "image_token_index", None)
    if image_token is not None:
        labels[labels == image_token] = -100
    return labels


class _EncoderObjective:
    """The objective of (d) on one batch, with the references taken before any tuning."""

    def __init__(self, adapter, blocks: list[Block], config):
        self.model, self.config, self.params = adapter.model, config, config.params
        self.vision = adapter.model.get_submodule(adapter.components["vision"])
        self.blocks = blocks
        self.references: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._sampled: dict[tuple, torch.Tensor] = {}   # element positions per activation size

    def _forward(self, batch: dict):
        captured: dict = {"blocks": []}
        handles = [self.vision.register_forward_hook(lambda m, a, out: captured.__setitem__(
            "vision", out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)))]
        handles += [block.module.register_forward_hook(lambda m, a, out: captured["blocks"].append(
            out[0] if isinstance(out, (tuple, list)) else out)) for block in self.blocks]
        try:
            output = self.model(**batch, labels=_labels(self.model, batch), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return output, captured

    def record_references(self, data: list[dict]) -> None:
        with torch.no_grad():
            for batch in data:
                output, captured = self._forward(batch)
                self.references.append((captured["vision"].detach(), output.logits.detach()))

    def __call__(self, index: int, batch: dict) -> torch.Tensor:
        params = self.params
        output, captured = self._forward(batch)
        vision_ref, logits_ref = self.references[index]
        entropy = torch.stack([qvlm.entropy(qvlm.layer_assignment(h.reshape(-1)[self._positions(h)].float(),
                                                                  self.config.a_bits, params.temperature))
                               for h in captured["blocks"]]).mean()
        vision_error = torch.mean((captured["vision"].float() - vision_ref.float()) ** 2)
        lm_error = torch.mean((output.logits.float() - logits_ref.float()) ** 2)
        return output.loss.float() + params.lambda1 * entropy + params.lambda2 * (vision_error + params.eta * lm_error)

    def _positions(self, h: torch.Tensor) -> torch.Tensor:
        key = (h.numel(), h.device)
        if key not in self._sampled:
            self._sampled[key] = qvlm.sample_positions(h.numel(), self.params.entropy_samples, self.params.seed, h.device)
        return self._sampled[key]


def optimize_encoder(adapter, targets, batches: list[dict], config) -> dict:
    """(d): tune the targeted vision weights in place; returns the objective before and after
    (mean over the tuning batches, with the weights rounded) and the seconds it took."""
    params: QVLMParams = config.params
    model = adapter.model
    started = time.perf_counter()
    data = _chunks(batches, params.encoder_batch, params.encoder_samples)
    objective = _EncoderObjective(adapter, blocks_of(adapter, "vision", targets), config)
    objective.record_references(data)
    trainable = [t.module for t in targets]
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for module, target in zip(trainable, targets):
        parametrize.register_parametrization(module, "weight", _RoundThrough(target.bits, config.group_size, config.sym))
    weights = [module.parametrizations.weight.original for module in trainable]
    for weight in weights:
        weight.requires_grad_(True)

    def mean_objective() -> float:
        with torch.no_grad():
            return sum(objective(i, batch).item() for i, batch in enumerate(data)) / len(data)

    try:
        before = mean_objective()
        optimizer = torch.optim.Adam(weights, lr=params.encoder_lr)
        for _ in range(params.encoder_epochs):
            for index, batch in enumerate(data):
                optimizer.zero_grad(set_to_none=True)
                objective(index, batch).backward()
                optimizer.step()
        after = mean_objective()
    finally:
        for module in trainable:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
    return {"objective_before": round(before, 6), "objective_after": round(after, 6),
            "steps": params.encoder_epochs * len(data), "samples": sum(
                next(v for v in b.values() if torch.is_tensor(v)).shape[0] for b in data),
            "seconds": round(time.perf_counter() - started, 3)}
