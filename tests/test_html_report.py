"""``darkknowledge report``: one self-contained HTML page (and its Markdown twin) from reproduce folders; it renders
in headless Chromium, holds results.json's numbers, refers to nothing outside itself and escapes every text."""

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from darkknowledge import html_report
from darkknowledge.cli import main
from darkknowledge.html_report import calibration, detect_kind, markdown_to_html

DATA = Path(os.environ.get("DARKKNOWLEDGE_DATA", Path(__file__).parents[2] / "shared" / "data"))
needs_mnist = pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason="MNIST files not found; set DARKKNOWLEDGE_DATA")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """reproduce mnist --quick, a folder of an unknown experiment, then report on both."""
    root = tmp_path_factory.mktemp("report")
    mnist = root / "mnist-quick"
    assert main(["reproduce", "mnist", "--quick", "--out", str(mnist), "--data-dir", str(DATA), "--no-progress"]) == 0
    other = root / "other"
    other.mkdir()
    (other / "results.json").write_text(json.dumps({"something": 1}))
    shutil.copyfile(mnist / "temperature.png", other / "plot.png")
    (other / "report.md").write_text(
        "# An experiment <script>alert('x')</script>\n\nText with `code` & a [link](https://example.com/x).\n\n"
        "| a | b |\n|---|---|\n| 1 | <b>2</b> |\n\n![a plot](plot.png)\n\n![missing](../elsewhere.png)\n\n- item one\n")
    out = root / "site" / "report.html"
    assert main(["report", str(mnist), str(other), "--out", str(out), "--data-dir", str(DATA)]) == 0
    return {"mnist": mnist, "other": other, "html": out, "text": out.read_text()}


@needs_mnist
def test_html_is_self_contained(report):
    text = report["text"]
    assert text.startswith("<!DOCTYPE html>")
    assert "http://" not in text and "https://" not in text and "href=" not in text
    assert "<script" not in text and "<link" not in text and "url(" not in text
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) >= 7  # temperature, per-class, bias, confusion, reliability, training + the unknown's plot
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG


@needs_mnist
def test_html_holds_the_numbers_of_results_json_beside_the_papers(report):
    results = json.loads((report["mnist"] / "results.json").read_text())
    text = report["text"]
    cells = re.findall(r"<td>([^<]*)</td>", text)
    for name, paper in (("teacher", 67), ("small", 146), ("distilled", 74)):
        row = results["table1"][name]
        i = cells.index(name)
        assert cells[i + 3:i + 5] == [str(row["test_errors"]), str(paper)]
        assert str(results["jittered_test"]["errors"][name]) in cells
        per_class = [str(v) for v in row["per_class_test_errors"].values()]
        starts = [j for j, c in enumerate(cells) if c == name]
        assert any(cells[j + 1:j + 1 + len(per_class)] == per_class for j in starts)  # the per-class table's row
    for spec, found in results["temperature_sweep"].items():
        for r in found["rows"]:
            assert any(c.startswith(f"{r['test_errors_mean']:.1f}") for c in cells)
    assert f"{results['no_threes']['before']['errors']} (" in text


@needs_mnist
def test_confusion_matrices_come_from_the_saved_runs(report):
    results = json.loads((report["mnist"] / "results.json").read_text())
    datasets = html_report._Datasets(str(DATA))
    for name in ("teacher", "distilled"):
        ev = html_report.evaluate_saved(report["mnist"] / "runs" / name, datasets)
        assert ev.confusion.sum() == ev.total == 10000
        assert ev.total - ev.confusion.trace() == ev.errors == results["table1"][name]["test_errors"]
        assert sum(ev.bin_counts) == ev.total and 0 <= ev.ece <= 1


@needs_mnist
def test_markdown_twin_has_sibling_pngs(report):
    md = report["html"].with_suffix(".md")
    text = md.read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) >= 8
    assert "../elsewhere.png" in images  # a missing image of the unknown experiment's report.md: left as it is
    images.remove("../elsewhere.png")
    for name in images:  # every other figure, the unknown's own plot.png included, is a PNG file beside the twin
        assert "/" not in name and (md.parent / name).read_bytes()[:8] == PNG
    assert any(name.endswith("-plot.png") for name in images)
    results = json.loads((report["mnist"] / "results.json").read_text())
    assert f"| teacher | {results['table1']['teacher']['spec']} |" in text


@needs_mnist
def test_unknown_experiments_render_their_report_md_escaped(report):
    text = report["text"]
    assert "<script>" not in text and "&lt;script&gt;alert" in text
    assert "<td>&lt;b&gt;2&lt;/b&gt;</td>" in text
    assert "<code>code</code> &amp; a link." in text
    assert "[image: missing]" in text and "<li>item one</li>" in text


@needs_mnist
def test_html_renders_in_headless_chromium(report, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed (Debian: apt-get install chromium; .ci/run installs it)")
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,3000",
                    report["html"].resolve().as_uri()], capture_output=True, timeout=120, check=False)
    assert shot.exists() and shot.stat().st_size > 20_000
    import matplotlib.image
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (3000, 1200)
    assert pixels.std() > 0.05  # not a blank page
    not_white = (pixels.min(axis=2) < 0.9).mean()
    assert not_white > 0.02  # text, tables and figures drawn
    colored = (pixels.max(axis=2) - pixels.min(axis=2) > 0.2).mean()
    assert colored > 0.005  # the embedded plots are drawn (colored lines and bars), not just text


def test_kind_detection_and_errors(tmp_path):
    assert detect_kind({"table1": {}, "temperature_sweep": {}}) == "mnist"
    assert detect_kind({"datasets": {"mnist-100": {"variants": {}}}}) == "specialists"
    assert detect_kind({"x": 1}) == "unknown"
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.html")]) == 1
    assert main(["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.html")]) == 1
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.txt")]) == 1
    assert not (tmp_path / "r.html").exists()


def test_calibration_and_markdown_subset():
    labels = torch.tensor([0, 1, 1, 0])
    sure = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    assert calibration(sure, labels)[0] == pytest.approx(0.0)
    wrong = torch.tensor([[0.0, 1.0]] * 4)
    assert calibration(wrong, torch.zeros(4, dtype=torch.long))[0] == pytest.approx(1.0)
    assert markdown_to_html("# T & <x>") == "<h3>T &amp; &lt;x&gt;</h3>"
