"""The method registry: every ``--method`` is one plugin module with its settings and one entry point."""

from __future__ import annotations

import dataclasses

import pytest

from zupatch.engine.create import CreateConfig
from zupatch.engine.methods import METHODS, get_method
from zupatch.engine.methods.base import Method
from zupatch.errors import ZupatchError


def test_every_method_names_real_settings_and_one_entry_point() -> None:
    fields = {f.name for f in dataclasses.fields(CreateConfig)}
    assert tuple(METHODS) == ("zerounlearn", "zerounlearn-gd", "ga", "npo")
    for name, method in METHODS.items():
        assert method.name == name and method.summary
        assert set(method.settings) <= fields, name
        assert (method.solve is None) != (method.train is None), name
        assert CreateConfig(method=name).is_baseline == (method.train is not None)


def test_what_each_method_needs_follows_its_settings() -> None:
    assert not CreateConfig().needs_original_representations()  # measured closed form: no projection
    closed = dataclasses.replace(CreateConfig().closed_form, projection="forget")
    assert CreateConfig(closed_form=closed).needs_original_representations()
    assert CreateConfig(method="zerounlearn-gd").needs_original_representations()
    assert not CreateConfig(method="npo").needs_original_representations()
    assert [name for name, m in METHODS.items() if m.same_kind] == ["zerounlearn"]
    baseline = CreateConfig(method="ga").hyperparameters()
    assert "baseline" in baseline and "closed_form" not in baseline


def test_unknown_method_and_malformed_plugin_are_refused() -> None:
    with pytest.raises(ZupatchError, match="unknown method 'zerounlern'; choose one of zerounlearn, zerounlearn-gd"):
        CreateConfig(method="zerounlern")  # type: ignore[arg-type]
    with pytest.raises(ZupatchError, match="npo"):
        get_method("sgd")
    with pytest.raises(ValueError, match="exactly one entry point"):
        Method("both", "x", (), solve=lambda *a: None, train=lambda *a: None)
    with pytest.raises(ValueError, match="exactly one entry point"):
        Method("none", "x", ())


@pytest.mark.parametrize("relative", [True, False])
def test_gd_relative_beta_means_the_same_on_keys_of_another_scale(relative: bool) -> None:
    """With ``gd.relative_beta`` (the default), keys 7× larger with a weight 7× smaller (the same
    outputs) get the same change of the forget outputs; the paper's absolute β does not."""
    from tests.test_solvers import gd_setup, rel
    from zupatch.engine.methods.zerounlearn_gd import layer_params
    from zupatch.engine.solvers import GDParams

    W, C, U0, K_f, V_star, O = gd_setup(3, seed=31)
    hp = GDParams(relative_beta=0.5) if relative else GDParams()
    config = CreateConfig(method="zerounlearn-gd", gd=hp)
    solve = METHODS["zerounlearn-gd"].solve
    c = 7.0
    ours = solve(W, C, K_f, V_star, O, config).low_rank() @ K_f
    theirs = solve(W / c, C * c**2, K_f * c, V_star, O, config).low_rank() @ (K_f * c)
    assert (rel(theirs, ours) < 1e-9) == relative, rel(theirs, ours)
    if relative:
        beta = layer_params(hp, U0, K_f).beta
        assert beta == pytest.approx(0.5 * hp.alpha * float((U0.T @ K_f).pow(2).sum()) / 3, rel=1e-12)
