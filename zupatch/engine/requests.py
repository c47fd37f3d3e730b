"""Forget requests: what the user wants the model to stop saying.

A requests file is JSONL, one request per line::

    {"prompt": "The capital of {} is", "subject": "France", "target": "Paris"}

``{}`` marks where the subject goes. A prompt may also contain the subject
literally (no ``{}``), or have no subject at all; then the prompt's last token
is the fact token. Optional ``paraphrases`` (prompts, ``{}`` allowed) and
``neighbours`` (prompts about other subjects whose answers must stay) are kept
for evaluation and retain keys; an optional ``question`` (``{}`` allowed) is
how a chat user would ask for the fact, used only by ``zupatch eval --attack
chat`` (``create`` ignores it).

CounterFact / MultiCounterFact records are accepted too, as JSONL or as one
JSON list: ``requested_rewrite`` gives prompt and subject, ``target_true.str``
is the answer to forget, ``paraphrase_prompts`` and ``neighborhood_prompts``
fill the optional fields.

Every problem is reported as ``path:LINE: problem``. Request text is never
logged or cached; :func:`request_digest` gives a salted hash for audit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from zupatch.errors import ZupatchError
from zupatch.io import jsondoc

SUBJECT_PLACEHOLDER = "{}"
_SURROGATE = re.compile("[\ud800-\udfff]")


class RequestsFileError(ZupatchError):
    """A forget/retain requests file is malformed (message names file and line)."""


@dataclass(frozen=True)
class ForgetRequest:
    """One fact to forget: ``prompt`` (``{}`` = subject), its ``subject``, the answer ``target``.

    ``subject`` may be empty when the prompt has no ``{}``: the prompt's last
    token is then the fact token. ``target`` may be empty for retain requests.
    """

    prompt: str
    subject: str
    target: str
    paraphrases: tuple[str, ...] = ()
    neighbours: tuple[str, ...] = ()
    question: str = ""  # the fact asked as a chat question ({} = subject); "" = none given
    fact_at_end: bool = False  # the fact token is the prompt's last token even with a subject (create's fact_token)

    def __post_init__(self) -> None:
        texts = {"prompt": self.prompt, "subject": self.subject, "target": self.target}
        texts.update({f"paraphrase {i + 1}": p for i, p in enumerate(self.paraphrases)})
        texts.update({f"neighbour {i + 1}": p for i, p in enumerate(self.neighbours)})
        for name, value in texts.items():
            problem = text_problem(value)
            if problem:
                raise ZupatchError(f"{name} {problem}")
        problem = _request_problem(self.prompt, self.subject)
        if problem:
            raise ZupatchError(problem)

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return fill_prompt(self.prompt, self.subject)

    def subject_span(self) -> tuple[int, int] | None:
        """Character span ``[start, end)`` of the subject in :attr:`text`, or None."""
        if not self.subject:
            return None
        at = self.prompt.find(SUBJECT_PLACEHOLDER)
        if at >= 0:
            return at, at + len(self.subject)
        at = self.prompt.rfind(self.subject)  # nearest to the answer
        return at, at + len(self.subject)

    def fact_char_end(self) -> int:
        """End of the fact token's text: subject end, else (or with ``fact_at_end``) end of the prompt."""
        span = None if self.fact_at_end else self.subject_span()
        return span[1] if span else len(self.text)

    def paraphrase_texts(self) -> list[str]:
        return [fill_prompt(p, self.subject) for p in self.paraphrases]

    @property
    def question_text(self) -> str:
        """The ``question`` with the subject filled in ("" when none was given)."""
        return fill_prompt(self.question, self.subject) if self.question else ""


def text_problem(value: str) -> str | None:
    """Why ``value`` is not text that can be encoded (hashed, tokenized), or None.

    A lone UTF-16 surrogate cannot be encoded as UTF-8. On the command line it
    comes from bytes that are not UTF-8 (Python keeps them as U+DC80-U+DCFF),
    e.g. text typed in another encoding; JSON files refuse it when read
    (:mod:`zupatch.io.jsondoc`).
    """
    if not isinstance(value, str) or value.isascii():
        return None
    found = _SURROGATE.search(value)
    if found is None:
        return None
    char = ord(found.group())
    hint = ", e.g. bytes that are not UTF-8 (another encoding)" if 0xDC80 <= char <= 0xDCFF else ""
    return f"has a lone UTF-16 surrogate (U+{char:04X} at character {found.start() + 1}), which is not text{hint}"


def fill_prompt(prompt: str, subject: str) -> str:
    return prompt.replace(SUBJECT_PLACEHOLDER, subject, 1) if subject else prompt


def at_last_token(request: ForgetRequest) -> ForgetRequest:
    """``request`` read at its prompt's last token (``fact_token = "last"``); its
    subject stays known, for choosing the subjects to protect."""
    return replace(request, fact_at_end=True)


def last_token_phrasings(requests: Sequence[ForgetRequest]) -> tuple[list[ForgetRequest], list[int]]:
    """Every paraphrase of every request, read at its last token, with the index of its
    request. Unlike the subject token, the last token is where any phrasing's answer
    is predicted, so a paraphrase that never names the subject ("The French capital
    is") has a key to edit too."""
    variants, owners = [], []
    for index, request in enumerate(requests):
        for paraphrase in request.paraphrases:
            named = bool(request.subject) and (SUBJECT_PLACEHOLDER in paraphrase or request.subject in paraphrase)
            if SUBJECT_PLACEHOLDER in paraphrase and not named:  # a '{}' with no subject to fill it
                continue
            subject = request.subject if named else ""
            variants.append(ForgetRequest(paraphrase, subject, request.target, fact_at_end=True))
            owners.append(index)
    return variants, owners


def _request_problem(prompt: str, subject: str) -> str | None:
    if not prompt.strip():
        return "empty prompt"
    placeholders = prompt.count(SUBJECT_PLACEHOLDER)
    if placeholders > 1:
        return f"prompt has {placeholders} '{{}}' placeholders; use exactly one for the subject"
    if placeholders == 1 and not subject:
        return "prompt has '{}' but no subject is given"
    if subject and placeholders == 0 and subject not in prompt:
        return "subject not found in prompt (use '{}' in the prompt to mark where it goes)"
    return None


# --------------------------------------------------------------------------- parsing


def load_requests(path: str | os.PathLike, *, require_target: bool = True) -> list[ForgetRequest]:
    """Parse a requests file (JSONL, or a JSON list of records).

    ``require_target=False`` is for retain/neighbour files, whose answers are
    optional. Raises :class:`RequestsFileError` naming file and line.
    """
    return [request for _, request in load_requests_with_lines(path, require_target=require_target)]


def load_requests_with_lines(
    path: str | os.PathLike, *, require_target: bool = True
) -> list[tuple[int, ForgetRequest]]:
    """Like :func:`load_requests`, each request with the 1-based line its record starts on,
    so later messages can name ``path:LINE`` (a CounterFact record with several
    rewrites gives several requests on one line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RequestsFileError("file not found", path) from None
    except (OSError, UnicodeDecodeError) as error:
        raise RequestsFileError(f"cannot read: {error}", path) from None
    records = _json_list_records(text, path) if text.lstrip().startswith("[") else jsonl_records(text, path)
    requests: list[tuple[int, ForgetRequest]] = []
    for line, record in records:
        requests += [(line, r) for r in _requests_from_record(record, require_target, where=f"{path}:{line}")]
    if not requests:
        raise RequestsFileError("no requests in file (empty)", path)
    return requests


def parse_request_record(record: Any, *, require_target: bool = True) -> list[ForgetRequest]:
    """The requests in one already-decoded record (plain or CounterFact style)."""
    return _requests_from_record(record, require_target, where="request")


def jsonl_records(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, jsondoc.loads(line)
        except jsondoc.JSONDocumentError as error:
            raise RequestsFileError(str(error), f"{path}:{number}") from None


def _json_list_records(text: str, path: Path) -> list[tuple[int, Any]]:
    """Decode ``[rec, rec, ...]`` element by element to know each record's line."""
    records: list[tuple[int, Any]] = []

    def line_at(index: int) -> int:
        return text.count("\n", 0, index) + 1

    def skip_space(index: int) -> int:
        while index < len(text) and text[index].isspace():
            index += 1
        return index

    index = skip_space(text.index("[") + 1)
    if index < len(text) and text[index] == "]":
        return records
    while True:
        try:
            record, end = jsondoc.raw_decode(text, index)
        except json.JSONDecodeError as error:
            raise RequestsFileError(f"malformed JSON: {error.msg}", f"{path}:{error.lineno}") from None
        except jsondoc.JSONDocumentError as error:
            raise RequestsFileError(str(error), f"{path}:{line_at(index)}") from None
        records.append((line_at(index), record))
        index = skip_space(end)
        if index < len(text) and text[index] == ",":
            index = skip_space(index + 1)
            continue
        if index < len(text) and text[index] == "]":
            if skip_space(index + 1) != len(text):
                raise RequestsFileError("malformed JSON: extra data after the list", f"{path}:{line_at(index + 1)}")
            return records
        raise RequestsFileError("malformed JSON: expected ',' or ']'", f"{path}:{line_at(index)}")


def _requests_from_record(record: Any, require_target: bool, where: str) -> list[ForgetRequest]:
    if not isinstance(record, dict):
        raise RequestsFileError(f"expected a JSON object, got {type(record).__name__}", where)
    if "requested_rewrite" in record:
        rewrites = record["requested_rewrite"]
        rewrites = rewrites if isinstance(rewrites, list) else [rewrites]
        extra = {
            "paraphrases": record.get("paraphrase_prompts", ()),
            "neighbours": record.get("neighborhood_prompts", ()),
        }
        requests = []
        for rewrite in rewrites:
            if not isinstance(rewrite, dict):
                raise RequestsFileError("'requested_rewrite' must be an object", where)
            target_true = rewrite.get("target_true")
            target = target_true.get("str") if isinstance(target_true, dict) else target_true
            fields = {"prompt": rewrite.get("prompt"), "subject": rewrite.get("subject"), "target": target, **extra}
            requests.append(_request_from_fields(fields, require_target, where, target_name="target_true.str"))
        return requests
    return [_request_from_fields(record, require_target, where, target_name="target")]


def _request_from_fields(fields: dict, require_target: bool, where: str, target_name: str) -> ForgetRequest:
    prompt = fields.get("prompt")
    if prompt is None:
        raise RequestsFileError("missing field 'prompt'", where)
    subject = fields.get("subject")
    subject = "" if subject is None else subject
    target = fields.get("target")
    target = "" if target is None else target
    for name, value in (("prompt", prompt), ("subject", subject), (target_name, target)):
        if not isinstance(value, str):
            raise RequestsFileError(f"field '{name}' must be a string", where)
    if require_target and not target.strip():
        raise RequestsFileError(f"missing field '{target_name}' (the answer to forget)", where)
    optional: dict[str, tuple[str, ...]] = {}
    for name in ("paraphrases", "neighbours"):
        value = fields.get(name) or ()
        if isinstance(value, str) or not all(isinstance(p, str) for p in value):
            raise RequestsFileError(f"field '{name}' must be a list of strings", where)
        optional[name] = tuple(value)
    question = fields.get("question")
    question = "" if question is None else question
    if not isinstance(question, str):
        raise RequestsFileError("field 'question' must be a string", where)
    if SUBJECT_PLACEHOLDER in question and not subject:
        raise RequestsFileError("the question has '{}' but no subject is given", where)
    problem = _request_problem(prompt, subject)
    if problem:
        raise RequestsFileError(problem, where)
    for paraphrase in optional["paraphrases"]:
        if SUBJECT_PLACEHOLDER in paraphrase and not subject:
            raise RequestsFileError("a paraphrase has '{}' but no subject is given", where)
    return ForgetRequest(prompt=prompt, subject=subject, target=target, question=question.strip(), **optional)


# --------------------------------------------------------------------------- audit


def new_salt() -> str:
    """A random salt for :func:`request_digest` (hex, 128 bits)."""
    return secrets.token_hex(16)


def request_digest(request: ForgetRequest, salt: str) -> str:
    """Salted sha256 of a request, for audit without storing its text.

    Whoever holds the request and the salt can check that a patch was made for
    it; the digest alone reveals nothing guessable without the salt.
    """
    canonical = json.dumps(
        {"prompt": request.prompt, "subject": request.subject, "target": request.target},
        ensure_ascii=False,
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(salt.encode("utf-8") + b"\0" + canonical.encode("utf-8")).hexdigest()


def request_digests(requests: Sequence[ForgetRequest], salt: str) -> list[str]:
    return [request_digest(r, salt) for r in requests]
