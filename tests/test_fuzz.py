"""Property-based fuzzing of every file the tool reads back and of option values (hypothesis).

For each mutated file or option value the command that reads it must: end with exit status 0 (a harmless
mutation) or with exactly one ``darkknowledge: error:`` line on stderr (no traceback), change no file of the run it
read (checksums before and after), and finish within a bounded time. A mutation that breaks a file outright (not
JSON, not an object, a required field removed) must be refused. A mutated soft-target store header must be
reused only while it still describes the data, and otherwise rebuilt: the student's targets are the teacher's.

Cases per class: ``CI_EXAMPLES`` by default, ``SLOW_EXAMPLES`` with ``pytest --slow``; the counts run are printed
at the end of the session.
"""

import contextlib
import copy
import hashlib
import io
import json
import math
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from darkknowledge import checkpoint, locks
from darkknowledge.cli import main
from darkknowledge.ensemble import MANIFEST
from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.soft_targets import SoftTargets

CI_EXAMPLES, SLOW_EXAMPLES = 12, 200
SECONDS_PER_CASE = 30  # generous: the machine may be shared; a case normally takes well under a second
CASES: Counter = Counter()
FAST = ["--epochs", "1", "--batch-size", "256", "--no-progress"]


def fuzz(request, factor: int = 1) -> settings:
    """Hypothesis settings: ``factor`` x CI_EXAMPLES cases (SLOW_EXAMPLES with --slow), no example database
    written into the repository, the same cases on every run."""
    examples = (SLOW_EXAMPLES if request.config.getoption("--slow") else CI_EXAMPLES) * factor
    return settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def report_cases(request):
    request.config.fuzz_cases = CASES  # printed in the terminal summary (conftest.py)


def run(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def digests(folder: Path) -> dict[str, str]:
    """Every file of a folder (the lock file aside: each writer that opens the folder writes its name there)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != locks.LOCK_FILE}


def check_outcome(code: int, err: str, *, must_fail: bool, seconds: float) -> None:
    assert "Traceback" not in err, err
    assert seconds < SECONDS_PER_CASE
    if must_fail:
        assert code != 0, err
    if code != 0:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("darkknowledge: error: "), err


# -- the files fuzzed: one of each kind, made once -----------------------------------------------------------

@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    assert run("train", "--model", "mlp:16", "--out", root / "teacher", *FAST, "--epochs", "2")[0] == 0
    assert run("train", "--model", "mlp:8", "--members", "2", "--out", root / "ensemble", *FAST)[0] == 0
    code, _, err = run("distill", "--teacher", root / "teacher", "--student", "mlp:8", "-T", "4", "--store-dir",
                       root / "store", "--out", root / "student", *FAST)
    assert code == 0, err
    code, _, err = run("specialists", "cluster", "--generalist", root / "teacher", "--clusters", "2",
                       "--min-size", "1", "--out", root / "specialists")
    assert code == 0, err
    return root


# -- mutations of a JSON document ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
    | st.sampled_from(["", "..", "../model.safetensors", "/dev/zero", "a/b", "x" * 300]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def paths_of(doc, prefix=(), depth=3):
    """Every key path (dict keys and list indices) of ``doc`` down to ``depth``."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    for key, value in items:
        yield prefix + (key,)
        if depth > 1:
            yield from paths_of(value, prefix + (key,), depth - 1)


def _at(doc, path):
    for key in path[:-1]:
        doc = doc[key]
    return doc


@st.composite
def mutated(draw, original: bytes, required: tuple[str, ...]):
    """(mutated file bytes, whether the file is broken outright)."""
    doc = json.loads(original)
    kind = draw(st.sampled_from(["set", "delete", "extreme", "root", "bytes"]))
    if kind == "root":
        return json.dumps(draw(json_values.filter(lambda v: not isinstance(v, dict)))).encode(), True
    if kind == "bytes":
        cut = draw(st.integers(0, len(original) // 2))
        if draw(st.booleans()):
            return original[:cut], True  # truncated: at most half the file is left
        noise = draw(st.binary(min_size=1, max_size=8))
        return original[:cut] + noise + original[cut + len(noise):], False
    path = draw(st.sampled_from(sorted(paths_of(doc), key=str)))
    doc = copy.deepcopy(doc)
    parent = _at(doc, path)
    if kind == "delete":
        del parent[path[-1]]
        return json.dumps(doc).encode(), len(path) == 1 and path[0] in required
    value = draw(st.sampled_from([math.nan, math.inf, -1, 2**70, -1e308, 1e308, 0, 1.5, "1", True])
                 if kind == "extreme" else json_values)
    parent[path[-1]] = value
    return json.dumps(doc).encode(), False


def fuzz_file(tmp_path, made, folder: str, name: str, required, data, command, count_as: str):
    """Copy ``made/folder``, mutate its ``name``, run ``command(copy)``; check the outcome and the copy."""
    case = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        shutil.copytree(made / folder, case / folder)
        target = case / folder / name
        content, broken = data.draw(mutated(target.read_bytes(), required))
        target.write_bytes(content)
        before = digests(case / folder)
        started = time.monotonic()
        code, out, err = run(*command(case / folder))
        check_outcome(code, err, must_fail=broken, seconds=time.monotonic() - started)
        if code != 0:
            assert digests(case / folder) == before, "a refused command changed the run"
        CASES[count_as] += 1
        return code, out, err
    finally:
        shutil.rmtree(case)


MODEL_REQUIRED = ("format", "spec", "image_shape", "classes", "weights", "weights_sha256")
STATE_REQUIRED = ("format", "epoch", "tensors", "tensors_sha256", "optimizer_param_groups", "optimizer_scalars",
                  "run_key", "history", "best", "seconds")


def test_fuzz_model_sidecar(made, tmp_path, request):
    @fuzz(request)
    @given(data=st.data())
    def case(data):
        fuzz_file(tmp_path, made, "teacher", checkpoint.MODEL_META, MODEL_REQUIRED, data,
                  lambda run_dir: ["evaluate", run_dir], "model.json")
    case()


def test_fuzz_training_state(made, tmp_path, request):
    @fuzz(request)
    @given(data=st.data())
    def case(data):
        fuzz_file(tmp_path, made, "teacher", checkpoint.STATE_META, STATE_REQUIRED, data,
                  lambda run_dir: ["train", "--model", "mlp:16", "--out", run_dir, *FAST, "--epochs", "2",
                                   "--resume"], "state.json")
    case()


def test_fuzz_ensemble_manifest(made, tmp_path, request):
    @fuzz(request)
    @given(data=st.data())
    def case(data):
        fuzz_file(tmp_path, made, "ensemble", MANIFEST, ("format", "members"), data,
                  lambda folder: ["evaluate", folder], "ensemble.json")
    case()


def test_fuzz_subsets_file(made, tmp_path, request):
    @fuzz(request)
    @given(data=st.data())
    def case(data):
        # 'specialists evaluate' reads subsets.json, then the generalist; with no specialist trained it always
        # ends with one error line, so every case is a refusal
        code, _, err = fuzz_file(tmp_path, made, "specialists", "subsets.json", ("format", "subsets"), data,
                                 lambda folder: ["specialists", "evaluate", folder], "subsets.json")
        assert code != 0
    case()


@pytest.fixture(scope="module")
def made_lm(tmp_path_factory):
    """A finished language-model run on a tiny corpus (character level), for 'generate'."""
    from darkknowledge.data.text import TextTokenizer, load_corpus, split_documents, tokenise_corpus
    from darkknowledge.language_model import LMConfig, train_language_model

    root = tmp_path_factory.mktemp("fuzz-lm")
    for d in range(4):
        (root / "corpus").mkdir(exist_ok=True)
        (root / "corpus" / f"doc{d}.txt").write_text(f"all the world's a stage {d}, and all the men " * 20)
    corpus = load_corpus(root / "corpus")
    documents = split_documents(corpus.documents, seed=0)
    tokenizer = TextTokenizer.train([corpus.documents[n] for n in documents["train"]], "char")
    splits = tokenise_corpus(corpus, documents, tokenizer, context=16)
    train_language_model("gpt:layers=1,dim=8,heads=2,context=16", tokenizer, splits.windows["train"],
                         splits.windows["validation"], LMConfig(epochs=1, batch_size=8), run_dir=root / "lm",
                         log=lambda _: None)
    return root


LM_MODEL_REQUIRED = ("format", "kind", "spec", "vocab_size", "context", "weights", "weights_sha256",
                     "tokenizer_sha256", "run_key", "history")


@pytest.mark.parametrize("name, required", [(checkpoint.MODEL_META, LM_MODEL_REQUIRED),
                                            ("tokenizer.json", ("format", "kind", "chars"))])
def test_fuzz_language_model_run(made_lm, tmp_path, request, name, required):
    @fuzz(request)
    @given(data=st.data())
    def case(data):
        fuzz_file(tmp_path, made_lm, "lm", name, required, data,
                  lambda run_dir: ["generate", run_dir, "--prompt", "all", "--tokens", "3"],
                  f"language-model {name}")
    case()


def test_fuzz_store_header_is_reused_only_while_valid_and_else_rebuilt(made, tmp_path, request):
    header = next((made / "store").glob("*.json"))
    reference = SoftTargets.open(header).member_logits(slice(None))

    @fuzz(request)
    @given(data=st.data())
    def case(data):
        store = Path(tempfile.mkdtemp(dir=tmp_path)) / "store"
        try:
            shutil.copytree(made / "store", store)
            content, _ = data.draw(mutated(header.read_bytes(), ()))
            (store / header.name).write_bytes(content)
            started = time.monotonic()
            code, _, err = run("distill", "--teacher", made / "teacher", "--student", "mlp:8", "-T", "4",
                               "--store-dir", store, "--out", store.parent / "student", *FAST)
            check_outcome(code, err, must_fail=False, seconds=time.monotonic() - started)
            assert code == 0, err  # a bad header is never fatal: the store is computed again
            assert SoftTargets.open(store / header.name).member_logits(slice(None)).equal(reference)
            CASES["store header"] += 1
        finally:
            shutil.rmtree(store.parent)
    case()


# -- option values, on the command line and in a TOML config file --------------------------------------------

TRAIN_OPTIONS = ["epochs", "batch-size", "lr", "momentum", "weight-decay", "schedule", "jitter", "seed",
                 "patience", "val-size", "val-seed", "members", "model", "context", "split-seed", "vocab-size",
                 "text-column", "tokenizer", "max-length"]
option_text = st.sampled_from(["1e308", "-1e308", "inf", "nan", "-1", "0", "1.5", "99999999999999999999999", "",
                               "2", "0.5", "true", "mlp:1000000000000", "mlp:10x100000000", "mlp:0",
                               "x" * 200]) | st.text(max_size=10)
toml_values = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12) \
    | st.lists(st.integers(-2**63, 2**63 - 1), max_size=3)


def toml_literal(value) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if -2**63 <= value < 2**63 else None  # TOML integers are 64-bit
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    return None


def _no_data(tmp_path) -> list[str]:
    """Options every fuzzed command ends with: a dataset that is not there, so no case trains (each ends with
    the data's one-line error, or an option's)."""
    (tmp_path / "empty").mkdir(exist_ok=True)
    return ["--dataset", "mnist", "--data-dir", tmp_path / "empty"]


def test_fuzz_option_values_on_the_command_line(tmp_path, request):
    @fuzz(request, 3)
    @given(option=st.sampled_from(TRAIN_OPTIONS), value=option_text)
    def case(option, value):
        started = time.monotonic()
        code, _, err = run("train", "--out", tmp_path / "out", f"--{option}", value, *_no_data(tmp_path))
        check_outcome(code, err, must_fail=True, seconds=time.monotonic() - started)
        assert not (tmp_path / "out" / checkpoint.MODEL_META).exists()
        CASES["option value (command line)"] += 1
    case()


DISTILL_OPTIONS = ["temperature", "soft-weight", "hard-weight", "top-k", "samples", "head", "store-dtype", "combine",
                   "student"]


def test_fuzz_distill_option_values_on_the_command_line(tmp_path, request):
    @fuzz(request)
    @given(option=st.sampled_from(DISTILL_OPTIONS), value=option_text)
    def case(option, value):
        started = time.monotonic()
        code, _, err = run("distill", "--teacher", tmp_path / "no-teacher", "--out", tmp_path / "out", "-T", "2",
                           f"--{option}", value)
        check_outcome(code, err, must_fail=True, seconds=time.monotonic() - started)
        CASES["option value (distill)"] += 1
    case()


STORE_BUILD_OPTIONS = ["layout", "top-k", "head", "samples", "context", "split-seed", "text-column", "teacher",
                       "data"]


def test_fuzz_store_build_option_values_on_the_command_line(tmp_path, request):
    @fuzz(request)
    @given(option=st.sampled_from(STORE_BUILD_OPTIONS), value=option_text)
    def case(option, value):
        started = time.monotonic()
        (tmp_path / "corpus").mkdir(exist_ok=True)
        code, _, err = run("store", "build", "--teacher", tmp_path / "no-teacher", "--data", tmp_path / "corpus",
                           "--out", tmp_path / "out", f"--{option}", value)
        check_outcome(code, err, must_fail=True, seconds=time.monotonic() - started)
        assert not (tmp_path / "out").exists()
        CASES["option value (store build)"] += 1
    case()


def test_fuzz_option_values_in_a_config_file(tmp_path, request):
    @fuzz(request, 3)
    @given(option=st.sampled_from(TRAIN_OPTIONS + ["resume", "bf16", "no-progress", "out", "unknown"]),
           value=toml_values, garbage=st.binary(max_size=20) | st.just(b""))
    def case(option, value, garbage):
        literal = toml_literal(value)
        config = tmp_path / "config.toml"
        config.write_bytes((f"{option.replace('-', '_')} = {literal}\n".encode() if literal else b"") + garbage)
        started = time.monotonic()
        code, _, err = run("train", "--config", config, "--out", tmp_path / "out", *_no_data(tmp_path))
        check_outcome(code, err, must_fail=True, seconds=time.monotonic() - started)
        CASES["option value (TOML)"] += 1
    case()


# -- files the report, reproduce lm and the token store read back -----------------------------------------------

RESULTS = Path(__file__).resolve().parents[1] / "results"
REPORTED = ["ensemble-small", "lm-small", "mnist", "regularizer", "specialists"]  # committed, one of each kind


def test_fuzz_results_json_read_by_report(tmp_path, request):
    @fuzz(request)
    @given(data=st.data())
    def case(data):
        # never must_fail: results.json that is not one of the known kinds is shown as an unknown experiment
        fuzz_file(tmp_path, RESULTS, data.draw(st.sampled_from(REPORTED)), "results.json", (), data,
                  lambda folder: ["report", folder, "--out", folder.parent / "page.html"], "results.json")
    case()


@st.composite
def mutated_lines(draw, original: bytes):
    """A JSON-lines file with one line mutated (as :func:`mutated` mutates a document)."""
    lines = original.splitlines(keepends=True)
    at = draw(st.integers(0, len(lines) - 1))
    line, _ = draw(mutated(lines[at].rstrip(b"\n"), ()))
    return b"".join(lines[:at] + [line.replace(b"\n", b" ") + b"\n"] + lines[at + 1:])


def test_fuzz_metrics_jsonl_read_by_report(made, tmp_path, request):
    metrics = (made / "teacher" / "metrics.jsonl").read_bytes()

    @fuzz(request)
    @given(data=st.data())
    def case(data):
        folder = Path(tempfile.mkdtemp(dir=tmp_path)) / "ensemble-small"
        try:
            shutil.copytree(RESULTS / "ensemble-small", folder)
            (folder / "runs" / "baseline").mkdir(parents=True)
            (folder / "runs" / "baseline" / "metrics.jsonl").write_bytes(data.draw(mutated_lines(metrics)))
            started = time.monotonic()
            code, _, err = run("report", folder, "--out", folder.parent / "page.html")
            check_outcome(code, err, must_fail=False, seconds=time.monotonic() - started)
            assert code == 0, err  # a line that does not fit is named in the log and left out
            CASES["metrics.jsonl"] += 1
        finally:
            shutil.rmtree(folder.parent)
    case()


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    """A tiny corpus and a folder that ``reproduce lm`` prepared from it (data.json and tokenizer.json)."""
    from dataclasses import replace

    from darkknowledge.experiments.lm import QUICK, prepare_data

    root = tmp_path_factory.mktemp("lm-data")
    (root / "corpus").mkdir()
    for d in range(6):
        (root / "corpus" / f"doc{d}.txt").write_text(f"document {d}: " + "the quick brown fox jumps " * 40)
    plan = replace(QUICK, corpus=str(root / "corpus"), context=8, max_train_tokens=None, max_eval_tokens=None)
    splits = prepare_data(plan, root / "out", None, log=lambda _: None)
    return plan, root / "out", splits


def test_fuzz_data_json(lm_data, tmp_path, request):
    from darkknowledge.experiments.lm import prepare_data

    plan, prepared, splits = lm_data
    original = (prepared / "data.json").read_bytes()

    @fuzz(request)
    @given(data=st.data())
    def case(data):
        out = Path(tempfile.mkdtemp(dir=tmp_path)) / "out"
        try:
            shutil.copytree(prepared, out)
            content, _ = data.draw(mutated(original, ()))
            (out / "data.json").write_bytes(content)
            try:  # made again (or reused when still valid), or one line: never another exception
                again = prepare_data(plan, out, None, log=lambda _: None)
                assert again.tokenizer.sha256 == splits.tokenizer.sha256
                assert (out / "data.json").read_bytes() == original
            except DarkKnowledgeError as e:  # a valid record of other data, or of another tokenizer
                assert "\n" not in str(e) and ("another corpus or split" in str(e) or "not the one" in str(e)), e
            CASES["data.json"] += 1
        finally:
            shutil.rmtree(out.parent)
    case()


def test_fuzz_token_store_header_is_reused_only_while_valid_and_else_rebuilt(lm_data, tmp_path, request):
    from darkknowledge.soft_targets import FOLDER_HEADER as HEADER, SoftTargets
    from darkknowledge.transformer import build_language_model

    plan, _, splits = lm_data
    train = splits.windows["train"]
    torch.manual_seed(0)
    teacher = build_language_model("gpt:layers=1,dim=8,heads=2,context=8", splits.tokenizer.vocab_size)
    kwargs = dict(tokenizer_sha256=splits.tokenizer.sha256, top_k=4, log=lambda _: None)
    store = SoftTargets.build(teacher, train, tmp_path / "made", **kwargs)
    reference = store.targets(range(len(store)), 1.0)["topk_targets"]
    original = (store.path / HEADER).read_bytes()

    @fuzz(request)
    @given(data=st.data())
    def case(data):
        copy = Path(tempfile.mkdtemp(dir=tmp_path))
        try:
            shutil.copytree(store.path.parent, copy / "stores")
            header = copy / "stores" / store.path.name / HEADER
            content, _ = data.draw(mutated(original, ()))
            header.write_bytes(content)
            try:
                opened = SoftTargets.open(header.parent, windows=train, tokenizer_sha256=splits.tokenizer.sha256,
                                          vocab_size=splits.tokenizer.vocab_size)
                assert opened.top_k == 4 and opened.header["complete"]  # open trusts only a header that fits
            except DarkKnowledgeError as e:
                assert "\n" not in str(e), e
            rebuilt = SoftTargets.build(teacher, train, copy / "stores", **kwargs)  # reused or rebuilt
            targets = rebuilt.targets(range(len(rebuilt)), 1.0)["topk_targets"]
            assert torch.equal(targets.logits, reference.logits) and torch.equal(targets.indices, reference.indices)
            CASES["token-store header"] += 1
        finally:
            shutil.rmtree(copy)
    case()
