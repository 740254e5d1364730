import pytest
import torch

# One thread, as the command line's default: the first test that ran a command used to set it for all later ones,
# so the exact-resume tests (a forked child trains with one thread) passed in the whole suite but not alone.
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (and the larger fuzz runs)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, config):
    cases = getattr(config, "fuzz_cases", None)  # set by test_fuzz.py
    if cases:
        terminalreporter.write_line("fuzz cases run: " + ", ".join(f"{k} {v}" for k, v in sorted(cases.items())))
