"""Down-scaled, random-init image-text-to-text models for the `hf` family's tests.

Each builder makes a real transformers architecture from its own config classes (hidden sizes
of 32-64, two layers per stack, the embedded world's 48-pixel images), a word-level tokenizer
built offline with `tokenizers`, the architecture's own image processor and processor, and a
minimal chat template in the model's conversation format; then saves everything with
save_pretrained, so that the tests load it back through `load_adapter(..., family="hf")`, i.e.
AutoModelForImageTextToText / AutoProcessor.from_pretrained, exactly as a hub checkpoint loads.
Weights are random (seeded): these models measure that the plumbing works, never accuracy.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch
from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from fixtures.adapters.llava import CAPTION, LETTER, SHORT_ANSWER, UNANSWERABLE

SEED = 0
IMAGE = 48            # the embedded world's image size (fixtures.world.scenes.IMAGE_SIZE)
VISION_PATCH = 8
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
BASE_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def qwen_chat_template(image: str) -> str:
    """The Qwen/ChatML turn format with `image` standing for one image entry."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}" + image + "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def vocabulary(texts: list[str]) -> list[str]:
    words = set(re.findall(r"\w+|[^\w\s]+", " ".join([SHORT_ANSWER, CAPTION, LETTER, UNANSWERABLE, *texts]).lower()))
    return sorted(words | {"user", "assistant", "system", "a", "b", "c", "d", "yes", "no"})


def build_tokenizer(words: list[str], specials: list[str], named: dict[str, str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer; `specials` are matched whole before the whitespace split."""
    tokens = BASE_SPECIALS + [t for t in specials if t not in BASE_SPECIALS]
    vocab = {token: i for i, token in enumerate(tokens + [w for w in words if w not in tokens])}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    core.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="<|im_end|>",
                                   unk_token="<unk>", pad_token="<pad>", padding_side="left",
                                   extra_special_tokens=named)


def _text_ids(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _generation_ids(model, tokenizer) -> None:
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))


def build_llava_onevision(words: list[str]):
    """SigLIP tower (no pooling head, as the released OneVision models) + 2-layer MLP projector
    + Qwen2 LM; AnyRes over 32-pixel crops (a square 48-pixel image picks one crop + the base view)."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor,
                              LlavaOnevisionVideoProcessor, Qwen2Config, SiglipVisionConfig)
    tokenizer = build_tokenizer(words, ["<image>", "<video>"], {"image_token": "<image>", "video_token": "<video>"})
    crop = 32
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=crop, patch_size=VISION_PATCH, vision_use_head=False)
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=Qwen2Config(**TEXT, **_text_ids(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=[[crop, crop], [crop, 2 * crop], [2 * crop, crop]],
        vision_feature_layer=-1, vision_feature_select_strategy="full")
    model = LlavaOnevisionForConditionalGeneration(config)
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": crop, "width": crop}, image_grid_pinpoints=config.image_grid_pinpoints,
        image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size={"height": crop, "width": crop}), num_image_tokens=(crop // VISION_PATCH) ** 2,
        vision_feature_select_strategy="full", chat_template=qwen_chat_template("<image>\n"))
    return model, processor, tokenizer


def _qwen_vl_processor(tokenizer, processor_class):
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor
    sizes = dict(patch_size=VISION_PATCH, merge_size=2, temporal_patch_size=2,
                 size={"shortest_edge": (2 * VISION_PATCH) ** 2, "longest_edge": IMAGE * IMAGE})
    image_processor = Qwen2VLImageProcessor(**sizes, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return processor_class(image_processor=image_processor, tokenizer=tokenizer,
                           video_processor=Qwen2VLVideoProcessor(**sizes),
                           chat_template=qwen_chat_template("<|vision_start|><|image_pad|><|vision_end|>"))


_QWEN_VL_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _qwen_vl_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def _qwen_text(tokenizer) -> dict:
    # M-RoPE: the head dim (64 / 4 = 16) has 8 frequency pairs, split over (time, height, width).
    return dict(**TEXT, **_text_ids(tokenizer),
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})


def build_qwen2_vl(words: list[str]):
    """Qwen2-VL: ViT with 2D RoPE (norm1 -> attn.qkv, norm2 -> mlp.fc1) ending in the patch
    merger (2x2 patches -> one LM token) + Qwen2 LM with M-RoPE."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    tokenizer = build_tokenizer(words, _QWEN_VL_SPECIALS, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=TEXT["hidden_size"], mlp_ratio=2, num_heads=2,
                           patch_size=VISION_PATCH, spatial_merge_size=2, temporal_patch_size=2),
        text_config=_qwen_text(tokenizer), **_qwen_vl_ids(tokenizer))
    model = Qwen2VLForConditionalGeneration(config)
    return model, _qwen_vl_processor(tokenizer, Qwen2VLProcessor), tokenizer


def build_qwen2_5_vl(words: list[str]):
    """Qwen2.5-VL: RMSNorm ViT with SwiGLU MLPs (norm2 -> mlp.gate/up) and window attention
    (block 1 full), the same merger and LM."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    tokenizer = build_tokenizer(words, _QWEN_VL_SPECIALS, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=TEXT["hidden_size"], patch_size=VISION_PATCH, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=4 * VISION_PATCH, fullatt_block_indexes=[1]),
        text_config=_qwen_text(tokenizer), **_qwen_vl_ids(tokenizer))
    model = Qwen2_5_VLForConditionalGeneration(config)
    return model, _qwen_vl_processor(tokenizer, Qwen2_5_VLProcessor), tokenizer


BUILDERS: dict[str, Callable] = {
    "llava_onevision": build_llava_onevision,
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
}


def save_tiny(architecture: str, directory: Path, words: list[str], seed: int = SEED) -> Path:
    """Build one architecture with seeded random weights and save model + processor there."""
    torch.manual_seed(seed)
    model, processor, tokenizer = BUILDERS[architecture](words)
    _generation_ids(model, tokenizer)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
