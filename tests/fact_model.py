"""A tiny Llama trained to memorise 48 synthetic facts, with a word-level tokenizer.

Shared by the engine, baseline and evaluation tests (fixture ``fact_model`` in
conftest.py): forgetting must be real forgetting of trained knowledge, not a
random model's noise.
"""

from __future__ import annotations

import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from zupatch.engine.requests import ForgetRequest

SUBJECTS = [
    "Zorvia", "Quenth", "Marlo", "Tibbet", "Varsk", "Olmund", "Pexa", "Drunn",
    "Kaltor", "Wemby", "Sollan", "Frix", "Brandel", "Yusk", "Hovan", "Gretl",
]  # fmt: skip
# The prompts end at the subject: a tiny model looks facts up from the last
# token, so the subject's last token must be where the answer is predicted
# (in large models, attention carries it there from inside the sentence).
RELATIONS = {
    "The capital of {}": "Plim Osk Raddle Veem Tarn Culp Nisk Bower Dremm Ilva Quost Sarn Elb Fenn Gorr Hult",
    "The language of {}": "Zelish Mornic Tavan Quell Brisk Ondu Pelta Rask Sivo Ulmer Vanta Wesk Xeno Yarro Kesh Lumo",
    "The currency of {}": "drab pell quid zent morr tala vex bisk curl dime feln grot hask jelp kron lutt",
}
FORGET = [0, 22]  # (capital, Zorvia) and (language, Pexa)


def synthetic_facts() -> list[ForgetRequest]:
    rng = random.Random(0)
    facts = []
    for template, answers in RELATIONS.items():
        shuffled = answers.split()
        rng.shuffle(shuffled)
        facts += [ForgetRequest(template, subject, answer) for subject, answer in zip(SUBJECTS, shuffled)]
    return facts


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Whole words as tokens, BOS added like Llama's tokenizer."""
    words = ["<unk>", "<s>", "</s>", "<pad>", ".", "a", "is", "The", "of", "capital", "language", "currency"]
    words += SUBJECTS + [a for answers in RELATIONS.values() for a in answers.split()]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def train_fact_model(
    facts: list[ForgetRequest], tokenizer: PreTrainedTokenizerFast, steps: int = 300
) -> LlamaForCausalLM:
    """A 4-layer Llama that memorises every fact (~300 full-batch Adam steps)."""
    encoded = [tokenizer(f"{fact.text} {fact.target} .")["input_ids"] + [tokenizer.eos_token_id] for fact in facts]
    ids = torch.tensor(encoded)  # all facts have the same number of words
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


@torch.no_grad()
def answered(model, tokenizer, facts: list[ForgetRequest]) -> list[bool]:
    """Whether the greedy next token after each prompt is its answer."""
    ids = torch.tensor([tokenizer(fact.text)["input_ids"] for fact in facts])
    predicted = model(input_ids=ids).logits[:, -1].argmax(-1).tolist()
    return [p == tokenizer.convert_tokens_to_ids(f.target) for p, f in zip(predicted, facts)]
