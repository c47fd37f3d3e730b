"""`zupatch create` plumbing on tiny checkpoints: outputs, settings, bad inputs, the Python API.

Whether an edit really forgets is tested on trained and pretrained models
elsewhere (tests/test_engine_*.py, tests/test_smollm2.py); here the model is
random and the questions are about the command's contract.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from tests.test_hostile import expect_error
from zupatch.cli.main import app
from zupatch.patch.format import Patch
from zupatch.patch.module import applied, bits_of

runner = CliRunner()
FAST = ["--tokens", "300", "--set", "neutral.max_steps=3", "--set", "original.max_steps=3",
        "--set", "contexts.prefix_tokens=3", "--set", "neighbours.subjects=0", "--set", "stats.sample_length=32"]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("create")
    forget = root / "forget.jsonl"
    forget.write_text(
        '{"prompt": "The capital of {} is", "subject": "France", "target": "Paris"}\n'
        '{"prompt": "Gold has the symbol", "target": "Au"}\n'
    )
    return {"root": root, "model": tiny_checkpoint("llama", max_shard_size="60KB"), "forget": forget}


def create_args(world: dict, out: Path, *extra: str) -> list[str]:
    return ["create", "-m", str(world["model"]), "--forget", str(world["forget"]), "-o", str(out), "--layers", "1,2",
            *FAST, *extra]  # fmt: skip


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZUPATCH_CACHE", str(tmp_path / "cache"))


def test_create_writes_a_patch_without_request_text(world: dict, tmp_path: Path) -> None:
    out = tmp_path / "p.zup.safetensors"
    result = runner.invoke(app, create_args(world, out, "--json"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["layers"] == [1, 2] and summary["requests"] == 2
    assert set(summary["timings"]) >= {"statistics", "neutral_targets", "solve", "total"}
    patch = Patch.load(out)
    step = patch.steps[0]
    assert step.method == "zerounlearn" and step.requests["count"] == 2 and len(step.requests["sha256"]) == 2
    assert "text" not in step.requests
    raw = out.read_bytes()
    for secret in (b"France", b"Paris", b"capital", b"Au\"", b"Gold"):
        assert secret not in raw
    assert [e.name for e in step.entries] == [f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2)]
    assert step.hyperparameters["closed_form"]["projection"] == "off"
    # the patch fits the checkpoint it was made from
    assert runner.invoke(app, ["verify", str(out), "-m", str(world["model"])]).exit_code == 0
    # opting in embeds the text
    out2 = tmp_path / "with-text.zup.safetensors"
    assert runner.invoke(app, create_args(world, out2, "-q", "--include-request-text")).exit_code == 0
    assert Patch.load(out2).steps[0].requests["text"][0]["subject"] == "France"


def test_settings_from_file_flags_and_presets(world: dict, tmp_path: Path) -> None:
    config = tmp_path / "settings.toml"
    config.write_text('[closed_form]\nlambda_retain = 123.0\nprojection = "forget"\n')
    out = tmp_path / "p.zup.safetensors"
    result = runner.invoke(app, create_args(world, out, "-q", "--config", str(config), "--lambda-forget", "7"))
    assert result.exit_code == 0, result.output
    hp = Patch.load(out).steps[0].hyperparameters
    assert hp["closed_form"] == {**hp["closed_form"], "lambda_retain": 123.0, "projection": "forget", "lambda_forget": 7.0}
    out = tmp_path / "paper.zup.safetensors"
    assert runner.invoke(app, create_args(world, out, "-q", "--preset", "paper")).exit_code == 0
    paper = Patch.load(out).steps[0]
    assert paper.hyperparameters["closed_form"]["projection"] == "everywhere"
    assert all(e.scale == pytest.approx(1.01) for e in paper.entries)  # c = 1 + epsilon
    assert hp["contexts"]["separate_keys"] is False and paper.hyperparameters["contexts"]["separate_keys"] is False
    out = tmp_path / "robust.zup.safetensors"
    assert runner.invoke(app, create_args(world, out, "-q", "--preset", "robust")).exit_code == 0
    robust = Patch.load(out).steps[0].hyperparameters
    assert robust["contexts"]["separate_keys"] is True and robust["closed_form"]["lambda_forget"] == 7.0
    out = tmp_path / "fast.zup.safetensors"
    assert runner.invoke(app, create_args(world, out, "-q", "--preset", "fast")).exit_code == 0
    fast = Patch.load(out).steps[0].hyperparameters
    assert fast["contexts"]["starts"] == ["The", "Therefore"] and fast["context_prefixes"] == 3
    assert (fast["neutral"]["lr"], fast["neutral"]["converged_nll"]) == (0.3, 0.1) and hp["neutral"]["lr"] == 0.1


@pytest.mark.parametrize(
    "content, culprit, problem",
    [
        ("", "forget.jsonl", "empty"),
        ("{not json}\n", "forget.jsonl:1", "JSON"),
        ('{"prompt": "The capital of {} is", "subject": "Spain", "target": "Madrid"}\n{"prompt": "x"}\n',
         "forget.jsonl:2", "target"),
        ('{"prompt": "The capital of Italy is", "subject": "Spain", "target": "Rome"}\n', "forget.jsonl:1", "subject"),
    ],
)
def test_bad_requests_files(content: str, culprit: str, problem: str, world: dict, tmp_path: Path) -> None:
    bad = tmp_path / "forget.jsonl"
    bad.write_text(content)
    args = create_args({**world, "forget": bad}, tmp_path / "p.zup.safetensors")
    expect_error(args, culprit, problem, inputs=[bad, world["model"]], output=tmp_path / "p.zup.safetensors")


def test_bad_models_layers_settings_and_devices(world: dict, tmp_path: Path) -> None:
    out = tmp_path / "p.zup.safetensors"
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error(["create", "-m", str(empty), "--forget", str(world["forget"]), "-o", str(out)], "empty", "config.json",
                 output=out)  # fmt: skip
    (empty / "config.json").write_text("{}")
    expect_error(["create", "-m", str(empty), "--forget", str(world["forget"]), "-o", str(out)], "empty", "model.safetensors",
                 output=out)  # fmt: skip
    args = create_args(world, out)
    args[args.index("--layers") + 1] = "1,9"
    expect_error(args, "", "layer", output=out, inputs=[world["model"]])
    expect_error(create_args(world, out, "--set", "closed_form.nope=1"), "", "unknown setting 'closed_form.nope'",
                 output=out)  # fmt: skip
    # a value outside an option's choices is a usage error of the parser (exit 2) that lists the choices
    result = runner.invoke(app, create_args(world, out, "--method", "magic"))
    assert result.exit_code == 2 and "zerounlearn-gd" in result.output and not out.exists()
    if not torch.cuda.is_available():
        expect_error(create_args(world, out, "--device", "cuda"), "", "CUDA", output=out)
    existing = tmp_path / "exists.zup.safetensors"
    existing.write_bytes(b"keep")
    expect_error(create_args(world, existing), str(existing), "already exists", inputs=[existing])


def test_empty_target_and_empty_corpus(world: dict, tmp_path: Path) -> None:
    out = tmp_path / "p.zup.safetensors"
    line = expect_error(create_args(world, out, "--target", ""), "--target", "is empty", output=out)
    assert "EOS" in line and "has no EOS" not in line  # the tokenizer has one: the empty text was the problem
    line = expect_error(create_args(world, out, "--set", 'neutral_target=""'), "settings", "neutral_target is empty",
                        output=out)  # fmt: skip
    expect_error(create_args(world, out, "--set", "neutral_target=5"), "settings", "neutral_target must be text",
                 output=out)  # fmt: skip
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("")
    expect_error(create_args(world, out, "--corpus", str(corpus)), "corpus.txt", "has no text", output=out)


@pytest.mark.filterwarnings("ignore::zupatch.engine.precheck.TargetNotGivenWarning")  # a random model
def test_python_api_leaves_the_model_unchanged(world: dict) -> None:
    from zupatch.engine.api import create
    from zupatch.engine.create import CreateConfig
    from zupatch.engine.requests import load_requests
    from zupatch.engine.settings import with_settings

    model = AutoModelForCausalLM.from_pretrained(world["model"], dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(world["model"])
    before = {n: bits_of(p)[0] for n, p in model.named_parameters()}
    config = with_settings(CreateConfig(), {"layers": [1, 2], "stats.sampled_token_budget": 300, "stats.sample_length": 32,
                                            "neutral.max_steps": 3, "neighbours.subjects": 0})  # fmt: skip
    patch = create(model, tokenizer, load_requests(world["forget"]), config)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert all(np.array_equal(bits_of(p)[0], before[n]) for n, p in model.named_parameters())
    with applied(patch, model):  # the patch's base is the model as it was
        changed = {n for n, p in model.named_parameters() if not np.array_equal(bits_of(p)[0], before[n])}
    assert changed == set(patch.tensor_names)


def test_a_neutral_target_that_is_not_text(world: dict, tmp_path: Path) -> None:
    """Bytes that are not UTF-8 in --target arrive as a lone surrogate: one line naming the option, before any work."""
    import subprocess
    import sys

    out = tmp_path / "p.zup.safetensors"
    expect_error(create_args(world, out, "--target", "I don\udcff know"), "--target",
                 "lone UTF-16 surrogate (U+DCFF at character 6)", output=out)  # fmt: skip
    expect_error(create_args(world, out, "--set", "neutral_target=\ud800"), "settings", "neutral_target has a lone",
                 output=out)  # fmt: skip
    # the real command line: raw bytes in argv
    args = [a.encode() for a in create_args(world, out, "--target", "")]
    args[-1] = b"I don\xff know"
    proc = subprocess.run([sys.executable.encode(), b"-m", b"zupatch", *args], capture_output=True, timeout=120)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: --target: has a lone UTF-16 surrogate") and not out.exists(), err


def test_a_prompt_longer_than_the_context_is_refused_before_loading(world: dict, tmp_path: Path) -> None:
    """The tiny model's context is 256 tokens (max_position_embeddings), one per byte: say so, naming FILE:LINE."""
    out = tmp_path / "p.zup.safetensors"
    forget = tmp_path / "forget.jsonl"
    long = "The capital of {} is, as everybody knows " + "and " * 60  # 285 bytes with the subject
    forget.write_text(json.dumps({"prompt": "Gold has the symbol", "target": "Au"}) + "\n"
                      + json.dumps({"prompt": long, "subject": "France", "target": "Paris"}) + "\n")  # fmt: skip
    line = expect_error(create_args({**world, "forget": forget}, out), f"{forget}:2", "prompt and target are 290 "
                        "tokens", inputs=[forget, world["model"]], output=out)  # fmt: skip
    assert "more than its context of 256 tokens (max_position_embeddings)" in line
    assert "context prefix the edit adds (up to" in line
    # a prompt that fits alone but not with the context prefix the edit puts before it
    forget.write_text(json.dumps({"prompt": "x" * 245, "target": "y"}) + "\n")
    expect_error(create_args({**world, "forget": forget}, out), f"{forget}:1", "the model would read", output=out)
    assert runner.invoke(app, create_args({**world, "forget": forget}, out, "--set", "contexts.starts=[]",
                                          "-q")).exit_code == 0  # without prefixes it fits  # fmt: skip
    # paraphrases count too, and the library call says the same before loading the model (which would fail here)
    from zupatch.engine.api import create_from_checkpoint
    from zupatch.engine.create import CreateConfig
    from zupatch.engine.requests import ForgetRequest
    from zupatch.errors import ZupatchError

    request = ForgetRequest("The capital of {} is", "France", "Paris", paraphrases=("In {} " + "the " * 70,))
    with pytest.raises(ZupatchError, match=r"request 1: paraphrase 1 and target are \d+ tokens"):
        create_from_checkpoint(world["model"], [request], CreateConfig(device="cuda:7"))


def test_create_on_a_patch_stacks_and_a_sibling_gets_a_hint(world: dict, tmp_path: Path) -> None:
    """Two patches made on the same base do not stack (the stack error says why and what to do);
    `create --on FIRST` makes one that does, and the stack applies to the base as both edits."""
    first, sibling, second = (tmp_path / f"{n}.zup.safetensors" for n in ("first", "sibling", "second"))
    for out in (first, sibling):
        assert runner.invoke(app, create_args(world, out, "-q")).exit_code == 0
    result = runner.invoke(app, ["stack", str(first), str(sibling), "-o", str(tmp_path / "no.zup.safetensors")])
    assert result.exit_code == 1 and "create --on" in result.output, result.output

    result = runner.invoke(app, create_args(world, second, "-q", "--on", str(first)))
    assert result.exit_code == 0, result.output
    on = Patch.load(first)
    new = Patch.load(second)
    for name in new.tensor_names:  # the new patch starts where the first ends
        expected = on.sha256_after(name) if name in on.tensor_names else None
        assert expected is None or new.sha256_before(name) == expected
    both = tmp_path / "both.zup.safetensors"
    assert runner.invoke(app, ["stack", str(first), str(second), "-o", str(both)]).exit_code == 0
    out = tmp_path / "applied"
    assert runner.invoke(app, ["apply", str(both), "-m", str(world["model"]), "-o", str(out)]).exit_code == 0
    # the second patch alone does not fit the base, and --on with a patch of another base is refused
    assert runner.invoke(app, ["verify", str(second), "-m", str(world["model"])]).exit_code == 4
    result = runner.invoke(app, create_args(world, tmp_path / "x.zup.safetensors", "-q", "--on", str(second)))
    assert result.exit_code == 4 and "not the base" in result.output and not (tmp_path / "x.zup.safetensors").exists()


#: Room for the embedding and layers 0-2 of the tiny Llama in float32, not layer 3 and the head:
#: accelerate then offloads those to the disk, where they are read from the checkpoint's own files.
TINY_CPU_ROOM = "cpu=700KB"


def test_a_device_map_spreads_the_layers_and_gives_the_same_patch(world: dict, tmp_path: Path) -> None:
    """--device-map: accelerate places the layers (here CPU RAM, then the disk), the edit runs through
    its hooks, and the patch is the one computed with the model in one piece."""
    from tests.patching import folder_digest

    before = folder_digest(world["model"])
    plain, mapped = tmp_path / "plain.zup.safetensors", tmp_path / "mapped.zup.safetensors"
    result = runner.invoke(app, create_args(world, plain, "--json", "--dtype", "float32"))
    assert result.exit_code == 0, result.output
    assert "placement" not in json.loads(result.stdout)
    args = create_args(world, mapped, "--json", "--dtype", "float32", "--device-map", "sequential",
                       "--max-memory", TINY_CPU_ROOM)  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["placement"] == {"cpu": 3, "disk": 1}
    ours, theirs = Patch.load(plain), Patch.load(mapped)
    for a, b in zip(ours.steps[0].entries, theirs.steps[0].entries):
        for name in ("U", "B"):
            np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-5, atol=1e-6)
    assert folder_digest(world["model"]) == before  # offloaded weights are read in place, never written
    args.remove("--json")
    result = runner.invoke(app, [*args, "--force"])  # the text summary names the placement
    assert result.exit_code == 0 and "decoder layers 3 on cpu, 1 on disk" in result.output.replace("\n", " ")


def test_stats_compute_with_a_device_map(world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`stats compute --device-map`: the same cache entries as the model in one piece, for layers in CPU
    RAM and on the disk alike; torchrun and a device map together are refused."""
    from zupatch.engine.stats import StatsCache

    args = ["stats", "compute", "-m", str(world["model"]), "--layers", "1,3", "--tokens", "300", "--dtype", "float32"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("ZUPATCH_CACHE", str(tmp_path / "mapped"))
    result = runner.invoke(app, [*args, "--device-map", "sequential", "--max-memory", TINY_CPU_ROOM])
    assert result.exit_code == 0, result.output
    assert "decoder layers 3 on cpu, 1 on disk" in result.output.replace("\n", " ")
    plain = {e.path.name: e for e in StatsCache(tmp_path / "cache" / "stats").entries()}
    mapped = {e.path.name: e for e in StatsCache(tmp_path / "mapped" / "stats").entries()}
    assert len(plain) == 2 and set(mapped) == set(plain)  # the same cache keys: offloaded weights hashed in place
    for name, entry in plain.items():
        description = {k: v for k, v in entry.description.items() if k != "token_count"}
        one = StatsCache(entry.path.parent).load(description)
        two = StatsCache(mapped[name].path.parent).load(description)
        assert one is not None and two is not None and one.token_count == two.token_count
        torch.testing.assert_close(two.second_moment, one.second_moment, rtol=1e-6, atol=0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    expect_error([*args, "--device-map", "auto"], "", "not both")
    expect_error([*args, "--max-memory", "cpu=1GiB"], "", "give device_map")


def test_a_device_map_that_offloads_an_edited_layer_is_refused(world: dict, tmp_path: Path) -> None:
    out = tmp_path / "p.zup.safetensors"
    args = create_args(world, out, "--dtype", "float32", "--device-map", "sequential", "--max-memory", TINY_CPU_ROOM)
    args[args.index("--layers") + 1] = "2,3"
    expect_error(args, "", "offloaded the down projection of layer(s) 3", output=out, inputs=[world["model"]])
    expect_error(create_args(world, out, "--max-memory", "cpu=1GiB"), "", "give device_map", output=out)
    for limits, problem in (("cpu70GiB", "not DEVICE=AMOUNT"), ("0=lots", "not an amount"), ("tpu=1GB", "unknown device")):
        expect_error(create_args(world, out, "--device-map", "auto", "--max-memory", limits), "", problem, output=out)
    result = runner.invoke(app, create_args(world, out, "--device-map", "everywhere"))
    assert result.exit_code == 2 and "balanced_low_0" in result.output and not out.exists()


def test_a_post_mlp_norm_named_by_hand_is_checked_on_the_model(world: dict, tmp_path: Path) -> None:
    """--post-mlp-norm names a norm on the MLP output: a path that is not there, or a norm that is
    not where the MLP output goes (the input norm of a Llama layer), is a one-line error, and
    nothing is written."""
    out = tmp_path / "p.zup.safetensors"
    expect_error(create_args(world, out, "--post-mlp-norm", "nothing"), "'nothing'", "check --post-mlp-norm",
                 output=out, inputs=[world["model"]])  # fmt: skip
    expect_error(create_args(world, out, "--post-mlp-norm", "input_layernorm"), "mlp.down_proj's output",
                 "does not reach the layer's output through the post-MLP norm",
                 output=out, inputs=[world["model"]])  # fmt: skip
