"""Model cards (``README.md``) for patch repos and for patched checkpoints.

A card is a pure function of its inputs: no clock, no tool version of the
pusher, no random order. Pushing the same patch again therefore produces the
same bytes, and the push is a no-op. A card never contains request text: it
reads only the request *count* from the patch metadata, whatever else (salted
hashes, opted-in text) the metadata holds. With an eval report (``push
--eval-report``) the card shows the report's figures for this patch and the
base, without and after each attack; only figures and attack names, never
the report's prompts or continuations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zupatch.hub.pull import PATCH_FILENAME, is_hub_repo_id
from rich.filesize import decimal as human_bytes

if TYPE_CHECKING:
    from zupatch.patch.format import Patch

TAGS = ["zupatch", "unlearning", "knowledge-unlearning", "model-patch"]
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layers_of(names: list[str]) -> list[int]:
    """Layer indices named in tensor names (``model.layers.12.mlp...`` -> 12)."""
    found = {int(m.group(1)) for n in names if (m := _LAYER.search(n))}
    return sorted(found)


def _yaml(meta: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False).strip()


def _scalar(value: Any) -> str | None:
    """A hyperparameter value fit for the card (scalars only, short)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, str) and len(value) <= 60 and "\n" not in value:
        return repr(value)
    return None


def _local_name(base: str | None) -> str:
    """A base that is not a Hub repo id (a local folder): its last component only, never the user's path."""
    if not base:
        return "unknown"
    return base.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or "unknown"


def _md(text: str) -> str:
    """Escape what would break a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


@dataclass(frozen=True)
class PatchCardInfo:
    """What a patch card says besides the patch itself."""

    repo_id: str
    filename: str = PATCH_FILENAME
    revision: str | None = None  # branch the patch was pushed to (None = main)
    base_model: str | None = None  # overrides the patch's base_model (must be a Hub repo id)
    base_bytes: int | None = None  # size of the base checkpoint's weights, when known
    file_bytes: int = 0
    file_sha256: str = ""
    robustness: tuple[str, ...] = ()  # Markdown lines from robustness_section(), () = no eval report


def card_base_model(patch: "Patch", override: str | None = None) -> str | None:
    """The Hub repo id the card names as base, or None when the patch's base is not one."""
    base = override or patch.base_model
    return base if base and is_hub_repo_id(base) else None


def apply_command(info: PatchCardInfo, patch: "Patch") -> str:
    ref = info.repo_id
    if info.revision and info.revision != "main":
        ref += f"@{info.revision}"
    if info.filename != PATCH_FILENAME:
        ref += f":{info.filename}"
    base = card_base_model(patch, info.base_model)
    inverse = bool(patch.steps) and patch.steps[0].inverted
    if inverse:  # it applies to the patched model, not to the recorded base
        base = None
    cmd = f"zupatch apply {ref} --model {base or ('PATH/TO/PATCHED/MODEL' if inverse else 'PATH/TO/BASE')}"
    if base and patch.base_revision:
        cmd += f" --revision {patch.base_revision}"
    name = info.repo_id.split("/")[-1]
    return cmd + f" -o ./{name}-applied"


def patch_card(patch: "Patch", info: PatchCardInfo) -> str:
    """The README.md of a patch repo: YAML metadata, what the patch does, how to apply it, sizes, provenance."""
    base = card_base_model(patch, info.base_model)
    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
    meta["library_name"] = "zupatch"
    meta["tags"] = list(TAGS)
    names = patch.tensor_names
    layers = layers_of(names)
    requests = sum(int(s.requests.get("count", 0) or 0) for s in patch.steps if isinstance(s.requests, dict))
    methods = sorted({s.method for s in patch.steps})
    title = info.repo_id.split("/")[-1]
    base_text = f"[{base}](https://huggingface.co/{base})" if base else f"`{_local_name(patch.base_model)}`"

    out: list[str] = ["---", _yaml(meta), "---", "", f"# {title}", ""]
    facts = f"{requests} fact{'s' if requests != 1 else ''} (forget request{'s' if requests != 1 else ''})"
    effect = (
        f"restores {facts} that an earlier patch made the model forget (it is the inverse of that patch)"
        if patch.steps and all(s.inverted for s in patch.steps)
        else f"makes the model forget {facts}"
    )
    out += [
        f"A [zupatch](https://pypi.org/project/zupatch/) unlearning patch for {base_text}: a small, exact and "
        f"invertible edit of a few MLP weight matrices that {effect}. "
        "The requests themselves are not published: neither the patch nor this card contains their text.",
        "",
        "## What it does",
        "",
        f"- Method: {', '.join(f'`{m}`' for m in methods)}",
        f"- Layers: {', '.join(map(str, layers)) if layers else 'n/a'}"
        f" ({len(names)} tensor{'s' if len(names) != 1 else ''} changed)",
        f"- Forget requests: {requests}",
        f"- Steps: {len(patch.steps)}" + (" (stacked patches)" if len(patch.steps) > 1 else ""),
        "",
        "| step | method | requests | tensors | hyperparameters |",
        "|---|---|---|---|---|",
    ]
    for i, step in enumerate(patch.steps):
        hp = [f"{k}={v}" for k, raw in sorted(step.hyperparameters.items()) if (v := _scalar(raw)) is not None]
        count = step.requests.get("count", 0) if isinstance(step.requests, dict) else 0
        method = step.method + (" (inverse)" if step.inverted else "")
        out.append(f"| {i} | {_md(method)} | {count} | {len(step.entries)} | {_md(', '.join(hp)) or '-'} |")
    out += [
        "",
        *info.robustness,
        "## How to apply",
        "",
        "```bash",
        "pip install zupatch",
        apply_command(info, patch),
        "```",
        "",
        "`zupatch` downloads the patch and the base through the Hugging Face cache, checks the sha256 of every "
        "tensor it changes (it refuses any other base), and writes a patched copy of the checkpoint without "
        "loading the model. "
        f"`zupatch verify {info.repo_id} --model ./{title}-applied` then exits with code 3 (already applied); "
        f"`zupatch invert {info.repo_id} -o restore.zup.safetensors` gives the patch that restores the base bit "
        "for bit.",
        "",
        "## Size",
        "",
        "| | bytes | |",
        "|---|---|---|",
        f"| patch file (`{info.filename}`) | {info.file_bytes:,} | {human_bytes(info.file_bytes)} |",
    ]
    touched = patch.touched_bytes()
    out.append(
        f"| tensors it changes | {touched:,} | {human_bytes(touched)}"
        + (f" (patch = {100 * info.file_bytes / touched:.2f}%)" if touched else "")
        + " |"
    )
    if info.base_bytes:
        out.append(
            f"| base model weights | {info.base_bytes:,} | {human_bytes(info.base_bytes)} "
            f"(patch = {100 * info.file_bytes / info.base_bytes:.3f}%) |"
        )
    out += [
        "",
        "## Base it expects",
        "",
        f"- Base model: {base_text}" + (" with the original patch applied" if patch.steps[0].inverted else ""),
        f"- Base revision: `{patch.base_revision}`" if patch.base_revision else "- Base revision: not recorded",
        "",
        "The patch stores the sha256 of every tensor it changes, before and after. `zupatch apply` checks them: "
        "another revision of the base works if (and only if) those tensors are identical; zupatch warns when the "
        "revision differs from the recorded one.",
        "",
        "| tensor | sha256 before | sha256 after |",
        "|---|---|---|",
    ]
    for n in names:
        out.append(f"| `{n}` | `{patch.sha256_before(n)[:16]}…` | `{patch.sha256_after(n)[:16]}…` |")
    versions = sorted({s.tool_version for s in patch.steps if s.tool_version})
    out += [
        "",
        "## Provenance",
        "",
        f"- Patch file sha256: `{info.file_sha256}`",
        f"- Created: {patch.created or 'unknown'}" + (f" with zupatch {', '.join(versions)}" if versions else ""),
        "- Format: zupatch patch (one `.safetensors` file; metadata as JSON under the `zupatch` key)",
        "",
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------- eval report


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _pair(base: dict[str, Any] | None, patched: dict[str, Any] | None, key: str = "answered") -> str:
    """``base → patch`` of one share, "–" where there is no figure."""
    if not base or not patched or not base.get("n"):
        return "–"
    return f"{_pct(base.get(key))} → {_pct(patched.get(key))}"


def _one(section: dict[str, Any] | None, key: str, count: str = "n") -> str:
    return _pct(section.get(key)) if section and section.get(count) else "–"


def _perplexities(base: dict[str, Any] | None, patched: dict[str, Any] | None) -> str:
    if not base or not patched or base.get("perplexity") is None or patched.get("perplexity") is None:
        return "–"
    return f"{base['perplexity']:.2f} → {patched['perplexity']:.2f}"


def _row(name: str, base: dict[str, Any], patched: dict[str, Any]) -> str:
    spec = patched.get("specificity")
    cells = [
        _pair(base.get("efficacy"), patched.get("efficacy")),
        _pair(base.get("generalization"), patched.get("generalization")),
        _one(spec, "kept"),
        _one(spec, "derived_unchanged", "derived_n"),
        _perplexities(base.get("fluency"), patched.get("fluency")),
    ]
    return f"| {_md(name)} | " + " | ".join(cells) + " |"


def _details(attack: dict[str, Any], entry: dict[str, Any]) -> str | None:
    """One line saying what an attack did, from its settings and details (figures and names only)."""
    details, settings = entry.get("details") or {}, attack.get("settings") or {}
    kind = attack.get("attack")
    if kind == "relearn":
        return (f"`{attack['name']}`: {details.get('steps', settings.get('steps'))} Adam steps, learning rate "
                f"{details.get('learning_rate', settings.get('learning_rate'))}, on {details.get('trained_on', '?')} "
                f"({details.get('texts', '?')} texts, none mentioning a forgotten fact)")  # fmt: skip
    if kind == "quant":
        return f"`{attack['name']}`: every decoder linear weight through GGUF {details.get('type')} and back"
    if kind == "lens":
        return f"`{attack['name']}`: answer top-1 at any layer {details.get('from_layer')}–{details.get('to_layer')}"
    if kind == "topk":
        return f"`{attack['name']}`: answer's first token among the {details.get('k')} most likely"
    if kind == "chat":
        return "`chat`: asked as a question through the chat template, greedy reply contains the answer"
    return None


def robustness_section(report: dict[str, Any], patch_sha256: str) -> tuple[str, ...]:
    """Markdown lines of the card's "Robustness" section, from a ``zupatch eval --json`` report.

    The report's entry for this patch is found by the patch file's sha256;
    a :class:`ValueError` says what is wrong with the report.
    """
    from zupatch.eval import REPORT_FORMAT, REPORT_VERSION

    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise ValueError("not a `zupatch eval --json` report")
    if report.get("version") != REPORT_VERSION:
        raise ValueError(f"report version {report.get('version')}, expected {REPORT_VERSION}: run zupatch eval again")
    models = report.get("models") or []
    base = next((m for m in models if m.get("patch") is None), None)
    entry = next((m for m in models if (m.get("patch") or {}).get("sha256") == patch_sha256), None)
    if base is None or entry is None:
        raise ValueError(f"the report has no figures for this patch (sha256 {patch_sha256[:12]}…): "
                         "evaluate this very file with zupatch eval -p")  # fmt: skip
    data = report.get("data") or {}
    attacks = report.get("attacks") or []
    out = [
        "## Robustness",
        "",
        f"Measured with `zupatch eval` on {data.get('forget', '?')} forgotten facts, {data.get('paraphrases', 0)} "
        f"paraphrases, {data.get('retain', 0)} other facts and {data.get('derived_probes', 0)} same-pattern probes "
        '(the forget templates filled with other subjects). "a → b": the base model, then with this patch. '
        "Answered: greedy decoding still gives the answer, or the attack extracts it (lower is better after "
        "the patch); kept: other facts the base answers that the patched model still answers; probes "
        "unchanged: same-pattern prompts whose top next token is the base's.",
        "",
        "| attack | forget facts answered | paraphrases answered | other facts kept | probes unchanged | perplexity |",
        "|---|---|---|---|---|---|",
        _row("none", base, entry),
    ]
    notes = []
    for index, attack in enumerate(attacks):
        name = str(attack.get("name", "?"))
        try:
            attacked_base, attacked = base["attacks"][index], entry["attacks"][index]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"the report's models have no result for attack {name!r}") from None
        if attacked.get("skipped"):
            out.append(f"| {_md(name)} | skipped: {_md(str(attacked['skipped']))} | | | | |")
            continue
        out.append(_row(name, attacked_base, attacked))
        note = _details(attack, attacked)
        if note:
            notes.append(f"- {note}")
    if notes:
        out += ["", "What each attack did (`zupatch eval --attack`, see the zupatch docs):", "", *notes]
    return tuple(out + [""])


def checkpoint_card(
    repo_id: str,
    *,
    base_model: str | None,
    base_revision: str | None,
    patch: "Patch",
    patch_ref: str,
    patch_repo_id: str | None,
    patch_sha256: str,
) -> str:
    """The README.md of a full patched checkpoint pushed with ``zupatch apply --push-to``.

    ``patch_ref`` is how the patch was named (a Hub reference when ``patch_repo_id``
    is set; for a local file only its name is shown, never the user's path).
    """
    base = base_model if base_model and is_hub_repo_id(base_model) else None
    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
    meta["library_name"] = "transformers"
    meta["tags"] = list(TAGS)
    requests = sum(int(s.requests.get("count", 0) or 0) for s in patch.steps if isinstance(s.requests, dict))
    layers = layers_of(patch.tensor_names)
    title = repo_id.split("/")[-1]
    base_text = f"[{base}](https://huggingface.co/{base})" if base else f"`{_local_name(base_model)}`"
    if patch_repo_id:
        patch_text = f"[{patch_ref}](https://huggingface.co/{patch_repo_id})"
    else:
        patch_text = f"`{patch_ref.replace(chr(92), '/').rsplit('/', 1)[-1]}`"  # a local file: its name only
        patch_ref = "PATCH_FILE"
    out = [
        "---",
        _yaml(meta),
        "---",
        "",
        f"# {title}",
        "",
        f"A patched copy of {base_text}"
        + (f" (revision `{base_revision}`)" if base_revision else "")
        + f", made by applying the zupatch unlearning patch {patch_text} "
        f"(sha256 `{patch_sha256}`). It forgets {requests} fact{'s' if requests != 1 else ''}; "
        f"{len(patch.tensor_names)} tensor{'s' if len(patch.tensor_names) != 1 else ''} "
        f"in layer{'s' if len(layers) != 1 else ''} {', '.join(map(str, layers)) or 'n/a'} differ from the base, "
        "everything else is the base's, byte for byte. The forget requests are not published.",
        "",
        "It loads like its base:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        "```",
        "",
        "If you have the base already, the patch alone is a much smaller download, and `zupatch verify` "
        "checks (by sha256 of the changed tensors) that this checkpoint is exactly the base plus the patch:",
        "",
        "```bash",
        "pip install zupatch",
        f"zupatch apply {patch_ref} --model {base or 'PATH/TO/BASE'}"
        + (f" --revision {base_revision}" if base and base_revision else "")
        + f" -o ./{title}",
        f"zupatch verify {patch_ref} --model {repo_id}   # exit code 3: this checkpoint has the patch",
        "```",
        "",
    ]
    return "\n".join(out)

