"""Unlearning real knowledge: SmolLM2-135M-Instruct, through the CLI, judged by plain transformers.

Forget three facts the model knows (two capitals and a chemical symbol) with
the default settings, a --retain file holding every other one of the 47 other
facts, and a 4096-token self-sampled corpus; then, on the applied checkpoint
loaded with ``AutoModelForCausalLM.from_pretrained``:
- the true answer is no longer the top-1 token on any forget prompt;
- most paraphrases the base model answered forget too;
- >= 90% of the other facts (including facts about the same subjects:
  France's language, Japan's currency) are still answered, overall and among
  those not in the retain file (measured 45/47 and 22/23 on 2026-11-23,
  when the default layers were 17-19);
- the perplexity of ordinary text rises by no more than 10%;
- invert restores the base checkpoint byte for byte.
Without a retain file only 19/47 survive: same-pattern facts (other capitals,
other symbols) need their keys in the statistics (docs/create.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from tests.patching import folder_digest
from zupatch.cli.main import app
from zupatch.eval.metrics import perplexity, score_answers

DATA = Path(__file__).parent / "data"
runner = CliRunner()
pytestmark = pytest.mark.slow


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fill(record: dict) -> str:
    return record["prompt"].replace("{}", record["subject"])


def evaluate(folder: Path, forget: list[dict], retain: list[dict], texts: list[str]) -> dict:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    para = [(p, r["target"]) for r in forget for p in r["paraphrases"]]
    return {
        "forget": score_answers(model, tok, [fill(r) for r in forget], [r["target"] for r in forget]),
        "paraphrases": score_answers(model, tok, [p for p, _ in para], [a for _, a in para]),
        "retain": score_answers(model, tok, [fill(r) for r in retain], [r["target"] for r in retain]),
        "perplexity": perplexity(model, tok, texts),
    }


def test_forget_three_facts_keep_the_rest(smollm2_checkpoint: Path, smollm2_stats_cache: Path,
                                          tmp_path: Path) -> None:  # fmt: skip
    forget_file = DATA / "smollm2_forget.jsonl"
    forget = load_jsonl(forget_file)
    forgotten = {(r["prompt"], r["subject"]) for r in forget}
    retain = [r for r in load_jsonl(DATA / "smollm2_facts.jsonl") if (r["prompt"], r["subject"]) not in forgotten]
    texts = [t for t in (DATA / "ordinary_text.txt").read_text().splitlines() if t.strip()]
    assert len(retain) >= 30

    base = evaluate(smollm2_checkpoint, forget, retain, texts)
    assert all(s.first_token_top1 for s in base["forget"]), "the base model should know the facts to forget"
    known_paraphrases = [i for i, s in enumerate(base["paraphrases"]) if s.first_token_top1]
    known_retain = [i for i, s in enumerate(base["retain"]) if s.greedy]
    assert len(known_paraphrases) >= 5 and len(known_retain) >= 30

    retain_file = tmp_path / "retain.jsonl"
    retain_file.write_text("".join(json.dumps(r) + "\n" for r in retain[::2]))
    held_out = set(range(1, len(retain), 2))
    patch = tmp_path / "forget.zup.safetensors"
    result = runner.invoke(app, ["create", "-m", str(smollm2_checkpoint), "--forget", str(forget_file), "-o", str(patch),
                                 "--retain", str(retain_file), "--tokens", "4096", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    out = tmp_path / "unlearned"
    assert runner.invoke(app, ["apply", str(patch), "-m", str(smollm2_checkpoint), "-o", str(out)]).exit_code == 0

    after = evaluate(out, forget, retain, texts)
    report = {
        "forget_top1": [s.first_token_top1 for s in after["forget"]],
        "paraphrases_still_known": sum(after["paraphrases"][i].first_token_top1 for i in known_paraphrases),
        "paraphrases_known_before": len(known_paraphrases),
        "retain_kept": sum(after["retain"][i].greedy for i in known_retain),
        "retain_known_before": len(known_retain),
        "held_out_kept": sum(after["retain"][i].greedy for i in known_retain if i in held_out),
        "held_out_known_before": sum(1 for i in known_retain if i in held_out),
        "perplexity": (base["perplexity"], after["perplexity"]),
        "layers": summary["layers"],
        "ranks": summary["ranks"],
        "seconds": summary["timings"].get("total"),
    }
    print(json.dumps(report))
    assert not any(report["forget_top1"]), report
    assert report["paraphrases_still_known"] <= len(known_paraphrases) // 2, report
    assert report["retain_kept"] >= 0.9 * report["retain_known_before"], report
    assert report["held_out_kept"] >= 0.9 * report["held_out_known_before"], report
    assert after["perplexity"] <= 1.10 * base["perplexity"], report

    inverse = tmp_path / "restore.zup.safetensors"
    assert runner.invoke(app, ["invert", str(patch), "-o", str(inverse)]).exit_code == 0
    restored = tmp_path / "restored"
    assert runner.invoke(app, ["apply", str(inverse), "-m", str(out), "-o", str(restored)]).exit_code == 0
    assert folder_digest(restored) == folder_digest(smollm2_checkpoint)


def test_without_a_retain_file_same_template_facts_stay(smollm2_checkpoint: Path, smollm2_stats_cache: Path,
                                                        tmp_path: Path) -> None:  # fmt: skip
    """The README's workflow as a new user runs it: only --forget. The three facts are
    no longer produced, and most facts sharing their templates (other capitals,
    other chemical symbols, none of them given to create in any form, none used
    to tune the defaults) still are, judged by greedy generation on the applied
    checkpoint. Measured 2026-11-30: 19 of 23 (83%) at layers 17-19, 23 of 23
    at the default layers since (4-6); the bar is the goal, 90%
    (docs/benchmarks.md)."""
    forget_file = DATA / "smollm2_forget.jsonl"
    forget = load_jsonl(forget_file)
    forgotten = {(r["prompt"], r["subject"]) for r in forget}
    templates = {r["prompt"] for r in forget}
    same = [r for r in load_jsonl(DATA / "smollm2_facts.jsonl")
            if r["prompt"] in templates and (r["prompt"], r["subject"]) not in forgotten]  # fmt: skip
    plain = tmp_path / "forget.jsonl"  # no paraphrases: nothing but the facts themselves
    plain.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "subject", "target")}) + "\n" for r in forget))
    base_model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint)

    def produced(model, records: list[dict]) -> list[bool]:
        """Whether greedy generation after the prompt starts with the answer."""
        out = []
        for r in records:
            ids = tokenizer(fill(r), return_tensors="pt")
            answer = len(tokenizer(" " + r["target"], add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                generated = model.generate(**ids, max_new_tokens=answer + 1, do_sample=False,
                                           pad_token_id=tokenizer.eos_token_id)  # fmt: skip
            text = tokenizer.decode(generated[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
            out.append(text.strip().startswith(r["target"]))
        return out

    assert all(produced(base_model, forget))
    known = [r for r, ok in zip(same, produced(base_model, same)) if ok]
    assert len(known) >= 15
    patch = tmp_path / "forget.zup.safetensors"
    result = runner.invoke(app, ["create", "-m", str(smollm2_checkpoint), "--forget", str(plain), "-o", str(patch),
                                 "--tokens", "4096", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    out = tmp_path / "unlearned"
    assert runner.invoke(app, ["apply", str(patch), "-m", str(smollm2_checkpoint), "-o", str(out)]).exit_code == 0
    patched = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    still = produced(patched, forget)
    kept = produced(patched, known)
    report = {"forget_produced": still, "kept": sum(kept), "known": len(known),
              "lost": [fill(r) for r, ok in zip(known, kept) if not ok],
              "verification": summary["diagnostics"]["verification"]}  # fmt: skip
    print(json.dumps(report))
    assert not any(still), report
    assert sum(kept) >= 0.9 * len(known), report
