"""BLIP-2's shipped configs (fixtures/configs/) through the random-init path: the full-size
architectures on the meta device, and down-scaled copies built by load_adapter and run end to end
on CPU, with every row labelled random-init."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

from fixtures.adapters import load_adapter
from reports.csv_log import read_rows
from tests.bench_run import ROOT, output, run_bench

CONFIGS = ROOT / "fixtures/configs"
CPU = torch.device("cpu")
GENERATIVE, RETRIEVAL = "blip2-opt-2.7b", "blip2-itm-vit-g-coco"


def small_copy(name: str, into: Path) -> Path:
    """The shipped folder with every stack cut to two narrow layers; vocabularies, special ids,
    query count and image sizes stay as released."""
    folder = into / f"{name}-small"
    shutil.copytree(CONFIGS / name, folder)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"].update(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)
    config["qformer_config"].update(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                                    encoder_hidden_size=32)
    if name == GENERATIVE:
        config["text_config"].update(hidden_size=64, ffn_dim=128, num_attention_heads=4, num_hidden_layers=2,
                                     word_embed_proj_dim=64)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("name, model_class, published", [
    (GENERATIVE, Blip2ForConditionalGeneration, 3.74e9),
    (RETRIEVAL, Blip2ForImageTextRetrieval, 1.17e9),
], ids=[GENERATIVE, RETRIEVAL])
def test_shipped_configs_build_the_published_sizes(name, model_class, published):
    config = Blip2Config.from_pretrained(CONFIGS / name)
    with torch.device("meta"):
        model = model_class(config)
    parameters = sum(p.numel() for p in model.parameters())
    assert abs(parameters - published) < 0.01e9, parameters
    assert config.vision_config.num_hidden_layers == 39 and config.qformer_config.num_hidden_layers == 12


def test_generative_random_init_has_the_released_prompt_layout(tmp_path):
    """32 image tokens at the released id, BOS, then the question, left-padded: the processor's
    own expansion, on a stand-in tokenizer as large as OPT's embedding."""
    adapter = load_adapter("g", "blip2", str(small_copy(GENERATIVE, tmp_path)), CPU, "auto", ROOT, random_init=True)
    tokenizer = adapter.processor.tokenizer
    assert len(tokenizer) == 50304 and tokenizer.convert_tokens_to_ids(["<pad>", "</s>", "<image>"]) == [1, 2, 50265]
    question = "what color is the circle ?"
    prompts = [adapter.short_answer_prompt(question), adapter.short_answer_prompt("how many")]
    inputs = adapter.encode([Image.new("RGB", (64, 48))] * 2, prompts)
    assert inputs["pixel_values"].shape[-2:] == (224, 224)
    ids = inputs["input_ids"][0].tolist()
    words = f"question : {question} short answer :".split()   # "Question: {} Short answer:", word-level
    assert ids[:32] == [50265] * 32 and ids[32] == 2 and len(ids) == 32 + 1 + len(words)
    assert inputs["input_ids"][1].tolist()[:34] == [50265] * 32 + [1, 1]   # padding after the queries
    assert adapter.model.vision_model.encoder.layers[0].mlp.fc1.weight.std() > 1e-3   # not the 1e-10 init


def test_retrieval_random_init_has_bert_texts(tmp_path):
    adapter = load_adapter("r", "blip2-retrieval", str(small_copy(RETRIEVAL, tmp_path)), CPU, "auto", ROOT,
                           random_init=True)
    inputs = adapter.text_inputs(["a red circle", "there is a small blue square at the top left"])
    ids, mask = inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()
    assert ids[0][0] == 101 and ids[0][4] == 102 and ids[0][5:] == [0] * (len(ids[0]) - 5)   # [CLS] .. [SEP] [PAD]..
    assert mask[1] == [1] * len(ids[1]) and ids[1][-1] == 102
    assert adapter.processor.tokenizer.convert_tokens_to_ids("[DEC]") == 30522
    assert adapter.processor.image_processor.size["height"] == 364
    image = Image.new("RGB", (64, 48), "red")
    assert adapter.image_embeddings([image]).shape == (1, 32, 256)
    assert adapter.itm_scores([image, image], ["a red circle", "a blue square"]).shape == (2,)


def test_random_init_blip2_runs_end_to_end_and_is_labelled(tmp_path):
    """Both BLIP-2 families from down-scaled shipped configs through the grid: VQAv2 (beam 5, as
    the perf grid decodes) and retrieval, FP, RTN and GPTQ; every row says random-init."""
    generative, retrieval = small_copy(GENERATIVE, tmp_path), small_copy(RETRIEVAL, tmp_path)
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"models:\n"
                    f"  g: {{family: blip2, path: {generative}, random_init: true, generation: {{num_beams: 5}}}}\n"
                    f"  r: {{family: blip2-retrieval, path: {retrieval}, random_init: true}}\n"
                    "tasks: {vqav2: {limit: 4, batch_size: 4}, flickr_retrieval: {limit: 3, k_test: 2, batch_size: 4}}\n"
                    "calibration: {samples: 4, batch_size: 2}\n"
                    "configs: [{name: fp16, method: fp}, {name: rtn, method: rtn, bits: {all: 4}},\n"
                    "          {name: gptq, method: gptq, bits: {all: 4}, group_size: 32}]\n")
    out = run_bench(f"--grid={grid}", f"--report-dir={tmp_path / 'r'}", "benchmarks/test_vqav2.py",
                    "benchmarks/test_flickr_retrieval.py", timeout=600)
    assert out.returncode == 0, output(out)
    rows = read_rows(tmp_path / "r" / "results.csv")
    assert {(r["model"], r["task"]) for r in rows} == {("g", "vqav2"), ("r", "flickr_retrieval")}
    assert len({(r["model"], r["config"]) for r in rows}) == 6 and all(r["weights"] == "random-init" for r in rows)
    assert "6 of them on random-init weights: timings and memory only, never accuracy" in out.stdout
