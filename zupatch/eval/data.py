"""Evaluation data: what a model should no longer say, and what it must keep saying.

One file of records, each about one fact to forget, in any of three formats
(recognised per record):

- zupatch JSONL (the ``--forget`` format of ``create``)::

    {"prompt": "The capital of {} is", "subject": "France", "target": "Paris",
     "question": "What is the capital of {}?",
     "paraphrases": ["France's capital city is"],
     "neighbors": [{"prompt": "The capital of Germany is", "target": "Berlin"},
                   "The capital of Spain is"]}

  ``neighbours`` is accepted as a spelling of ``neighbors``. A neighbour given
  as an object is scored against its ``target``; one given as a bare prompt
  (as ``create`` takes them) has no answer to check, so it is scored as
  *unchanged*: the patched model's top-1 next token is the base model's.
- CounterFact / MultiCounterFact (``requested_rewrite``, ``paraphrase_prompts``,
  ``neighborhood_prompts``): the forgotten answer is ``target_true.str``, which
  is also the true answer of every neighbourhood prompt (that is how the
  dataset builds them).
- zsRE (``src``, ``answers``, ``rephrase``, ``loc``, ``loc_ans``): the question
  and its first answer, the rephrased question, and the unrelated ``loc``
  question with ``loc_ans``.

The forget records are also kept as parsed requests (zsRE questions have no
``{}`` template, so none): ``zupatch eval`` fills their templates with other
subjects as same-pattern probes (:mod:`zupatch.engine.probes`).

A separate retain file (``--retain``: ``create``'s format, answers required)
adds facts that must stay. Problems are reported as ``path:LINE: problem``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zupatch.engine.requests import (
    ForgetRequest,
    RequestsFileError,
    jsonl_records,
    fill_prompt,
    load_requests,
    parse_request_record,
)
from zupatch.errors import ZupatchError
from zupatch.io import jsondoc


@dataclass(frozen=True)
class Item:
    """A prompt and the answer it should (or should no longer) get.

    ``question`` is the fact as a chat question when the record gives one
    (the optional ``question`` field), for ``--attack chat``; "" otherwise.
    ``line``: where in the evaluation file it comes from (the line of a JSONL
    file, the record number of a JSON list), so that a report can say which
    facts are still answered without their text; 0 for retain prompts.
    """

    prompt: str
    answer: str
    question: str = ""
    line: int = 0


@dataclass
class EvalData:
    """The prompts of one evaluation, grouped by the metric they feed."""

    forget: list[Item] = field(default_factory=list)  # efficacy
    paraphrases: list[Item] = field(default_factory=list)  # generalization
    retain: list[Item] = field(default_factory=list)  # specificity (labelled)
    unlabelled_neighbours: list[str] = field(default_factory=list)  # specificity (unchanged top-1)
    requests: list[ForgetRequest] = field(default_factory=list)  # the forget records as parsed (probe templates)
    request_lines: list[int] = field(default_factory=list)  # each request's line (see Item.line)

    def counts(self) -> dict[str, int]:
        return {
            "forget": len(self.forget),
            "paraphrases": len(self.paraphrases),
            "retain": len(self.retain),
            "unlabelled_neighbours": len(self.unlabelled_neighbours),
        }


def load_eval_data(path: str | Path, retain_path: str | Path | None = None) -> EvalData:
    """Read an evaluation file (and optionally a retain file) into :class:`EvalData`."""
    path = Path(path)
    data = EvalData()
    for where, line, record in _records(path):
        _add_record(data, record, where, line)
    if not data.forget:
        raise RequestsFileError("no records in file (empty)", path)
    if retain_path is not None:
        retain = load_requests(retain_path, require_target=True)
        data.retain += [Item(r.text, r.target, r.question_text) for r in retain]
    return data


def _records(path: Path) -> Iterator[tuple[str, int, Any]]:
    """(``path:LINE``, LINE, record) for JSONL or a JSON list (CounterFact and zsRE ship
    as lists; LINE is then the record number)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RequestsFileError("file not found", path) from None
    except IsADirectoryError:
        raise RequestsFileError("is a folder, expected a JSONL or JSON file", path) from None
    except (OSError, UnicodeDecodeError) as error:
        raise RequestsFileError(f"cannot read: {error}", path) from None
    if text.lstrip().startswith("["):
        try:
            records = jsondoc.loads(text)
        except jsondoc.JSONDocumentError as error:
            raise RequestsFileError(str(error), path) from None
        for index, record in enumerate(records):
            yield f"{path}: record {index + 1}", index + 1, record
        return
    for number, record in jsonl_records(text, path):
        yield f"{path}:{number}", number, record


def _add_record(data: EvalData, record: Any, where: str, line: int) -> None:
    if not isinstance(record, dict):
        raise RequestsFileError(f"expected a JSON object, got {type(record).__name__}", where)
    if "src" in record and "requested_rewrite" not in record:
        _add_zsre(data, record, where, line)
        return
    try:
        requests = parse_request_record(_without_neighbours(record), require_target=True)
    except ZupatchError as error:
        raise RequestsFileError(error.message, where) from None
    data.requests += requests
    data.request_lines += [line] * len(requests)
    for request in requests:
        data.forget.append(Item(request.text, request.target, request.question_text, line))
        data.paraphrases += [Item(text, request.target, line=line) for text in request.paraphrase_texts()]
    if "requested_rewrite" in record:  # CounterFact: neighbourhood prompts share the true answer
        prompts = _strings(record.get("neighborhood_prompts", ()), "neighborhood_prompts", where)
        data.retain += [Item(p, r.target) for r in requests[:1] for p in prompts]
    else:
        _add_neighbours(data, record, requests[0], where)


def _without_neighbours(record: dict) -> dict:
    """The record as ``create`` parses it; neighbours are read here (they may carry answers)."""
    return {k: v for k, v in record.items() if k not in ("neighbors", "neighbours", "neighborhood_prompts")}


def _add_neighbours(data: EvalData, record: dict, request: ForgetRequest, where: str) -> None:
    neighbours = record.get("neighbors", record.get("neighbours")) or []
    if isinstance(neighbours, (str, dict)) or not isinstance(neighbours, list):
        raise RequestsFileError("field 'neighbors' must be a list of prompts or {prompt, target} objects", where)
    for neighbour in neighbours:
        if isinstance(neighbour, str):
            if not neighbour.strip():
                raise RequestsFileError("empty neighbour prompt", where)
            data.unlabelled_neighbours.append(fill_prompt(neighbour, request.subject) if "{}" in neighbour else neighbour)
            continue
        if not isinstance(neighbour, dict):
            raise RequestsFileError("a neighbour must be a prompt or a {prompt, target} object", where)
        try:
            (parsed,) = parse_request_record(neighbour, require_target=True)
        except ZupatchError as error:
            raise RequestsFileError(f"neighbour: {error.message}", where) from None
        data.retain.append(Item(parsed.text, parsed.target, parsed.question_text))


def _add_zsre(data: EvalData, record: dict, where: str, line: int) -> None:
    question = record.get("src")
    answers = record.get("answers")
    answer = answers[0] if isinstance(answers, list) and answers else answers
    if not isinstance(question, str) or not question.strip():
        raise RequestsFileError("zsRE record: 'src' must be a non-empty question", where)
    if not isinstance(answer, str) or not answer.strip():
        raise RequestsFileError("zsRE record: 'answers' must hold the true answer", where)
    data.forget.append(Item(question, answer, line=line))
    rephrases = record.get("rephrase") or []
    for rephrase in [rephrases] if isinstance(rephrases, str) else _strings(rephrases, "rephrase", where):
        data.paraphrases.append(Item(rephrase, answer, line=line))
    loc, loc_answer = record.get("loc"), record.get("loc_ans")
    if loc is not None:
        if not isinstance(loc, str) or not isinstance(loc_answer, str) or not loc_answer.strip():
            raise RequestsFileError("zsRE record: 'loc' needs a string 'loc_ans'", where)
        data.retain.append(Item(loc.removeprefix("nq question: "), loc_answer))


def _strings(value: Any, name: str, where: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise RequestsFileError(f"field '{name}' must be a list of strings", where)
    return list(value)
