"""Broken and hostile inputs: one line naming the file, non-zero exit, nothing written.

Each case runs the real CLI. A shared check asserts the contract: the exit
code, a single ``error:`` line that names the culprit, no traceback, no
output created, inputs unchanged.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.patching import folder_digest, random_patch
from tests.tiny_models import MLP_DOWN_PROJ, make_tiny_checkpoint
from zupatch.cli.main import app

runner = CliRunner()
DOWN = [MLP_DOWN_PROJ["llama"].format(i=i) for i in (1, 2)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    base = make_tiny_checkpoint("llama", root / "base", max_shard_size="60KB")
    other = make_tiny_checkpoint("llama", root / "other", max_shard_size="60KB", seed=1)  # same shapes
    fp16 = make_tiny_checkpoint("llama", root / "fp16", dtype=torch.float16)
    patch = random_patch(base, DOWN)
    patch.save(root / "good.zup.safetensors")
    return {"root": root, "base": base, "other": other, "fp16": fp16, "patch": root / "good.zup.safetensors"}


def expect_error(args: list[str], culprit: str, problem: str, *, code: int = 1, inputs: list[Path] = (),
                 output: Path | None = None) -> str:  # fmt: skip
    """Run the CLI and check the error contract."""
    before = {p: (folder_digest(p) if p.is_dir() else p.read_bytes()) for p in inputs}
    result = runner.invoke(app, args)
    text = result.output
    assert result.exit_code == code, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), text
    assert culprit in lines[0] and problem in lines[0], lines[0]
    assert "Traceback" not in text
    if output is not None:
        assert not output.exists()
        leftovers = [p for p in output.parent.iterdir() if ".zupatch-partial-" in p.name or p.name.endswith(".tmp")]
        assert not leftovers, leftovers
    for p, digest in before.items():
        assert (folder_digest(p) if p.is_dir() else p.read_bytes()) == digest, f"{p} was modified"
    return lines[0]


def apply_args(patch: Path, model: Path, out: Path) -> list[str]:
    return ["apply", str(patch), "--model", str(model), "-o", str(out)]


# --------------------------------------------------------------------------- patch files


def write_safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def mutate_patch(src: Path, dst: Path, fn: Callable[[dict, dict], None]) -> Path:
    """Rewrite a patch file's header: ``fn(header, metadata)`` edits them in place."""
    blob = src.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["zupatch"])
    fn(header, meta)
    header["__metadata__"]["zupatch"] = json.dumps(meta)
    return write_safetensors(dst, header, blob[8 + n :])


def entry(meta: dict) -> dict:
    return meta["steps"][0]["entries"][0]


PATCH_CASES: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "garbage": (lambda s, d: (d.write_bytes(os.urandom(3000)), d)[1], "not a valid safetensors file"),
    "empty": (lambda s, d: (d.write_bytes(b""), d)[1], "not a valid safetensors file"),
    "truncated": (lambda s, d: (d.write_bytes(s.read_bytes()[:-100]), d)[1], "outside the data"),
    "header-not-json": (lambda s, d: write_safetensors(d, {}, b"") and (d.write_bytes(struct.pack("<Q", 5) + b"{nope"), d)[1], "header: malformed JSON"),
    "shape-lies": (lambda s, d: mutate_patch(s, d, lambda h, m: h[entry(m)["U"]].update(shape=[3, 3])), "needs"),
    "offsets-overlap": (lambda s, d: mutate_patch(s, d, lambda h, m: h[entry(m)["B"]].update(data_offsets=h[entry(m)["U"]]["data_offsets"])), "tensor"),
    "metadata-not-json": (lambda s, d: mutate_patch_raw(s, d, "{not json"), "metadata: malformed JSON"),
    "not-a-patch": (lambda s, d: mutate_patch_raw(s, d, None), "not a zupatch patch"),
    "wrong-format": (lambda s, d: mutate_patch(s, d, lambda h, m: m.update(format="other")), "metadata.format"),
    "newer-version": (lambda s, d: mutate_patch(s, d, lambda h, m: m.update(format_version=99)), "newer than this zupatch"),
    "no-steps": (lambda s, d: mutate_patch(s, d, lambda h, m: m.update(steps=[])), "steps"),
    "shape-not-list": (lambda s, d: mutate_patch(s, d, lambda h, m: entry(m).update(shape="big")), "shape"),
    "unknown-kind": (lambda s, d: mutate_patch(s, d, lambda h, m: entry(m).update(kind="magic")), "unknown kind"),
    "bad-hash": (lambda s, d: mutate_patch(s, d, lambda h, m: entry(m).update(sha256_before="xyz")), "64 lowercase hex"),
    "dotdot-name": (lambda s, d: mutate_patch(s, d, lambda h, m: entry(m).update(name="../../etc/passwd")), "invalid tensor name"),
    "absolute-name": (lambda s, d: mutate_patch(s, d, lambda h, m: entry(m).update(name="/etc/passwd")), "invalid tensor name"),
    "missing-tensor": (lambda s, d: mutate_patch(s, d, lambda h, m: entry(m).update(U="nope")), "does not contain"),
    "factor-shape": (lambda s, d: mutate_patch(s, d, lambda h, m: entry(m).update(shape=[7, 7])), "shape"),
    "bad-scale": (lambda s, d: mutate_patch(s, d, lambda h, m: entry(m).update(scale="0x0p+0")), "non-zero"),
    "fix-count": (lambda s, d: mutate_patch(s, d, lambda h, m: entry(m)["inverse_fix"].update(count=-1)), "impossible"),
}


def mutate_patch_raw(src: Path, dst: Path, metadata: str | None) -> Path:
    blob = src.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    if metadata is None:
        header.pop("__metadata__")
    else:
        header["__metadata__"]["zupatch"] = metadata
    return write_safetensors(dst, header, blob[8 + n :])


@pytest.mark.parametrize("case", sorted(PATCH_CASES))
@pytest.mark.parametrize("command", ["apply", "inspect", "invert"])
def test_broken_patch_files(case: str, command: str, world: dict, tmp_path: Path) -> None:
    make, problem = PATCH_CASES[case]
    bad = make(world["patch"], tmp_path / f"{case}.zup.safetensors")
    out = tmp_path / "out"
    args = {
        "apply": apply_args(bad, world["base"], out),
        "inspect": ["inspect", str(bad)],
        "invert": ["invert", str(bad), "-o", str(out)],
    }[command]
    expect_error(args, bad.name, problem, inputs=[bad, world["base"]], output=out)


def test_corrupt_correction_is_caught_before_writing(world: dict, tmp_path: Path) -> None:
    """A correction blob that decodes to garbage: refused, nothing written."""
    blob = world["patch"].read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["zupatch"])
    key = entry(meta)["inverse_fix"]["tensor"]
    start, end = header[key]["data_offsets"]
    data = bytearray(blob[8 + n :])
    data[start + 10 : end - 10] = bytes(end - start - 20)  # zero the middle of the lzma stream
    bad = tmp_path / "corrupt.zup.safetensors"
    bad.write_bytes(blob[: 8 + n] + bytes(data))
    inverse = tmp_path / "inv.zup.safetensors"
    assert runner.invoke(app, ["invert", str(bad), "-o", str(inverse)]).exit_code == 0  # invert only moves bytes
    result = tmp_path / "result"
    assert runner.invoke(app, apply_args(world["patch"], world["base"], result)).exit_code == 0
    expect_error(apply_args(inverse, result, tmp_path / "out"), inverse.name, "correction of tensor",
                 inputs=[result, inverse], output=tmp_path / "out")  # fmt: skip


# --------------------------------------------------------------------------- models


def test_wrong_base_same_shapes(world: dict, tmp_path: Path) -> None:
    line = expect_error(apply_args(world["patch"], world["other"], tmp_path / "out"), str(world["other"]),
                        "not the base this patch was made for", code=4, inputs=[world["other"]],
                        output=tmp_path / "out")  # fmt: skip
    assert DOWN[0] in line and "base" in line


def test_dtype_mismatch(world: dict, tmp_path: Path) -> None:
    expect_error(apply_args(world["patch"], world["fp16"], tmp_path / "out"), str(world["fp16"]), "F16",
                 inputs=[world["fp16"]], output=tmp_path / "out")  # fmt: skip


def test_target_tensor_missing_from_model(world: dict, tmp_path: Path) -> None:
    bad = mutate_patch(world["patch"], tmp_path / "p.zup.safetensors",
                       lambda h, m: entry(m).update(name="model.layers.99.mlp.down_proj.weight"))  # fmt: skip
    expect_error(apply_args(bad, world["base"], tmp_path / "out"), str(world["base"]), "has no tensor",
                 inputs=[world["base"]], output=tmp_path / "out")  # fmt: skip


def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


@pytest.mark.parametrize("bad_name", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_pointing_outside_the_folder(bad_name: str, world: dict, tmp_path: Path) -> None:
    model = copy_checkpoint(world["base"], tmp_path / "model")
    index = model / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"][DOWN[0]] = bad_name
    index.write_text(json.dumps(doc))
    expect_error(apply_args(world["patch"], model, tmp_path / "out"), "model.safetensors.index.json",
                 "not a file name inside the checkpoint", inputs=[model], output=tmp_path / "out")  # fmt: skip


def test_shard_missing_and_index_malformed(world: dict, tmp_path: Path) -> None:
    model = copy_checkpoint(world["base"], tmp_path / "model")
    shard = sorted(model.glob("model-*.safetensors"))[0]
    shard.unlink()
    expect_error(apply_args(world["patch"], model, tmp_path / "out"), "index.json", "missing from the folder",
                 output=tmp_path / "out")  # fmt: skip
    (model / "model.safetensors.index.json").write_text("{oops")
    expect_error(apply_args(world["patch"], model, tmp_path / "out"), "index.json", "malformed JSON",
                 output=tmp_path / "out")  # fmt: skip


def test_model_folder_without_weights(world: dict, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    expect_error(apply_args(world["patch"], empty, tmp_path / "out"), "empty", "has no model.safetensors",
                 output=tmp_path / "out")  # fmt: skip
    expect_error(apply_args(world["patch"], tmp_path / "nowhere", tmp_path / "out"), "nowhere", "no such folder")


def test_corrupt_shard_header(world: dict, tmp_path: Path) -> None:
    model = copy_checkpoint(world["base"], tmp_path / "model")
    shard = sorted(model.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"\xff" * 64)
    expect_error(apply_args(world["patch"], model, tmp_path / "out"), shard.name, "not a valid safetensors file",
                 output=tmp_path / "out")  # fmt: skip


# --------------------------------------------------------------------------- outputs


def test_output_exists(world: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    expect_error(apply_args(world["patch"], world["base"], out), str(out), "already exists", inputs=[out])
    target = tmp_path / "inv.zup.safetensors"
    target.write_bytes(b"keep me")
    expect_error(["invert", str(world["patch"]), "-o", str(target)], str(target), "already exists", inputs=[target])


def test_output_parent_missing(world: dict, tmp_path: Path) -> None:
    out = tmp_path / "missing" / "out"
    expect_error(apply_args(world["patch"], world["base"], out), "missing", "does not exist")


def test_read_only_output_location(world: dict, tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root ignores permission bits: use a filesystem that refuses new folders
        out = Path("/sys/zupatch-test-out")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = ro / "out"
    expect_error(apply_args(world["patch"], world["base"], out), str(out.parent), "cannot write here")
    assert not out.exists()


def test_interrupted_apply_leaves_nothing(tmp_path: Path) -> None:
    """SIGTERM in the middle of an apply: no output folder, no temporary folder."""
    base = make_tiny_checkpoint("llama", tmp_path / "big", dtype=torch.float32)
    # make the touched tensor big enough that the apply takes a while
    from safetensors.torch import load_file, save_file

    tensors = load_file(base / "model.safetensors")
    tensors[DOWN[0]] = torch.randn(4096, 2048)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    patch = random_patch(base, [DOWN[0]], rank=16)
    patch.save(tmp_path / "p.zup.safetensors")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from zupatch.cli.main import main; main()", *apply_args(tmp_path / "p.zup.safetensors", base, out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(".zupatch-partial-" in p.name for p in tmp_path.iterdir()):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".zupatch-partial-" in p.name]
