"""The tiny BLIP-2 builders, both BLIP-2 adapters and the outlier transformation on BLIP-2.

Fast: every model here is a randomly initialized tiny one from the builders, no checkpoint."""
import random

import pytest
import torch
from transformers import AutoProcessor, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Processor

from fixtures.adapters.base import FAMILIES
from fixtures.adapters.blip2 import Blip2Adapter, Blip2RetrievalAdapter
from fixtures.training.blip2_tiny import (TinyBlip2Size, build_generative, build_processor, build_retrieval,
                                      build_tokenizer, parameter_count, vocabulary)
from fixtures.training.outliers import OutlierSpec, add_weight_outliers
from fixtures.training.train_blip2 import encode_lm, init_from_retrieval, plant_outliers
from fixtures.world.scenes import COLORS, POSITIONS, SHAPES, SIZES, render, sample_scene
from fixtures.adapters.layouts import ALL_KNOWN
from tasks.requests import Generation
from quantizers.folds import norm_linear_pairs

CPU = torch.device("cpu")
QUESTIONS = ["what color is the circle", "is there a red square", "how many",
             "what shape is at the top left of the image", "where is the small blue diamond", "is it"]
CAPTIONS = ["a small red circle at the top left", "there is a blue square", "a picture of a large green bar"]


@pytest.fixture(scope="module")
def tokenizer():
    # The world's attribute words and a few question/caption words stand in for the full vocabulary.
    words = list(COLORS) + list(SHAPES) + list(SIZES) + list(POSITIONS)
    return build_tokenizer(vocabulary(words + QUESTIONS + CAPTIONS + ["yes no there picture image"]))


@pytest.fixture(scope="module")
def images():
    rng = random.Random(0)
    return [render(sample_scene(rng, i)) for i in range(6)]


@pytest.fixture
def generative(tokenizer):
    torch.manual_seed(0)
    processor = build_processor(tokenizer, TinyBlip2Size.num_query_tokens)
    return Blip2Adapter("g", build_generative(tokenizer), processor, CPU)


@pytest.fixture
def retrieval(tokenizer):
    torch.manual_seed(0)
    return Blip2RetrievalAdapter("r", build_retrieval(tokenizer), build_processor(tokenizer, None), CPU)


# -- builders -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["generative", "retrieval"])
def test_builders_save_and_reload_with_from_pretrained(kind, tokenizer, images, tmp_path, request):
    adapter = request.getfixturevalue(kind)
    model_class = Blip2ForConditionalGeneration if kind == "generative" else Blip2ForImageTextRetrieval
    adapter.model.save_pretrained(tmp_path)
    adapter.processor.save_pretrained(tmp_path)
    model = model_class.from_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(processor, Blip2Processor)
    assert processor.num_query_tokens == adapter.processor.num_query_tokens
    assert processor.tokenizer.get_vocab() == adapter.processor.tokenizer.get_vocab()
    saved = adapter.model.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    inputs = adapter.model_inputs(images[:2], ["a photo of", "a picture"])
    inputs = {k: v for k, v in inputs.items() if k != "use_image_text_matching_head"}
    with torch.no_grad():
        before, after = adapter.model(**inputs), model.eval()(**inputs)
    key = "logits" if kind == "generative" else "logits_per_image"
    assert torch.equal(before[key], after[key])


def test_parameter_counts_are_tiny(generative, retrieval):
    assert 150_000 <= parameter_count(generative.model) <= 250_000
    assert 100_000 <= parameter_count(retrieval.model) <= 200_000
    # Untied head: quantizing the (protected) lm_head must never touch the input embeddings.
    lm = generative.model.language_model
    assert lm.lm_head.weight.data_ptr() != lm.get_input_embeddings().weight.data_ptr()


def test_query_tokens_are_not_all_equal(generative):
    # transformers initializes them to zeros, which would keep every query identical in training.
    queries = generative.model.query_tokens[0]
    assert not torch.allclose(queries[0], queries[1])


# -- generative adapter ---------------------------------------------------------------------------
def test_generative_adapter_components_resolve(generative):
    assert FAMILIES.get("blip2") is Blip2Adapter and FAMILIES.get("blip2-retrieval") is Blip2RetrievalAdapter
    for name in generative.components:
        generative.component(name)
    assert generative.component("lm_head") is generative.model.get_output_embeddings()
    assert set(generative.quantizable) <= set(generative.components)
    assert generative.short_answer_prompt("is it red?") == "Question: is it red? Short answer:"
    assert generative.caption_prompt() == "a photo of"


def test_generate_batched_equals_batch_size_one(generative, images):
    prompts = [generative.short_answer_prompt(q) for q in QUESTIONS[:5]] + [generative.caption_prompt()]
    batched = generative.generate(images, prompts, Generation(max_new_tokens=6))
    single = [generative.generate([im], [p], Generation(max_new_tokens=6))[0] for im, p in zip(images, prompts)]
    assert all(isinstance(text, str) for text in batched)
    assert batched == single
    # Only new text comes back: with one word per token, never more words than new tokens.
    assert all(len(text.split()) <= 6 for text in batched)
    assert any(batched)


def test_generative_inputs_put_query_placeholders_first(generative, images):
    inputs = generative.model_inputs(images[:2], ["a photo of", QUESTIONS[3]])
    queries, token = generative.model.config.num_query_tokens, generative.model.config.image_token_index
    assert (inputs["input_ids"][:, :queries] == token).all()
    assert (inputs["input_ids"][:, queries:] != token).all()
    assert inputs["attention_mask"][0, queries] == 0      # left padding after the placeholders
    with torch.no_grad():
        generative.model(**inputs, use_cache=False)      # the calibration walker's call


def test_training_layout_matches_the_processor(generative, images):
    """train_blip2 pre-encodes rows itself; they must be what the processor gives, and only the
    target and EOS may carry labels."""
    prompts = [generative.short_answer_prompt(QUESTIONS[0]), generative.caption_prompt()]
    targets = ["red", CAPTIONS[0]]
    examples = encode_lm(generative, prompts, targets, [0, 1])
    eos = generative.processor.tokenizer.eos_token
    for row, (p, t) in enumerate(zip(prompts, targets)):
        ref = generative.model_inputs([images[row]], [f"{p} {t}{eos}"])["input_ids"][0]
        assert torch.equal(examples.ids[row][examples.mask[row].bool()], ref)
        labelled = examples.labels[row][examples.labels[row] != -100].tolist()
        tokenizer = generative.processor.tokenizer
        assert tokenizer.convert_ids_to_tokens(labelled) == tokenizer.tokenize(f" {t}") + [eos]


def test_generative_starts_from_the_retrieval_qformer(generative, retrieval, images):
    """BLIP-2's stage 2 starts from the stage-1 Q-Former: after the copy, the generative model's
    query outputs are the retrieval model's."""
    init_from_retrieval(generative.model, retrieval.model)
    pixels = retrieval.pixels(images)
    with torch.no_grad():
        def queries(model):
            image = model.vision_model(pixel_values=pixels).last_hidden_state
            return model.qformer(query_embeds=model.query_tokens.expand(len(pixels), -1, -1),
                                 encoder_hidden_states=image).last_hidden_state
        assert torch.equal(queries(generative.model), queries(retrieval.model))


# -- retrieval adapter ----------------------------------------------------------------------------
def test_retrieval_embeddings_and_itm_scores(retrieval, images):
    n_query, dim = retrieval.model.config.num_query_tokens, retrieval.model.config.image_text_hidden_size
    image_emb = retrieval.image_embeddings(images[:3])
    text_emb = retrieval.text_embeddings(CAPTIONS + QUESTIONS[:2])
    assert image_emb.shape == (3, n_query, dim) and text_emb.shape == (5, dim)
    assert torch.allclose(image_emb.norm(dim=-1), torch.ones(3, n_query), atol=1e-5)
    assert torch.allclose(text_emb.norm(dim=-1), torch.ones(5), atol=1e-5)
    scores = retrieval.itm_scores(images[:3], CAPTIONS)
    with torch.inference_mode():   # the positive-class logit of the ITM head, as LAVIS ranks by
        logits = retrieval.model(pixel_values=retrieval.pixels(images[:3]), **retrieval.text_inputs(CAPTIONS),
                                 use_image_text_matching_head=True).logits_per_image
    assert scores.shape == (3,) and torch.allclose(scores, logits[:, 1].float())


def test_retrieval_itc_agrees_with_the_model_and_ignores_padding(retrieval, images):
    texts = CAPTIONS + QUESTIONS
    with torch.no_grad():
        itc = retrieval.model(pixel_values=retrieval.pixels(images), **retrieval.text_inputs(texts)).logits_per_image
    ours = torch.einsum("iqd,td->itq", retrieval.image_embeddings(images), retrieval.text_embeddings(texts)).amax(-1)
    assert torch.allclose(itc, ours, atol=1e-5)
    alone = torch.cat([retrieval.text_embeddings([t]) for t in texts])
    assert torch.allclose(retrieval.text_embeddings(texts), alone, atol=1e-5)


def test_retrieval_texts_are_cut_to_35_tokens(retrieval):
    long_text = " ".join(["red"] * 60)
    assert retrieval.text_inputs([long_text, "red"])["input_ids"].shape[1] == 35


def test_retrieval_calibration_inputs_run_the_model(retrieval, images):
    batch = retrieval.model_inputs(images[:2], CAPTIONS[:2])
    with torch.no_grad():
        out = retrieval.model(**batch, use_cache=False)   # the calibration walker's call
    assert out.logits_per_image.shape == (2, 2)


# -- outliers -------------------------------------------------------------------------------------
# Norms whose outputs feed only the listed Linears (pre-LN): the only exact folds in BLIP-2. The
# Q-Former is post-LN (its norms also feed the residual stream): never a fold.
EXACT_FOLDS = ("vision_model.encoder.layers.{i}.layer_norm1", "vision_model.encoder.layers.{i}.layer_norm2",
               "language_model.model.decoder.layers.{i}.self_attn_layer_norm",
               "language_model.model.decoder.layers.{i}.final_layer_norm")


def test_folds_cover_blip2_vision_mlp_and_nothing_inexact(generative):
    layers = range(max(TinyBlip2Size.vision_layers, TinyBlip2Size.text_layers))
    exact = {pattern.format(i=i) for pattern in EXACT_FOLDS for i in layers}
    covered = {fold.name for fold in norm_linear_pairs(generative.model, ALL_KNOWN)}
    vision_mlp = {f"vision_model.encoder.layers.{i}.layer_norm2" for i in range(TinyBlip2Size.vision_layers)}
    assert vision_mlp <= covered <= exact


def test_outliers_leave_generative_logits_unchanged(generative, images):
    model = generative.model
    probe = generative.model_inputs(images, [generative.short_answer_prompt(q) for q in QUESTIONS])
    before = {n: p.clone() for n, p in model.named_parameters()}
    change = add_weight_outliers(model, OutlierSpec(channels=2, factor=16.0, seed=0), probe=probe)
    assert change < 1e-5
    # Only the folded norms and the Linears they feed were touched.
    names = {m: n for n, m in model.named_modules()}
    allowed = set()
    for fold in norm_linear_pairs(model, ALL_KNOWN):
        allowed |= {f"{fold.name}.weight", f"{fold.name}.bias"} | {f"{names[m]}.weight" for m in fold.linears}
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed <= allowed


def test_outliers_leave_retrieval_outputs_unchanged(retrieval, images):
    def outputs():
        return [retrieval.image_embeddings(images), retrieval.text_embeddings(CAPTIONS),
                retrieval.itm_scores(images[:3], CAPTIONS)]
    record = plant_outliers(retrieval.model, OutlierSpec(channels=2, factor=16.0, seed=0), outputs)
    assert record["outlier_norms"]
    assert record["max_abs_output_change_from_outliers"] < 1e-5
