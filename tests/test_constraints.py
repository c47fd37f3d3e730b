"""constraints/ci.txt, the versions CI installs, stays usable: exact pins that fit pyproject.toml's ranges.

A dependency release cannot turn CI red because scripts/setup.sh installs
with these pins; this test catches a pin that pyproject.toml no longer allows
(pip would refuse to install) or a dependency that was added without a pin.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints" / "ci.txt"


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for number, line in enumerate(CONSTRAINTS.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and name.strip() == name and version.strip() == version, f"ci.txt:{number}: not NAME==VERSION"
        parsed = Version(version)
        assert not parsed.local, f"ci.txt:{number}: local label ({line}) would not match other builds"
        key = canonicalize_name(name)
        assert key not in pins, f"ci.txt:{number}: {name} pinned twice"
        pins[key] = parsed
    return pins


def test_every_dependency_is_pinned_within_its_range() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pins = _pins()
    assert "zupatch" not in pins and {"pip", "setuptools", "torch"} <= set(pins)
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is a dependency but has no pin in constraints/ci.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (requirement, pins[name])
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    setuptools = next(Requirement(r) for r in build if canonicalize_name(Requirement(r).name) == "setuptools")
    assert setuptools.specifier.contains(pins["setuptools"]), "setup.sh builds with the pinned setuptools"


def test_scripts_parse() -> None:
    for script in sorted((ROOT / "scripts").glob("*.sh")):
        subprocess.run(["bash", "-n", str(script)], check=True)
