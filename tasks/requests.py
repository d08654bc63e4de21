"""What a task may ask of a model: the request kinds, each a typed interface that a model family
implements, and the decoding settings sent with every generative request.

A family answers a request kind by subclassing its interface (fixtures/adapters/base.py holds
the rest of the adapter contract); a task names the kinds it sends (TaskDef.requests), and a
family serves a task when it implements every one of them. They live here, in tasks/, because
the tasks send them and tasks/ never imports fixtures/.
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch


@dataclass(frozen=True)
class Generation:
    """Decoding settings of one request: a task's defaults (TaskDef.generation) with the grid's
    `generation:` overrides for the model (and for that task) merged over them. Adapters keep no
    decoding state: every generate call is given one of these."""
    max_new_tokens: int = field(metadata={"minimum": 1})
    num_beams: int = field(default=1, metadata={"minimum": 1})    # 1 = greedy
    min_length: int = field(default=0, metadata={"minimum": 0})   # at least this many new tokens (LAVIS captions: 8)
    # The batch packed by image: each distinct image's prompt prefix prefilled once and read once
    # per decode step for all the questions about it (greedy, families that support it:
    # fixtures/adapters/shared_prefix.py). Off by default: the same predictions on the tiny
    # checkpoints, but a bf16 near-tie could round the other way.
    share_image_prefix: bool = False
    # With share_image_prefix on a GPU: replay the packed decode step as a CUDA graph captured
    # once per batch shape (rows rounded up to a multiple of 8, so batches share shapes). On by
    # default: with fused_elementwise each eager step pays the compiled functions' guards, and on
    # H100s whose host bounds it the fused shared batch took 0.53-0.94 s eager and 0.34-0.36 s
    # captured (89.5 -> 182.1 samples/s, the same predictions), the perf grid's evaluation 3.5-4.4
    # -> 2.1-2.2 s a config (benchmarks/perf/RESULTS.md). Each new shape pays a capture, again
    # every config (the weights change).
    decode_graphs: bool = True
    # Batches of prompts of similar token length (tasks.base.generate_replies): less padding to
    # prefill where prompts vary (ScienceQA's hints); off by default, as it regroups the batches.
    length_buckets: bool = False
    # Decoding (greedy or beams) with a static KV cache at a length padded to a multiple of 64,
    # so the decode step compiles into CUDA graphs reused across batches
    # (fixtures/adapters/static_decode.py); families that generate with a decoder-only language
    # model, not with activation quantizers.
    static_cache: bool = False
    # On a GPU, for families that support it (LLaVA): the language model's norms, MLPs and rotary
    # application compiled (fixtures/adapters/fused_elementwise.py), compiled once per model and
    # timed apart (the `compile` phase); not with activation quantizers. On by default: the eager
    # predictions on the tiny checkpoints; at full size on an H200, +20% shared and +12% unshared
    # samples/s for a 19-21 s compile per model (benchmarks/perf/RESULTS.md).
    # The CPU keeps eager code whatever this says (a tiny model's whole run is shorter than a compile).
    fused_elementwise: bool = True

    def merged(self, overrides: Mapping[str, Any]) -> "Generation":
        return dataclasses.replace(self, **overrides) if overrides else self


# The settings a grid may override: Generation's fields, the one list of them.
GENERATION_KEYS = tuple(f.name for f in dataclasses.fields(Generation))


def generation_setting_error(key: str, value: Any) -> str | None:
    """Why `value` cannot be the decoding setting `key` (one phrase), or None."""
    spec = next(f for f in dataclasses.fields(Generation) if f.name == key)
    if "minimum" not in spec.metadata:   # a switch
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    minimum = spec.metadata["minimum"]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        return f"must be an integer >= {minimum}, got {value!r}"
    return None


# -- the request kinds ---------------------------------------------------------------------------
class Generates(abc.ABC):
    """What every generative request kind needs besides its prompt: the processor's work on the
    host (encode: safe to run in a background thread, it must not touch the model) and decoding
    of an encoded batch (only the new text of each row)."""

    @abc.abstractmethod
    def encode(self, images: list, texts: list[str]) -> dict:
        """Processor output on the host, left-padded for batched generation."""

    def staged(self, encoded: dict) -> dict:
        """encode's output readied for the device on the same thread (cast, pinned): by default as
        it is."""
        return encoded

    @abc.abstractmethod
    def generate_encoded(self, encoded: dict, generation: Generation) -> list[str]:
        """The reply to each row of an encoded batch, decoded with `generation`."""


class ShortAnswer(Generates):
    """Open VQA answered in a word or phrase (VQAv2)."""
    kind: ClassVar[str] = "short_answer"

    @abc.abstractmethod
    def short_answer_prompt(self, question: str) -> str: ...


class ShortAnswerOrUnanswerable(Generates):
    """Open VQA that may answer that it cannot tell (VizWiz)."""
    kind: ClassVar[str] = "short_answer_or_unanswerable"

    @abc.abstractmethod
    def short_answer_or_unanswerable_prompt(self, question: str) -> str: ...


class Caption(Generates):
    """A one-sentence caption (COCO)."""
    kind: ClassVar[str] = "caption"

    @abc.abstractmethod
    def caption_prompt(self) -> str: ...


class MultipleChoice(Generates):
    """An option letter from lettered choices, with an optional context hint (ScienceQA)."""
    kind: ClassVar[str] = "multiple_choice"

    @abc.abstractmethod
    def multiple_choice_prompt(self, question: str, choices: list[str], hint: str = "") -> str: ...


class Retrieval(abc.ABC):
    """Image and text embeddings and image-text match scores (Flickr30k)."""
    kind: ClassVar[str] = "retrieval"

    @abc.abstractmethod
    def image_embeddings(self, images: list) -> torch.Tensor:
        """(n, n_query, d): L2-normalized query embeddings."""

    @abc.abstractmethod
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """(n, d): L2-normalized text embeddings."""

    @abc.abstractmethod
    def itm_scores(self, images: list, texts: list[str]) -> torch.Tensor:
        """(n,): the match logit (or probability) of text i with image i."""


class SharedImageSide(Retrieval):
    """Retrieval with each image's side computed once per evaluation (tasks/flickr_retrieval.py
    says why): an adapter that implements it is evaluated through these instead of the per-pair
    calls, with the same scores."""

    @abc.abstractmethod
    def image_features(self, images: list) -> torch.Tensor:
        """(n, ...): what the adapter needs per image, kept on the device."""

    @abc.abstractmethod
    def image_embeddings_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """As image_embeddings, from rows of image_features."""

    @abc.abstractmethod
    def itm_scores_from_features(self, features: torch.Tensor, image_idx, texts: list[str]) -> torch.Tensor:
        """As itm_scores, pair j being row image_idx[j] of features with texts[j]."""


class TextLikelihood(abc.ABC):
    """The language model alone, as a causal LM (text perplexity)."""
    kind: ClassVar[str] = "text_likelihood"

    @abc.abstractmethod
    def causal_lm(self) -> torch.nn.Module:
        """A CausalLM sharing the model's language modules (quantized weights and hooks included)."""


# kind -> its interface; the one list of request kinds.
REQUESTS: dict[str, type] = {interface.kind: interface for interface in
                             (ShortAnswer, ShortAnswerOrUnanswerable, Caption, MultipleChoice, Retrieval, TextLikelihood)}
REQUEST_KINDS = tuple(REQUESTS)


def answered_kinds(adapter_class: type) -> frozenset[str]:
    """The request kinds a model family answers: the interfaces its adapter class implements."""
    return frozenset(kind for kind, interface in REQUESTS.items() if issubclass(adapter_class, interface))
