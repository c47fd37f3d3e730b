"""The answer scores agree with a hand computation on a tiny model."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from zupatch.eval.metrics import perplexity, score_answers


def test_scores_match_a_token_by_token_computation(tiny_checkpoint) -> None:
    folder = tiny_checkpoint("llama", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    prompts = ["The capital of France is", "Gold has the symbol", "A"]
    answers = ["Paris", "Au", "longer answer here"]
    scores = score_answers(model, tok, prompts, answers, batch_size=2)  # batching and padding exercised
    for prompt, answer, score in zip(prompts, answers, scores):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(prompt + " " + answer, add_special_tokens=False)["input_ids"][len(p):]
        probs, hits = [], []
        for k, token in enumerate(a):  # one unpadded forward per answer token
            with torch.no_grad():
                logits = model(torch.tensor([p + a[:k]])).logits[0, -1]
            probs.append(torch.softmax(logits, -1)[token].item())
            hits.append(int(logits.argmax()) == token)
        assert score.first_token_top1 == hits[0]
        assert score.greedy == all(hits)
        assert abs(score.mean_probability - sum(probs) / len(probs)) < 1e-5


def test_perplexity_is_the_exponentiated_mean_nll(tiny_checkpoint) -> None:
    folder = tiny_checkpoint("llama", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    texts = ["hello world, this is text", "another line"]
    nll, n = 0.0, 0
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
        nll -= sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1))
        n += len(ids) - 1
    assert abs(perplexity(model, tok, texts) - torch.tensor(nll / n).exp().item()) < 1e-3
