"""A text-only check of the language model through lm-evaluation-harness.

lm-eval's HFLM wraps the in-memory (quantized) language model, sharing its modules, and
evaluates a local lm-eval task: rolling log-likelihood (perplexity) on held-out text of the
task's split. By default that text is the COCO-format captions of the split. Quantization of
the language model shows up here with no image in the loop; that is how the paper isolates one
component's degradation.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tasks import coco_caption
from tasks.base import DataError, DataMissing, TaskResult
from tasks.registry import TaskDef, register_task
from tasks.requests import TextLikelihood

NAME = "text_ppl"
PRIMARY_METRIC = "word_perplexity"
LM_EVAL_TASK = "vqb_text_ppl"
# A plain template (filled with str.replace): lm-eval's own {{text}} must reach it unescaped.
_TASK_YAML = """task: LM_EVAL_TASK
dataset_path: json
dataset_kwargs:
  data_files:
    test: DATA_FILE
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def load_official(root: Path, split: str) -> list[str]:
    """Held-out text: `root/text_<split>.jsonl` ({"text": ...} per line) when present, else the
    first reference caption of each image of a COCO-format root."""
    path = Path(root) / f"text_{split}.jsonl"
    if path.is_file():
        try:
            return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{path}: each line must be a JSON object with a 'text' field ({err})") from None
    return [sample.references[0] for sample in coco_caption.load_official(root, split)]


def load_hf(dataset: str, split: str, revision: str | None = None) -> list[str]:
    raise DataMissing("text_ppl reads local text (text_<split>.jsonl or COCO-format captions); "
                      "no HF schema is defined")


def evaluate(adapter: TextLikelihood, texts: list[str], batch_size: int = 32, progress: bool = True) -> TaskResult:
    from lm_eval import simple_evaluate  # imported here: slow, and only this task needs it
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not texts:
        raise DataError("text_ppl: no text to evaluate")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "text.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        (Path(tmp) / f"{LM_EVAL_TASK}.yaml").write_text(
            _TASK_YAML.replace("LM_EVAL_TASK", LM_EVAL_TASK).replace("DATA_FILE", str(data)))
        # lm-eval puts its own prefix token (BOS) before each rolling window; a tokenizer that
        # also adds one would score every text after a doubled BOS.
        lm = HFLM(pretrained=adapter.causal_lm(), tokenizer=adapter.processor.tokenizer,
                  batch_size=batch_size, add_bos_token=False)
        output = simple_evaluate(model=lm, tasks=[LM_EVAL_TASK], task_manager=TaskManager(include_path=tmp),
                                 log_samples=False, verbosity="ERROR")
    scores = output["results"][LM_EVAL_TASK]
    metrics = {name.split(",")[0]: float(value) for name, value in scores.items()
               if name.endswith(",none") and "stderr" not in name}
    return TaskResult(metrics, PRIMARY_METRIC, False, len(texts),
                      [{"text": t} for t in texts[:20]])   # the texts; scores are corpus-level


TASK = register_task(TaskDef(
    name=NAME, folder="coco", default_split="test", requests=("text_likelihood",),
    primary_metric=PRIMARY_METRIC, higher_is_better=False, load_official=load_official, load_hf=load_hf,
    evaluate=evaluate, sample_id="text"))
