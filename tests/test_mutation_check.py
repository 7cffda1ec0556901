"""scripts/mutation_check.py stays usable: every deliberate bug still applies to the code
(its old text occurs exactly once) and names tests that exist. The check itself, which runs
the tests under each bug, is run on demand (docs/design.md, "The test suite as an oracle")."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "mutation_check.py")


def _load():
    spec = importlib.util.spec_from_file_location("mutation_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutation_check"] = module
    spec.loader.exec_module(module)
    return module


MODULE = _load()


@pytest.mark.parametrize("mutation", MODULE.MUTATIONS, ids=lambda m: m.name)
def test_each_deliberate_bug_still_applies_and_names_existing_tests(mutation):
    assert MODULE.check_applies(mutation) is None
    assert mutation.old != mutation.new
    for test in mutation.tests:
        path, _, name = test.partition("::")
        if name:
            with open(os.path.join(ROOT, path), encoding="utf-8") as f:
                assert f"def {name}(" in f.read(), f"{test} is not defined"


def test_the_issue_s_list_of_bugs_is_covered():
    names = {m.name for m in MODULE.MUTATIONS}
    assert {"select-shift-by-one", "select-lattice-not-centred", "decode-blind-to-last-prompt-token",
            "decode-positions-plus-one", "survivors-renumbered", "fastv-second-to-last-query",
            "fastv-ranks-at-layer-k", "solver-second-closest", "solver-aims-high", "solver-tie-break-flipped",
            "eval-grids-from-training-digits", "count-ignores-a-cell", "scorer-keeps-final-period",
            "lora-ignored-at-load"} <= names
    assert len(names) == len(MODULE.MUTATIONS)


def test_a_stale_mutation_is_named_and_the_list_prints_every_mutation():
    stale = MODULE.Mutation("stale", "adsc_patch/select.py", "this text is not in the file", "x",
                            ("tests/adsc_patch/test_select_oracle.py",), "none")
    assert "occurs 0 times" in MODULE.check_applies(stale)
    listed = subprocess.run([sys.executable, SCRIPT, "--list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and listed.stdout.count("\n") == len(MODULE.MUTATIONS)
