"""Bad requests and parameters are refused up front, each with a message naming the fix."""

import pytest

from steamviz import editors
from steamviz.data.requests import EditRequest, RequestError

BASE = dict(prompt="{} is located in", subject="Toronto", target_new="Japan",
            target_true="Canada")


def test_a_string_where_a_list_belongs_is_refused():
    with pytest.raises(RequestError, match="'paraphrase_prompts' must be a list of strings, got "
                                           "the string"):
        EditRequest.from_dict(dict(BASE, paraphrase_prompts="Toronto is in"))


def test_a_prompt_with_other_braces_is_refused():
    with pytest.raises(RequestError, match="must not hold braces other than"):
        EditRequest(**dict(BASE, prompt="{} is {x} in"))


def test_an_edit_that_changes_nothing_is_refused():
    with pytest.raises(RequestError, match="equals target_true"):
        EditRequest(**dict(BASE, target_new="Canada"))


def test_a_prompt_longer_than_the_window_is_refused_before_editing(tiny):
    window = tiny.model.config.max_position_embeddings
    long = EditRequest(**dict(BASE, prompt="{} is " + "very " * window + "far from"))
    with pytest.raises(RequestError, match="does not fit the model's window"):
        editors.edit(tiny, long, "rome")


@pytest.mark.parametrize("lam", [-1.0, "5", True])
def test_a_bad_alignment_strength_is_refused(tiny, lam):
    with pytest.raises(ValueError, match="lam must be a number >= 0"):
        editors.edit(tiny, EditRequest(**BASE), "steam-rome", lam=lam)


def test_negative_lambdas_in_a_sweep_config_are_refused():
    from steamviz.run.sweep import ConfigError, SweepConfig

    with pytest.raises(ConfigError, match="'lams': a list of numbers >= 0"):
        SweepConfig.from_dict(dict(lams=[-5.0]))


@pytest.mark.parametrize("bad, key", [
    (dict(generation="no"), "generation"), (dict(offset=-1), "offset"),
    (dict(knn_k=0), "knn_k"), (dict(max_new_tokens=-5), "max_new_tokens"),
    (dict(bank_size=-3), "bank_size"), (dict(seed="x"), "seed"),
    (dict(device="nosuch"), "device"), (dict(edit_blocks=[-1]), "edit_blocks"),
    (dict(hparams=dict(v_lr="abc")), "hparams"), (dict(hparams=dict(block=2.5)), "hparams"),
    (dict(hparams=dict(v_num_grad_steps=0)), "hparams"),
])
def test_bad_sweep_values_are_refused_naming_the_key(bad, key):
    from steamviz.run.sweep import ConfigError, SweepConfig

    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        SweepConfig.from_dict(bad)


def test_every_shipped_config_is_valid():
    from pathlib import Path

    from steamviz.run.sweep import SweepConfig

    for p in sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")):
        SweepConfig.from_yaml(p)


HPARAMS = [("steamviz.edit.rome", "ROMEHparams", "ROME"), ("steamviz.edit.memit", "MEMITHparams", "MEMIT"),
           ("steamviz.edit.sake", "SAKEHparams", "SAKE"), ("steamviz.edit.baft", "BaFTHparams", "BaFT"),
           ("steamviz.edit.kne", "KNEHparams", "KNE")]


@pytest.mark.parametrize("mod, name, label", HPARAMS)
def test_every_hparams_class_refuses_an_unknown_field_naming_the_fields(mod, name, label):
    # issue 19: one hyperparameter base; the same error from every editor's replace
    import dataclasses
    import importlib

    cls = getattr(importlib.import_module(mod), name)
    fields = [f.name for f in dataclasses.fields(cls)]
    with pytest.raises(TypeError) as e:
        cls().replace(sede=1)
    assert str(e.value) == f"unknown {label} parameter 'sede'; fields of {name}: {fields}"


@pytest.mark.parametrize("mod, name, label", HPARAMS)
def test_every_hparams_class_round_trips_through_to_dict_and_replace(mod, name, label):
    import importlib

    cls = getattr(importlib.import_module(mod), name)
    hp = cls().replace(seed=7)
    assert hp.seed == 7 and cls().seed == 0  # a copy: the original is unchanged
    d = hp.to_dict()
    assert d["seed"] == 7 and cls().replace(**d) == hp == cls(**d)
    assert hp.replace() == hp and hp.replace() is not hp
    with pytest.raises(ValueError):  # __post_init__ checks the replaced values again
        cls().replace(context_template_length_params=[["x", 1]])
