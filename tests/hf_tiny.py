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


def _vision(**overrides) -> dict:
    """A two-layer ViT of width 32 over 8-pixel patches, in each config's own field names."""
    return dict(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     patch_size=VISION_PATCH, image_size=IMAGE), **overrides)


def build_llava_next(words: list[str]):
    """CLIP tower + MLP projector + Llama LM; AnyRes over 32-pixel crops."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor)
    tokenizer = build_tokenizer(words, ["<image>"], {"image_token": "<image>"})
    crop = 32
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_vision(image_size=crop)),
        text_config=LlamaConfig(**TEXT, **_text_ids(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=[[crop, crop], [crop, 2 * crop], [2 * crop, crop]],
        vision_feature_layer=-1, vision_feature_select_strategy="default")
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop},
                                              image_grid_pinpoints=config.image_grid_pinpoints,
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3)
    # CLIP's class token is dropped ("default"): each crop gives (32 / 8)^2 = 16 image tokens.
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=VISION_PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=qwen_chat_template("<image>\n"))
    return LlavaNextForConditionalGeneration(config), processor, tokenizer


def build_mistral3(words: list[str]):
    """Pixtral tower (2D RoPE, attention_norm / ffn_norm, SwiGLU) + patch merger + Mistral LM."""
    from transformers import (Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralImageProcessor,
                              PixtralProcessor, PixtralVisionConfig)
    specials = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    tokenizer = build_tokenizer(words, specials, {"image_token": "[IMG]"})
    config = Mistral3Config(
        vision_config=PixtralVisionConfig(**_vision(head_dim=16)),
        text_config=MistralConfig(**TEXT, **_text_ids(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2, vision_feature_layer=-1)
    image_processor = PixtralImageProcessor(size={"longest_edge": IMAGE}, patch_size=VISION_PATCH,
                                            image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = PixtralProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=VISION_PATCH,
                                 spatial_merge_size=2, chat_template=qwen_chat_template("[IMG]"))
    return Mistral3ForConditionalGeneration(config), processor, tokenizer


def build_internvl(words: list[str]):
    """InternViT (layer scale, q/k/v + projection_layer) + pixel-shuffle MLP projector + Qwen2 LM."""
    from transformers import (GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration,
                              InternVLProcessor, InternVLVideoProcessor, InternVLVisionConfig, Qwen2Config)
    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tokenizer = build_tokenizer(words, list(named.values()), named)
    crop = 32
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(**_vision(image_size=[crop, crop], patch_size=[VISION_PATCH] * 2)),
        text_config=Qwen2Config(**TEXT, **_text_ids(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), downsample_ratio=0.5)
    image_processor = GotOcr2ImageProcessor(size={"height": crop, "width": crop}, crop_to_patches=False,
                                            image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  video_processor=InternVLVideoProcessor(size={"height": crop, "width": crop}),
                                  image_seq_length=(crop // VISION_PATCH) ** 2 // 4,
                                  chat_template=qwen_chat_template("<IMG_CONTEXT>\n"))
    return InternVLForConditionalGeneration(config), processor, tokenizer


_IDEFICS_SPECIALS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]


def build_idefics2(words: list[str]):
    """SigLIP-like tower + connector (modality projection MLP, then a perceiver resampler to 4
    latents) + Mistral LM."""
    from transformers import (Idefics2Config, Idefics2ForConditionalGeneration, Idefics2ImageProcessor,
                              Idefics2Processor, MistralConfig)
    tokenizer = build_tokenizer(words, _IDEFICS_SPECIALS, {"image_token": "<image>",
                                                           "image_boundary_token": "<fake_token_around_image>"})
    config = Idefics2Config(
        vision_config=_vision(),
        perceiver_config=dict(hidden_size=TEXT["hidden_size"], resampler_n_latents=4, resampler_depth=1,
                              resampler_n_heads=2, resampler_head_dim=16, num_key_value_heads=1),
        text_config=MistralConfig(**TEXT, **_text_ids(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    image_processor = Idefics2ImageProcessor(do_image_splitting=False, size={"shortest_edge": IMAGE, "longest_edge": IMAGE},
                                             image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Idefics2Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=qwen_chat_template("<image>"))
    return Idefics2ForConditionalGeneration(config), processor, tokenizer


def build_idefics3(words: list[str]):
    """SigLIP-like tower + pixel-shuffle connector (one Linear) + Llama LM."""
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor,
                              Idefics3Processor, LlamaConfig)
    grid = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tokenizer = build_tokenizer(words, _IDEFICS_SPECIALS + ["<global-img>"] + grid, {"image_token": "<image>"})
    config = Idefics3Config(
        vision_config=_vision(), text_config=LlamaConfig(**TEXT, **_text_ids(tokenizer)), scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    image_processor = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": IMAGE},
                                             max_image_size={"longest_edge": IMAGE}, image_mean=[0.5] * 3,
                                             image_std=[0.5] * 3)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=(IMAGE // VISION_PATCH) ** 2 // 4,
                                  chat_template=qwen_chat_template("<image>"))
    return Idefics3ForConditionalGeneration(config), processor, tokenizer


def build_gemma3(words: list[str]):
    """SigLIP tower + projector (average pool, RMSNorm, a bare projection matrix) + Gemma 3 LM
    with sandwich norms."""
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor,
                              Gemma3TextConfig, SiglipVisionConfig)
    named = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    tokenizer = build_tokenizer(words, list(named.values()), named)
    ids = tokenizer.convert_tokens_to_ids
    config = Gemma3Config(
        vision_config=SiglipVisionConfig(**_vision(vision_use_head=False)),   # as the released Gemma 3
        text_config=Gemma3TextConfig(**TEXT, **_text_ids(tokenizer), head_dim=16, sliding_window=64),
        mm_tokens_per_image=4, boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"))
    image_processor = Gemma3ImageProcessor(size={"height": IMAGE, "width": IMAGE}, image_mean=[0.5] * 3,
                                           image_std=[0.5] * 3)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4,
                                chat_template=qwen_chat_template("<start_of_image>"))
    return Gemma3ForConditionalGeneration(config), processor, tokenizer


def build_paligemma(words: list[str]):
    """SigLIP tower + one-Linear projector + Gemma LM. Like the released pt/mix checkpoints, its
    processor has no chat template: the grid's `chat_template:` supplies one."""
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers import SiglipImageProcessor, SiglipVisionConfig
    tokenizer = build_tokenizer(words, ["<image>"], {"image_token": "<image>"})
    image_processor = SiglipImageProcessor(size={"height": IMAGE, "width": IMAGE}, image_mean=[0.5] * 3,
                                           image_std=[0.5] * 3)
    image_processor.image_seq_length = (IMAGE // VISION_PATCH) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)   # adds <loc>/<seg> tokens
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(**_vision(projection_dim=TEXT["hidden_size"], vision_use_head=False)),
        text_config=GemmaConfig(**TEXT, **_text_ids(tokenizer), head_dim=16),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), projection_dim=TEXT["hidden_size"])
    return PaliGemmaForConditionalGeneration(config), processor, tokenizer


def build_qwen3_vl(words: list[str]):
    """Qwen3-VL: ViT with learned position embeddings, a merger and a deepstack merger (vision
    block 0's features added into the LM's first layer) + Qwen3 LM."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor
    from transformers import Qwen2VLImageProcessor
    tokenizer = build_tokenizer(words, _QWEN_VL_SPECIALS, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    config = Qwen3VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT["hidden_size"],
                           patch_size=VISION_PATCH, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=36, deepstack_visual_indexes=[0]),
        text_config={**_qwen_text(tokenizer), "head_dim": 16,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                         "mrope_interleaved": True}},
        **_qwen_vl_ids(tokenizer))
    sizes = dict(patch_size=VISION_PATCH, merge_size=2, temporal_patch_size=2,
                 size={"shortest_edge": (2 * VISION_PATCH) ** 2, "longest_edge": IMAGE * IMAGE})
    processor = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes, image_mean=[0.5] * 3, image_std=[0.5] * 3),
                                 tokenizer=tokenizer, video_processor=Qwen3VLVideoProcessor(**sizes),
                                 chat_template=qwen_chat_template("<|vision_start|><|image_pad|><|vision_end|>"))
    return Qwen3VLForConditionalGeneration(config), processor, tokenizer


def build_llama4(words: list[str]):
    """Llama 4: a ViT whose patch embedding is a Linear (no Conv), a pixel-shuffle MLP adapter
    inside the vision model, a one-Linear projector, and a MoE LM (4 experts, top-1, a shared
    expert) whose experts are 3-D parameter tensors."""
    from transformers import (Llama4Config, Llama4ForConditionalGeneration, Llama4ImageProcessor, Llama4Processor,
                              Llama4TextConfig, Llama4VisionConfig)
    named = {"image_token": "<|image|>"}
    specials = ["<|image|>", "<|image_start|>", "<|image_end|>", "<|patch|>", "<|tile_x_separator|>",
                "<|tile_y_separator|>"]
    tokenizer = build_tokenizer(words, specials, named)
    # The adapter's fc1 reads the pixel-shuffled features (4 x 32 = 128, the MLP width, as in the release).
    vision = Llama4VisionConfig(**_vision(intermediate_size=128, vision_output_dim=64, projector_input_dim=64,
                                          projector_output_dim=64, pixel_shuffle_ratio=0.5, rope_theta=10000))
    text = Llama4TextConfig(**{**TEXT, "intermediate_size": 64}, **_text_ids(tokenizer), head_dim=16,
                            intermediate_size_mlp=128, num_local_experts=4, num_experts_per_tok=1,
                            interleave_moe_layer_step=1, attention_chunk_size=64)
    # The processor expands each <|image|> into <|patch|> tokens, which the model fills with image features.
    config = Llama4Config(vision_config=vision, text_config=text,
                          image_token_index=tokenizer.convert_tokens_to_ids("<|patch|>"))
    image_processor = Llama4ImageProcessor(size={"height": IMAGE, "width": IMAGE}, max_patches=1,
                                           image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Llama4Processor(image_processor=image_processor, tokenizer=tokenizer, patch_size=VISION_PATCH,
                                pixel_shuffle_ratio=0.5, chat_template=qwen_chat_template("<|image|>"))
    return Llama4ForConditionalGeneration(config), processor, tokenizer


def build_mllama(words: list[str]):
    """Mllama (Llama 3.2 Vision): a tiled ViT with a local and a global stack called by keyword,
    a one-Linear projector, and an LM whose layer list mixes self-attention and cross-attention
    layers."""
    from transformers import (MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor,
                              MllamaTextConfig, MllamaVisionConfig)
    tokenizer = build_tokenizer(words, ["<|image|>", "<|python_tag|>"], {"image_token": "<|image|>"})
    vision = MllamaVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                                attention_heads=2, image_size=IMAGE, patch_size=VISION_PATCH, max_num_tiles=1,
                                supported_aspect_ratios=[[1, 1]], intermediate_layers_indices=[0],
                                vision_output_dim=64)
    text = MllamaTextConfig(**{k: v for k, v in TEXT.items() if k != "tie_word_embeddings"}, **_text_ids(tokenizer),
                            cross_attention_layers=[1])
    config = MllamaConfig(vision_config=vision, text_config=text,
                          image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"))
    image_processor = MllamaImageProcessor(size={"height": IMAGE, "width": IMAGE}, max_image_tiles=1,
                                           image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=qwen_chat_template("<|image|>"))
    return MllamaForConditionalGeneration(config), processor, tokenizer


def build_florence2(words: list[str]):
    """Florence-2: a two-stage DaViT (convolutional stages, window and channel attention), a
    projection, and a BART encoder-decoder LM: generate returns decoder tokens only."""
    from transformers import (BartConfig, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor, Florence2VisionConfig)
    tokenizer = build_tokenizer(words, ["<image>"], {"image_token": "<image>"})
    vision = Florence2VisionConfig(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                                   patch_prenorm=[False, True], embed_dim=[32, 64], num_heads=[2, 4],
                                   num_groups=[2, 4], window_size=3, projection_dim=TEXT["hidden_size"],
                                   drop_path_rate=0.0)
    text = BartConfig(**_text_ids(tokenizer), d_model=TEXT["hidden_size"], encoder_layers=1, decoder_layers=1,
                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                      max_position_embeddings=512, decoder_start_token_id=tokenizer.eos_token_id,
                      forced_eos_token_id=None)
    config = Florence2Config(vision_config=vision, text_config=text,
                             image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    image_processor = CLIPImageProcessor(size={"height": IMAGE, "width": IMAGE}, do_center_crop=False,
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3)
    # 48 pixels / (4 x 2) = 6 x 6 features, plus the pooled one Florence-2 prepends.
    image_processor.image_seq_length = (IMAGE // 8) ** 2 + 1
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                   chat_template=qwen_chat_template(""))
    return Florence2ForConditionalGeneration(config), processor, tokenizer


BUILDERS: dict[str, Callable] = {
    "llava_onevision": build_llava_onevision,
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
    "llava_next": build_llava_next,
    "mistral3": build_mistral3,
    "internvl": build_internvl,
    "idefics2": build_idefics2,
    "idefics3": build_idefics3,
    "gemma3": build_gemma3,
    "paligemma": build_paligemma,
    "qwen3_vl": build_qwen3_vl,
    "llama4": build_llama4,
    "mllama": build_mllama,
    "florence2": build_florence2,
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
