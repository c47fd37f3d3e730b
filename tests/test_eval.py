"""``zupatch eval`` on the trained fact model: figures against a hand computation, formats, errors, the Hub.

The hand computation loads the base checkpoint and the patched checkpoint that
``apply_to_checkpoint`` writes with plain transformers and scores every answer
token by token, one unpadded forward per token; eval (batched, patch applied in
memory from the stored bits) must agree with it on every figure.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from tests.fact_model import FORGET
from tests.hub_server import LoopbackHub
from tests.patching import folder_digest
from zupatch.checkpoint.apply import apply_to_checkpoint
from zupatch.checkpoint.folder import Checkpoint
from zupatch.cli.main import app
from zupatch.engine.api import create
from zupatch.engine.baselines import BaselineParams
from zupatch.engine.create import CreateConfig
from zupatch.engine.probes import derive_probe_prompts, derive_probes
from zupatch.engine.requests import ForgetRequest, load_requests
from zupatch.engine.subjects import excluded_words, half_of, request_templates, vocabulary_words
from zupatch.engine.targets import NeighbourConfig, propose_neighbour_subjects
from zupatch.eval.data import Item, load_eval_data
from zupatch.errors import ZupatchError
from zupatch.patch import numerics as nm
from zupatch.patch.format import Patch
from zupatch.patch.ops import DenseEdit, build_patch

runner = CliRunner()
DOC = Path(__file__).resolve().parents[1] / "docs" / "eval.md"
DOWN = "model.layers.{}.mlp.down_proj.weight"


def jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def record(fact: ForgetRequest, **extra) -> dict:
    return {"prompt": fact.prompt, "subject": fact.subject, "target": fact.target, **extra}


@pytest.fixture
def workdir(tmp_path: Path, fact_checkpoint: Path, _trained_fact_model) -> dict:
    """Evaluation data about the fact model, and a patch that wipes its MLPs (the facts live in layer 0's)."""
    facts = _trained_fact_model[2]
    capital, language = facts[FORGET[0]], facts[FORGET[1]]
    data = jsonl(tmp_path / "forget.jsonl", [
        # a two-token answer ("Plim ."), a paraphrase and labelled + unlabelled neighbours
        record(capital, target=f"{capital.target} .", paraphrases=["a capital of {}"],
               neighbors=[record(facts[1]), "The language of {}"]),
        record(language, paraphrases=["The language of {} is"], neighbours=[record(facts[17])]),
    ])  # fmt: skip
    retain = jsonl(tmp_path / "retain.jsonl", [record(f) for f in facts[2:48:5]])
    text = tmp_path / "text.txt"
    text.write_text("The currency of Marlo is drab .\nThe capital of Frix is a\n\n")
    patch = damage_patch(fact_checkpoint, tmp_path / "damage.zup.safetensors", seed=0, noise=0.01)
    return {"data": data, "retain": retain, "text": text, "patch": patch, "tmp": tmp_path}


def damage_patch(fact_checkpoint: Path, path: Path, *, seed: int, noise: float) -> Path:
    """A dense patch that replaces every MLP down projection of the fact model by small noise."""
    ckpt = Checkpoint(fact_checkpoint)
    base = {DOWN.format(i): (ckpt.read_bits(DOWN.format(i), np.uint32), nm.FLOAT_DTYPES["F32"]) for i in range(4)}
    rng = np.random.default_rng(seed)
    edits = [DenseEdit(name, -bits.view(np.float32) + rng.normal(0, noise, bits.shape))
             for name, (bits, _) in base.items()]  # fmt: skip
    build_patch(edits, base, method="manual").save(path)
    return path


def run_eval(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["eval", *args])
    return result.exit_code, result.output


# --------------------------------------------------------------------------- by hand


@torch.no_grad()
def hand_scores(folder: Path, items: list[Item]) -> list[tuple[bool, float]]:
    """(every answer token is the argmax, product of the answer tokens' probabilities), unbatched."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    out = []
    for item in items:
        prompt = [tok.bos_token_id] + tok(item.prompt, add_special_tokens=False)["input_ids"]
        answer = tok(" " + item.answer, add_special_tokens=False)["input_ids"]
        hits, logp = [], 0.0
        for k, token in enumerate(answer):
            logits = model(torch.tensor([prompt + answer[:k]])).logits[0, -1].double()
            hits.append(int(logits.argmax()) == token)
            logp += float(torch.log_softmax(logits, -1)[token])
        out.append((all(hits), math.exp(logp)))
    return out


@torch.no_grad()
def hand_next_tokens(folder: Path, prompts: list[str]) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    return [int(model(torch.tensor([[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"]])).logits[0, -1].argmax())
            for p in prompts]  # fmt: skip


def base_probes(folder: Path, requests: list[ForgetRequest]) -> list[str]:
    """The same-pattern probes eval derives, from the base checkpoint loaded with plain transformers."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return derive_probe_prompts(model, AutoTokenizer.from_pretrained(folder), requests)


def vocabulary_probe_count(folder: Path, requests: list[ForgetRequest]) -> int:
    """How many vocabulary subjects the probes hold: 16 asked, fewer on the fact model's
    46-word vocabulary, where about half of the probe half has a spelling in the protect half."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    count = len(derive_probes(model, AutoTokenizer.from_pretrained(folder), requests).vocabulary)
    assert 4 <= count <= 16, count
    return count


@torch.no_grad()
def hand_perplexity(folder: Path, lines: list[str]) -> float:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    nll, count = 0.0, 0
    for line in lines:
        ids = tok(line, add_special_tokens=True)["input_ids"]  # BOS first, where the tokenizer adds one
        assert ids[0] == tok.bos_token_id  # the fact model's tokenizer does
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        nll -= sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1))
        count += len(ids) - 1
    return math.exp(nll / count)


def share(flags: list[bool]) -> float:
    return sum(flags) / len(flags)


def test_eval_agrees_with_a_hand_computation(workdir: dict, fact_checkpoint: Path) -> None:
    code, out = run_eval("-m", str(fact_checkpoint), "-d", str(workdir["data"]), "-p", str(workdir["patch"]),
                         "--retain", str(workdir["retain"]), "--text", str(workdir["text"]), "--json")  # fmt: skip
    assert code == 0, out
    report = json.loads(out)
    data = load_eval_data(workdir["data"], workdir["retain"])
    probes = base_probes(fact_checkpoint, data.requests)
    words = vocabulary_probe_count(fact_checkpoint, data.requests)
    assert len(probes) == 4 * words  # 4 templates (2 prompts, 2 paraphrases) x the vocabulary words
    assert report["data"] == {"forget": 2, "paraphrases": 2, "retain": 2 + 10, "unlabelled_neighbours": 1,
                              "derived_probes": 4 * words, "derived_templates": 4, "derived_subjects_proposed": 0,
                              "derived_subjects_vocabulary": words,
                              "text": "text", "text_tokens": 7 + 6 + 2}  # one token per word, BOS on each line

    patched = workdir["tmp"] / "patched"
    apply_to_checkpoint(Patch.load(workdir["patch"]), fact_checkpoint, patched)
    lines = [t for t in workdir["text"].read_text().splitlines() if t.strip()]
    base_tokens = hand_next_tokens(fact_checkpoint, data.unlabelled_neighbours)
    base_probe_tokens = hand_next_tokens(fact_checkpoint, probes)
    base_retain = hand_scores(fact_checkpoint, data.retain)
    for folder, scores in zip((fact_checkpoint, patched), report["models"]):
        for section, items in (("efficacy", data.forget), ("generalization", data.paraphrases),
                               ("specificity", data.retain)):  # fmt: skip
            hand = hand_scores(folder, items)
            assert scores[section]["n"] == len(items)
            assert scores[section]["answered"] == pytest.approx(share([h[0] for h in hand]), abs=1e-4), section
            assert scores[section]["probability"] == pytest.approx(np.mean([h[1] for h in hand]), abs=2e-6), section
            if section != "specificity":  # line k + 1 gives the k-th forget prompt and the k-th paraphrase
                assert scores[section]["answered_lines"] == [k + 1 for k, (ok, _) in enumerate(hand) if ok], section
        retain = hand_scores(folder, data.retain)
        known = [i for i, (ok, _) in enumerate(base_retain) if ok]
        assert scores["specificity"]["kept"] == pytest.approx(share([retain[i][0] for i in known]), abs=1e-4)
        tokens = hand_next_tokens(folder, data.unlabelled_neighbours)
        assert scores["specificity"]["unchanged"] == share([a == b for a, b in zip(tokens, base_tokens)])
        tokens = hand_next_tokens(folder, probes)
        assert scores["specificity"]["derived_n"] == len(probes)
        assert scores["specificity"]["derived_unchanged"] == pytest.approx(
            share([a == b for a, b in zip(tokens, base_probe_tokens)]), abs=1e-4
        )
        assert scores["fluency"]["perplexity"] == pytest.approx(hand_perplexity(folder, lines), rel=1e-4)
        assert [g["prompt"] for g in scores["generations"]] == [i.prompt for i in data.forget]

    base, damaged = report["models"]
    assert base["name"] == "base" and base["patch"] is None and base["efficacy"]["answered"] == 1.0
    assert damaged["patch"]["method"] == "manual" and damaged["patch"]["bytes"] == workdir["patch"].stat().st_size
    assert damaged["efficacy"]["answered"] < 1.0  # the damage shows
    assert base["specificity"]["derived_unchanged"] == 1.0 > damaged["specificity"]["derived_unchanged"]
    assert damaged["fluency"]["perplexity_change"] == pytest.approx(
        damaged["fluency"]["perplexity"] / base["fluency"]["perplexity"] - 1, abs=1e-3
    )
    jsonschema.validate(report, doc_schema())
    assert folder_digest(fact_checkpoint) == folder_digest(fact_checkpoint)  # inputs untouched (read-only fixture)


def doc_schema() -> dict:
    block = re.search(r"## The JSON report.*?```json\n(.*?)```", DOC.read_text(), re.S)
    assert block, "docs/eval.md has no JSON Schema block under 'The JSON report'"
    schema = json.loads(block.group(1))
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def test_human_output_and_self_sampled_text(workdir: dict, fact_checkpoint: Path) -> None:
    code, out = run_eval("-m", str(fact_checkpoint), "-d", str(workdir["data"]), "-p", str(workdir["patch"]),
                         "--text-tokens", "64", "--generations", "1")  # fmt: skip
    assert code == 0, out
    assert "forget prompts still answered" in out and "perplexity" in out and "damage" in out
    words = vocabulary_probe_count(fact_checkpoint, load_eval_data(workdir["data"]).requests)
    assert "same-pattern probes unchanged" in out and f"{4 * words} same-pattern probe(s)" in out
    assert "text sampled from the base model" in out
    assert out.count("The capital of Zorvia") == 1  # one generation row, as asked
    # which facts the patch still answers, by line of the data file (no text): the language fact
    # (line 2) survives the wiped MLPs, as the hand computation of the test above finds
    assert "forget prompts still answered, by line of forget.jsonl:\n  damage: 2\n" in out, out


# --------------------------------------------------------------------------- --plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plot_draws_the_per_fact_probabilities(workdir: dict, fact_checkpoint: Path) -> None:
    """--plot writes a PNG drawn from the report, whose per-fact answer probabilities are a
    plain transformers computation on the base and on the checkpoint ``apply`` writes."""
    pytest.importorskip("matplotlib")
    picture = workdir["tmp"] / "probabilities.png"
    code, out = run_eval("-m", str(fact_checkpoint), "-d", str(workdir["data"]), "-p", str(workdir["patch"]),
                         "--text", str(workdir["text"]), "--probes", "0", "--generations", "0",
                         "--plot", str(picture), "--json")  # fmt: skip
    assert code == 0, out
    report = json.loads(out)
    jsonschema.validate(report, doc_schema())
    data = load_eval_data(workdir["data"])
    patched = workdir["tmp"] / "patched"
    apply_to_checkpoint(Patch.load(workdir["patch"]), fact_checkpoint, patched)
    for folder, scores in zip((fact_checkpoint, patched), report["models"]):
        for section, items in (("efficacy", data.forget), ("generalization", data.paraphrases)):
            hand = [probability for _, probability in hand_scores(folder, items)]
            assert scores[section]["probabilities"] == pytest.approx(hand, rel=1e-4, abs=1e-9), section
    base, damaged = (m["efficacy"]["probabilities"] for m in report["models"])
    assert min(base) > 0.5 and damaged != base  # the base knows its facts, the damage shows
    assert all("probabilities" not in entry for m in report["models"] for entry in m["attacks"])

    header = picture.read_bytes()[:24]
    assert header[:8] == PNG_SIGNATURE and header[12:16] == b"IHDR", header
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert width == 900 and height > 300 and picture.stat().st_size > 0
    assert not list(picture.parent.glob(".probabilities.png*"))  # no temporary left
    (picture.parent / "plain").write_bytes(b"")
    assert picture.stat().st_mode == (picture.parent / "plain").stat().st_mode  # the umask's, not 0600


def test_plot_of_long_and_old_reports(tmp_path: Path) -> None:
    """A long forget list draws its first rows and says so; a report without per-fact
    probabilities (an older eval) is one error, not a traceback."""
    pytest.importorskip("matplotlib")
    from zupatch.eval.plot import MAX_ROWS, draw_report

    n = MAX_ROWS + 10
    figures = {"n": n, "answered": 0.0, "first_token": 0.0, "probability": 0.1}
    empty = {"n": 0, "answered": None, "first_token": None, "probability": None, "probabilities": []}
    models = [{"name": name, "patch": patch, "generalization": empty,
               "efficacy": {**figures, "probabilities": [p] * n}}
              for name, patch, p in (("base", None, 0.9), ("x.zup.safetensors", {"method": "zerounlearn"}, 1e-9))]
    picture = draw_report({"model": "m", "models": models}, tmp_path / "long.png")  # fmt: skip
    assert picture.read_bytes().startswith(PNG_SIGNATURE)
    del models[1]["efficacy"]["probabilities"]
    with pytest.raises(ZupatchError, match="no per-fact probabilities .* older zupatch eval"):
        draw_report({"model": "m", "models": models}, tmp_path / "old.png")
    assert not (tmp_path / "old.png").exists()


def test_plot_without_matplotlib_is_one_line_naming_the_extra(workdir: dict, fact_checkpoint: Path) -> None:
    """Where matplotlib cannot be imported, --plot fails at once (nothing evaluated, nothing
    written) with one line naming the extra, and eval without --plot never imports it."""
    shim = "import sys; sys.modules['matplotlib'] = None; from zupatch.__main__ import main; main()"
    picture = workdir["tmp"] / "probabilities.png"
    base = [sys.executable, "-c", shim, "eval", "-m", str(fact_checkpoint), "-d", str(workdir["data"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*base, "--plot", str(picture)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1, result
    assert result.stderr.startswith("error: --plot needs matplotlib") and "pip install 'zupatch[plot]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not result.stdout and not picture.exists(), result
    assert "plot" in subprocess.run([*base, "--help"], capture_output=True, text=True, env=env, check=True).stdout


# --------------------------------------------------------------------------- same-pattern probes


@pytest.fixture
def unspecific_patch(fact_model, tmp_path: Path) -> Path:
    """Gradient ascent with no retain term, 100x the default rate and no early stop:
    it forgets, and takes other facts of the same pattern with it."""
    model, tokenizer, facts = fact_model
    params = BaselineParams(learning_rate=1e-2, steps=30, stop_when_forgotten=False)
    patch = create(model, tokenizer, [facts[i] for i in FORGET], CreateConfig(method="ga", baseline=params))
    path = tmp_path / "ga-unspecific.zup.safetensors"
    patch.save(path)
    return path


def test_probes_show_collateral_damage_without_retain_data(
    fact_checkpoint: Path, _trained_fact_model, unspecific_patch: Path, tmp_path: Path
) -> None:
    """Only a forget file: specificity still shows, on the probes derived from it, and agrees
    with plain transformers on the patched checkpoint that ``apply`` writes."""
    facts = _trained_fact_model[2]
    forget = jsonl(tmp_path / "forget.jsonl", [record(facts[i]) for i in FORGET])
    text = tmp_path / "text.txt"
    text.write_text("The currency of Marlo is drab .\n")
    args = ["-m", str(fact_checkpoint), "-d", str(forget), "-p", str(unspecific_patch), "--text", str(text)]
    code, out = run_eval(*args, "--json")
    assert code == 0, out
    report = json.loads(out)
    jsonschema.validate(report, doc_schema())
    assert report["version"] == 3 and report["settings"]["probes"] == 16
    assert report["data"]["retain"] == report["data"]["unlabelled_neighbours"] == 0

    probes = base_probes(fact_checkpoint, load_requests(forget))
    words = vocabulary_probe_count(fact_checkpoint, load_requests(forget))
    assert len(probes) == report["data"]["derived_probes"] == 2 * words  # 2 templates x the vocabulary words
    patched = tmp_path / "patched"
    apply_to_checkpoint(Patch.load(unspecific_patch), fact_checkpoint, patched)
    before, after = hand_next_tokens(fact_checkpoint, probes), hand_next_tokens(patched, probes)
    expected = share([a == b for a, b in zip(before, after)])
    print({"probes": len(probes), "unchanged": expected})

    base, ga = report["models"]
    assert base["specificity"]["derived_n"] == ga["specificity"]["derived_n"] == len(probes)
    assert base["specificity"]["derived_unchanged"] == 1.0
    assert ga["efficacy"]["answered"] == 0.0  # it forgets...
    assert ga["specificity"]["derived_unchanged"] == pytest.approx(expected, abs=1e-4)
    assert expected < 0.9  # ...and the probes see what else it changed
    assert base["specificity"]["n"] == 0 and base["specificity"]["kept"] is None  # nothing else could have

    code, out = run_eval(*args)
    assert code == 0 and "same-pattern probes unchanged" in out and f"{2 * words} same-pattern probe(s)" in out, out
    code, out = run_eval(*args, "--probes", "0", "--json")
    assert code == 0, out
    off = json.loads(out)
    assert off["data"]["derived_probes"] == 0 and off["settings"]["probes"] == 0
    assert all(m["specificity"]["derived_n"] == 0 and m["specificity"]["derived_unchanged"] is None
               for m in off["models"])  # fmt: skip
    jsonschema.validate(off, doc_schema())


def _probe_subject(prompt: str, templates: list[str]) -> str:
    """The subject a probe prompt fills its template with."""
    for template in templates:
        head, tail = template.split("{}")
        if prompt.startswith(head) and prompt.endswith(tail) and len(prompt) > len(head) + len(tail):
            return prompt[len(head) : len(prompt) - len(tail)]
    raise AssertionError(f"{prompt!r} fills none of the templates")


def _words(text: str) -> set[str]:
    return {w.casefold() for w in re.findall(r"\w+", text)}


def test_probes_never_use_forget_or_protected_subjects(fact_model) -> None:
    model, tokenizer, facts = fact_model
    forget = [facts[i] for i in FORGET]
    templates = request_templates(forget)
    protect = {w.casefold() for w in vocabulary_words(tokenizer) if half_of(w) == "protect"}
    forbidden = excluded_words(forget) | protect
    created = propose_neighbour_subjects(model, tokenizer, forget)  # what create protects by default
    # not vacuous: the model's own lists and the vocabulary hold forget subjects and protect-half words
    raw = propose_neighbour_subjects(model, tokenizer, forget, NeighbourConfig(subjects=32, new_tokens=64))
    assert any(_words(s) & forbidden for s in raw), raw
    assert protect and excluded_words(forget) & {w.casefold() for w in vocabulary_words(tokenizer)}
    for skip in (None, 0, 3):
        prompts = derive_probe_prompts(model, tokenizer, forget, skip_proposed=skip)
        words = len(derive_probes(model, tokenizer, forget, skip_proposed=skip).vocabulary)
        assert 4 <= words <= 16 and len(prompts) == len(set(prompts)) == len(templates) * words, skip
        for prompt in prompts:
            subject = _probe_subject(prompt, templates)
            assert not _words(subject) & forbidden, (skip, subject)
            assert subject.casefold() not in {r.subject.casefold() for r in forget}
            assert not any(_words(subject) & _words(s) for s in created), (skip, subject)
            assert all(half_of(w) == "probe" for w in vocabulary_words(tokenizer) if w.casefold() in _words(subject))
    assert derive_probe_prompts(model, tokenizer, forget) == derive_probe_prompts(model, tokenizer, forget)
    # create hands over the list it made instead of having it made again: the same probes
    assert derive_probe_prompts(model, tokenizer, forget, protected=created) == derive_probe_prompts(
        model, tokenizer, forget
    )
    assert derive_probe_prompts(model, tokenizer, forget, proposed=0, vocabulary=0) == []
    assert derive_probe_prompts(model, tokenizer, [ForgetRequest("The capital of Zorvia", "", "Plim")]) == []
    with pytest.raises(ZupatchError, match="probe counts must be >= 0"):
        derive_probes(model, tokenizer, forget, proposed=-1)


@pytest.mark.slow
def test_probes_on_a_real_model_skip_what_create_protects(smollm2_checkpoint: Path) -> None:
    """SmolLM2 lists a few countries after "Examples: France,": create protects those; the probes
    are the ones it lists next, and probe-half words."""
    from zupatch.engine.api import load_model

    model, tokenizer = load_model(smollm2_checkpoint, "float32", "cpu")
    question = "Q: What is the capital of {}?\nA:"
    forget = [ForgetRequest("The capital of {} is", "France", "Paris", paraphrases=(question,))]
    created = propose_neighbour_subjects(model, tokenizer, forget)
    probes = derive_probes(model, tokenizer, forget)
    print({"create protects": created, "proposed probes": probes.proposed, "vocabulary": probes.vocabulary})
    assert created and probes.proposed and len(probes.vocabulary) == 16
    protect = {w.casefold() for w in vocabulary_words(tokenizer) if half_of(w) == "protect"}
    for subject in probes.subjects:
        assert not _words(subject) & (protect | {"france", "paris"} | {w for s in created for w in _words(s)}), subject
    assert len(probes.prompts) == 2 * len(probes.subjects)


# --------------------------------------------------------------------------- formats


def test_counterfact_and_zsre_records(tmp_path: Path) -> None:
    counterfact = tmp_path / "mcf.json"
    counterfact.write_text(json.dumps([{
        "case_id": 0,
        "requested_rewrite": {"prompt": "{} is located in", "subject": "Eiffel Tower",
                              "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
        "paraphrase_prompts": ["Where is the Eiffel Tower? It is in"],
        "neighborhood_prompts": ["The Louvre is located in", "Notre-Dame is located in"],
    }], indent=1))  # fmt: skip
    data = load_eval_data(counterfact)
    assert data.forget == [Item("Eiffel Tower is located in", "Paris", line=1)]  # record 1 of the list
    assert data.paraphrases == [Item("Where is the Eiffel Tower? It is in", "Paris", line=1)]
    assert data.retain == [Item("The Louvre is located in", "Paris"), Item("Notre-Dame is located in", "Paris")]

    zsre = jsonl(tmp_path / "zsre.jsonl", [{
        "subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
        "answers": ["Illinois Institute of Technology"], "rephrase": "What university did Watts Humphrey take part in?",
        "alt": "University of Michigan", "loc": "nq question: who played desmond doss father in hacksaw ridge",
        "loc_ans": "Hugo Weaving",
    }])  # fmt: skip
    data = load_eval_data(zsre)
    assert data.forget == [Item("What university did Watts Humphrey attend?", "Illinois Institute of Technology", line=1)]
    assert data.paraphrases[0].answer == "Illinois Institute of Technology"
    assert data.retain == [Item("who played desmond doss father in hacksaw ridge", "Hugo Weaving")]


def test_items_know_their_line(tmp_path: Path) -> None:
    """Forget prompts and paraphrases carry the line of the record they come from (blank lines
    counted), which is how reports name the facts still answered without their text."""
    path = tmp_path / "forget.jsonl"
    path.write_text('{"prompt": "The capital of {} is", "subject": "France", "target": "Paris"}\n\n'
                    '{"prompt": "Gold has the symbol", "target": "Au", "paraphrases": ["The symbol of gold is"]}\n')
    data = load_eval_data(path)
    assert [i.line for i in data.forget] == [1, 3] and [i.line for i in data.paraphrases] == [3]
    assert data.request_lines == [1, 3]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "no records in file"),
        ('{"prompt": "The capital of {} is", "subject": "France"}\n', "forget.jsonl:1: missing field 'target'"),
        ('{"prompt": "x", "target": "y"}\n{"prompt": \n', "forget.jsonl:2: malformed JSON"),
        ('{"prompt": "x", "target": "y", "neighbors": "z"}\n', "forget.jsonl:1: field 'neighbors' must be a list"),
        ('{"prompt": "x", "target": "y", "neighbors": [{"prompt": "z"}]}\n', "neighbour: missing field 'target'"),
        ('{"src": "q?", "answers": []}\n', "zsRE record: 'answers' must hold the true answer"),
        ("[1, 2]", "record 1: expected a JSON object"),
    ],
)
def test_bad_data_files_give_one_line_errors(tmp_path: Path, fact_checkpoint: Path, content: str, message: str) -> None:
    data = tmp_path / "forget.jsonl"
    data.write_text(content)
    code, out = run_eval("-m", str(fact_checkpoint), "-d", str(data))
    assert code == 1 and message in out and out.startswith("error:") and len(out.strip().splitlines()) == 1, out


def test_wrong_inputs(workdir: dict, fact_checkpoint: Path, tiny_checkpoint, tmp_path: Path) -> None:
    patched = tmp_path / "patched"
    apply_to_checkpoint(Patch.load(workdir["patch"]), fact_checkpoint, patched)
    code, out = run_eval("-m", str(patched), "-d", str(workdir["data"]), "-p", str(workdir["patch"]))
    assert code == 4 and "not this patch's base" in out and "already patched" in out, out
    code, out = run_eval("-m", str(tiny_checkpoint("llama")), "-d", str(workdir["data"]), "-p", str(workdir["patch"]))
    assert code == 4 and "damage.zup.safetensors" in out and len(out.strip().splitlines()) == 1, out
    for args, message in [
        (["-p", str(tmp_path / "missing.zup.safetensors")], "missing.zup.safetensors"),
        (["--text", str(tmp_path / "none.txt")], "none.txt: file not found"),
        (["--batch-size", "0"], "batch size must be at least 1"),
        (["--probes", "-1"], "probes must be >= 0"),
        (["--device", "tpu:x"], "unknown device"),
        (["--plot", str(tmp_path / "probabilities.xyz")], "unknown picture format '.xyz'"),
        (["--plot", str(tmp_path / "nowhere" / "p.png")], "the folder does not exist"),
        (["--plot", str(tmp_path)], "is a folder"),
    ]:
        code, out = run_eval("-m", str(fact_checkpoint), "-d", str(workdir["data"]), *args)
        assert code != 0 and message in out and len(out.strip().splitlines()) == 1, (args, out)
    code, out = run_eval("-m", str(tmp_path / "nowhere"), "-d", str(workdir["data"]))
    assert code != 0 and "nowhere" in out, out


# --------------------------------------------------------------------------- the Hub


def test_model_and_patch_from_the_hub(workdir: dict, fact_checkpoint: Path, tmp_path: Path) -> None:
    args = ["-d", str(workdir["data"]), "--text", str(workdir["text"]), "--generations", "0", "--json"]
    code, local = run_eval("-m", str(fact_checkpoint), "-p", str(workdir["patch"]), *args)
    assert code == 0, local
    files = {p.name: p.read_bytes() for p in fact_checkpoint.iterdir() if p.is_file()}
    with LoopbackHub() as hub, hub.client_environment(tmp_path / "hf_home"):
        hub.create_repo("alice/fact-llama")
        hub.commit("alice/fact-llama", files, message="weights")
        hub.create_repo("alice/forget-zorvia")
        hub.commit("alice/forget-zorvia", {"patch.zup.safetensors": workdir["patch"].read_bytes()}, message="patch")
        code, remote = run_eval("-m", "alice/fact-llama", "-p", "alice/forget-zorvia", *args)
    assert code == 0, remote
    local_models, remote_models = json.loads(local)["models"], json.loads(remote)["models"]
    for a, b in zip(local_models, remote_models):
        for section in ("efficacy", "generalization", "specificity", "fluency"):
            assert a[section] == b[section], section
    assert remote_models[1]["name"] == "alice/forget-zorvia"


def test_self_sampled_text_is_cached_per_checkpoint(fact_checkpoint: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A second eval of the same checkpoint reads the sampled perplexity text instead of sampling again."""
    import shutil

    from zupatch.engine.api import load_model
    from zupatch.eval.evaluate import EvalConfig, fluency_windows

    monkeypatch.setenv("ZUPATCH_CACHE", str(tmp_path / "cache"))
    folder = shutil.copytree(fact_checkpoint, tmp_path / "model")
    model, tokenizer = load_model(folder, "float32", "cpu")
    config = EvalConfig(text_tokens=64)
    first, source = fluency_windows(model, tokenizer, None, config, Checkpoint(folder))
    files = list((tmp_path / "cache" / "eval-text").iterdir())
    assert source == "self-sampled" and len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again, _ = fluency_windows(model, tokenizer, None, config, Checkpoint(folder))
    assert again == first and files[0].stat().st_mtime_ns == stamp  # read, not written again
    files[0].unlink()
    assert fluency_windows(model, tokenizer, None, config, Checkpoint(folder))[0] == first  # sampling is seeded
    weights = next(folder.glob("*.safetensors"))
    os.utime(weights, ns=(stamp + 10**9, stamp + 10**9))  # a changed checkpoint is another key
    fluency_windows(model, tokenizer, None, config, Checkpoint(folder))
    assert len(list((tmp_path / "cache" / "eval-text").iterdir())) == 2


def test_retain_records_keep_their_chat_question(tmp_path: Path) -> None:
    """``--retain`` records and labelled neighbours carry their ``question`` to the chat attack."""
    data_file = tmp_path / "forget.jsonl"
    data_file.write_text(json.dumps({
        "prompt": "The capital of {} is", "subject": "France", "target": "Paris", "question": "Capital of {}?",
        "neighbors": [{"prompt": "The capital of {} is", "subject": "Spain", "target": "Madrid",
                       "question": "Where does the government of {} sit?"}],
    }) + "\n")  # fmt: skip
    retain_file = tmp_path / "retain.jsonl"
    retain_file.write_text(
        json.dumps({"prompt": "{} is spoken in", "subject": "Polish", "target": "Poland", "question": "Who speaks {}?"})
        + "\n" + json.dumps({"prompt": "The symbol of gold is", "target": "Au"}) + "\n"
    )
    data = load_eval_data(data_file, retain_file)
    assert [i.question for i in data.forget] == ["Capital of France?"]
    assert [i.question for i in data.retain] == ["Where does the government of Spain sit?", "Who speaks Polish?", ""]


def noise_patch(folder: Path, path: Path, layers: list[int]) -> Path:
    """A dense patch adding small noise to the down projections of ``layers`` (a bf16 checkpoint)."""
    ckpt = Checkpoint(folder)
    base = {DOWN.format(i): (ckpt.read_bits(DOWN.format(i), np.uint16), nm.FLOAT_DTYPES["BF16"]) for i in layers}
    rng = np.random.default_rng(0)
    build_patch([DenseEdit(name, rng.normal(0, 0.05, bits.shape)) for name, (bits, _) in base.items()], base,
                method="manual").save(path)  # fmt: skip
    return path


def test_eval_with_a_device_map(tiny_checkpoint, tmp_path: Path) -> None:
    """--device-map: the figures of the model in one piece; the attacks that rewrite or copy the
    weights say why they are skipped; a patch of an offloaded layer is refused in one line."""
    model = tiny_checkpoint("llama", max_shard_size="60KB")
    data = jsonl(tmp_path / "forget.jsonl", [{"prompt": "The capital of {} is", "subject": "France", "target": "Paris",
                                              "paraphrases": ["France's capital is"]}])  # fmt: skip
    text = tmp_path / "text.txt"
    text.write_text("Some ordinary words to score.\n")
    patch = noise_patch(model, tmp_path / "p.zup.safetensors", [1, 2])
    common = ["-m", str(model), "-d", str(data), "--text", str(text), "-p", str(patch), "--json", "-q",
              "--dtype", "float32", "--probes", "2"]  # fmt: skip
    mapped = ["--device-map", "sequential", "--max-memory", "cpu=700KB"]  # layer 3 and the head on the disk
    code, plain = run_eval(*common)
    assert code == 0, plain
    code, spread = run_eval(*common, *mapped, "--attack", "quant:Q8_0", "--attack", "relearn:2")
    assert code == 0, spread
    plain, spread = json.loads(plain), json.loads(spread)
    assert spread["settings"]["device_map"] == "sequential"
    for ours, theirs in zip(plain["models"], spread["models"]):
        for measure in ("efficacy", "generalization"):
            assert theirs[measure]["probabilities"] == pytest.approx(ours[measure]["probabilities"], rel=1e-4)
        assert theirs["fluency"]["perplexity"] == pytest.approx(ours["fluency"]["perplexity"], rel=1e-4)
        reasons = {a["name"]: a["skipped"] for a in theirs["attacks"]}
        assert "offloaded decoder weights" in reasons["quant:Q8_0"] and "device map" in reasons["relearn:2"]
    whole = noise_patch(model, tmp_path / "all.zup.safetensors", [2, 3])
    code, output = run_eval("-m", str(model), "-d", str(data), "-p", str(whole), "--dtype", "float32", *mapped)
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "offloaded model.layers.3.mlp.down_proj.weight" in lines[0], output
