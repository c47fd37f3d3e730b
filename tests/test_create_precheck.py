"""`create` checks that the model gives each target before editing (tests/fact_model.py's trained Llama).

A request whose target the model does not give has nothing to forget: the
user is told (a warning naming file and line, never the text unless
--verbose), --strict refuses it, and the summary lists it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.fact_model import synthetic_facts
from tests.test_hostile import expect_error
from zupatch.cli.main import app
from zupatch.engine.api import create, create_from_checkpoint
from zupatch.engine.create import CreateConfig
from zupatch.engine.precheck import (
    TargetNotGivenError,
    TargetNotGivenWarning,
    TargetStillGivenError,
    TargetStillGivenWarning,
    check_targets,
    ordinal,
)
from zupatch.engine.targets import target_nll
from zupatch.engine.requests import ForgetRequest
from zupatch.engine.settings import with_settings

runner = CliRunner()
FAST = ["--layers", "1,2", "--tokens", "200", "--set", "neutral.max_steps=3", "--set", "original.max_steps=3",
        "--set", "contexts.prefix_tokens=3", "--set", "neighbours.subjects=0", "--set", "stats.sample_length=16"]  # fmt: skip
#: The settings that forget the tiny model's facts (tests/test_engine_create.py's BEHAVIOUR).
FORGETS = ["--tokens", "4096", "--set", "neutral.clamp_norm_factor=4.0", "--set", "closed_form.lambda_retain=2000",
           "--set", "closed_form.lambda_forget=50"]  # fmt: skip
FAST_SETTINGS = {"layers": [1, 2], "stats.sampled_token_budget": 200, "stats.sample_length": 16,
                 "neutral.max_steps": 3, "original.max_steps": 3, "contexts.prefix_tokens": 3,
                 "neighbours.subjects": 0}  # fmt: skip


def _facts() -> tuple[ForgetRequest, ForgetRequest, ForgetRequest]:
    """Two facts the model knows, and Zorvia's capital with another country's capital as the answer."""
    facts = synthetic_facts()
    zorvia, other = facts[0], facts[1]  # "The capital of {}": Zorvia, Quenth
    assert zorvia.subject == "Zorvia" and other.target != zorvia.target
    return zorvia, facts[22], ForgetRequest(zorvia.prompt, zorvia.subject, other.target)


def _line(request: ForgetRequest) -> str:
    return json.dumps({"prompt": request.prompt, "subject": request.subject, "target": request.target}) + "\n"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    good, good2, wrong = _facts()
    mixed = tmp_path / "forget.jsonl"
    mixed.write_text(_line(good) + "\n" + _line(wrong) + _line(good2))  # the wrong one: request 2, on line 3
    known = tmp_path / "known.jsonl"
    known.write_text(_line(good) + _line(good2))
    return {"mixed": mixed, "known": known}


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZUPATCH_CACHE", str(tmp_path / "cache"))


def _args(checkpoint: Path, forget: Path, out: Path, *extra: str) -> list[str]:
    return ["create", "-m", str(checkpoint), "--forget", str(forget), "-o", str(out), *extra]


def test_check_ranks_each_target_token(fact_model) -> None:
    model, tokenizer, facts = fact_model
    good, _, wrong = _facts()
    two_tokens = ForgetRequest(good.prompt, good.subject, f"{good.target} {wrong.target}")  # 2nd token: "." is next
    checks = check_targets(model, tokenizer, [*facts, wrong, two_tokens])
    assert all(c.given and c.ranks == (1,) for c in checks[:48])
    assert not checks[48].given and checks[48].ranks[0] > 1 and checks[48].index == 48
    assert checks[49].ranks[0] == 1 and checks[49].ranks[1] > 1
    assert checks[49].reason() == f"token 2 of its 2 target tokens is ranked {ordinal(checks[49].ranks[1])}"
    requests = [*facts, wrong, two_tokens]  # the NLL is target_nll's, from the same forward pass
    expected = target_nll(model, tokenizer, requests, [r.target for r in requests])
    assert [c.nll for c in checks] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st", "111th"]  # fmt: skip


def test_cli_warns_without_the_text_and_lists_indices(fact_checkpoint: Path, files: dict, tmp_path: Path) -> None:
    out = tmp_path / "p.zup.safetensors"
    result = runner.invoke(app, _args(fact_checkpoint, files["mixed"], out, *FAST))
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning:") and "does not give" in line]
    assert len(warned) == 1, result.stderr  # (three steps may leave the others given: warned apart, tested below)
    assert f"{files['mixed']}:3: the model does not give this target now (nothing to forget)" in warned[0]
    assert "its first target token is ranked" in warned[0]
    for secret in ("Zorvia", "capital", *_facts()[2].target.split()):
        assert secret not in result.output
    assert out.exists()

    out2 = tmp_path / "p2.zup.safetensors"
    result = runner.invoke(app, _args(fact_checkpoint, files["mixed"], out2, *FAST, "--json", "--verbose"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["targets_not_given"] == [2] and summary["requests"] == 3
    (warned,) = [line for line in result.stderr.splitlines() if line.startswith("warning:") and "does not give" in line]
    assert f':3 ("The capital of Zorvia" → "{_facts()[2].target}"): the model does not give' in warned


def test_cli_strict_refuses_and_writes_nothing(fact_checkpoint: Path, files: dict, tmp_path: Path) -> None:
    out = tmp_path / "p.zup.safetensors"
    for method in ("zerounlearn", "npo"):
        line = expect_error(_args(fact_checkpoint, files["mixed"], out, "--strict", "--method", method),
                            f"{files['mixed']}:3", "does not give this target now", output=out,
                            inputs=[files["mixed"]])  # fmt: skip
        assert "strict" in line and "Zorvia" not in line

def test_cli_known_targets_give_no_warning(fact_checkpoint: Path, files: dict, tmp_path: Path) -> None:
    out = tmp_path / "p.zup.safetensors"
    args = _args(fact_checkpoint, files["known"], out, *FORGETS, "--strict", "--json")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["targets_not_given"] == [] and summary["targets_still_given"] == []
    assert "warning" not in result.stderr


def test_python_api_reports_warns_and_refuses(fact_model, fact_checkpoint: Path) -> None:
    model, tokenizer, _ = fact_model
    requests = list(_facts())
    config = with_settings(CreateConfig(), FAST_SETTINGS)
    ga = with_settings(config, {"method": "ga", "baseline.steps": 1})
    with pytest.warns(TargetNotGivenWarning, match=r"^request 3: the model does not give this target now"):
        report = create(model, tokenizer, requests, config, return_report=True)
    assert report.targets_not_given == [3] and report.summary()["targets_not_given"] == [3]
    with pytest.raises(TargetNotGivenError, match="request 3: .*strict"):
        create(model, tokenizer, requests, config, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TargetNotGivenWarning)  # known targets: no warning
        create(model, tokenizer, requests[:2], ga)
    weak = with_settings(config, {"closed_form.lambda_forget": 1e-9, "refine.max_passes": 1})
    with pytest.warns(TargetStillGivenWarning, match=r"^request 1: the patched model still gives this target"):
        report = create(model, tokenizer, requests[:2], weak, return_report=True)
    assert report.targets_still_given == [1, 2]
    with pytest.raises(TargetStillGivenError, match=r"^request 1: .*still gives this target \(and 1 more\); strict"):
        create(model, tokenizer, requests[:2], weak, strict=True)
    with pytest.raises(TargetStillGivenError, match=r"^a.jsonl:1: .*strict"):
        create_from_checkpoint(fact_checkpoint, requests[:2], weak, strict=True, request_names=["a.jsonl:1", "b"])

    report = create_from_checkpoint(fact_checkpoint, requests, ga)
    assert report.targets_not_given == [3] and [c.given for c in report.target_checks] == [True, True, False]
    with pytest.raises(TargetNotGivenError, match="^a.jsonl:9: .*ranked"):
        create_from_checkpoint(fact_checkpoint, requests, config, strict=True, request_names=["x", "y", "a.jsonl:9"])


def test_cli_a_target_still_given_after_the_edit_is_named_and_strict_refuses(
    fact_checkpoint: Path, files: dict, tmp_path: Path
) -> None:  # fmt: skip
    """An edit too weak to forget (λ_f near 0, one pass): the summary lists the
    requests, a warning names each by file and line (never its text), and
    --strict writes nothing."""
    weak = [*FAST, "--set", "closed_form.lambda_forget=1e-9", "--set", "refine.max_passes=1"]
    out = tmp_path / "p.zup.safetensors"
    result = runner.invoke(app, _args(fact_checkpoint, files["known"], out, *weak, "--json"))
    # (the Python API: one TargetStillGivenWarning per request, test_python_api_reports_warns_and_refuses)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["targets_still_given"] == [1, 2]
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warned == [f"warning: {files['known']}:{n}: the patched model still gives this target "
                      "(docs/create.md, 'Still given after the edit')" for n in (1, 2)]  # fmt: skip
    for secret in ("Zorvia", "capital", *_facts()[0].target.split()):
        assert secret not in result.stderr
    assert out.exists()

    out = tmp_path / "strict.zup.safetensors"
    line = expect_error(_args(fact_checkpoint, files["known"], out, *weak, "--strict"), f"{files['known']}:1",
                        "still gives this target (and 1 more)", output=out, inputs=[files["known"]])  # fmt: skip
    assert "strict" in line and "Zorvia" not in line
