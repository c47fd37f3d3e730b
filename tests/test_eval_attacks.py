"""``zupatch eval --attack``: each attack's figures against a plain torch/transformers computation.

The hand computations load the base checkpoint and the patched checkpoint that
``apply_to_checkpoint`` writes, do to them what the attack describes with
plain code (gguf's quantizer called directly, an Adam loop, hidden states
read through ``output_hidden_states``), and score each prompt on its own,
unbatched. ``eval`` (batched, patch applied in memory) must agree.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.fact_model import FORGET
from tests.test_eval import damage_patch, doc_schema, jsonl, record, run_eval
from zupatch.checkpoint.apply import apply_to_checkpoint
from zupatch.engine.requests import parse_request_record
from zupatch.errors import ZupatchError
from zupatch.eval.attacks import ALL, parse_attacks
from zupatch.eval.attacks.base import Outcome, Subject
from zupatch.eval.attacks.base import contains_answer
from zupatch.eval.attacks.chat import chat_replies, question_for
from zupatch.eval.attacks import chat, quant, relearn
from zupatch.eval.attacks.quant import round_trip
from zupatch.eval.data import EvalData, Item, load_eval_data
from zupatch.patch.format import Patch


def load_requests_from(records: list[dict]) -> list:
    return [r for record in records for r in parse_request_record(record)]


# --------------------------------------------------------------------------- quantization by hand


def roundf(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def hand_q8_0(x: np.ndarray) -> np.ndarray:
    """Q8_0 as ggml-quants.c defines it: blocks of 32, d = max|x| / 127 stored as f16, q = roundf(x / d)."""
    blocks = x.reshape(-1, 32).astype(np.float32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    inverse = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, 1, d))
    q = roundf(blocks * inverse).astype(np.int8)
    return (q.astype(np.float32) * d.astype(np.float16).astype(np.float32)).reshape(x.shape)


def test_q8_0_round_trip_is_the_hand_implementation() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.05, (4, 96)).astype(np.float32)
    x[1, :32] = 0.0  # an all-zero block: scale 0, values 0
    x[2, 40] = 3.0  # an outlier sets its block's scale
    expected = hand_q8_0(x)
    assert np.array_equal(round_trip(x, "Q8_0"), expected)
    assert 0 < np.abs(expected - x).max() <= np.abs(x).max() / 127  # it did round, by at most half a step... of 2 d
    assert not np.array_equal(round_trip(x, "Q4_0"), expected)  # a coarser type rounds differently
    # rows not a multiple of the block: through float16, as llama.cpp's converter stores them
    odd = rng.normal(0, 1, (3, 33)).astype(np.float32)
    assert np.array_equal(round_trip(odd, "Q8_0"), odd.astype(np.float16).astype(np.float32))


# --------------------------------------------------------------------------- the fact model, by hand


@pytest.fixture
def attack_workdir(tmp_path: Path, fact_checkpoint: Path, _trained_fact_model) -> dict:
    """Two facts to forget (with paraphrases), ten retain facts, and a patch that wipes every MLP."""
    facts = _trained_fact_model[2]
    data = jsonl(tmp_path / "forget.jsonl", [
        record(facts[FORGET[0]], paraphrases=["a capital of {}"]),
        record(facts[FORGET[1]], paraphrases=["The language of {} is"]),
    ])  # fmt: skip
    retain = jsonl(tmp_path / "retain.jsonl", [record(f) for f in facts[3:48:5]])
    text = tmp_path / "text.txt"
    text.write_text("The currency of Marlo is drab .\nThe capital of Frix is a\n")
    patch = damage_patch(fact_checkpoint, tmp_path / "damage.zup.safetensors", seed=1, noise=0.02)
    patched = tmp_path / "patched"
    apply_to_checkpoint(Patch.load(patch), fact_checkpoint, patched)
    return {"data": data, "retain": retain, "text": text, "patch": patch, "patched": patched}


def load(folder: Path) -> tuple[torch.nn.Module, object]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def encode(tok, item: Item) -> tuple[list[int], list[int]]:
    return [tok.bos_token_id] + tok(item.prompt, add_special_tokens=False)["input_ids"], tok(
        " " + item.answer, add_special_tokens=False
    )["input_ids"]


@torch.no_grad()
def hand_answers(model, tok, items: list[Item]) -> list[tuple[bool, float]]:
    """(greedy reproduces the answer, its probability), one unpadded forward per answer token."""
    out = []
    for item in items:
        prompt, answer = encode(tok, item)
        hits, logp = [], 0.0
        for k, token in enumerate(answer):
            logits = model(torch.tensor([prompt + answer[:k]])).logits[0, -1].double()
            hits.append(int(logits.argmax()) == token)
            logp += float(torch.log_softmax(logits, -1)[token])
        out.append((all(hits), math.exp(logp)))
    return out


@torch.no_grad()
def hand_perplexity(model, tok, lines: list[str]) -> float:
    nll, count = 0.0, 0
    for line in lines:
        ids = tok(line, add_special_tokens=True)["input_ids"]  # BOS first, as eval reads text
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        nll -= sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1))
        count += len(ids) - 1
    return math.exp(nll / count)


def hand_quantize(model, qtype: str) -> None:
    """Every nn.Linear of the decoder layers through gguf's quantizer, called directly."""
    kind = gguf.GGMLQuantizationType[qtype]
    with torch.no_grad():
        for layer in model.model.layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    w = module.weight.numpy()
                    module.weight.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind)))


def hand_relearn(model, tok, texts: list[str], steps: int, lr: float, batch: int = 8):
    """``steps`` Adam steps, ``batch`` texts at a time in order (cycling), right-padded, loss on real tokens only."""
    model = copy.deepcopy(model)
    rows = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        chosen = [rows[(step * batch + i) % len(rows)] for i in range(min(batch, len(rows)))]
        width = max(map(len, chosen))
        ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in chosen])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chosen])
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


@torch.no_grad()
def hand_topk(model, tok, items: list[Item], k: int) -> list[bool]:
    hits = []
    for item in items:
        prompt, answer = encode(tok, item)
        hits.append(answer[0] in torch.topk(model(torch.tensor([prompt])).logits[0, -1], k).indices.tolist())
    return hits


@torch.no_grad()
def hand_lens(model, tok, items: list[Item], first: int) -> list[bool]:
    """hidden_states[l + 1] is layer l's output (the last one is normed by transformers: use the logits)."""
    hits = []
    for item in items:
        prompt, answer = encode(tok, item)
        out = model(torch.tensor([prompt]), output_hidden_states=True)
        layers = len(model.model.layers)
        top1 = [int(model.lm_head(model.model.norm(out.hidden_states[layer + 1][0, -1])).argmax())
                for layer in range(first, layers - 1)]  # fmt: skip
        top1.append(int(out.logits[0, -1].argmax()))
        hits.append(answer[0] in top1)
    return hits


def share(flags: list[bool]) -> float:
    return sum(flags) / len(flags)


def check_answers(figures: dict, hand: list[tuple[bool, float]], lines: list[int] | None = None) -> None:
    assert figures["n"] == len(hand)
    assert figures["answered"] == pytest.approx(share([h[0] for h in hand]), abs=1e-4)
    assert figures["probability"] == pytest.approx(np.mean([h[1] for h in hand]), abs=2e-6)
    if lines is not None:  # the data file's lines of the prompts still answered
        assert figures["answered_lines"] == [line for (ok, _), line in zip(hand, lines) if ok]


def hits(flags: list[bool], lines: list[int]) -> dict:
    """An attack's figures for these hand-computed hits of prompts on these data file lines."""
    return {"n": len(flags), "answered": pytest.approx(share(flags), abs=1e-4),
            "answered_lines": sorted({line for ok, line in zip(flags, lines) if ok})}  # fmt: skip


def test_attacks_agree_with_a_hand_computation(attack_workdir: dict, fact_checkpoint: Path) -> None:
    w = attack_workdir
    code, out = run_eval("-m", str(fact_checkpoint), "-d", str(w["data"]), "-p", str(w["patch"]),
                         "--retain", str(w["retain"]), "--text", str(w["text"]), "--probes", "0", "--generations", "0",
                         "--attack", "quant:q4_0", "-a", "topk:3", "-a", "lens", "-a", "relearn:6", "-a", "chat",
                         "-a", "mention", "--json")  # fmt: skip
    assert code == 0, out
    report = json.loads(out)
    doc = doc_schema()
    import jsonschema

    jsonschema.validate(report, doc)
    assert report["version"] == 3
    assert report["settings"]["attacks"] == ["quant:Q4_0", "topk:3", "lens", "relearn:6", "chat", "mention"]
    assert [a["name"] for a in report["attacks"]] == report["settings"]["attacks"]
    assert report["attacks"][3]["settings"] == {"steps": 6, "learning_rate": 2e-5, "batch": 8}
    data = load_eval_data(w["data"], w["retain"])
    lines = [t for t in w["text"].read_text().splitlines() if t.strip()]
    texts = [f"{i.prompt} {i.answer}" for i in data.retain]
    forgotten = ("Zorvia", "Pexa", "Quost", "Zelish")  # subjects and answers of the forget facts
    texts = [t for t in texts if not any(w in t for w in forgotten)]
    assert len(texts) == len(data.retain) - 1  # "The currency of Pexa kron" is not trained on

    # each forget record has one paraphrase: subjects in record order serve both sections, and
    # the n-th forget prompt and the n-th paraphrase come from line n of the data file
    mention_subjects = [r["subject"] for r in map(json.loads, w["data"].read_text().splitlines())]
    record_lines = list(range(1, len(mention_subjects) + 1))
    assert len(data.forget) == len(data.paraphrases) == len(record_lines)
    sentences = ("{}. ", "Here is a fact about {}. ", "We talked about {} yesterday. ")
    models = {folder: load(folder) for folder in (fact_checkpoint, w["patched"])}
    base_model, tok = models[fact_checkpoint]
    quant_base, relearn_base = copy.deepcopy(base_model), hand_relearn(base_model, tok, texts, 6, 2e-5)
    hand_quantize(quant_base, "Q4_0")
    base_kept = {"quant": hand_answers(quant_base, tok, data.retain),
                 "relearn": hand_answers(relearn_base, tok, data.retain)}  # fmt: skip
    for (folder, (model, tok)), scores in zip(models.items(), report["models"]):
        quant_q, topk, lens, relearned_e, chat_e, mention_e = scores["attacks"]
        assert quant_q["name"] == "quant:Q4_0" and quant_q["skipped"] is None
        assert quant_q["details"] == {"type": "Q4_0", "tensors": 4 * 7, "f16_fallback": 0}
        quantized = copy.deepcopy(model)
        hand_quantize(quantized, "Q4_0")
        relearned = hand_relearn(model, tok, texts, 6, 2e-5)
        for entry, attacked, kind in ((quant_q, quantized, "quant"), (relearned_e, relearned, "relearn")):
            check_answers(entry["efficacy"], hand_answers(attacked, tok, data.forget), record_lines)
            check_answers(entry["generalization"], hand_answers(attacked, tok, data.paraphrases), record_lines)
            retain = hand_answers(attacked, tok, data.retain)
            check_answers(entry["specificity"], retain)
            known = [i for i, (ok, _) in enumerate(base_kept[kind]) if ok]
            assert entry["specificity"]["kept"] == pytest.approx(share([retain[i][0] for i in known]), abs=1e-4)
            assert entry["fluency"]["perplexity"] == pytest.approx(hand_perplexity(attacked, tok, lines), rel=1e-4)
            assert entry["fluency"]["perplexity_change"] == pytest.approx(
                entry["fluency"]["perplexity"] / report["models"][0]["fluency"]["perplexity"] - 1, abs=2e-4
            )
        unattacked = scores["fluency"]["perplexity"]
        # The attacks moved the perplexity by more than twice the tolerance above (rel 1e-4), so the
        # comparisons could tell an attacked model from the model itself. Q4_0 moves this tiny model's
        # perplexity by 0.08% on an AMD EPYC box; a bar of 0.1% failed there.
        for entry in (quant_q, relearned_e):
            assert abs(entry["fluency"]["perplexity"] / unattacked - 1) > 2e-4, entry["name"]
        assert relearned_e["details"] == {"steps": 6, "learning_rate": 2e-5, "batch": 8, "trained_on": "retain facts",
                                      "texts": len(texts)}  # fmt: skip
        for section, items in (("efficacy", data.forget), ("generalization", data.paraphrases)):
            assert topk[section] == hits(hand_topk(model, tok, items, 3), record_lines)
            assert lens[section] == hits(hand_lens(model, tok, items, 0), record_lines)
        assert topk["specificity"] is None and topk["fluency"] is None and topk["details"] == {"k": 3}
        assert lens["details"] == {"from_layer": 0, "to_layer": 3}  # the patch edits layers 0 to 3
        assert chat_e["skipped"] == "the tokenizer has no chat template" and chat_e["efficacy"] is None
        for section, items in (("efficacy", data.forget), ("generalization", data.paraphrases)):
            named = [Item(sentence.format(subject) + item.prompt, item.answer)
                     for item, subject in zip(items, mention_subjects) for sentence in sentences]  # fmt: skip
            hand = [ok for ok, _ in hand_answers(model, tok, named)]
            assert mention_e[section] == hits(hand, [line for line in record_lines for _ in sentences])
        assert mention_e["specificity"] is None and mention_e["details"] == {"sentences": 3}
    damaged = report["models"][1]
    assert damaged["efficacy"]["answered"] < 1.0 and damaged["patch"]["sha256"]  # the patch does something

    code, human = run_eval("-m", str(fact_checkpoint), "-d", str(w["data"]), "-p", str(w["patch"]),
                           "--text", str(w["text"]), "--probes", "0", "-a", "topk", "-a", "chat")  # fmt: skip
    assert code == 0 and "topk:5: forget prompts answered" in human, human
    assert "chat: skipped, the tokenizer has no chat template" in human
    table = human[human.index("after each attack") :].splitlines()
    assert max(len(line) for line in table) <= 80, table


def test_attacks_leave_the_model_as_they_found_it(fact_model) -> None:
    model, tokenizer, facts = fact_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = EvalData(forget=[Item(facts[0].text, facts[0].target)], retain=[Item(facts[5].text, facts[5].target)])
    seen: list[float] = []

    def score(attacked, base_raw):
        seen.append(float(next(attacked.parameters()).detach().abs().sum()))
        return {}, None

    subject = Subject(model, tokenizer, data, 4, 0, score)
    quant.run(quant.QuantSettings("Q4_0"), subject, None)
    relearn.run(relearn.RelearnSettings(steps=2, learning_rate=1e-2), subject, None)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


@torch.no_grad()
def test_quant_and_lens_on_a_tiny_gpt2(tiny_checkpoint) -> None:
    """GPT-2 stores its projections transposed (Conv1D) and names its final norm ln_f:
    the attacks read both from the architecture data; checked against plain code."""
    model, tok = load(tiny_checkpoint("gpt2", dtype=torch.float32))
    hand = copy.deepcopy(model)
    kind = gguf.GGMLQuantizationType.Q8_0
    for block in hand.transformer.h:
        for module in block.modules():
            if type(module).__name__ == "Conv1D":  # (in, out): GGUF rows are the output units
                w = module.weight.numpy().T
                module.weight.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind).T.copy()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with quant.quantized(model, "Q8_0") as counts:
        assert counts == {"tensors": 4 * 4, "f16_fallback": 0}  # c_attn, c_proj, c_fc, mlp.c_proj per block
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), hand.state_dict().values()))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    from zupatch.eval.attacks.lens import lens_top1

    def lens(prompt: str) -> list[int]:
        """Top-1 token after layers 1, 2 (ln_f + LM head on the hidden state) and 3 (the logits), by hand."""
        ids = tok(prompt, add_special_tokens=False)["input_ids"]  # no BOS: this tokenizer adds none
        out = model(torch.tensor([ids]), output_hidden_states=True)
        top1 = [int(model.lm_head(model.transformer.ln_f(out.hidden_states[layer + 1][0, -1])).argmax())
                for layer in (1, 2)]  # fmt: skip
        return top1 + [int(out.logits[0, -1].argmax())]

    # answers whose first token is what the lens reads at layer 1, 2 or 3, so hits happen
    # (a prompt ending in a space: no separator, the answer's first byte is its first token)
    items, expected = [], []
    for index, prompt in enumerate(["Hello there, my ", "One two ", "The cat sat on the ", "Numbers: 1 2 "]):
        layers = lens(prompt)
        token = layers[index % 3]
        answer = tok.decode([token]) + "x"
        if tok(prompt + answer, add_special_tokens=False)["input_ids"][len(tok(prompt)["input_ids"])] != token:
            continue  # a byte that does not decode on its own
        items.append(Item(prompt, answer))
        expected.append([t == token for t in layers])
    assert len(items) >= 2 and all(any(e) for e in expected)
    subject = Subject(model, tok, EvalData(forget=items), 2, 1, lambda m, b: ({}, None))
    assert lens_top1(subject, items, 1) == expected


# --------------------------------------------------------------------------- chat


def test_chat_questions_and_matching() -> None:
    assert question_for(Item("The capital of France is", "Paris")) == "Complete this sentence: The capital of France is"
    assert question_for(Item("Who wrote Hamlet?", "Shakespeare")) == "Who wrote Hamlet?"
    assert question_for(Item("x", "y", "What is x?")) == "What is x?"
    assert contains_answer("The capital of France is PARIS.", "Paris")
    assert contains_answer("It is  New\nYork city", "new york")
    assert not contains_answer("Romeo and Juliet", "Rome")


def test_the_question_field() -> None:
    (request,) = parse_request_record({"prompt": "The capital of {} is", "subject": "France", "target": "Paris",
                                       "question": " What is the capital of {}? "})  # fmt: skip
    assert request.question_text == "What is the capital of France?"
    assert parse_request_record({"prompt": "p", "target": "t"})[0].question_text == ""
    for bad, message in [({"question": 3}, "field 'question' must be a string"),
                         ({"question": "Where is {}?"}, "the question has '{}' but no subject")]:  # fmt: skip
        with pytest.raises(ZupatchError, match=message):
            parse_request_record({"prompt": "Gold has the symbol", "target": "Au", **bad})


def test_chat_is_skipped_without_a_usable_template(fact_model) -> None:
    from tests.tiny_models import tiny_tokenizer

    model, _, _ = fact_model
    data = EvalData(forget=[Item("The capital of Zorvia", "Plim")])
    tok = tiny_tokenizer()
    tok.chat_template = "{{ raise_exception('a system message is required') }}"
    outcome = chat.run(chat.ChatSettings(), Subject(model, tok, data, 4, 0, lambda m, b: ({}, None)), None)
    assert outcome.skipped == "the chat template fails on a user message (TemplateError)" and not outcome.figures
    tok.chat_template = None
    outcome = chat.run(chat.ChatSettings(), Subject(model, tok, data, 4, 0, lambda m, b: ({}, None)), None)
    assert outcome.skipped == "the tokenizer has no chat template"


def test_relearn_never_trains_on_the_forget_facts() -> None:
    request = load_requests_from([{"prompt": "The chemical symbol of {} is", "subject": "gold", "target": "Au"}])
    data = EvalData(forget=[Item(request[0].text, "Au")], requests=request,
                    retain=[Item("Gold is a", "metal"), Item("The symbol of silver is", "Ag")])  # fmt: skip
    assert relearn.training_texts(data) == (["The symbol of silver is Ag"], "retain facts")
    data.retain = []
    texts, source = relearn.training_texts(data)
    assert source == "built-in text" and len(texts) == len(relearn.ORDINARY_TEXT)  # "because" does not mention Au


def test_chat_attack_on_smollm2_finds_the_base_answers(smollm2_checkpoint: Path, tmp_path: Path) -> None:
    forget = jsonl(tmp_path / "forget.jsonl", [
        {"prompt": "The capital of {} is", "subject": "France", "target": "Paris", "question": "What is the capital of {}?"},
        {"prompt": "The main language spoken in {} is", "subject": "Germany", "target": "German",
         "question": "Which language is spoken in {}?"},
        {"prompt": "The Eiffel Tower is located in the city of", "target": "Paris"},  # asked "Complete this sentence: ..."
    ])  # fmt: skip
    data = load_eval_data(forget)
    assert [i.question for i in data.forget] == ["What is the capital of France?", "Which language is spoken in Germany?", ""]
    model, tok = load(smollm2_checkpoint)
    subject = Subject(model, tok, data, 4, 0, lambda m, b: ({}, None))
    outcome = chat.run(chat.ChatSettings(), subject, None)
    assert outcome.skipped is None
    assert outcome.figures["efficacy"] == {"n": 3, "answered": 1.0, "answered_lines": [1, 2, 3]}
    assert outcome.details == {"new_tokens": 32, "questions_given": 2, "questions_derived": 1}
    # the replies, by hand: the chat template, greedy generation, one question at a time
    questions = [question_for(i) for i in data.forget] + ["Hi", "Name a very large river in South America, please."]
    replies = []
    for question in questions:
        text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                       tokenize=False)  # fmt: skip
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=32, pad_token_id=tok.pad_token_id)  # fmt: skip
        replies.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert "Paris" in replies[0] and len({len(tok(q)["input_ids"]) for q in questions}) == 4
    # generated together (left-padded: questions of four lengths), in pairs, and one by one: the same replies
    for batch_size in (len(questions), 2, 1):
        assert chat_replies(model, tok, questions, 32, batch_size) == replies, batch_size


# --------------------------------------------------------------------------- names and errors


def test_attack_names() -> None:
    assert [s.label for s in parse_attacks(["all"])] == list(ALL)
    assert [s.label for s in parse_attacks(["topk", "topk:5", "QUANT:q5_1", "relearn"])] == ["topk:5", "quant:Q5_1", "relearn:20"]
    for bad, message in [("bogus", "unknown attack 'bogus'"), ("topk:x", "K must be a whole number"),
                         ("topk:0", "K must be"), ("quant:Q3_K", "unknown GGUF type"), ("relearn:-2", "STEPS"),
                         ("lens:3", "lens takes no parameter"), ("quant:", "empty parameter"),
                         ("mention:2", "mention takes no parameter")]:  # fmt: skip
        with pytest.raises(ZupatchError, match=message):
            parse_attacks([bad])


@pytest.mark.parametrize("bad", ["bogus", "topk:x"])
def test_bad_attack_is_one_line(bad: str, fact_checkpoint: Path, tmp_path: Path) -> None:
    data = jsonl(tmp_path / "forget.jsonl", [{"prompt": "The capital of {}", "subject": "Zorvia", "target": "Plim"}])
    code, out = run_eval("-m", str(fact_checkpoint), "-d", str(data), "--attack", bad)
    assert code == 1 and out.startswith(f"error: ") and repr(bad) in out and len(out.strip().splitlines()) == 1, out
