"""Facts SmolLM2-135M-Instruct states itself, for the many-request quality run.

CounterFact-style requests from the model's own knowledge: 10 templates
(capital, language, currency, country, city...) filled with 1500
capitalised single-token words of its vocabulary (chosen by a seeded
shuffle), the model's greedy answer as the target (its first word), kept
when the first answer token has probability >= 0.2 and is not the subject
itself. The facts are shuffled (seeded) and written to ``--out``
(benchmarks/data/own_facts_smollm2.jsonl holds this script's output: 1070
facts, 2026-12-01). Nothing is downloaded: the demo checkpoint is built
from the cached GGUF as ``zupatch demo`` does.

Usage: python benchmarks/own_facts.py [--out data/own_facts_smollm2.jsonl] [--words 1500]
(then docs/benchmarks.md, "1000 requests the model knows", for create and eval).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import torch

TEMPLATES = (
    "The capital of {} is", "The official language of {} is", "The currency of {} is the",
    "{} is located in the country of", "{} was born in the country of", "The primary language spoken in {} is",
    "{} is a city in", "The national sport of {} is", "{} is the capital of", "The largest city in {} is",
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data" / "own_facts_smollm2.jsonl")
    parser.add_argument("--words", type=int, default=1500, help="vocabulary words to try (fewer: a quick check)")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zupatch.models.smollm2 import demo_checkpoint

    folder = demo_checkpoint(progress=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    words = sorted({t[1:] for t in tokenizer.get_vocab() if re.fullmatch(r"Ġ[A-Z][a-z]{3,11}", t)})
    random.Random(0).shuffle(words)
    prompts = [(template, word) for word in words[: args.words] for template in TEMPLATES]
    random.Random(1).shuffle(prompts)
    tokenizer.padding_side = "left"
    facts = []
    with torch.no_grad():
        for start in range(0, len(prompts), 128):
            batch = prompts[start : start + 128]
            encoded = tokenizer([t.replace("{}", w) for t, w in batch], return_tensors="pt", padding=True)
            out = model.generate(**encoded, max_new_tokens=5, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)  # fmt: skip
            first = torch.softmax(out.scores[0], -1).max(-1).values
            for (template, word), sequence, p in zip(batch, out.sequences[:, encoded["input_ids"].shape[1] :], first):
                answer = re.match(r" ([A-Z][a-z]+)\b", tokenizer.decode(sequence, skip_special_tokens=True))
                if answer and p >= 0.2 and answer.group(1) != word:
                    facts.append({"prompt": template, "subject": word, "target": answer.group(1)})
            print(f"{start + len(batch)}/{len(prompts)} prompts, {len(facts)} facts", flush=True)
    random.Random(2).shuffle(facts)
    args.out.write_text("".join(json.dumps(f) + "\n" for f in facts))
    print(f"wrote {len(facts)} facts to {args.out}")


if __name__ == "__main__":
    main()
