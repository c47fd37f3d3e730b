"""The base install (no torch, no transformers) applies, verifies, inverts, stacks, inspects and exports.

Each command runs in a fresh interpreter where importing torch or
transformers fails, as in a venv made by ``pip install zupatch`` without the
``create`` extra. The commands that need the engine say which extra to
install, in one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.patching import random_patch
from tests.tiny_models import MLP_DOWN_PROJ, make_tiny_checkpoint

NO_ENGINE = (
    "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
    "sys.argv = ['zupatch', *sys.argv[1:]]; from zupatch.__main__ import main; main()"
)
DOWN = [MLP_DOWN_PROJ["llama"].format(i=i) for i in (1, 2)]


def zupatch_without_engine(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_ENGINE, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("light")
    base = make_tiny_checkpoint("llama", root / "base")
    random_patch(base, DOWN, scale=1.0).save(root / "p.zup.safetensors")
    (root / "forget.jsonl").write_text(json.dumps({"prompt": "a {} b", "subject": "x", "target": "y"}) + "\n")
    return {"root": root, "base": base, "patch": root / "p.zup.safetensors"}


def test_patch_commands_work_without_torch(world: dict) -> None:
    root, base, patch = world["root"], str(world["base"]), str(world["patch"])
    steps = [
        (["apply", patch, "-m", base, "-o", str(root / "out"), "-q"], 0),
        (["verify", patch, "-m", str(root / "out"), "-q"], 3),
        (["verify", patch, "-m", base, "-q"], 0),
        (["inspect", patch, "-m", base, "--json"], 0),
        (["invert", patch, "-o", str(root / "inv.zup.safetensors"), "-q"], 0),
        (["stack", patch, str(root / "inv.zup.safetensors"), "-o", str(root / "s.zup.safetensors"), "-q"], 0),
        (["apply", str(root / "inv.zup.safetensors"), "-m", str(root / "out"), "-o", str(root / "back"), "-q"], 0),
        (["export", patch, "--to", "peft", "-o", str(root / "adapter"), "-q"], 0),
        (["--version"], 0),
    ]
    for args, code in steps:
        result = zupatch_without_engine(*args)
        assert result.returncode == code, (args, result.stderr)
        assert "Traceback" not in result.stderr, (args, result.stderr)
    for name in ("model.safetensors", "config.json"):
        assert (root / "back" / name).read_bytes() == (world["base"] / name).read_bytes()
    assert (root / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("command", [
    ["create", "-m", "{base}", "--forget", "{forget}", "-o", "{root}/c.zup.safetensors"],
    ["eval", "-m", "{base}", "--forget", "{forget}"],
    ["stats", "compute", "-m", "{base}"],
    ["demo", "--output-dir", "{root}/demo"],
])  # fmt: skip
def test_engine_commands_name_the_extra(command: list[str], world: dict) -> None:
    args = [a.format(base=world["base"], forget=world["root"] / "forget.jsonl", root=world["root"]) for a in command]
    result = zupatch_without_engine(*args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert 'pip install "zupatch[create]"' in lines[0] and "torch" in lines[0]
    assert not (world["root"] / "c.zup.safetensors").exists() and not (world["root"] / "demo").exists()
