"""Every case of the generated hostile corpus (tests/hostile_corpus.py) is refused cleanly.

For each case and each command that reads that kind of input (apply,
inspect, invert, stack, verify, eval), the contract is checked: a non-zero
exit, exactly one ``error:`` line naming the culprit, no traceback, nothing
written (the case's folder holds exactly what it held before, byte for
byte) and the shared inputs unchanged. One test per family collects every
failing case id, so a regression names all the cases it breaks.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests import hostile_corpus as corpus
from tests.patching import random_patch
from tests.tiny_models import MLP_DOWN_PROJ, make_tiny_checkpoint
from zupatch.cli.main import app

runner = CliRunner()
DOWN = [MLP_DOWN_PROJ["llama"].format(i=i) for i in (1, 2)]
PATCH_COMMANDS = ("apply", "inspect", "invert", "stack", "verify", "eval")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    base = make_tiny_checkpoint("llama", root / "base", max_shard_size="60KB")
    random_patch(base, DOWN).save(root / "good.zup.safetensors")
    random_patch(base, DOWN, encoding="bits").save(root / "bits.zup.safetensors")
    forget = root / "forget.jsonl"
    forget.write_text(json.dumps({"prompt": "The capital of {} is", "subject": "France", "target": "Paris"}) + "\n")
    return {"root": root, "base": base, "good": root / "good.zup.safetensors", "bits": root / "bits.zup.safetensors",
            "forget": forget}  # fmt: skip


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry below ``folder`` without following links: kind, and bytes of regular files."""
    out: dict[str, tuple] = {}
    for here, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            path = Path(here) / name
            st = path.lstat()
            rel = str(path.relative_to(folder))
            if stat.S_ISREG(st.st_mode):
                out[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            else:
                out[rel] = ("other", stat.S_IFMT(st.st_mode))
    return out


def refused_cleanly(args: list[str], needle: str, folder: Path) -> str | None:
    """None if the contract holds, else what broke it."""
    before = snapshot(folder)
    result = runner.invoke(app, args)
    text = result.output
    lines = [line for line in text.splitlines() if line.strip()]
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return f"raised {type(result.exception).__name__}: {result.exception}"[:200]
    if result.exit_code == 0:
        return "accepted"
    if len(lines) != 1 or not lines[0].startswith("error:") or "Traceback" in text:
        return f"not one error line: {text[:200]!r}"
    if needle not in lines[0]:
        return f"does not name {needle!r}: {lines[0][:200]}"
    if snapshot(folder) != before:
        return "wrote or changed files"
    return None


def patch_args(command: str, bad: Path, world: dict, folder: Path) -> list[str]:
    return {
        "apply": ["apply", str(bad), "-m", str(world["base"]), "-o", str(folder / "out")],
        "inspect": ["inspect", str(bad)],
        "invert": ["invert", str(bad), "-o", str(folder / "inv.zup.safetensors")],
        "stack": ["stack", str(world["good"]), str(bad), "-o", str(folder / "s.zup.safetensors")],
        "verify": ["verify", str(bad), "-m", str(world["base"])],
        "eval": ["eval", "-m", str(world["base"]), "-d", str(world["forget"]), "-p", str(bad), "-q"],
    }[command]


def run_family(cases: list[tuple[str, list[str], str, Path]]) -> tuple[int, list[str]]:
    failures = []
    for case_id, args, needle, folder in cases:
        problem = refused_cleanly(args, needle, folder)
        if problem:
            failures.append(f"{case_id}: {problem}")
    return len(cases), failures


def shared_unchanged(world: dict, before: dict) -> None:
    assert snapshot(world["base"]) == before["base"]
    assert world["good"].read_bytes() == before["good"] and world["bits"].read_bytes() == before["bits"]


@pytest.fixture
def guard_shared(world: dict):
    before = {"base": snapshot(world["base"]), "good": world["good"].read_bytes(), "bits": world["bits"].read_bytes()}
    yield
    shared_unchanged(world, before)


@pytest.mark.parametrize("source", ["good", "bits"])
def test_patch_metadata_family(source: str, world: dict, tmp_path: Path, guard_shared: None) -> None:
    """Mutations of a low-rank patch's metadata, and of a bits patch's (format version 2)."""
    header, meta, data = corpus.read_parts(world[source])
    cases = []
    for i, (name, text) in enumerate(corpus.metadata_mutations(meta)):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        bad = corpus.write_patch(folder / "bad.zup.safetensors", header, text, data)
        # every mutation through one command, the six in turn (each command sees about 50)
        command = PATCH_COMMANDS[i % len(PATCH_COMMANDS)]
        cases.append((f"{name}/{command}", patch_args(command, bad, world, folder), "bad.zup.safetensors", folder))
    total, failures = run_family(cases)
    assert total >= {"good": 290, "bits": 250}[source]  # a bits entry has fewer fields (no scale, U, B)
    assert not failures, f"{len(failures)} of {total} cases:\n" + "\n".join(failures[:40])


def test_patch_container_family(world: dict, tmp_path: Path, guard_shared: None) -> None:
    header, meta, data = corpus.read_parts(world["good"])
    cases = []
    for i, (name, write) in enumerate(corpus.container_mutations(header, meta, data)):
        folder = tmp_path / f"c{i}"
        folder.mkdir()
        bad = write(folder / "bad.zup.safetensors")
        for command in PATCH_COMMANDS:
            cases.append((f"{name}/{command}", patch_args(command, bad, world, folder), "bad.zup.safetensors", folder))
    total, failures = run_family(cases)
    assert total >= 100
    assert not failures, f"{len(failures)} of {total} cases:\n" + "\n".join(failures[:40])


def test_checkpoint_family(world: dict, tmp_path: Path, guard_shared: None) -> None:
    cases = []
    for i, (name, build, needle, commands) in enumerate(corpus.checkpoint_mutations(world["base"])):
        folder = tmp_path / f"k{i}"
        folder.mkdir()
        model = build(folder)
        good = str(world["good"])
        args = {
            "apply": ["apply", good, "-m", str(model), "-o", str(folder / "out")],
            "verify": ["verify", good, "-m", str(model)],
            "inspect": ["inspect", good, "-m", str(model)],
        }
        cases += [(f"{name}/{command}", args[command], needle, folder) for command in commands]
    total, failures = run_family(cases)
    assert total >= 75
    assert not failures, f"{len(failures)} of {total} cases:\n" + "\n".join(failures[:40])


def test_requests_family(world: dict, tmp_path: Path, guard_shared: None) -> None:
    cases = []
    for i, (name, text) in enumerate(corpus.request_mutations()):
        folder = tmp_path / f"r{i}"
        folder.mkdir()
        bad = folder / "bad.jsonl"
        bad.write_bytes(text.encode("utf-8", "surrogateescape" if name == "not-utf8" else "surrogatepass"))
        args = ["eval", "-m", str(world["base"]), "-d", str(bad), "-p", str(world["good"]), "-q"]
        cases.append((name, args, "bad.jsonl", folder))
    total, failures = run_family(cases)
    assert total >= 15
    assert not failures, f"{len(failures)} of {total} cases:\n" + "\n".join(failures[:40])
