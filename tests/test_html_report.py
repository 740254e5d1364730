"""``darkknowledge report``: one self-contained HTML page (and its Markdown twin) from reproduce folders; it renders
in headless Chromium, holds results.json's numbers, refers to nothing outside itself and escapes every text."""

import base64
import html
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
from darkknowledge.language_model import ensemble_is_better

DATA = Path(os.environ.get("DARKKNOWLEDGE_DATA", Path(__file__).parents[2] / "shared" / "data"))
needs_mnist = pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason="MNIST files not found; set DARKKNOWLEDGE_DATA")
PNG = b"\x89PNG\r\n\x1a\n"
RESULTS = Path(__file__).resolve().parents[1] / "results"
LM_SMALL = RESULTS / "lm-small"  # a real `reproduce lm` folder (results.json, lm.png), committed


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


def test_committed_results_are_recognised_by_their_kind():
    kinds = {"lm": "lm", "mnist": "mnist", "ensemble": "ensemble", "specialists": "specialists",
             "regularizer": "regularizer",
             "text": "unknown"}  # text-classifier: the docs example's numbers, shown as its results.json
    found = {}
    for path in sorted(RESULTS.glob("*/results.json")):
        found[path.parent.name] = detect_kind(json.loads(path.read_text()))
    assert found["lm-small"] == "lm"
    for folder, kind in found.items():  # lm-small, ensemble-small, ... are the kind their name starts with
        assert kind == kinds[folder.split("-")[0]], folder


def _lm_report(tmp_path, edit=lambda r: None, figure=True):
    """A copy of results/lm-small (results.json edited by ``edit``, lm.png if ``figure``) and its report."""
    folder = tmp_path / "lm-small"
    folder.mkdir()
    results = json.loads((LM_SMALL / "results.json").read_text())
    edit(results)
    (folder / "results.json").write_text(json.dumps(results))
    if figure:
        shutil.copyfile(LM_SMALL / "lm.png", folder / "lm.png")
    out = tmp_path / "site" / "lm.html"
    assert main(["report", str(folder), "--out", str(out)]) == 0
    return results, out.read_text(), out.with_suffix(".md")


def test_lm_report_holds_the_numbers_of_results_json_beside_the_papers(tmp_path):
    results, text, _ = _lm_report(tmp_path)
    assert "Language models (§4 on text)" in text and "QUICK" not in text
    cells = re.findall(r"<td>([^<]*)</td>", text)
    models, paper = results["models"], results["paper"]

    def quality(m):
        return [f"{100 * m['test_accuracy']:.2f}%", f"{m['test_log_loss']:.4f}", f"{m['test_perplexity']:.1f}",
                f"{m['val_log_loss']:.4f}"]

    def row(label):
        i = cells.index(label)
        return cells[i + 1:i + 7]

    assert row("baseline (one model)") == [*quality(models["baseline"]), "", f"{100 * paper['baseline']:.1f}%"]
    assert row(f"{results['plan']['members']}-member ensemble") == [*quality(models["ensemble"]), "",
                                                                   f"{100 * paper['ensemble']:.1f}%"]
    chosen = results["chosen_on_validation"]
    for s in results["temperature_sweep"]:
        mark = " (chosen on validation)" if s["run"] == chosen["run"] else ""
        by_t = results["share_by_temperature"][s["run"]]
        assert row(f"distilled, T = {s['temperature']:g}{mark}")[:5] == [
            *quality(models[s["run"]]), f"{100 * by_t['accuracy']:.0f}% / {100 * by_t['log_loss']:.0f}%"]
    assert row(f"distilled, T = {chosen['temperature']:g} (chosen on validation)")[5] == \
        f"{100 * paper['distilled']:.1f}%"
    for metric, share in results["share_transferred"].items():
        assert row(metric.replace("_", "-"))[:3] == [
            f"{100 * share['share']:.1f}%", f"{100 * share['low']:.0f}% to {100 * share['high']:.0f}%",
            f"{share['gain_per_token']:+.4f}"]
    for key, label in (("half_width_distilled", "half width, distilled"),
                       ("half_width_labels_only", "half width, labels only")):
        assert row(label)[:5] == [results["deployment"]["spec"], *quality(results["deployment"][key])]
    dense = next(k["bytes_per_token"] for k in results["top_k"] if k["store"] == "dense")
    for k in results["top_k"]:
        assert row(k["store"])[:5] == [f"{k['bytes_per_token']:,}", f"1/{dense / k['bytes_per_token']:.0f}",
                                       f"{100 * k['test_accuracy']:.2f}%", f"{k['test_log_loss']:.4f}",
                                       f"{100 * k['share_of_dense_gain_accuracy']:.0f}%"]
    # lm-small's ensemble is worse than its baseline on test: its shares are flagged, once per metric
    flagged = [m for m, s in results["share_transferred"].items() if not ensemble_is_better(m, s["gain_per_token"])]
    assert flagged and text.count("this share means nothing") == len(flagged)


def test_lm_report_escapes_the_samples_and_embeds_lm_png(tmp_path):
    def add_sample(r):
        r["samples"]["odd <b>model</b>"] = "KING.\n<script>alert('x')</script> & more"
    results, text, md = _lm_report(tmp_path, add_sample)
    assert "<script" not in text and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more</pre>" in text
    assert "<strong>odd &lt;b&gt;model&lt;/b&gt;</strong>" in text
    for name, sample in results["samples"].items():  # every sample, in a <pre> block, escaped (they hold quotes)
        assert f"<pre>{html.escape(sample.strip(chr(10)))}</pre>" in text
    png = (LM_SMALL / "lm.png").read_bytes()
    assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in text
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.read_text())
    assert [(md.parent / name).read_bytes() for name in images] == [png]


def test_lm_report_without_lm_png_and_with_a_gain(tmp_path):
    def better_ensemble(r):  # as if the ensemble had gained on both metrics
        for metric, share in r["share_transferred"].items():
            share["gain_per_token"] = abs(share["gain_per_token"]) * (1 if metric == "accuracy" else -1)
        r["quick"] = True
    _, text, md = _lm_report(tmp_path, better_ensemble, figure=False)
    assert "QUICK smoke run" in text and "means nothing" not in text
    assert "<img" not in text and "![" not in md.read_text()


def test_every_committed_results_json_fits_the_schema_of_its_kind():
    from darkknowledge import schemas

    for path in sorted(RESULTS.glob("*/results.json")):
        results = json.loads(path.read_text())
        if detect_kind(results) == "unknown":  # no report kind, no schema: which folders these are is pinned by
            continue  # test_committed_results_are_recognised_by_their_kind (text-classifier alone)
        schemas.check(schemas.RESULTS[detect_kind(results)], results, path, "")


def _set(path, value):
    def edit(r):
        for key in path[:-1]:
            r = r[key]
        r[path[-1]] = value
    return edit


def _first(key):
    return lambda r: next(iter(r[key]))


MALFORMED = {  # (committed folder, edit of its results.json): each a traceback before results.json had schemas
    "mnist parameters": ("mnist", _set(["table1", "teacher", "parameters"], "many")),
    "mnist sweep rows": ("mnist", lambda r: _set(["temperature_sweep", _first("temperature_sweep")(r), "rows"], [])(r)),
    "mnist bias offsets": ("mnist", _set(["no_threes", "offsets"], [1.0])),
    "mnist jitter": ("mnist", _set(["jittered_test"], {"max_shift": 2, "unjittered_errors": {},
                                                       "errors": {"teacher": 1}})),
    "ensemble chosen": ("ensemble-small", _set(["chosen_on_validation", "run"], "nobody")),
    "ensemble rules": ("ensemble-small", _set(["ensemble"], {})),
    "ensemble accuracy": ("ensemble-small", _set(["baseline", "test_accuracy"], None)),
    "regularizer curves": ("regularizer", lambda r: _set(["datasets", _first("datasets")(r), "full", "curves",
                                                          "epoch"], [1])(r)),
    "regularizer run": ("regularizer", lambda r: _set(["datasets", _first("datasets")(r), "soft_3pct", "run"],
                                                      "../../elsewhere")(r)),
    "regularizer paper": ("regularizer", _set(["paper", "full"], "high")),
    "specialists variants": ("specialists", lambda r: _set(["datasets", _first("datasets")(r), "variants"],
                                                           {"hard": {"test": []}})(r)),
    "lm bytes": ("lm-small", lambda r: _set(["top_k", 0, "bytes_per_token"], 0)(r)),
    "lm models": ("lm-small", _set(["models"], {})),
    "lm sweep": ("lm-small", lambda r: _set(["temperature_sweep", 0, "run"], "missing")(r)),
    "lm shares": ("lm-small", _set(["share_transferred"], {"accuracy": {"share": "most"}})),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_results_json_that_does_not_fit_its_kind_is_one_line_naming_it(tmp_path, capsys, case):
    folder, edit = MALFORMED[case]
    results = json.loads((RESULTS / folder / "results.json").read_text())
    edit(results)
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "results.json").write_text(json.dumps(results))
    assert main(["report", str(tmp_path / folder), "--out", str(tmp_path / "r.html")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "results.json is not a valid results file" in err, err
    assert not (tmp_path / "r.html").exists()


def test_a_metrics_jsonl_line_that_does_not_fit_is_named_and_left_out(tmp_path, capsys):
    folder = tmp_path / "ensemble-small"
    shutil.copytree(RESULTS / "ensemble-small", folder)
    (folder / "runs" / "baseline").mkdir(parents=True)
    (folder / "runs" / "baseline" / "metrics.jsonl").write_text('{"epoch": 1, "val_loss": 0.5}\n'
                                                                '{"epoch": {"a": 1}, "val_loss": "low"}\n')
    assert main(["report", str(folder), "--out", str(tmp_path / "r.html")]) == 0
    err = capsys.readouterr().err  # where report logs
    assert "metrics.jsonl line 2 is not a valid metrics line: field 'epoch'" in err, err


@pytest.mark.parametrize("content", [b"null", b"[]", b'"text"', b"3"])
def test_a_results_json_that_is_not_an_object_is_one_line_even_beside_a_report_md(tmp_path, capsys, content):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_bytes(content)
    (tmp_path / "run" / "report.md").write_text("# A report\n")
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "r.html")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "results.json is not a JSON object" in err, err
