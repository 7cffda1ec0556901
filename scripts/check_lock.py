"""Check that the active environment holds exactly the pinned versions of a constraints file.

``python scripts/check_lock.py FILE``: every installed distribution (but the project itself
and the bootstrap packages setuptools / wheel) must be pinned in FILE at the installed
version. Exits 1 with one line per difference; used by scripts/_venv.sh after installing.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

IGNORED = {"llava-adsc", "setuptools", "wheel"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: str) -> dict[str, str]:
    pins = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
            if not match:
                raise SystemExit(f"{path}:{number}: not an exact pin 'name==version': {line!r}")
            pins[_normalise(match[1])] = match[2]
    return pins


def differences(pins: dict[str, str]) -> list[str]:
    installed = {_normalise(d.metadata["Name"]): d.version for d in metadata.distributions()}
    problems = []
    for name, version in sorted(installed.items()):
        if name in IGNORED:
            continue
        if name not in pins:
            problems.append(f"{name}=={version} is installed but not in the lock")
        elif pins[name] != version:
            problems.append(f"{name}=={version} is installed but the lock pins {pins[name]}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    problems = differences(read_pins(argv[0]))
    for problem in problems:
        print(f"[setup] {argv[0]}: {problem}", file=sys.stderr)
    if problems:
        print("[setup] the environment differs from the lock: refresh the lock with 'bash scripts/lock.sh' "
              "or remove the virtual environment and run again", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
