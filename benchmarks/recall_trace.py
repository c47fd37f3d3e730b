"""Where SmolLM2-135M-Instruct recalls a fact: the answer's probability with the
MLP outputs of three consecutive layers zeroed at one token (the subject's last
token, or the prompt's last token), for every window of layers.

docs/create.md ("Where the paraphrases are recalled") reads these figures to
explain why an edit at the subject token does not reach paraphrases without
that token. The prompts are a forget prompt of benchmarks/data/quality_forget.jsonl
and paraphrases of the set that the default patch still answered.

Usage (from benchmarks/): python recall_trace.py [--step 2]
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

#: (prompt, answer, the subject word whose last token is ablated)
CASES = [
    ("The capital of France is", "Paris", "France"),
    ("The French capital is", "Paris", "French"),
    ("The Japanese capital is", "Tokyo", "Japanese"),
    ("The Chinese capital is", "Beijing", "Chinese"),
    ("People in Italy speak", "Italian", "Italy"),
    ("The chemical symbol for gold is", "Au", "gold"),
]
WINDOW = 3


def answer_probability(model, ids: torch.Tensor, answer: int, layers: range, position: int | None) -> float:
    """p(answer) at the last position, MLP outputs of ``layers`` zeroed at ``position``."""

    def zero(module, inputs, output):
        output = output.clone()
        output[0, position] = 0
        return output

    mlps = [model.model.layers[i].mlp for i in layers] if position is not None else []
    handles = [mlp.register_forward_hook(zero) for mlp in mlps]
    try:
        with torch.no_grad():
            return model(ids).logits[0, -1].softmax(-1)[answer].item()
    finally:
        for handle in handles:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step", type=int, default=2, help="first layers of successive windows differ by this")
    args = parser.parse_args()

    from zupatch.models.smollm2 import demo_checkpoint

    path = demo_checkpoint(progress=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    starts = range(0, len(model.model.layers) - WINDOW + 1, args.step)
    for prompt, answer, subject in CASES:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        answer_id = tokenizer(" " + answer, add_special_tokens=False).input_ids[0]
        end = prompt.index(subject) + len(subject)
        offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
        subject_at = max(i for i, (start, _) in enumerate(offsets) if start < end)
        base = answer_probability(model, ids, answer_id, range(0), None)
        print(f"{prompt!r} -> {answer}: {base:.2f} unablated")
        for name, position in (("subject", subject_at), ("last", ids.shape[1] - 1)):
            figures = [answer_probability(model, ids, answer_id, range(s, s + WINDOW), position) for s in starts]
            print(f"  {name:>7}: " + " ".join(f"{s}:{p:.2f}" for s, p in zip(starts, figures)))


if __name__ == "__main__":
    main()
