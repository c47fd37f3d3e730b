"""``zupatch eval`` on the trained fact model: figures against a hand computation, formats, errors, the Hub.

The hand computation loads the base checkpoint and the patched checkpoint that
``apply_to_checkpoint`` writes with plain transformers and scores every answer
token by token, one unpadded forward per token; eval (batched, patch applied in
memory from the stored bits) must agree with it on every figure.
"""

from __future__ import annotations

import json
import math
import re
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
from zupatch.engine.requests import ForgetRequest
from zupatch.eval.data import Item, load_eval_data
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
    ckpt = Checkpoint(fact_checkpoint)
    base = {DOWN.format(i): (ckpt.read_bits(DOWN.format(i), np.uint32), nm.FLOAT_DTYPES["F32"]) for i in range(4)}
    rng = np.random.default_rng(0)
    edits = [DenseEdit(name, -bits.view(np.float32) + rng.normal(0, 0.01, bits.shape))
             for name, (bits, _) in base.items()]  # fmt: skip
    patch = tmp_path / "damage.zup.safetensors"
    build_patch(edits, base, method="manual").save(patch)
    return {"data": data, "retain": retain, "text": text, "patch": patch, "tmp": tmp_path}


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


@torch.no_grad()
def hand_perplexity(folder: Path, lines: list[str]) -> float:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    nll, count = 0.0, 0
    for line in lines:
        ids = tok(line, add_special_tokens=False)["input_ids"]
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
    assert report["data"] == {"forget": 2, "paraphrases": 2, "retain": 2 + 10, "unlabelled_neighbours": 1,
                              "text": "text", "text_tokens": 7 + 6}  # one token per word

    patched = workdir["tmp"] / "patched"
    apply_to_checkpoint(Patch.load(workdir["patch"]), fact_checkpoint, patched)
    lines = [t for t in workdir["text"].read_text().splitlines() if t.strip()]
    base_tokens = hand_next_tokens(fact_checkpoint, data.unlabelled_neighbours)
    base_retain = hand_scores(fact_checkpoint, data.retain)
    for folder, scores in zip((fact_checkpoint, patched), report["models"]):
        for section, items in (("efficacy", data.forget), ("generalization", data.paraphrases),
                               ("specificity", data.retain)):  # fmt: skip
            hand = hand_scores(folder, items)
            assert scores[section]["n"] == len(items)
            assert scores[section]["answered"] == pytest.approx(share([h[0] for h in hand]), abs=1e-4), section
            assert scores[section]["probability"] == pytest.approx(np.mean([h[1] for h in hand]), abs=2e-6), section
        retain = hand_scores(folder, data.retain)
        known = [i for i, (ok, _) in enumerate(base_retain) if ok]
        assert scores["specificity"]["kept"] == pytest.approx(share([retain[i][0] for i in known]), abs=1e-4)
        tokens = hand_next_tokens(folder, data.unlabelled_neighbours)
        assert scores["specificity"]["unchanged"] == share([a == b for a, b in zip(tokens, base_tokens)])
        assert scores["fluency"]["perplexity"] == pytest.approx(hand_perplexity(folder, lines), rel=1e-4)
        assert [g["prompt"] for g in scores["generations"]] == [i.prompt for i in data.forget]

    base, damaged = report["models"]
    assert base["name"] == "base" and base["patch"] is None and base["efficacy"]["answered"] == 1.0
    assert damaged["patch"]["method"] == "manual" and damaged["patch"]["bytes"] == workdir["patch"].stat().st_size
    assert damaged["efficacy"]["answered"] < 1.0  # the damage shows
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
    assert "text sampled from the base model" in out
    assert out.count("The capital of Zorvia") == 1  # one generation row, as asked


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
    assert data.forget == [Item("Eiffel Tower is located in", "Paris")]
    assert data.paraphrases == [Item("Where is the Eiffel Tower? It is in", "Paris")]
    assert data.retain == [Item("The Louvre is located in", "Paris"), Item("Notre-Dame is located in", "Paris")]

    zsre = jsonl(tmp_path / "zsre.jsonl", [{
        "subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
        "answers": ["Illinois Institute of Technology"], "rephrase": "What university did Watts Humphrey take part in?",
        "alt": "University of Michigan", "loc": "nq question: who played desmond doss father in hacksaw ridge",
        "loc_ans": "Hugo Weaving",
    }])  # fmt: skip
    data = load_eval_data(zsre)
    assert data.forget == [Item("What university did Watts Humphrey attend?", "Illinois Institute of Technology")]
    assert data.paraphrases[0].answer == "Illinois Institute of Technology"
    assert data.retain == [Item("who played desmond doss father in hacksaw ridge", "Hugo Weaving")]


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
        (["--device", "tpu:x"], "unknown device"),
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
