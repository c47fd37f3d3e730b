"""`zupatch demo` end to end on the SmolLM2 demo checkpoint, and its user errors.

The end-to-end test runs the real command (create, apply, invert, restore) on
the shared demo checkpoint with a small statistics budget and checks the
report against the files: the forget prompt's answer is gone, unrelated
answers stay, the restored folder hashes like the original (hashed here, not
only taken from the report), the patch is small, and no file the demo wrote
holds the fact's text.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.patching import folder_digest
from tests.test_hostile import expect_error
from zupatch.cli.main import app
from zupatch.demo import DEMO_OUTPUTS, INVERSE_FILE, PATCH_FILE, RESTORED_DIR, UNLEARNED_DIR

runner = CliRunner()
#: The demo's default statistics budget. Sampling costs about the same for 1024 tokens (one batch of
#: 128-token samples either way), and a smaller budget gives a larger edit: 1024 tokens made a 307 KB
#: patch (5.8% of the changed tensors, over the format's 5% size target), 4096 tokens 204 KB (3.8%).
TOKENS = "4096"
FORGET_WORDS = (b"france", b"paris", b"capital")


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".demo-partial-" in p.name or ".demo-old-" in p.name]


@pytest.mark.slow
def test_demo_end_to_end(smollm2_checkpoint: Path, smollm2_stats_cache: Path, tmp_path: Path) -> None:
    cache = smollm2_stats_cache  # private cache, holding the session's statistics: checked for text below
    given = {p: p.read_bytes() for p in (cache / "stats").iterdir()}
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--model", str(smollm2_checkpoint), "-o", str(out), "--tokens", TOKENS,
                                 "--device", "cpu", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)

    rows = {r["kind"]: [] for r in report["rows"]}
    for r in report["rows"]:
        rows[r["kind"]].append(r)
    (forget,) = rows["forget"]
    assert forget["prompt"] == "The capital of France is"
    assert "paris" in forget["before"].lower() and forget["said_before"], forget
    assert "paris" not in forget["after"].lower() and not forget["said_after"], forget
    assert forget["verdict"] == "forgotten" and report["forgotten"]
    assert len(rows["paraphrase"]) == 1
    unrelated = rows["unrelated"]
    assert len(unrelated) >= 3 and all(r["said_before"] for r in unrelated), unrelated
    for r in unrelated:  # e.g. "The capital of Germany is" -> Berlin, before and after
        assert r["answer"].lower() in r["after"].lower() and r["verdict"] == "kept", r

    # the round trip, as reported and as hashed here
    assert report["round_trip_exact"] is True and report["mismatched_files"] == []
    assert folder_digest(out / RESTORED_DIR) == folder_digest(smollm2_checkpoint)
    unlearned = folder_digest(out / UNLEARNED_DIR)
    changed = {f for f, h in folder_digest(smollm2_checkpoint).items() if unlearned[f] != h}
    assert changed and all(f.endswith(".safetensors") for f in changed)

    # sizes: the patch is a small fraction of the model and of the tensors it changes
    patch = out / PATCH_FILE
    assert patch.stat().st_size == report["patch_bytes"]
    model_bytes = sum(p.stat().st_size for p in smollm2_checkpoint.glob("*.safetensors"))
    assert report["model_bytes"] == model_bytes
    # One pass made a 204 KB patch (3.8% of the 5.3 MB it changes); create now refines until the
    # answer is gone (a second pass here, rank 2 per tensor): 292 KB, 5.5% (docs/maths.md).
    assert report["patch_bytes"] < 0.01 * model_bytes and report["patch_bytes"] < 0.06 * report["touched_bytes"]
    assert len(report["tensors_changed"]) == 3 < report["tensors_total"]
    steps = {"model", "generate before", "create", "apply", "generate after", "invert", "restore + check", "total"}
    assert set(report["seconds"]) == steps

    # what the demo wrote: two patches and two checkpoint folders holding only the model's own files
    assert {p.name for p in out.iterdir()} == DEMO_OUTPUTS
    model_files = {p.name for p in smollm2_checkpoint.iterdir()}
    assert {p.name for p in (out / UNLEARNED_DIR).iterdir()} == model_files
    assert {p.name for p in (out / RESTORED_DIR).iterdir()} == model_files
    assert not leftovers(tmp_path)
    # ... and none of it holds the fact (the checkpoints' tokenizer files hold these words as vocabulary)
    written = [out / PATCH_FILE, out / INVERSE_FILE, *(p for p in cache.rglob("*") if p.is_file())]
    assert {p: p.read_bytes() for p in (cache / "stats").iterdir()} == given, "create sampled its own statistics"
    for path in written:
        data = path.read_bytes().lower()
        for word in FORGET_WORDS:
            assert word not in data, f"{path} contains {word!r}"


def test_demo_refuses_a_missing_model(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    expect_error(["demo", "--model", str(tmp_path / "no-such-model"), "-o", str(out)], "no-such-model",
                 "no such folder", output=out)  # fmt: skip
    assert not leftovers(tmp_path)


def test_demo_refuses_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a model")
    out = tmp_path / "demo"
    expect_error(["demo", "--model", str(folder), "-o", str(out)], "notes", "has no", inputs=[folder], output=out)
    assert not leftovers(tmp_path)


def test_demo_refuses_a_non_empty_output_dir(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    expect_error(["demo", "--model", str(tmp_path / "unused"), "-o", str(out)], "demo", "not empty (pass --force",
                 inputs=[out])  # fmt: skip
    # --force replaces only an earlier demo's output, never a folder with other files
    expect_error(["demo", "-o", str(out), "--force"], "demo", "'mine.txt', which the demo did not write", inputs=[out])
    assert (out / "mine.txt").read_text() == "keep me" and not leftovers(tmp_path)


def test_demo_needs_prompt_and_target_together(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    expect_error(["demo", "--subject", "Germany", "-o", str(out)], "--prompt", "--target go together", output=out)
    expect_error(["demo", "--prompt", "The capital of {} is", "--target", "Berlin", "-o", str(out)], "{}",
                 "subject", output=out)  # fmt: skip


def test_demo_refuses_a_lone_surrogate_in_the_fact(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 on the command line reach Python as lone surrogates: one line, not a traceback."""
    out = tmp_path / "demo"
    fact = ["--prompt", "The capital of {} is", "--subject", "Germany", "--target", "Berlin"]
    for option in ("--prompt", "--subject", "--target"):
        args = list(fact)
        args[args.index(option) + 1] += "\udcff"
        line = expect_error(["demo", "--model", str(tmp_path / "unused"), "-o", str(out), *args], option,
                            "lone UTF-16 surrogate (U+DCFF", output=out)  # fmt: skip
        assert "not UTF-8" in line
    expect_error(["demo", "--model", str(tmp_path / "unused"), "-o", str(out), "--paraphrase", "\ud800 capital"],
                 "--paraphrase", "surrogate (U+D800 at character 1)", output=out)  # fmt: skip
    assert not leftovers(tmp_path)


def test_another_model_gets_a_built_in_fact_it_answers(fact_checkpoint: Path) -> None:
    """With --model and no fact of the user's, the demo forgets the first built-in fact the
    model answers (Gemma 3 270M does not say "Paris" after "The capital of France is");
    a fact the user names is kept as it is, answered or not."""
    from tests.fact_model import synthetic_facts
    from zupatch.demo import DemoConfig, _fact_the_model_gives

    known = synthetic_facts()[0]
    alternative = (known.prompt, known.subject, known.target, ())
    config = DemoConfig(model=str(fact_checkpoint), alternatives=(alternative,))
    chosen = _fact_the_model_gives(fact_checkpoint, config)  # the fact model knows nothing of France
    assert (chosen.prompt, chosen.subject, chosen.target, chosen.alternatives) == (*alternative[:3], ())
    assert DemoConfig().with_fact("The capital of {} is", "Spain", "Madrid").alternatives == ()
    assert DemoConfig().with_fact(paraphrases=["France's capital is"]).alternatives == ()


def test_demo_caches_the_statistics_create_reads() -> None:
    """One token budget for demo (library and CLI) and create, so the demo warms create's cache."""
    import inspect

    from zupatch.cli.demo_cli import demo as demo_command
    from zupatch.demo import DEFAULT_TOKENS, DemoConfig
    from zupatch.engine.stats import StatsConfig

    assert DEFAULT_TOKENS == DemoConfig().tokens == StatsConfig().sampled_token_budget
    assert inspect.signature(demo_command).parameters["tokens"].default == DEFAULT_TOKENS
