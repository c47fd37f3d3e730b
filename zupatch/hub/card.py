"""Model cards (``README.md``) for patch repos and for patched checkpoints.

A card is a pure function of its inputs: no clock, no tool version of the
pusher, no random order. Pushing the same patch again therefore produces the
same bytes, and the push is a no-op. A card never contains request text: it
reads only the request *count* from the patch metadata, whatever else (salted
hashes, opted-in text) the metadata holds. With an eval report (``push
--eval-report``) the card shows the report's figures for this patch and the
base, without and after each attack; only figures and attack names, never
the report's prompts or continuations.


Key-statistics repos (``zupatch stats push``, a dataset repo) get their own
card (:func:`stats_card`): the model, revision, layers, corpus description and
token count, never text.

Three kinds of card, one per push mode, each with its Hub relation to the
base (``base_model_relation`` in the YAML metadata, docs/publishing.md): a
patch repo (none: a patch is not a model, the Hub infers what it shows), a
patched checkpoint (``finetune``: the base's weights, some of them changed)
and a PEFT adapter (``adapter``).

zupatch is not published on PyPI, so no card says ``pip install zupatch``:
cards install it from its source repository when the pusher names one
(``--source-url``), else from a local clone (:func:`install_lines`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.filesize import decimal as human_bytes

from zupatch.hub.pull import PATCH_FILENAME, is_hub_repo_id

if TYPE_CHECKING:
    from zupatch.engine.shared_stats import StatsManifest
    from zupatch.patch.format import Patch

TAGS = ["zupatch", "unlearning", "knowledge-unlearning", "model-patch"]
_SOURCE_URL = re.compile(r"^https://[A-Za-z0-9.-]+(?::\d+)?/[A-Za-z0-9._~/%+-]*$")
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


def check_source_url(url: str | None) -> str | None:
    """A zupatch source repository URL fit for a card's install line (https, no spaces or quotes), or None."""
    if url is not None and not _SOURCE_URL.match(url):
        from zupatch.errors import ZupatchError

        raise ZupatchError("--source-url must be an https:// URL of zupatch's git repository", url)
    return url


def install_lines(source_url: str | None) -> list[str]:
    """Shell lines that install zupatch: it is not on PyPI, so from its repository or a clone of it."""
    if source_url:
        return [f'pip install "zupatch @ git+{check_source_url(source_url)}"']
    return [
        "# zupatch is not on PyPI: install it from a clone of its source repository",
        "pip install ./zupatch   # the folder of your clone",
    ]


def _zupatch_link(source_url: str | None) -> str:
    return f"[zupatch]({source_url})" if source_url else "zupatch"


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
    source_url: str | None = None  # zupatch's git repository, for the install line (see install_lines)


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
    requests = patch.request_count
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
        f"A {_zupatch_link(info.source_url)} unlearning patch for {base_text}: a small, exact and "
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
        *install_lines(info.source_url),
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
    if kind == "mention":
        return f"`mention`: after each of {details.get('sentences')} sentences naming the subject, greedy answer"
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
        meta["base_model_relation"] = "finetune"  # the base's weights, some changed (docs/publishing.md)
    meta["library_name"] = "transformers"
    meta["tags"] = list(TAGS)
    requests = patch.request_count
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
        *install_lines(None),
        f"zupatch apply {patch_ref} --model {base or 'PATH/TO/BASE'}"
        + (f" --revision {base_revision}" if base and base_revision else "")
        + f" -o ./{title}",
        f"zupatch verify {patch_ref} --model {repo_id}   # exit code 3: this checkpoint has the patch",
        "```",
        "",
    ]
    return "\n".join(out)


@dataclass(frozen=True)
class AdapterCardInfo:
    """What an adapter card says besides the patch: the exported adapter and where it goes."""

    repo_id: str
    base_model: str  # a Hub repo id (an adapter repo needs one)
    base_revision: str | None
    modules: tuple[tuple[str, int], ...]  # (module path, rank)
    adapter_bytes: int
    patch_sha256: str
    source_url: str | None = None


def adapter_card(patch: "Patch", info: AdapterCardInfo) -> str:
    """The README.md of a PEFT adapter repo (``zupatch push --as-adapter``): the Hub lists it among the base's adapters."""
    meta: dict[str, Any] = {
        "base_model": info.base_model,
        "base_model_relation": "adapter",
        "library_name": "peft",
        "tags": [*TAGS, "lora"],
    }
    requests = patch.request_count
    layers = layers_of([m for m, _ in info.modules])
    title = info.repo_id.split("/")[-1]
    base_text = f"[{info.base_model}](https://huggingface.co/{info.base_model})"
    revision = f', revision="{info.base_revision}"' if info.base_revision else ""
    versions = sorted({s.tool_version for s in patch.steps if s.tool_version})
    out: list[str] = [
        "---",
        _yaml(meta),
        "---",
        "",
        f"# {title}",
        "",
        f"A LoRA adapter for {base_text} that makes it forget {requests} fact{'s' if requests != 1 else ''}. "
        f"It is a {_zupatch_link(info.source_url)} unlearning patch (a ZeroUnlearn edit `W' = W + U·B` of "
        f"{len(info.modules)} MLP down projection{'s' if len(info.modules) != 1 else ''}, layer"
        f"{'s' if len(layers) != 1 else ''} {', '.join(map(str, layers)) or 'n/a'}) exported in PEFT's format, "
        "so a server can keep one base in memory and swap forget adapters per request. "
        "The forget requests are not published: neither the adapter nor this card contains their text.",
        "",
        "## Use it",
        "",
        "```bash",
        "pip install peft transformers",
        "```",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'base = AutoModelForCausalLM.from_pretrained("{info.base_model}"{revision})',
        f'model = PeftModel.from_pretrained(base, "{info.repo_id}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{info.base_model}"{revision})',
        "```",
        "",
        "With vLLM, as one of several adapters on the base:",
        "",
        "```bash",
        f"vllm serve {info.base_model} \\",
        f"    --enable-lora --max-lora-rank {_lora_rank_bucket(max(r for _, r in info.modules))} \\",
        f"    --lora-modules {title}={info.repo_id}",
        "```",
        "",
        "## What it changes",
        "",
        "| module | rank |",
        "|---|---|",
        *(f"| `{m}` | {r} |" for m, r in info.modules),
        "",
        f"`lora_alpha` equals each module's rank, so the adapter adds exactly `lora_B · lora_A = U·B`: in real "
        "arithmetic it is the patch. In bfloat16 its logits match those of the zupatch-applied checkpoint to "
        "within bfloat16 rounding (the applied checkpoint rounds `W + U·B` to bfloat16 once; the adapter computes "
        "`x·W` and `x·U·B` apart and adds them).",
        "",
        "## Provenance",
        "",
        f"- Adapter weights: {info.adapter_bytes:,} bytes ({human_bytes(info.adapter_bytes)})",
        f"- Exported from the zupatch patch with sha256 `{info.patch_sha256}`",
        f"- Patch created: {patch.created or 'unknown'}" + (f" with zupatch {', '.join(versions)}" if versions else ""),
        f"- Base revision: `{info.base_revision}`" if info.base_revision else "- Base revision: not recorded",
        "",
        "The patch itself applies bit-exactly to the base's files and inverts bit-exactly; with the patch file:",
        "",
        "```bash",
        *install_lines(info.source_url),
        f"zupatch apply PATCH_FILE --model {info.base_model}"
        + (f" --revision {info.base_revision}" if info.base_revision else "")
        + f" -o ./{title}-applied",
        "```",
        "",
    ]
    return "\n".join(out)


def _lora_rank_bucket(rank: int) -> int:
    """vLLM's --max-lora-rank takes one of a few sizes; the smallest that holds ``rank``."""
    for size in (8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= size:
            return size
    return rank


STATS_TAGS = ["zupatch", "key-statistics", "unlearning", "model-editing"]


def stats_card(manifest: "StatsManifest", repo_id: str, source_url: str | None = None) -> str:
    """The README.md of a key-statistics dataset repo (``zupatch stats push``).

    Numbers and names only: the model, its revision, the layers, the corpus's
    kind, settings and token-id hash, the token count. Never any text; a local
    model is named by its folder's last component only.
    """
    model = manifest.model if is_hub_repo_id(manifest.model) else _local_name(manifest.model)
    meta: dict[str, Any] = {"tags": list(STATS_TAGS)}
    if is_hub_repo_id(manifest.model):
        meta["base_model"] = manifest.model  # the Hub shows which model these statistics belong to
    corpus = dict(manifest.corpus)
    kind = corpus.pop("kind", "unknown")
    described = corpus.pop("description", None)
    fingerprint = corpus.pop("fingerprint", None)
    settings = ", ".join(f"{k}={v}" for k, v in sorted(corpus.items()) if _scalar(v) is not None)
    layers = manifest.layer_numbers
    widths = sorted({e.key_width for e in manifest.layers})
    revision = manifest.revision
    model_text = f"[{model}](https://huggingface.co/{model})" if is_hub_repo_id(model) else f"`{model}`"
    size = 8 * sum(e.key_width**2 for e in manifest.layers)
    rows = [
        ("model", model_text),
        ("revision", f"`{revision}`" if revision else "unknown (a local folder; the weights are fingerprinted)"),
        ("architecture", f"{manifest.architecture} (`{manifest.model_type}`), hidden size {manifest.hidden_size}"),
        ("layers", ", ".join(map(str, layers))),
        ("keys per layer (f)", ", ".join(map(str, widths))),
        ("tokens", f"{manifest.tokens:,}"),
        ("corpus", f"{kind}" + (f" ({_md(settings)})" if settings else "")),
        ("corpus fingerprint", f"`{_md(str(fingerprint))}` (sha256 of its token ids)" if fingerprint else "n/a"),
        ("model dtype", manifest.dtype),
        ("statistics", f"E[k kᵀ] of each down projection's input, float64, {human_bytes(size)} in all"),
    ]
    if isinstance(described, str) and described.strip():
        rows.insert(8, ("corpus description", _md(described.strip()[:200])))
    pin = f" --revision {revision}" if revision and is_hub_repo_id(model) else ""
    out = [
        "---",
        _yaml(meta),
        "---",
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"Key statistics of {model_text} for {_zupatch_link(source_url)} unlearning edits: the second moment of "
        "the MLP down projections' inputs over a corpus, which ZeroUnlearn needs for every edit of these layers. "
        "Computing them takes a pass over the corpus; with this repo, nobody has to compute them again. "
        "Numbers only: no text of the corpus is published.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        "Use them in an edit (zupatch checks that they match the model: architecture, sizes, layers, and a "
        "fingerprint of the weights up to each layer; anything else is refused):",
        "",
        "```bash",
        *install_lines(source_url),
        f"zupatch create -m {model if is_hub_repo_id(model) else 'PATH/TO/MODEL'}{pin} --layers {','.join(map(str, layers))} "
        f"--stats {repo_id} --forget forget.jsonl -o forget.zup.safetensors",
        f"zupatch stats pull {repo_id}   # or copy them into the local statistics cache",
        "```",
        "",
        "Files: `zupatch_stats.json` (what they were computed from, with the sha256 of each file) and one "
        "`layer-NNN.safetensors` per layer (`second_moment`, f×f float64).",
        "",
    ]
    return "\n".join(out)
