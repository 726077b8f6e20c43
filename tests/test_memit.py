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


EASYEDIT_MEMIT = """alg_name: "MEMIT"
model_name: "./hugging_cache/gpt2-xl"
stats_dir: "./data/stats"
device: 0
layers: [13, 14, 15, 16, 17]
clamp_norm_factor: 0.75
layer_selection: "all"
fact_token: "subject_last"
v_num_grad_steps: 20
v_lr: 5e-1
v_loss_layer: 47
v_weight_decay: 0.5
kl_factor: 0.0625
mom2_adjustment: true
mom2_update_weight: 20000
rewrite_module_tmp: "transformer.h.{}.mlp.c_proj"
layer_module_tmp: "transformer.h.{}"
mlp_module_tmp: "transformer.h.{}.mlp"
attn_module_tmp: "transformer.h.{}.attn"
ln_f_module: "transformer.ln_f"
lm_head_module: "transformer.wte"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
model_parallel: false
"""


def test_hparams_from_easyedit_memit_yaml(tmp_path):
    y = tmp_path / "gpt2-xl.yaml"
    y.write_text(EASYEDIT_MEMIT)
    with pytest.warns(UserWarning, match="no mom2_corpus"):
        hp = MEMITHparams.from_yaml(y)
    assert hp.layers == (13, 14, 15, 16, 17) and hp.v_lr == 0.5 and isinstance(hp.v_lr, float)
    assert hp.mom2_update_weight == 20000.0 and hp.v_num_grad_steps == 20
    assert hp.clamp_norm_factor == 0.75 and hp.mom2_n_tokens == 100000
    hp = MEMITHparams.from_yaml(y, mom2_corpus="model")
    assert hp.mom2_corpus == "model"
    y.write_text(EASYEDIT_MEMIT + "v_lrr: 1\n")
    with pytest.raises(ValueError, match="unknown MEMIT hyperparameter 'v_lrr'"):
        MEMITHparams.from_yaml(y)
    y.write_text(EASYEDIT_MEMIT.replace("v_lr: 5e-1", "v_lr: fast"))
    with pytest.raises(ValueError, match="'v_lr' must be a number"):
        MEMITHparams.from_yaml(y)
