"""Forget-request files: formats, subject spans, and every error with its line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zupatch.engine.requests import (
    ForgetRequest,
    RequestsFileError,
    load_requests,
    new_salt,
    request_digest,
)
from zupatch.errors import ZupatchError


def write(tmp_path: Path, text: str, name: str = "forget.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_with_placeholder_literal_subject_and_no_subject(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '{"prompt": "The capital of {} is", "subject": "France", "target": "Paris"}\n'
        "\n"
        '{"prompt": "Tokyo is the capital of", "subject": "Tokyo", "target": "Japan"}\n'
        '{"prompt": "Water boils at", "target": "100 degrees", "paraphrases": ["At sea level water boils at"]}\n',
    )
    first, second, third = load_requests(path)
    assert first.text == "The capital of France is"
    assert first.subject_span() == (15, 21) and first.fact_char_end() == 21
    assert second.subject_span() == (0, 5)
    assert third.subject == "" and third.subject_span() is None
    assert third.fact_char_end() == len("Water boils at")
    assert third.paraphrases == ("At sea level water boils at",)


def test_counterfact_records_as_list_and_jsonl(tmp_path: Path) -> None:
    record = {
        "case_id": 0,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "subject": "Danielle Darrieux",
            "target_new": {"str": "English"},
            "target_true": {"str": "French"},
        },
        "paraphrase_prompts": ["Danielle Darrieux grew up speaking"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
    }
    for path in (
        write(tmp_path, json.dumps([record, record], indent=2), "cf.json"),
        write(tmp_path, json.dumps(record) + "\n" + json.dumps(record) + "\n", "cf.jsonl"),
    ):
        requests = load_requests(path)
        assert len(requests) == 2
        assert requests[0] == ForgetRequest(
            "The mother tongue of {} is",
            "Danielle Darrieux",
            "French",
            paraphrases=("Danielle Darrieux grew up speaking",),
            neighbours=("The mother tongue of Léon Blum is",),
        )


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("", None, "empty"),
        ("\n\n", None, "empty"),
        ("[]", None, "empty"),
        ('{"prompt": "a {}", "subject": "b", "target": "c"}\n{"prompt": ', 2, "malformed JSON"),
        ('{"subject": "b", "target": "c"}', 1, "missing field 'prompt'"),
        ('{"prompt": "x {}", "subject": "b"}', 1, "missing field 'target'"),
        ('{"prompt": "x {}", "subject": "b", "target": ""}', 1, "missing field 'target'"),
        ('\n{"prompt": "The capital of {} is", "target": "Paris"}', 2, "no subject"),
        ('{"prompt": "The capital is", "subject": "France", "target": "Paris"}', 1, "subject not found"),
        ('{"prompt": "{} and {}", "subject": "a", "target": "b"}', 1, "placeholders"),
        ('{"prompt": "  ", "target": "b"}', 1, "empty prompt"),
        ('{"prompt": 3, "target": "b"}', 1, "must be a string"),
        ('{"prompt": "a", "target": "b", "paraphrases": "c"}', 1, "list of strings"),
        ('["not an object"]', 1, "expected a JSON object"),
        ('[\n  {"prompt": "ok", "target": "t"},\n  {"prompt": "x {}", "target": "t"}\n]', 3, "no subject"),
        ('[\n  {"prompt": "ok", "target": "t"}\n  {"prompt": "x"}\n]', 3, "expected ',' or ']'"),
        ('{"requested_rewrite": {"prompt": "x {}", "subject": "s"}}', 1, "target_true.str"),
    ],
)
def test_errors_name_file_and_line(tmp_path: Path, text: str, line: int | None, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RequestsFileError) as error:
        load_requests(path)
    message = str(error.value)
    where = f"{path}:{line}: " if line else f"{path}: "
    assert message.startswith(where), message
    assert problem in message
    assert "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ZupatchError, match="not found"):
        load_requests(tmp_path / "nope.jsonl")


def test_retain_files_may_omit_targets(tmp_path: Path) -> None:
    path = write(tmp_path, '{"prompt": "The capital of {} is", "subject": "Spain"}\n')
    (request,) = load_requests(path, require_target=False)
    assert request.target == ""


def test_salted_digest_hides_the_request() -> None:
    request = ForgetRequest("The capital of {} is", "France", "Paris")
    salt = new_salt()
    digest = request_digest(request, salt)
    assert len(digest) == 64 and "Paris" not in digest
    assert digest == request_digest(ForgetRequest("The capital of {} is", "France", "Paris"), salt)
    assert digest != request_digest(request, new_salt())
    assert digest != request_digest(ForgetRequest("The capital of {} is", "France", "Lyon"), salt)


@pytest.mark.parametrize("field", ["prompt", "subject", "target", "paraphrases", "neighbours"])
def test_a_lone_surrogate_is_refused_before_it_is_hashed(field: str) -> None:
    """Text from the command line (or built in code) with a lone surrogate cannot be encoded: a clear error."""
    fields = {"prompt": "The capital of {} is", "subject": "France", "target": "Paris", "paraphrases": ("{} is in",),
              "neighbours": ("The capital of Spain is",)}  # fmt: skip
    bad = "x\udcff"
    fields[field] = (bad,) if field in ("paraphrases", "neighbours") else fields[field].replace("a", bad, 1)
    with pytest.raises(ZupatchError, match=r"has a lone UTF-16 surrogate \(U\+DCFF at character \d+\)") as error:
        ForgetRequest(**fields)
    assert str(error.value).startswith({"paraphrases": "paraphrase 1", "neighbours": "neighbour 1"}.get(field, field))
