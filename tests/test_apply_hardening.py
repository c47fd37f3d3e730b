"""apply never ships a model other than the one verify describes, and writes nothing outside ``-o``.

Each test reproduces one way a checkpoint folder, a patch or the machine can
go wrong (ambiguous layouts, links, killed runs, corrupt inverses, NaN, a
full disk) on real checkpoints in the Hugging Face layout, through the real
CLI, and checks the outcome a user relies on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from tests.patching import base_tensors, folder_digest, random_patch, same_inode
from tests.tiny_models import MLP_DOWN_PROJ, make_tiny_checkpoint
from zupatch.checkpoint.apply import LOCK_NAME, apply_to_checkpoint
from zupatch.cli.main import app
from zupatch.errors import BaseMismatchError
from zupatch.patch.correction import Correction
from zupatch.patch.format import Patch, StoredCorrection
from zupatch.patch.ops import LowRankEdit, build_patch

runner = CliRunner()
DOWN = [MLP_DOWN_PROJ["llama"].format(i=i) for i in (1, 2)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hardening")
    single = make_tiny_checkpoint("llama", root / "single")
    sharded = make_tiny_checkpoint("llama", root / "sharded", max_shard_size="60KB")
    patch = random_patch(single, DOWN)
    patch.save(root / "p.zup.safetensors")
    return {"root": root, "single": single, "sharded": sharded, "patch": root / "p.zup.safetensors"}


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def one_line_error(code: int, text: str, *needles: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error:"), text
    assert "Traceback" not in text
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".zupatch-partial-" in p.name]


# --------------------------------------------------------------------------- ambiguous layouts


def test_folder_with_both_layouts_is_refused_by_apply_and_verify(world: dict, tmp_path: Path) -> None:
    """Shards + index beside a model.safetensors: transformers loads the single file, so refuse."""
    both = shutil.copytree(world["sharded"], tmp_path / "both")
    shutil.copy(world["single"] / "model.safetensors", both / "model.safetensors")
    before = folder_digest(both)
    out = tmp_path / "out"
    one_line_error(*cli("apply", str(world["patch"]), "-m", str(both), "-o", str(out)),
                   "model.safetensors and model.safetensors.index.json")  # fmt: skip
    no_output(out)
    one_line_error(*cli("verify", str(world["patch"]), "-m", str(both)), "ambiguous")
    assert folder_digest(both) == before


def test_tensor_stored_in_two_shards_is_refused(world: dict, tmp_path: Path) -> None:
    """A touched tensor also present, unpatched, in another listed shard."""
    folder = shutil.copytree(world["sharded"], tmp_path / "dup")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    home = index["weight_map"][DOWN[0]]
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != home)
    tensors = load_file(folder / other)
    tensors[DOWN[0]] = load_file(folder / home)[DOWN[0]]
    save_file(tensors, folder / other, metadata={"format": "pt"})
    patch = random_patch(world["sharded"], DOWN)
    patch.save(tmp_path / "p.zup.safetensors")
    out = tmp_path / "out"
    line = one_line_error(*cli("apply", str(tmp_path / "p.zup.safetensors"), "-m", str(folder), "-o", str(out)),
                          DOWN[0], "stored in both")  # fmt: skip
    assert home in line and other in line
    no_output(out)
    one_line_error(*cli("verify", str(tmp_path / "p.zup.safetensors"), "-m", str(folder)), "stored in both")


# --------------------------------------------------------------------------- nothing shared with inputs


def hf_cache_snapshot(src: Path, cache: Path) -> Path:
    """``src`` laid out as huggingface_hub lays out a download: snapshot links into blobs/."""
    repo = cache / "models--alice--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(p for p in src.iterdir() if p.is_file())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)
    return snapshot


def test_output_never_shares_an_inode_with_the_hf_cache(world: dict, tmp_path: Path) -> None:
    """A later in-place write into the output (save_pretrained of a tokenizer) must not reach the cache."""
    snapshot = hf_cache_snapshot(world["single"], tmp_path / "hub")
    cache_before = folder_digest(tmp_path / "hub")
    out = tmp_path / "out"
    code, text = cli("apply", str(world["patch"]), "-m", str(snapshot), "-o", str(out))
    assert code == 0, text
    for f in out.iterdir():
        blob = (snapshot / f.name).resolve()
        assert not same_inode(f, blob), f.name
    for f in out.iterdir():  # write into every output file in place, as save_pretrained does
        with open(f, "r+b") as fh:
            fh.write(b"\0")
    assert folder_digest(tmp_path / "hub") == cache_before

    linked = tmp_path / "linked"  # the opt-in does share inodes, as its help says
    assert cli("apply", str(world["patch"]), "-m", str(snapshot), "-o", str(linked), "--link")[0] == 0
    assert same_inode(linked / "config.json", (snapshot / "config.json").resolve())


# --------------------------------------------------------------------------- links


@pytest.mark.parametrize("kind", ["secret", "device", "loop", "folder", "dangling"])
def test_links_leading_outside_the_model_folder_are_refused(kind: str, world: dict, tmp_path: Path) -> None:
    folder = shutil.copytree(world["single"], tmp_path / "model")
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    link = folder / "notes.txt"
    if kind == "secret":
        link.symlink_to(secret)
    elif kind == "device":
        link.symlink_to("/dev/zero")
    elif kind == "loop":
        link.symlink_to(folder / "loop2.txt")
        (folder / "loop2.txt").symlink_to(link)
    elif kind == "folder":
        link.symlink_to(tmp_path, target_is_directory=True)
    else:
        link.symlink_to(tmp_path / "missing")
    out = tmp_path / "out"
    needle = "link loop" if kind == "loop" else "notes.txt"
    one_line_error(*cli("apply", str(world["patch"]), "-m", str(folder), "-o", str(out)), needle)
    no_output(out)


def test_links_inside_the_folder_are_followed(world: dict, tmp_path: Path) -> None:
    folder = shutil.copytree(world["single"], tmp_path / "model")
    (folder / "extra").mkdir()
    (folder / "extra" / "readme.txt").write_text("inside")
    (folder / "readme.txt").symlink_to("extra/readme.txt")
    out = tmp_path / "out"
    assert cli("apply", str(world["patch"]), "-m", str(folder), "-o", str(out))[0] == 0
    assert (out / "readme.txt").read_text() == "inside" and not (out / "readme.txt").is_symlink()


def test_output_inside_the_model_folder_is_refused(world: dict, tmp_path: Path) -> None:
    folder = shutil.copytree(world["single"], tmp_path / "model")
    before = folder_digest(folder)
    one_line_error(*cli("apply", str(world["patch"]), "-m", str(folder), "-o", str(folder / "out")),
                   "outside the model folder")  # fmt: skip
    assert folder_digest(folder) == before and not (folder / "out").exists()


# --------------------------------------------------------------------------- killed runs


def test_a_killed_runs_partial_folder_is_removed_by_the_next_run(world: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    stale = tmp_path / ".out.zupatch-partial-dead1234"
    stale.mkdir()
    (stale / LOCK_NAME).touch()  # its owner died: nobody holds the lock
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    busy = tmp_path / ".out.zupatch-partial-busy5678"  # an apply running right now holds its lock
    busy.mkdir()
    import fcntl

    fd = os.open(busy / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        code, text = cli("apply", str(world["patch"]), "-m", str(world["single"]), "-o", str(out))
    finally:
        os.close(fd)
    assert code == 0, text
    assert "killed run" in text
    assert not stale.exists() and busy.exists()
    assert not (out / LOCK_NAME).exists()


# --------------------------------------------------------------------------- the copy thread


def test_a_failing_apply_leaves_no_thread_writing(tmp_path: Path) -> None:
    """Wrong base on a shard with 256 MB of untouched bytes: the error waits for the copier.

    Before the fix the copy thread went on writing into the closed descriptor
    number, which the caller's next opened file received.
    """
    base = make_tiny_checkpoint("llama", tmp_path / "base", dtype=torch.float32)
    other = make_tiny_checkpoint("llama", tmp_path / "other", dtype=torch.float32, seed=1)
    for folder in (base, other):
        tensors = load_file(folder / "model.safetensors")
        tensors["zz.padding"] = torch.zeros(64 << 20)  # 256 MB after the touched tensors
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    patch = random_patch(base, [DOWN[0]])
    threads_before = set(threading.enumerate())
    with pytest.raises(BaseMismatchError):
        apply_to_checkpoint(patch, other, tmp_path / "out")
    victim = tmp_path / "next-file.bin"
    with open(victim, "wb") as fh:
        time.sleep(0.5)
        fh.flush()
        assert os.fstat(fh.fileno()).st_size == 0
    assert set(threading.enumerate()) <= threads_before
    no_output(tmp_path / "out")


@pytest.mark.parametrize("spawned", [False, True], ids=["before-spawn", "after-spawn"])
def test_an_interrupt_inside_the_copy_threads_start(spawned: bool, world: dict, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Ctrl-C/SIGTERM landing inside ``Thread.start()``: the interrupt is what surfaces.

    A signal handler raises KeyboardInterrupt wherever the main thread is; in
    CI it once landed in ``start()`` while it waited for the new thread, and
    the cleanup's ``join()`` replaced the interrupt with "cannot join thread
    before it is started" and a traceback. The interrupt is raised here at
    the two places it can land: before the thread exists, and after it runs.
    """
    real_start = threading.Thread.start

    def interrupted_start(self: threading.Thread) -> None:
        if self.name != "zupatch-copy":
            return real_start(self)
        if spawned:
            real_start(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", interrupted_start)
    with pytest.raises(KeyboardInterrupt):
        apply_to_checkpoint(Patch.load(world["patch"]), world["single"], tmp_path / "out")
    no_output(tmp_path / "out")


# --------------------------------------------------------------------------- what the patch writes


def test_a_patch_whose_inverse_is_corrupt_is_refused_before_anything_is_placed(world: dict, tmp_path: Path) -> None:
    """A well-formed, correctly hashed forward patch with a wrong inverse_fix."""
    patch = Patch.load(world["patch"])
    entry = patch.steps[0].entries[0]
    wrong = Correction(np.array([3], dtype=np.int64), np.array([1], dtype=entry.float_dtype.bits))
    bad_entry = replace(entry, inverse_fix=StoredCorrection.make(wrong, entry.numel))
    bad = Patch(steps=[replace(patch.steps[0], entries=[bad_entry, *patch.steps[0].entries[1:]])])
    bad.save(tmp_path / "bad.zup.safetensors")
    out = tmp_path / "out"
    one_line_error(*cli("apply", str(tmp_path / "bad.zup.safetensors"), "-m", str(world["single"]), "-o", str(out)),
                   "bad.zup.safetensors", "cannot be undone")  # fmt: skip
    no_output(out)


def test_new_nonfinite_values_need_allow_nonfinite(world: dict, tmp_path: Path) -> None:
    base = base_tensors(world["single"], [DOWN[0]])
    rows, cols = base[DOWN[0]][0].shape
    U = np.zeros((rows, 1))
    U[0, 0] = 1e30
    B = np.full((1, cols), 1e30)  # row 0 overflows bf16: +Inf where the base was finite
    build_patch([LowRankEdit(DOWN[0], 1.0, U, B)], base, method="test").save(tmp_path / "inf.zup.safetensors")
    out = tmp_path / "out"
    args = ["apply", str(tmp_path / "inf.zup.safetensors"), "-m", str(world["single"]), "-o", str(out)]
    one_line_error(*cli(*args), "inf.zup.safetensors", f"{cols} NaN/Inf", "--allow-nonfinite")
    no_output(out)
    code, text = cli(*args, "--allow-nonfinite")
    assert code == 0, text
    weight = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).state_dict()[DOWN[0]]
    assert torch.isinf(weight[0]).all() and torch.isfinite(weight[1:]).all()


def test_disk_full_names_the_output(world: dict, tmp_path: Path) -> None:
    """A write limit (RLIMIT_FSIZE, EFBIG) stands in for a full disk; the error names -o, not the input."""
    out = tmp_path / "out"
    code = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
        "from zupatch.cli.main import main; sys.argv[0] = 'zupatch'; main()"
    )
    args = ["apply", str(world["patch"]), "-m", str(world["single"]), "-o", str(out)]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}:"), proc.stderr
    assert "nothing was written" in lines[0]
    no_output(out)


def test_patch_files_follow_the_umask(world: dict, tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        Patch.load(world["patch"]).save(tmp_path / "q.zup.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "q.zup.safetensors").stat().st_mode & 0o777 == 0o640


# --------------------------------------------------------------------------- inspect


def test_inspect_shows_a_large_correction_hidden_behind_a_small_rank(world: dict, tmp_path: Path) -> None:
    """A rank-2 entry whose forward fix moves one value far: consistent hashes, so it applies; inspect shows it."""
    from zupatch.patch.ops import compute_entry_block, sha256_hex

    honest = random_patch(world["single"], [DOWN[0]], rank=2)
    honest.save(tmp_path / "honest.zup.safetensors")
    e = honest.steps[0].entries[0]
    base = base_tensors(world["single"], [DOWN[0]])[DOWN[0]][0]
    raw = compute_entry_block(e, base, 0, None)
    wanted = compute_entry_block(e, base, 0, e.fix.decode(e.numel, e.float_dtype) if e.fix else None)
    wanted.flat[5] = 0x42C8  # bf16 100.0, about 5000 times the RMS of this tensor
    back = compute_entry_block(e.inverted(), wanted, 0, None)
    hostile = replace(e, sha256_after=sha256_hex(wanted),
                      fix=StoredCorrection.make(Correction.between(raw, wanted), e.numel),
                      inverse_fix=StoredCorrection.make(Correction.between(back, base), e.numel))  # fmt: skip
    Patch(steps=[replace(honest.steps[0], entries=[hostile])]).save(tmp_path / "hostile.zup.safetensors")

    def inspected(name: str, *extra: str) -> dict:
        code, text = cli("inspect", str(tmp_path / name), "--json", *extra)
        assert code == 0, text
        return json.loads(text)["entries"][0]

    plain = inspected("hostile.zup.safetensors")
    U, B = e.U.astype(np.float64), e.B.astype(np.float64)
    assert plain["rank"] == 2 and plain["fix_count"] >= 1
    assert plain["change_norm"] == pytest.approx(np.linalg.norm(U @ B), rel=1e-9)
    measured = inspected("hostile.zup.safetensors", "--model", str(world["single"]))
    fair = inspected("honest.zup.safetensors", "--model", str(world["single"]))
    w = base.view(np.uint16).astype(np.uint32) << 16
    values = w.view(np.float32).astype(np.float64)
    rms = np.sqrt(np.mean(values**2))
    assert measured["fix_max"] == pytest.approx(abs(100.0 - float(np.frombuffer(
        (np.uint32(raw.flat[5]) << 16).tobytes(), np.float32)[0])) / rms, rel=1e-6)  # fmt: skip
    assert measured["fix_max"] > 100 and fair["fix_max"] < 0.05 and fair["inverse_fix_max"] < 0.05
    result = 1.01 * values + U @ B  # the honest entry's change, computed directly (before bf16 rounding)
    assert fair["relative_change"] == pytest.approx(np.linalg.norm(result - values) / np.linalg.norm(values), rel=0.01)
    code, text = cli("inspect", str(tmp_path / "hostile.zup.safetensors"), "--model", str(world["single"]))
    assert code == 0 and max(len(line) for line in text.splitlines()) <= 80, text
