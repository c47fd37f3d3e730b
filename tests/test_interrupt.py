"""Ctrl-C while the ``zupatch`` command starts: one line and exit code 130, never a traceback.

The command's first second is spent importing (typer, rich, then torch for
``create``). Each run below starts the real entry point in a fresh process and
sends one SIGINT at a different delay, so the signal lands in the imports of
the CLI, in those of a command's body and in the command itself; every run must
end the same way. The clock starts once the child's interpreter is up (it
says so on stdout): before that, Ctrl-C interrupts Python's own start-up
(``site``), which no program can handle. From there to the handler in
:func:`zupatch.__main__.main` there are only runpy and ``import zupatch``, a
few milliseconds (checked below), well under the shortest delay.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Seconds after the interpreter is up; `create` is still importing torch at the last one.
DELAYS = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5)
#: ``python -m zupatch`` (what runpy does for -m), started once the interpreter is up.
ENTRY = "import os, runpy; os.write(1, b'R'); runpy.run_module('zupatch', run_name='__main__', alter_sys=True)"
HEAVY = ("numpy", "torch", "transformers", "safetensors", "typer", "rich", "huggingface_hub")


def test_importing_zupatch_imports_nothing_heavy() -> None:
    """The package is light, so the command's handler is in place within milliseconds of start."""
    code = "import sys, zupatch, zupatch.__main__; print(sorted({m.split('.')[0] for m in sys.modules}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not set(eval(proc.stdout)) & set(HEAVY), proc.stdout
    import zupatch

    assert zupatch.load_patch is zupatch.Patch.load and callable(zupatch.apply_to_checkpoint)  # loaded on use
    with pytest.raises(AttributeError):
        zupatch.no_such_name  # noqa: B018


def test_the_console_script_is_the_guarded_entry_point() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["zupatch"].split("#")[0].strip() == "zupatch.__main__:main"


@pytest.mark.parametrize("delay", DELAYS)
def test_ctrl_c_during_start_up_is_one_line(delay: float, tmp_path: Path) -> None:
    args = ["create", "-m", str(tmp_path / "model"), "--forget", str(tmp_path / "forget.jsonl"), "-o",
            str(tmp_path / "p.zup.safetensors")]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", ENTRY, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.stdout is not None and proc.stdout.read(1) == b"R"
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    text = err.decode(errors="replace")
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert proc.returncode == 130, (proc.returncode, text)
    assert text.strip() == "interrupted: nothing was written", text
    assert out == b"" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupt_while_the_engine_loads_waits_for_it(number: int) -> None:
    """Ctrl-C inside torch's import could end in std::terminate (a C++ message, exit -6):
    while the engine loads the signal is held, then raised as the ordinary interrupt."""
    from zupatch.cli import ui

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    held = (signal.SIGINT, signal.SIGTERM)
    outer = {n: signal.signal(n, interrupt) for n in held}  # as zupatch's main() sets them
    try:
        finished = []
        with pytest.raises(KeyboardInterrupt):
            with ui.interrupts_held():
                os.kill(os.getpid(), number)
                time.sleep(0.05)  # Python runs signal handlers here
                finished.append(True)
        assert finished == [True]
        assert all(signal.getsignal(n) is interrupt for n in held)
    finally:
        for n, handler in outer.items():
            signal.signal(n, handler)
