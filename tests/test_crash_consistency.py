"""apply killed with SIGKILL at several points leaves the input intact and nothing under the output's name.

A SIGKILL runs no clean-up code, so what protects the user is the design:
everything is written into a hidden partial folder that is renamed into
place only at the end, and the next run on the same output removes partial
folders whose writer died (their lock is free). The checkpoint here is a
sharded ~300 MB folder so that the kills land in different stages: copying
untouched shards, computing touched tensors, and the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from tests.patching import base_tensors, random_patch
from zupatch.checkpoint.apply import LOCK_NAME

MB = 1 << 20


def write_big_checkpoint(folder: Path) -> Path:
    """Three f32 shards, ~100 MB each; two 4096x2048 tensors to patch, the rest padding."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    shards = {
        "model-00001-of-00003.safetensors": {"layers.0.down.weight": rng.standard_normal((4096, 2048), dtype=np.float32),
                                             "pad.0": np.zeros(17 * MB, dtype=np.float32)},
        "model-00002-of-00003.safetensors": {"pad.1": np.zeros(25 * MB, dtype=np.float32)},
        "model-00003-of-00003.safetensors": {"pad.2": np.zeros(17 * MB, dtype=np.float32),
                                             "layers.1.down.weight": rng.standard_normal((4096, 2048), dtype=np.float32)},
    }  # fmt: skip
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update({t: name for t in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "synthetic"}))
    return folder


def digest(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(folder.iterdir()):
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(16 * MB), b""):
                h.update(chunk)
        out[path.name] = h.hexdigest()
    return out


def partials(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".zupatch-partial-" in p.name]


def start_apply(patch: Path, model: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", "from zupatch.cli.main import main; main()", "apply", str(patch), "-m", str(model),
         "-o", str(out), "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def test_sigkill_at_several_points_then_a_rerun(tmp_path: Path) -> None:
    model = write_big_checkpoint(tmp_path / "model")
    assert sum(p.stat().st_size for p in model.iterdir()) > 250 * MB
    names = ["layers.0.down.weight", "layers.1.down.weight"]
    patch = random_patch(model, names, rank=8)
    patch.save(tmp_path / "p.zup.safetensors")
    before = digest(model)
    out = tmp_path / "work" / "out"
    out.parent.mkdir()

    # one full run, timed from the moment its partial folder is locked, to place the kills
    proc = start_apply(tmp_path / "p.zup.safetensors", model, out)
    while not any((p / LOCK_NAME).exists() for p in partials(out.parent)) and proc.poll() is None:
        time.sleep(0.005)
    locked = time.monotonic()
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    duration = time.monotonic() - locked
    reference = digest(out)
    os.rename(out, tmp_path / "reference")

    kills = 0
    for fraction in (0.0, 0.15, 0.35, 0.6, 0.85):
        proc = start_apply(tmp_path / "p.zup.safetensors", model, out)
        while not any((p / LOCK_NAME).exists() for p in partials(out.parent)) and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(fraction * duration)
        proc.send_signal(signal.SIGKILL)
        code = proc.wait(timeout=60)
        if code == -signal.SIGKILL:
            kills += 1
            assert not out.exists(), f"output under its final name after a kill at {fraction:.0%}"
        else:  # finished before the signal: a complete, correct output
            assert code == 0 and digest(out) == reference
            os.rename(out, tmp_path / f"finished-{fraction}")
        assert digest(model) == before, f"input changed by a kill at {fraction:.0%}"
    assert kills >= 3, f"only {kills} of 5 runs were killed mid-way (a run took {duration:.2f} s)"
    assert partials(out.parent), "a killed run leaves its partial folder (removed by the next run)"

    # the rerun succeeds, gives the same bytes, and leaves no stray folder
    proc = start_apply(tmp_path / "p.zup.safetensors", model, out)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert digest(out) == reference
    assert not partials(out.parent)
    assert digest(model) == before
    assert base_tensors(out, names)[names[0]][0].tobytes() != base_tensors(model, names)[names[0]][0].tobytes()


def test_a_stale_folder_without_a_lock_is_left_alone_while_young(tmp_path: Path) -> None:
    """Killed between creating the folder and locking it: removed only once older than a minute."""
    from zupatch.checkpoint.apply import STALE_UNLOCKED_SECONDS, remove_stale_partials

    out = tmp_path / "out"
    young = tmp_path / ".out.zupatch-partial-young"
    old = tmp_path / ".out.zupatch-partial-old"
    young.mkdir()
    old.mkdir()
    past = time.time() - STALE_UNLOCKED_SECONDS - 10
    os.utime(old, (past, past))
    removed = remove_stale_partials(out)
    assert removed == [old] and young.exists() and not old.exists()
