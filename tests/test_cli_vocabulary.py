"""One vocabulary across the command lines (the recipes, the demo, the snnTorch
recipe, the audit): the same names for the same things, --quick everywhere, every
option with a help text and a default, old names hidden but working."""

from __future__ import annotations

import argparse

import pytest

from asynctrain import audit
from asynctrain.recipe import parser as recipe_parser
from fixtures import load_recipe

OLD = ("--limit-train", "--limit-test", "--eval-K", "--eval-policy", "--checkpoint", "--max-samples",
       "--finetune", "--gradient-fill")


def _parsers() -> dict[str, argparse.ArgumentParser]:
    return {"nmnist": recipe_parser(load_recipe("nmnist").SPEC), "shd": recipe_parser(load_recipe("shd").SPEC),
            "demo": load_recipe("demo").parser(), "byom_snntorch": load_recipe("byom_snntorch").parser(),
            "cifar_vgg7": load_recipe("cifar_vgg7").parser(), "audit": audit._parser()}


@pytest.mark.parametrize("name", ["nmnist", "shd", "demo", "byom_snntorch", "cifar_vgg7", "audit"])
def test_every_option_has_help_and_the_shared_names(name):
    ap = _parsers()[name]
    shown = {s: a for a in ap._actions for s in a.option_strings if a.help != argparse.SUPPRESS}
    for opt, action in shown.items():
        assert action.help and action.help.strip(), f"{name}: {opt} has no help"
    for common in ("--quick", "--out", "--fresh", "--no-progress"):
        assert common in shown, f"{name} lacks {common}"
    assert not set(OLD) & set(shown), f"{name} shows an old spelling"
    assert "--max-train" in shown and "--max-test" in shown, name
    if name != "demo":  # the demo's executions are the paper's table
        assert "--eval" in shown, name


def test_the_help_shows_every_default():
    for name, ap in _parsers().items():
        text = " ".join(ap.format_help().split())
        shown = [a for a in ap._actions if a.option_strings and a.help != argparse.SUPPRESS
                 and a.dest != "help"]
        assert text.count("(default:") >= len(shown), name
