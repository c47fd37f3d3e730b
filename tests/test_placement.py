"""Device maps (zupatch.engine.placement): limits, which models accelerate's hooks run, layer counts."""

from __future__ import annotations

import pytest

from zupatch.engine.api import load_model
from zupatch.engine.architectures import decoder_layers, resolve_architecture
from zupatch.engine.placement import dispatched, layers_per_device, parse_max_memory, placement_problem
from zupatch.errors import ZupatchError


def test_max_memory_is_parsed_and_bad_limits_are_named() -> None:
    assert parse_max_memory("0=70GiB, 1=75 GiB,cpu=200GB") == {0: "70GiB", 1: "75GiB", "cpu": "200GB"}
    for text, problem in (("0=70GiB,0=1GB", "given twice"), ("gpu=1GB", "unknown device"), ("cpu", "DEVICE=AMOUNT"),
                          ("cpu=-1GB", "not an amount")):  # fmt: skip
        with pytest.raises(ZupatchError, match=problem):
            parse_max_memory(text)
    assert placement_problem(None, "cpu=1GB") and placement_problem("everywhere", None)
    assert placement_problem("auto", "cpu=1GB") is None


def test_only_a_split_model_is_run_by_accelerate(tiny_checkpoint) -> None:
    """A plain load adds no hooks (zupatch may skip the layers an edit does not change); a map
    that puts the last layer on the disk does, and the layer count per device says so."""
    folder = tiny_checkpoint("llama", max_shard_size="60KB")
    whole, _ = load_model(folder, "float32", "cpu")
    split, _ = load_model(folder, "float32", "cpu", device_map="sequential", max_memory="cpu=700KB")
    assert not dispatched(whole) and layers_per_device(whole, decoder_layers(whole, resolve_architecture(whole))) is None
    assert dispatched(split)
    assert layers_per_device(split, decoder_layers(split, resolve_architecture(split))) == {"cpu": 3, "disk": 1}
