"""MEMIT: batch edits reach their targets, spread over layers, and undo exactly."""

import pytest
import torch

from steamviz import memit
from steamviz.forward import target_logprobs
from steamviz.memit import MEMITHparams
from steamviz.requests import EditRequest

FAST = dict(context_template_length_params=((5, 2), (10, 2)), v_num_grad_steps=12)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.model
def test_batch_of_edits_lands_and_undoes(lm):
    reqs = [
        EditRequest(prompt="The city of {} is located in the country of", subject="Toronto",
                    target_new="Japan", target_true="Canada"),
        EditRequest(prompt="The capital of {} is", subject="Italy", target_new="Paris",
                    target_true="Rome"),
        EditRequest(prompt="The official language of {} is", subject="Brazil",
                    target_new="French", target_true="Portuguese"),
    ]
    state = _state(lm.model)
    before = [target_logprobs(lm, [r.rewrite_prompt], [r.target_new])[0]["prob"] for r in reqs]
    hp = MEMITHparams(layers=(3, 4, 5), **FAST)
    edit = memit.apply(lm, reqs, hp)
    touched = sorted(edit.deltas)
    assert touched == [f"model.layers.{i}.mlp.down_proj.weight" for i in (3, 4, 5)]
    after = [target_logprobs(lm, [r.rewrite_prompt], [r.target_new])[0]["prob"] for r in reqs]
    assert all(a > max(0.3, 10 * b) for a, b in zip(after, before)), (before, after)
    edit.restore()
    assert _same(lm.model, state)


@pytest.mark.model
def test_bad_layers_are_refused(lm):
    with pytest.raises(ValueError, match="increasing and distinct"):
        MEMITHparams(layers=(5, 4))
    with pytest.raises(ValueError, match="out of range"):
        memit.apply(lm, [EditRequest(prompt="{} is in", subject="Paris", target_new="Rome")],
                    MEMITHparams(layers=(29, 30)))
