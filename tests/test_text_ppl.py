"""The lm-eval text check: finite perplexity for the FP language model, unchanged when only the
vision encoder is quantized, worse when the language model is."""
import copy
from pathlib import Path

import pytest
import torch

from fixtures.adapters import load_adapter
from quantizers.api import quantize
from quantizers.config import make_config
from tasks import text_ppl
from tasks.base import DataError

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["a large red circle at the top left and a small blue square in the center",
         "there is a small green triangle at the bottom right", "a large yellow cross at the top"] * 4


@pytest.fixture(scope="module")
def tiny():
    return load_adapter("llava-tiny", "llava", "fixtures/tiny/llava-tiny", torch.device("cpu"), "float32", ROOT)


def ppl(adapter):
    return text_ppl.evaluate(adapter, TEXTS, batch_size=4, progress=False).primary


def test_text_perplexity_isolates_the_language_model(tiny):
    fp = ppl(tiny)
    assert 1 < fp < 20
    vision = copy.deepcopy(tiny)
    quantize(vision, make_config("v", "rtn", {"vision": 3}))
    assert ppl(vision) == pytest.approx(fp, rel=1e-6)
    language = copy.deepcopy(tiny)
    # 2 bits: on this text the shipped checkpoint's LM loses little at 3 bits (3.29 vs 3.21)
    quantize(language, make_config("l", "rtn", {"language": 2}))
    assert ppl(language) > fp * 1.5


def test_text_file_loader(tmp_path):
    (tmp_path / "text_test.jsonl").write_text('{"text": "a red circle"}\n{"text": "a blue bar"}\n')
    assert text_ppl.load_official(tmp_path, "test") == ["a red circle", "a blue bar"]
    (tmp_path / "text_test.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(DataError, match="text_test.jsonl"):
        text_ppl.load_official(tmp_path, "test")
