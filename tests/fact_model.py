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


#: Syllables of the invented words of :func:`many_facts` (capitalised, 2-3 syllables, none a real word).
_SYLLABLES = ("ba", "ko", "ri", "zu", "mel", "tan", "vo", "shi", "pra", "gol", "ne", "dux", "fi", "lor", "qua", "ste")


def many_facts(subjects: int = 72, seed: int = 1) -> tuple[list[ForgetRequest], PreTrainedTokenizerFast]:
    """``4 × subjects`` facts (288 by default) about invented subjects, and their word tokenizer.

    The three relations of :data:`RELATIONS` and "The leader of {}", each with
    its own invented answer words, one per subject (shuffled, as in
    :func:`synthetic_facts`): enough facts for hundreds of requests in one
    edit with others left to check (48 facts are not). The words are drawn
    from syllables with ``seed`` and are distinct from each other and from
    the 48-fact vocabulary.
    """
    rng = random.Random(seed)
    taken = {*SUBJECTS, *" ".join(RELATIONS.values()).split()}
    words: list[str] = []
    while len(words) < 5 * subjects:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        if word not in taken:
            taken.add(word)
            words.append(word)
    names, answer_words = words[:subjects], words[subjects:]
    templates = [*RELATIONS, "The leader of {}"]
    facts = []
    for r, template in enumerate(templates):
        answers = answer_words[r * subjects : (r + 1) * subjects]
        rng.shuffle(answers)
        facts += [ForgetRequest(template, subject, answer) for subject, answer in zip(names, answers)]
    return facts, word_tokenizer(names, answer_words, ("leader",))


def word_tokenizer(
    subjects: list[str] = SUBJECTS, answers: list[str] | None = None, relation_words: tuple[str, ...] = ()
) -> PreTrainedTokenizerFast:
    """Whole words as tokens, BOS added like Llama's tokenizer (default: the 48 facts' words)."""
    words = ["<unk>", "<s>", "</s>", "<pad>", ".", "a", "is", "The", "of", "capital", "language", "currency"]
    answers = answers if answers is not None else [a for answers in RELATIONS.values() for a in answers.split()]
    words += [*relation_words, *subjects, *answers]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def train_fact_model(
    facts: list[ForgetRequest], tokenizer: PreTrainedTokenizerFast, steps: int = 300, width: int = 64,
    lr: float = 3e-3,
) -> LlamaForCausalLM:
    """A 4-layer float32 Llama that memorises every fact (~300 full-batch Adam steps); hidden
    size ``width``, MLP ``4 × width``.

    Trained in float64, then cast: 300 Adam steps amplify rounding, so float32 training
    gives a different model on each kind of CPU (its matmul kernels round differently;
    the weights of float32 and float64 training differ by up to 0.06), and the tests'
    bars held on one machine and not on another (ZeroUnlearn-GD forgot 17 of 20 facts
    on one, 9 on the other). In float64 the rounding stays far below what training
    amplifies, so every machine gets the same model to float32 precision.
    """
    encoded = [tokenizer(f"{fact.text} {fact.target} .")["input_ids"] + [tokenizer.eos_token_id] for fact in facts]
    ids = torch.tensor(encoded)  # all facts have the same number of words
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(torch.float64)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.float().eval()


@torch.no_grad()
def answered(model, tokenizer, facts: list[ForgetRequest]) -> list[bool]:
    """Whether the greedy next token after each prompt is its answer."""
    ids = torch.tensor([tokenizer(fact.text)["input_ids"] for fact in facts])
    predicted = model(input_ids=ids).logits[:, -1].argmax(-1).tolist()
    return [p == tokenizer.convert_tokens_to_ids(f.target) for p, f in zip(predicted, facts)]
