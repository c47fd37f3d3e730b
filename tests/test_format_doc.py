"""docs/format.md's JSON Schema describes the metadata zupatch writes (so the two cannot drift)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from zupatch.patch import numerics as nm
from zupatch.patch.format import METADATA_KEY, metadata_schema
from zupatch.patch.ops import DenseEdit, LowRankEdit, build_patch, invert, run_chain_in_memory, stack

DOC = Path(__file__).resolve().parents[1] / "docs" / "format.md"


def doc_schema() -> dict:
    section = DOC.read_text().split("## 8.", 1)[1]
    block = re.search(r"```json\n(.*?)```", section, re.S)
    assert block, "docs/format.md section 7 has no JSON block"
    schema = json.loads(block.group(1))
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema == metadata_schema(), "docs/format.md §8 differs from zupatch/patch/metadata.schema.json"
    return schema


def metadata_of(patch) -> dict:
    from safetensors import safe_open

    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".safetensors") as fh:
        fh.write(patch.to_bytes())
        fh.flush()
        with safe_open(fh.name, "np") as f:  # the reference reader agrees the file is valid safetensors
            return json.loads(f.metadata()[METADATA_KEY])


def sample_patches():
    dt = nm.FLOAT_DTYPES["BF16"]
    rng = np.random.default_rng(0)
    base = {"a.weight": (nm.round_to(rng.standard_normal((6, 5)), dt), dt),
            "b.weight": (nm.round_to(rng.standard_normal((4, 3, 2)), dt), dt)}
    first = build_patch([LowRankEdit("a.weight", 1.01, rng.standard_normal((6, 2)), rng.standard_normal((2, 5))),
                         DenseEdit("b.weight", rng.standard_normal((4, 3, 2)) * 0.01)], base,
                        method="zerounlearn", hyperparameters={"layers": [1]}, base_model="org/model",
                        requests={"count": 2, "salt": "00", "sha256": ["0" * 64, "1" * 64]})
    mid = run_chain_in_memory(first.chain("a.weight"), base["a.weight"][0])
    second = build_patch([LowRankEdit("a.weight", 0.5, rng.standard_normal((6, 1)), rng.standard_normal((1, 5)))],
                         {"a.weight": (mid, dt)})
    both = stack([first, second])
    return [first, invert(first), both, invert(both)]


@pytest.mark.parametrize("index", range(4))
def test_written_metadata_matches_the_documented_schema(index: int) -> None:
    jsonschema.validate(metadata_of(sample_patches()[index]), doc_schema())


def test_schema_rejects_what_the_reader_rejects() -> None:
    meta = metadata_of(sample_patches()[0])
    validator = jsonschema.Draft202012Validator(doc_schema())
    for mutate in (
        lambda m: m["steps"][0]["entries"][0].update(name="../x"),
        lambda m: m["steps"][0]["entries"][0].update(kind="magic"),
        lambda m: m["steps"][0]["entries"][0].pop("U"),
        lambda m: m["steps"][0]["entries"][0].update(sha256_after="abc"),
        lambda m: m.update(steps=[]),
    ):
        bad = json.loads(json.dumps(meta))
        mutate(bad)
        assert not validator.is_valid(bad)
