"""The GA and NPO baselines: real forgetting on the trained tiny Llama, dense patches, the CLI.

The figures each test measures are printed (``pytest -s``); the bars sit below
what was measured (2 of 2 facts forgotten everywhere; other facts kept: GA and
NPO 43/46 without a retain set, 46/46 with one, at the default lr 1e-4).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from tests.fact_model import FORGET, answered
from tests.patching import folder_digest
from tests.test_hostile import expect_error
from zupatch.cli.main import app
from zupatch.engine.api import create
from zupatch.engine.baselines import BaselineParams
from zupatch.engine.create import CreateConfig, compute_edit, restore_weights
from zupatch.engine.settings import with_settings
from zupatch.errors import ZupatchError
from zupatch.patch.format import Patch
from zupatch.patch.module import applied

runner = CliRunner()
#: Other facts still answered, of 46: without a retain set, and with half of them as one.
KEPT_ALONE, KEPT_WITH_RETAIN = 40, 44


def _others() -> list[int]:
    return [i for i in range(48) if i not in FORGET]


@pytest.mark.parametrize("method", ["ga", "npo"])
@pytest.mark.parametrize("with_retain", [False, True], ids=["alone", "retain"])
def test_baseline_forgets_and_edits_only_the_down_projections(fact_model, method: str, with_retain: bool) -> None:
    model, tokenizer, facts = fact_model
    forget = [facts[i] for i in FORGET]
    retain = [facts[i] for i in _others()[::2]] if with_retain else []
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags = [p.requires_grad for p in model.parameters()]
    result = compute_edit(model, tokenizer, forget, CreateConfig(method=method), retain_requests=retain)

    now = answered(model, tokenizer, facts)
    forgotten = sum(not now[i] for i in FORGET)
    kept = sum(now[i] for i in _others())
    held_out = sum(now[i] for i in _others()[1::2])
    d = result.diagnostics
    print({"method": method, "retain": with_retain, "forgotten": forgotten, "kept": kept, "held_out": held_out,
           "steps": d["steps"], "loss": (d["initial_forget_loss"], d["final_forget_loss"]),
           "relative_change": [layer["relative_change"] for layer in d["layers"]]})  # fmt: skip
    assert forgotten == len(FORGET) and d["answered_after"] == 0 and d["answered_before"] == len(FORGET)
    assert d["stopped_forgotten"] and 0 < d["steps"] < BaselineParams().steps
    assert kept >= (KEPT_WITH_RETAIN if with_retain else KEPT_ALONE), kept
    assert all(a > b for a, b in zip(d["verification"]["answer_nll_after"], d["verification"]["answer_nll_before"]))

    # only the down projections of the default layers (0, 1, 2 of 4) changed, by exactly the deltas
    assert result.method == method and [e.layer for e in result.layers] == [0, 1, 2]
    parameters = dict(model.named_parameters())
    for edit in result.layers:
        assert edit.tensor_name == f"model.layers.{edit.layer}.mlp.down_proj.weight"
        assert edit.kind == "dense" and edit.factors is None and edit.delta is not None
        assert edit.delta.dtype == torch.float64 and edit.delta.device.type == "cpu"
        assert edit.delta.shape == before[edit.tensor_name].shape and edit.delta.abs().max() > 0
        expected = (before[edit.tensor_name].double() + edit.delta).float()
        assert torch.equal(parameters[edit.tensor_name].detach(), expected)
    untouched = set(before) - set(result.tensor_names)
    assert all(torch.equal(before[name], parameters[name]) for name in untouched)
    assert [p.requires_grad for p in model.parameters()] == flags  # the model's flags were restored

    hp = result.hyperparameters
    assert hp["baseline"]["learning_rate"] == BaselineParams().learning_rate and hp["layers"] == [0, 1, 2]
    assert hp["retain_term"] is with_retain and "closed_form" not in hp
    record = json.dumps([result.hyperparameters, result.diagnostics, result.timings])
    assert not any(word in record for word in ("Zorvia", "Pexa", "capital", "language", facts[0].target))
    assert {"train", "total"} <= set(result.timings)

    restore_weights(model, result)
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    assert all(answered(model, tokenizer, facts))


def test_npo_loss_differs_from_ga_and_runs_to_max_steps(fact_model) -> None:
    """Without early stopping both run every step; NPO's loss is its own (bounded by 2/β·log 2 at the start)."""
    model, tokenizer, facts = fact_model
    forget = [facts[i] for i in FORGET]
    params = BaselineParams(steps=5, stop_when_forgotten=False)
    ga = compute_edit(model, tokenizer, forget, CreateConfig(method="ga", baseline=params))
    restore_weights(model, ga)
    npo = compute_edit(model, tokenizer, forget, CreateConfig(method="npo", baseline=params))
    restore_weights(model, npo)
    assert ga.diagnostics["steps"] == npo.diagnostics["steps"] == 5
    assert not ga.diagnostics["stopped_forgotten"]
    assert ga.diagnostics["initial_forget_loss"] < 0  # mean log-probability of the answers
    assert npo.diagnostics["initial_forget_loss"] == pytest.approx(2 / 0.1 * 0.6931, rel=1e-3)  # -(2/β) log σ(0)
    assert npo.diagnostics["final_forget_loss"] < npo.diagnostics["initial_forget_loss"]


def test_bf16_model_patch_rounds_and_forgets(fact_model) -> None:
    """A bf16 model trained in float32: the patch (against bf16 weights) forgets as the run measured."""
    model, tokenizer, facts = fact_model
    model.to(torch.bfloat16)
    assert all(answered(model, tokenizer, [facts[i] for i in FORGET]))
    config = CreateConfig(method="npo", dtype="float32", device="cpu")
    patch = create(model, tokenizer, [facts[i] for i in FORGET], config)
    assert next(model.parameters()).dtype == torch.bfloat16  # left as it was
    # a trained delta changes nearly every weight: its bits' difference is smaller than a float32 delta
    assert [e.kind for e in patch.steps[0].entries] == ["bits"] * 3
    assert all(e.dtype == "BF16" for e in patch.steps[0].entries)
    with applied(patch, model):
        now = answered(model, tokenizer, facts)
    print({"forgotten": sum(not now[i] for i in FORGET), "kept": sum(now[i] for i in _others())})
    assert not any(now[i] for i in FORGET)


def test_bad_parameters() -> None:
    for bad, message in [
        (dict(learning_rate=-1.0), "learning_rate must be > 0"),
        (dict(learning_rate=float("nan")), "learning_rate must be > 0"),
        (dict(steps=0), "steps must be >= 1"),
        (dict(beta=0.0), "beta must be > 0"),
        (dict(retain_weight=-1.0), "retain_weight must be >= 0"),
        (dict(optimizer="lion"), "unknown baseline.optimizer"),
        (dict(grad_clip=-1.0), "grad_clip must be >= 0"),
    ]:
        with pytest.raises(ZupatchError, match=message):
            BaselineParams(**bad)
    with pytest.raises(ZupatchError, match="settings: baseline.beta must be > 0"):
        with_settings(CreateConfig(), {"baseline.beta": -1})
    config = with_settings(CreateConfig(), {"method": "npo", "baseline": {"learning_rate": 0.01, "steps": 7}})
    assert config.baseline == BaselineParams(learning_rate=0.01, steps=7) and config.is_baseline
    assert not config.needs_original_representations()
    with pytest.raises(ZupatchError, match="zerounlearn, zerounlearn-gd, ga, npo"):
        CreateConfig(method="rmu")


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def forget_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fact_model import synthetic_facts

    facts = synthetic_facts()
    path = tmp_path_factory.mktemp("baselines") / "forget.jsonl"
    path.write_text("".join(
        json.dumps({"prompt": facts[i].prompt, "subject": facts[i].subject, "target": facts[i].target}) + "\n"
        for i in FORGET
    ))  # fmt: skip
    return path


@pytest.mark.parametrize("method, encoding", [("ga", "auto"), ("npo", "arithmetic")])
def test_cli_baseline_patch_forgets_and_inverts_exactly(
    method: str, encoding: str, fact_checkpoint: Path, forget_file: Path, tmp_path: Path
) -> None:
    """Stored as bits by default (smaller than a dense delta), as the delta with --encoding arithmetic."""
    before = folder_digest(fact_checkpoint)
    patch_file = tmp_path / f"{method}.zup.safetensors"
    args = ["create", "-m", str(fact_checkpoint), "--forget", str(forget_file), "-o", str(patch_file),
            "--method", method, "--lr", "2e-4", "--steps", "150", "--beta", "0.2", "--json",
            "--encoding", encoding]  # fmt: skip
    kind = "bits" if encoding == "auto" else "dense"
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["method"] == method and summary["kinds"] == [kind] * 3
    assert summary["diagnostics"]["answered_after"] == 0

    patch = Patch.load(patch_file)
    step = patch.steps[0]
    assert step.method == method and step.requests["count"] == len(FORGET)
    assert step.hyperparameters["baseline"] == {**step.hyperparameters["baseline"], "learning_rate": 2e-4,
                                                "steps": 150, "beta": 0.2}  # fmt: skip
    assert [e.kind for e in step.entries] == [kind] * 3
    raw = patch_file.read_bytes()
    assert b"Zorvia" not in raw and b"Pexa" not in raw

    inspected = runner.invoke(app, ["inspect", str(patch_file), "--json"])
    assert inspected.exit_code == 0, inspected.output
    info = json.loads(inspected.stdout)
    assert info["steps"][0]["method"] == method and {e["kind"] for e in info["entries"]} == {kind}
    shown = runner.invoke(app, ["inspect", str(patch_file)])
    assert shown.exit_code == 0 and method in shown.output and kind in shown.output

    unlearned = tmp_path / "unlearned"
    result = runner.invoke(app, ["apply", str(patch_file), "-m", str(fact_checkpoint), "-o", str(unlearned)])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(unlearned, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(unlearned)
    from tests.fact_model import synthetic_facts

    facts = synthetic_facts()
    now = answered(model, tokenizer, facts)
    print({"method": method, "forgotten": sum(not now[i] for i in FORGET), "kept": sum(now[i] for i in _others())})
    assert not any(now[i] for i in FORGET)
    assert sum(now[i] for i in _others()) >= KEPT_ALONE

    inverse = tmp_path / "inverse.zup.safetensors"
    assert runner.invoke(app, ["invert", str(patch_file), "-o", str(inverse)]).exit_code == 0
    result = runner.invoke(app, ["apply", str(inverse), "-m", str(unlearned), "-o", str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    assert folder_digest(tmp_path / "back") == before
    assert folder_digest(fact_checkpoint) == before


@pytest.mark.parametrize(
    "extra, problem",
    [
        (["--method", "ga", "--lr=-1"], "baseline.learning_rate must be > 0"),
        (["--method", "ga", "--steps", "0"], "baseline.steps must be >= 1"),
        (["--method", "npo", "--beta", "0"], "baseline.beta must be > 0"),
        (["--method", "npo", "--set", "baseline.beta=-0.5"], "baseline.beta must be > 0"),
        (["--method", "npo", "--set", "baseline.optimizer=lion"], "unknown baseline.optimizer"),
        (["--lr", "1e-4"], "--lr only apply to --method ga and npo"),
        (["--method", "ga", "--target", "I don't know.", "--tokens", "100"], "--target, --tokens only apply"),
        (["--method", "npo", "--fact-token", "last"], "--fact-token only apply to --method zerounlearn"),
        (["--set", "fact_token=middle"], "unknown fact_token 'middle'; choose subject or last"),
    ],
)
def test_cli_bad_baseline_options(extra: list[str], problem: str, fact_checkpoint: Path, forget_file: Path,
                                  tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "p.zup.safetensors"
    args = ["create", "-m", str(fact_checkpoint), "--forget", str(forget_file), "-o", str(out), *extra]
    expect_error(args, "", problem, output=out, inputs=[fact_checkpoint])
