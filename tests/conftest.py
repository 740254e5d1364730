import pytest


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
