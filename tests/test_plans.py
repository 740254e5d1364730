"""Named plans of ``reproduce`` (``--plan NAME``): each equals, field by field, the plan the results/*/run.py script
that made its committed folder built (written out below, so a plan cannot drift from the folder it made), and the
CLI chooses, refuses and records them."""

from dataclasses import replace
from pathlib import Path

import pytest

from darkknowledge.cli import main
from darkknowledge.experiments import ensemble, lm
from darkknowledge.experiments.plans import choose, name_of


def test_lm_plans_are_the_settings_their_run_scripts_built():
    full = lm.FULL
    # results/lm-6epochs/run.py
    assert lm.PLANS["6epochs"].plan == replace(full, test_fraction=0.5, sampled=(32,),
                                               training=replace(full.training, epochs=6),
                                               student_training=replace(full.student_training, epochs=6))
    # results/lm-stores/run.py
    assert lm.PLANS["stores"].plan == replace(full, test_fraction=0.5, temperatures=(1,), top_ks=(64,),
                                              sampled_tails=((8, 24), (16, 16), (24, 8), (32, 32)),
                                              training=replace(full.training, epochs=6),
                                              student_training=replace(full.student_training, epochs=6))
    # issue 31's plan (no committed folder yet): the stores plan with compact stores beside top-32 and 16 + 16
    assert lm.PLANS["compact"].plan == replace(lm.PLANS["stores"].plan, members=3, top_ks=(32,),
                                               sampled_tails=((16, 16),),
                                               compact=((16, 14, "log8"), (12, 21, "log8"), (6, 10, "log8"),
                                                        (4, 13, "log8")))
    # results/lm-small/run.py
    assert lm.PLANS["small"].plan == replace(full, max_train_tokens=100_000, max_eval_tokens=65_536,
                                             training=replace(full.training, epochs=1),
                                             student_training=replace(full.student_training, epochs=1))
    # results/lm/sizing/sampled.py
    assert lm.PLANS["sampled-sizing"].plan == replace(
        full, spec="gpt:layers=1,dim=64,heads=4,context=128", half_spec="gpt:layers=1,dim=32,heads=4,context=128",
        members=3, temperatures=(1,), top_ks=(32,), sampled=(32,), max_train_tokens=100_000, sample_tokens=20)
    # results/lm/run.sh ran 'reproduce lm' itself
    assert lm.PLANS["full"].plan == lm.Plan() and lm.PLANS["quick"].plan is lm.QUICK


def test_ensemble_plans_are_the_settings_their_run_scripts_built():
    # results/ensemble-small/run.py
    assert ensemble.PLANS["small"].plan == replace(ensemble.FULL, subset=15000, val_size=5000)
    assert ensemble.PLANS["full"].plan == ensemble.Plan() and ensemble.PLANS["quick"].plan is ensemble.QUICK


@pytest.mark.parametrize("plans", [lm.PLANS, ensemble.PLANS])
def test_every_registry_has_full_and_quick_and_distinct_plans(plans):
    assert list(plans)[:2] == ["full", "quick"]
    assert all(name_of(plans, named.plan) == name for name, named in plans.items())
    assert all(named.about for named in plans.values())


def test_choose_resolves_quick_and_refuses_unknown_or_conflicting_names():
    assert choose(lm.PLANS, None, False, "lm") == ("full", lm.FULL)
    assert choose(lm.PLANS, None, True, "lm") == ("quick", lm.QUICK)
    assert choose(lm.PLANS, "quick", True, "lm") == ("quick", lm.QUICK)
    with pytest.raises(Exception, match="no plan 'nope'; choose one of full, quick, 6epochs"):
        choose(lm.PLANS, "nope", False, "lm")
    with pytest.raises(Exception, match="--quick is --plan quick"):
        choose(lm.PLANS, "small", True, "lm")
    assert name_of(lm.PLANS, replace(lm.FULL, members=3)) is None  # a plan built in code has no name


def test_help_lists_one_line_per_plan(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    lines = capsys.readouterr().out.splitlines()
    for experiment, plans in (("lm", lm.PLANS), ("ensemble", ensemble.PLANS)):
        for name, named in plans.items():
            assert f"  {experiment} {name}: {named.about}" in lines


@pytest.mark.parametrize("argv, message", [
    (["reproduce", "lm", "--plan", "nope"], "reproduce lm has no plan 'nope'"),
    (["reproduce", "mnist", "--plan", "small"], "reproduce mnist has no plan 'small'; choose one of full, quick"),
    (["reproduce", "ensemble", "--quick", "--plan", "small"], "--quick is --plan quick"),
])
def test_cli_refuses_a_bad_plan_in_one_line_before_any_folder(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("darkknowledge: error: ") and message in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("experiment, argv, out, plan", [
    ("lm", ["--plan", "6epochs", "--jobs", "2"], Path("results/lm-6epochs"), "6epochs"),
    ("lm", ["--quick"], Path("results/lm-quick"), None),
    ("lm", [], Path("results/lm"), None),
    ("ensemble", ["--plan", "small"], Path("results/ensemble-small"), "small"),
])
def test_cli_passes_the_plan_name_and_defaults_out_to_its_folder(experiment, argv, out, plan, monkeypatch):
    calls = []
    module = {"lm": lm, "ensemble": ensemble}[experiment]
    monkeypatch.setattr(module, f"reproduce_{experiment}", lambda out, **kw: calls.append((out, kw)))
    assert main(["reproduce", experiment, *argv]) == 0
    (got, kw), = calls
    assert got == out and kw["plan"] == plan and kw["quick"] == ("--quick" in argv)
