"""The report page and its plots: one self-contained HTML file with tables and embedded PNGs,
checked by parsing it and, where a chromium binary is installed, by rendering it headless."""
from __future__ import annotations

import base64
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from reports.csv_log import PartWriter
from reports.html import write_report
from reports.plots import Point, bpw_buckets, make_figures, pareto_front
from tests.test_reports import PNG_MAGIC, make_row


class PageParser(HTMLParser):
    """Collects what the tests look at: image sources, external references, table headers, text."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.external: list[str] = []
        self.headers: list[str] = []
        self.headings: list[str] = []
        self.text: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "img":
            self.images.append(attributes.get("src", ""))
        for name in ("src", "href"):
            value = attributes.get(name)
            if value and not value.startswith(("data:", "#")):
                self.external.append(value)
        if tag == "link" or (tag == "script" and "src" in attributes):
            self.external.append(tag)
        self._in = tag

    def handle_data(self, data):
        if self._in == "th":
            self.headers.append(data)
        elif self._in in ("h1", "h2", "h3"):
            self.headings.append(data)
        self.text.append(data)

    def handle_endtag(self, tag):
        self._in = None


def grid_rows(run_id: str = "run-7", shift: float = 0.0) -> list[dict]:
    """A small grid of one model and task: FP, single-component RTN configs (for the heatmap),
    and RTN / GPTQ / AWQ at nearly the same bpw (for the equal-size comparison), one failed test."""
    def row(config, method, components, w_bits, bpw, value, **extra):
        return make_row(run_id=run_id, commit="abc1234", device="cpu", model="llava-tiny", task="vqav2",
                        config=config, config_hash=f"h-{config}", method=method, components=components,
                        w_bits=w_bits, a_bits=16, bpw=bpw, value=value, fp_value=95.0,
                        delta=None if value is None else value - 95.0,
                        rel_delta=None if value is None else (value - 95.0) / 95.0, n_samples=500,
                        test_id=f"benchmarks/test_vqav2.py::test_vqav2[llava-tiny-{config}]",
                        timestamp="2026-01-01T00:00:00+00:00", **extra)
    return [row("fp16", "fp", "", "", 16.0, 95.0),
            row("rtn-w4-language", "rtn", "language", "language=4", 9.62, 93.0 + shift),
            row("rtn-w3-language", "rtn", "language", "language=3", 9.07, 64.0 + shift),
            row("rtn-w4-vision", "rtn", "vision", "vision=4", 14.11, 94.7 + shift),
            row("rtn-w4-all", "rtn", "connector+language+vision", "connector=4,language=4,vision=4", 7.36, 91.9 + shift),
            row("gptq-w4-all", "gptq", "connector+language+vision", "connector=4,language=4,vision=4", 7.36, 94.0 + shift),
            row("awq-w4-all", "awq", "connector+language+vision", "connector=4,language=4,vision=4", 7.38, 94.5 + shift),
            row("gptq-w2-all", "gptq", "connector+language+vision", "connector=2,language=2,vision=2", 5.86, None,
                status="failed", primary=False, metric="")]


def make_run_dir(root: Path, **kwargs) -> Path:
    PartWriter(root / "results.csv").write_rows(grid_rows(**kwargs))
    return root


def parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_page_is_self_contained_with_metadata_tables_and_embedded_plots(tmp_path):
    page = write_report(make_run_dir(tmp_path / "run"))

    assert page == tmp_path / "run" / "report.html"
    parsed = parse(page)
    assert parsed.external == []
    assert len(parsed.images) == 3   # score vs bpw, the RTN heatmap, methods at equal bpw
    for source in parsed.images:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1]).startswith(PNG_MAGIC)
    for header in ("config", "method", "components", "w_bits", "a_bits", "bpw", "value", "FP", "delta"):
        assert header in parsed.headers
    text = " ".join(parsed.text)
    assert "run-7" in text and "abc1234" in text and "cpu" in text
    assert "8: 7 passed, 1 failed, 0 error, 0 skipped" in text
    assert "llava-tiny · vqav2" in parsed.headings
    assert "Compare" not in parsed.headings


def test_page_with_a_base_has_the_compare_sections(tmp_path):
    base = make_run_dir(tmp_path / "base")
    head = make_run_dir(tmp_path / "head", run_id="run-8", shift=-5.0)

    parsed = parse(write_report(head, base, tmp_path / "out" / "page.html"))

    assert "Compare" in parsed.headings
    assert "Regressions (6)" in parsed.headings
    assert "tolerance only" in " ".join(parsed.text)   # CSV rows without per-sample logs


def test_plots_draw_a_pareto_front_per_method_and_name_empty_heatmap_cells():
    def point(config, bpw, value):
        return Point(config, "rtn", "all", "all=4", bpw, value, None)
    points = [point("a", 4.0, 60.0), point("b", 5.0, 55.0), point("c", 6.0, 70.0), point("d", 6.0, 65.0),
              point("e", 8.0, 80.0)]
    assert [p.config for p in pareto_front(points)] == ["a", "c", "e"]
    assert [p.config for p in pareto_front(points, higher_is_better=False)] == ["a", "b"]
    assert [[p.config for p in bucket] for bucket in bpw_buckets(points)] == [["a"], ["b"], ["c", "d"], ["e"]]

    figures = {stem: figure for stem, _caption, figure in make_figures(grid_rows())}
    heatmap = figures["sensitivity__llava-tiny__vqav2__rtn"]
    cells = [text.get_text() for text in heatmap.axes[0].texts]
    # language at W4 and W3, vision at W4 only: vision's W3 cell is empty and says so.
    assert sorted(cells) == sorted(["-2.1%", "-32.6%", "-0.3%", "no config"])
    scatter_labels = [text.get_text() for text in figures["llava-tiny__vqav2"].axes[0].texts]
    assert sorted(scatter_labels) == sorted(["rtn-w4-language", "rtn-w3-language", "rtn-w4-vision",
                                             "rtn-w4-all", "gptq-w4-all", "awq-w4-all"])
    bars = figures["methods_at_equal_bpw"].axes[0]
    assert [label.get_text() for label in bars.get_legend().get_texts()] == ["awq", "gptq", "rtn"]


def test_cli_html_writes_the_page_and_bad_input_is_one_line(tmp_path):
    from tests.test_reports_compare import run_cli
    run = make_run_dir(tmp_path / "run")
    result = run_cli("html", str(run), "-o", str(tmp_path / "p.html"))
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == tmp_path / "p.html"

    missing = run_cli("html", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().count("\n") == 0 and "nowhere" in missing.stderr


CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (chromium, chromium-browser, "
                                              "google-chrome): headless rendering not checked")
def test_headless_chromium_renders_the_page_with_its_plots(tmp_path):
    from PIL import Image
    page = write_report(make_run_dir(tmp_path / "run"))
    shot = tmp_path / "shot.png"

    subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", f"--screenshot={shot}",
                    "--window-size=1200,2400", page.as_uri()], capture_output=True, timeout=120, check=True)

    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2400)
    # Text and tables alone use a handful of greys; rendered plots add many colours.
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 500


def _wa_rows() -> list[dict]:
    """W4A16 and W4A4 configs at nearly one bpw, each with its format-failure diagnostic row."""
    def row(config, method, a_bits, value, failures, a_quant=""):
        base = dict(run_id="r", commit="abc1234", device="cpu", model="llava-tiny", task="vqav2", config=config,
                    config_hash=f"h-{config}", method=method, components="connector+language+vision",
                    w_bits="connector=4,language=4,vision=4", a_bits=a_bits, a_quant=a_quant, bpw=7.37,
                    fp_value=95.0, n_samples=500, test_id=f"t[{config}]", timestamp="2026-01-01T00:00:00+00:00")
        return [make_row(**base, value=value, delta=value - 95, rel_delta=(value - 95) / 95),
                make_row(**base, metric="format_failures", primary=False, value=failures)]
    return [make_row(run_id="r", model="llava-tiny", task="vqav2", config="fp16", method="fp", bpw=16.0, value=95.0,
                     fp_value=95.0, w_bits="", test_id="t[fp16]"),
            *row("awq-w4", "awq", 16, 93.0, 0.0), *row("qvlm-w4a4", "qvlm", 4, 89.9, 2.5, "a4-official-minmax-asym-widen"),
            *row("minmax-w4a4", "rtn", 4, 90.4, 0.4, "a4-official-minmax-asym-widen")]


def test_tables_show_the_activation_setting_and_the_tasks_diagnostics(tmp_path):
    PartWriter(tmp_path / "run" / "results.csv").write_rows(_wa_rows())
    page = parse(write_report(tmp_path / "run"))
    assert "a_quant" in page.headers and "format_failures" in page.headers and "answer_words" in page.headers
    assert "a4-official-minmax-asym-widen" in page.text and "2.50" in page.text


def test_equal_size_bars_never_pool_activation_bits():
    from reports.plots import methods_at_equal_bpw
    figure = methods_at_equal_bpw({("llava-tiny", "vqav2"): [r for r in _wa_rows() if r.get("primary", True)]})
    labels = [label.get_text() for label in figure.axes[0].get_xticklabels()]
    # W4A4 has two methods (qvlm, rtn): one group; W4A16 holds AWQ alone: no group, so AWQ never
    # stands beside W4A4 rows as an equal
    assert labels == ["llava-tiny\nvqav2\n≈7.37 bpw, A4"]
