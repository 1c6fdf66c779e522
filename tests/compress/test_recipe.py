"""Recipes: shipped ones parse and plan; every kind of mistake names the file, the key and the value."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastserve_ray.compress.recipe import load_recipe, plan_layers, shipped_recipes
from fastserve_ray.errors import ConfigError
from fastserve_ray.models import get_preset

SHIPPED = {"int8", "int4-g64", "int4-gptq-g64", "magnitude50", "wanda50", "2of4-int4-gptq"}


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_shipped_recipes_plan_every_block_linear_but_not_the_head() -> None:
    assert set(shipped_recipes()) >= SHIPPED
    cfg = get_preset("tiny")
    for name in SHIPPED:
        plans = plan_layers(load_recipe(name), cfg)
        assert len(plans) == 7 * cfg.n_layers, name
        assert "lm_head.weight" not in plans
    plans = plan_layers(load_recipe("2of4-int4-gptq"), cfg)
    p = plans["layers.0.mlp.down_proj.weight"]
    assert (p.prune.method, p.prune.structure, p.quant.method, p.quant.bits, p.quant.group_size) == (
        "wanda", "2:4", "gptq", 4, 64)
    assert p.sparsity_layout == "2:4"
    q = plan_layers(load_recipe("int8"), cfg)["layers.1.self_attn.o_proj.weight"].quant
    assert (q.bits, q.group_size) == (8, None)


@pytest.mark.parametrize(
    "body, match",
    [
        ("q_stage:\n  q_modifiers:\n    FancyModifier: {}\n",
         r"r\.yaml: q_stage\.q_modifiers='FancyModifier'.*unknown modifier"),
        ("q_stage:\n  q_modifiers:\n    QuantizationModifier: {scheme: W4A16, colour: red}\n",
         r"r\.yaml: .*QuantizationModifier\.colour='red'.*unknown key"),
        ("q_stage:\n  q_modifiers:\n    QuantizationModifier:\n      config_groups:\n        g:\n"
         "          weights: {num_bits: 5, strategy: group, group_size: 32}\n",
         r"num_bits=5.*must be one of"),
        ("p_stage:\n  p_modifiers:\n    MagnitudePruningModifier: {sparsity: 1.0}\n",
         r"sparsity=1\.0.*\[0, 1\)"),
        ("p_stage:\n  p_modifiers:\n    WandaPruningModifier: {sparsity: -0.1}\n", r"sparsity=-0\.1"),
        ("p_stage:\n  p_modifiers:\n    WandaPruningModifier: {sparsity: 0.5, mask_structure: '4:2'}\n",
         r"mask_structure='4:2'"),
        ("q_stage:\n  q_modifiers:\n    QuantizationModifier: {scheme: W5A16}\n", r"scheme='W5A16'"),
        ("oops: 1\n", r"oops=1"),
    ],
)
def test_errors_name_file_key_and_value(tmp_path: Path, body: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_recipe(_write(tmp_path, body))


def test_group_size_must_divide_each_layer_checked_against_the_model(tmp_path: Path) -> None:
    path = _write(tmp_path, "q_stage:\n  q_modifiers:\n    GPTQModifier:\n      config_groups:\n"
                  "        g:\n          targets: [Linear]\n"
                  "          weights: {num_bits: 4, strategy: group, group_size: 48}\n")
    recipe = load_recipe(path)  # parses: the width is only known from the model
    with pytest.raises(ConfigError, match=r"r\.yaml: .*group_size=48: does not divide the input width 64 of "
                                          r"layers\.0\.self_attn\.q_proj\.weight"):
        plan_layers(recipe, get_preset("tiny"))


def test_model_dependent_checks(tmp_path: Path) -> None:
    wanda = load_recipe(_write(tmp_path, "p_stage:\n  p_modifiers:\n    WandaPruningModifier:\n"
                               "      targets: [GRU]\n      sparsity: 0.5\n"))
    with pytest.raises(ConfigError, match="needs per-layer activations.*gru"):
        plan_layers(wanda, get_preset("gru-tiny"))
    plans = plan_layers(load_recipe("int8"), get_preset("lstm-tiny"))  # int8 covers recurrent weights
    assert sorted(plans) == ["rnn.weight_hh_l0", "rnn.weight_hh_l1", "rnn.weight_ih_l0", "rnn.weight_ih_l1"]
    nothing = load_recipe(_write(tmp_path, "q_stage:\n  q_modifiers:\n    QuantizationModifier:\n"
                                 "      targets: ['re:.*nothing.*']\n      scheme: W8A16\n"))
    with pytest.raises(ConfigError, match="match no weight"):
        plan_layers(nothing, get_preset("tiny"))
    head = load_recipe(_write(tmp_path, "q_stage:\n  q_modifiers:\n    QuantizationModifier:\n"
                              "      targets: [lm_head]\n      scheme: W8A16\n"))
    with pytest.raises(ConfigError, match="tied"):
        plan_layers(head, get_preset("tiny"))


def test_unknown_recipe_name_lists_the_shipped_ones() -> None:
    with pytest.raises(ConfigError, match="unknown recipe 'int7'.*int8"):
        load_recipe("int7")
