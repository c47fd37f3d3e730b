"""200 requests in one edit of a trained tiny fact model: forgetting, specificity, bounded memory (issue 13).

The shared fact model knows 48 facts, too few for 200 requests with facts
left over to check, so this test trains its own on 256 generated facts
(tests/fact_model.py :func:`many_facts`: 64 invented subjects × 4
relations, same architecture and training as the 48-fact model) and asks
one ``compute_edit`` to forget every fact of 50 subjects (200 requests).
The 56 facts of the other 14 subjects are the specificity check: half are
given as the retain file, the other half (held out) are protected by nothing
but the edit's own terms.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from tests.fact_model import answered, many_facts, train_fact_model
from zupatch.engine.create import CreateConfig, compute_edit, restore_weights
from zupatch.engine.solvers import ClosedFormParams
from zupatch.engine.stats import StatsConfig
from zupatch.engine.targets import OptimisationConfig

#: The settings of tests/test_engine_create.py's BEHAVIOUR, with 50 neutral-target steps (the
#: default 150 triples the time for the same result here) and each retain key weighted as 10 forget
#: keys, because there are 200 forget keys against 28 retain facts (figures below).
MANY = CreateConfig(
    neutral=OptimisationConfig(clamp_norm_factor=4.0, max_steps=50),
    closed_form=ClosedFormParams(lambda_retain=2000.0, lambda_forget=50.0, projection="off"),
    stats=StatsConfig(sampled_token_budget=4096),
    retain_key_weight=10.0,
)
#: Bars, below what was measured on 2026-12-02 with the fact model trained in float64 (the same
#: model on every machine; tests/fact_model.py): 185/200 forgotten (0.93), 25/56 other facts kept
#: (0.45), 9/28 of the held-out ones (0.32); retain weight 30 or 100 keeps 26 or 30; weight 0 (no
#: protection) keeps 14, 6 of them held out, so the KEPT bar fails without it. (The earlier
#: 172/200, 40/56 and 16/28 were of a float32-trained model, which differed from machine to
#: machine.) Room is left for the edit's own float differences, which move a few borderline facts.
FORGOTTEN, KEPT, KEPT_HELD_OUT = 0.85, 0.39, 0.25
#: Peak RSS growth allowed during the edit. Measured: about 16 MB (the f×f statistics here are
#: 256² float64 = 0.5 MB, the forwards run at most 256 rows). The bound catches an edit that
#: holds per-request f×f matrices or runs all rows of all requests at once, not a few MB.
RSS_GROWTH_BOUND = 256 * 2**20
#: Rows per forward: optimise_representations and fact_activations split at 256.
MAX_ROWS = 256


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Samples this process's RSS every 10 ms in a thread (torch releases the GIL in its ops)."""

    def __enter__(self) -> _PeakRSS:
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


@pytest.mark.slow
def test_two_hundred_requests_in_one_edit_of_the_fact_model() -> None:
    facts, tokenizer = many_facts(subjects=64)
    model = train_fact_model(facts, tokenizer)
    assert all(answered(model, tokenizer, facts)), "the tiny model did not memorise its 256 facts"
    subjects = list(dict.fromkeys(fact.subject for fact in facts))
    forgotten_subjects = set(subjects[:50])
    forget = [i for i, fact in enumerate(facts) if fact.subject in forgotten_subjects]
    others = [i for i in range(len(facts)) if i not in set(forget)]
    assert len(forget) == 200 and len(others) == 56
    retain, held_out = others[::2], others[1::2]

    rows: list[int] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    try:
        with _PeakRSS() as rss:
            result = compute_edit(model, tokenizer, [facts[i] for i in forget], MANY,
                                  retain_requests=[facts[i] for i in retain])  # fmt: skip
    finally:
        hook.remove()
    try:
        now = answered(model, tokenizer, facts)
        forgotten = sum(not now[i] for i in forget) / len(forget)
        kept = sum(now[i] for i in others) / len(others)
        kept_held_out = sum(now[i] for i in held_out) / len(held_out)
        growth = rss.peak - rss.start
        print({"forgotten": forgotten, "kept": kept, "kept_held_out": kept_held_out, "rss_growth_mb": growth / 2**20,
               "max_rows": max(rows), "timings": result.timings})  # fmt: skip
        assert result.request_count == 200
        assert forgotten >= FORGOTTEN, (forgotten, kept, kept_held_out)
        assert kept >= KEPT and kept_held_out >= KEPT_HELD_OUT, (forgotten, kept, kept_held_out)
        assert growth < RSS_GROWTH_BOUND, growth
        assert max(rows) <= MAX_ROWS < sum(rows), (max(rows), sum(rows))  # split into bounded batches
        assert all(torch.isfinite(edit.factors.U).all() and torch.isfinite(edit.factors.B).all()
                   for edit in result.layers)  # fmt: skip
        # The passes' factors compose; their sum is kept at its numerical rank, never above min(d, f).
        assert result.diagnostics["verification"]["passes"] > 1
        assert all(edit.factors.rank <= min(edit.factors.shape) for edit in result.layers)
    finally:
        restore_weights(model, result)
    assert all(answered(model, tokenizer, facts))
