"""The declared ranges, the lock, the lowest-release pins and adsc_patch.compat say the same thing."""

import importlib.util
import os
from importlib import metadata

import pytest
import transformers
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from adsc_patch import compat

pytestmark = pytest.mark.compat  # also on the lowest release: its environment must match the ranges too

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(ROOT, "requirements", "lock-cpu.txt")
LOWEST = os.path.join(ROOT, "requirements", "lowest.txt")
NEWEST = os.path.join(ROOT, "requirements", "newest.txt")


def _check_lock():
    spec = importlib.util.spec_from_file_location("check_lock", os.path.join(ROOT, "scripts", "check_lock.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _requirements(extras=("", "dev", "playground")) -> list[Requirement]:
    out = []
    for line in metadata.requires("llava-adsc"):
        requirement = Requirement(line)
        if requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in extras):
            out.append(requirement)
    return out


def test_the_lock_satisfies_every_range_of_the_tested_extras():
    pins = _check_lock().read_pins(LOCK)
    for requirement in _requirements():
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{requirement} is not in the lock"
        assert requirement.specifier.contains(Version(pins[name]), prereleases=True), (requirement, pins[name])
    assert pins["torch"].endswith("+cpu")  # the CPU wheel, not a multi-GB CUDA build


def test_setup_py_compat_and_the_lowest_pins_state_one_transformers_range():
    (declared,) = [r.specifier for r in _requirements(("",)) if r.name == "transformers"]
    assert declared == compat.TESTED_RANGE == SpecifierSet(compat.TESTED_RANGE_TEXT)
    (low,) = [Version(spec.version) for spec in declared if spec.operator == ">="]
    lowest = _check_lock().read_pins(LOWEST)
    assert Version(lowest["transformers"]) == low and declared.contains(low)
    locked = Version(_check_lock().read_pins(LOCK)["transformers"])
    assert declared.contains(locked) and locked > low  # the two CI environments test different releases


def test_the_newest_pins_are_in_the_range_and_above_the_lock():
    """The third CI environment tests a release the other two do not (requirements/newest.txt)."""
    (declared,) = [r.specifier for r in _requirements(("",)) if r.name == "transformers"]
    newest = Version(_check_lock().read_pins(NEWEST)["transformers"])
    locked = Version(_check_lock().read_pins(LOCK)["transformers"])
    assert declared.contains(newest) and newest > locked
    (high,) = [Version(spec.version) for spec in declared if spec.operator == "<"]
    assert (newest.major, newest.minor + 1) == (high.major, high.minor)  # the newest minor the range admits


def test_torch_has_no_upper_cap():
    (torch_requirement,) = [r for r in _requirements(("",)) if r.name == "torch"]
    assert all(spec.operator in (">=", ">") for spec in torch_requirement.specifier)


def test_the_running_release_is_one_the_ranges_admit():
    assert compat.TESTED_RANGE.contains(Version(transformers.__version__))


def test_check_lock_reports_what_differs_and_refuses_loose_pins(tmp_path):
    check_lock = _check_lock()
    loose = tmp_path / "loose.txt"
    loose.write_text("# comment\ntorch>=2\n")
    with pytest.raises(SystemExit, match="loose.txt:2: not an exact pin"):
        check_lock.read_pins(str(loose))
    pins = {check_lock._normalise(d.metadata["Name"]): d.version for d in metadata.distributions()}
    pins.pop("llava-adsc", None)
    assert check_lock.differences(pins) == []
    pins["transformers"] = "0.0.1"
    del pins["torch"]
    problems = check_lock.differences(pins)
    assert f"transformers=={transformers.__version__} is installed but the lock pins 0.0.1" in problems
    assert any(p.startswith("torch==") and p.endswith("not in the lock") for p in problems)
