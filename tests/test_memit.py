"""MEMIT: batch edits reach their targets, spread over blocks, and undo exactly."""

import pytest
import torch

from steamviz import memit
from steamviz.core.forward import target_logprobs
from steamviz.edit.memit import MEMITHparams
from steamviz.data.requests import EditRequest
from steamviz.core.memo import clear_caches

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
    hp = MEMITHparams(blocks=(3, 4, 5), **FAST)
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
        MEMITHparams(blocks=(5, 4))
    with pytest.raises(ValueError, match="out of range"):
        memit.apply(lm, [EditRequest(prompt="{} is in", subject="Paris", target_new="Rome")],
                    MEMITHparams(blocks=(29, 30)))


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
    assert hp.blocks == (13, 14, 15, 16, 17) and hp.v_lr == 0.5 and isinstance(hp.v_lr, float)
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


# --- MEMIT as published: z's norms relative to the residual stream, keys per template type

TORONTO = EditRequest(prompt="The city of {} is located in the country of", subject="Toronto",
                      target_new="Japan", target_true="Canada")
MLP_OUT = {"llama": lambda m, L: m.model.layers[L].mlp.down_proj,
           "gpt2": lambda m, L: m.transformer.h[L].mlp.c_proj}


def _subject_last(lm, text_before_subject_end: str) -> int:
    """Position of the subject's last token, counted by hand (start tokens, then the text
    up to the end of the subject), as MEMIT's find_fact_lookup_idx."""
    return len(lm.prefix_ids) + len(lm.tok(text_before_subject_end,
                                           add_special_tokens=False)["input_ids"]) - 1


def _spy_compute_v(monkeypatch):
    """Every target vector MEMIT optimises (it calls rome.compute_vs, z_batch at a time)."""
    from steamviz import rome

    seen, real = [], rome.compute_vs

    def spy(*a, **k):
        seen.extend(real(*a, **k))
        return seen[-len(a[3] if len(a) > 3 else k["aligns"]):]

    monkeypatch.setattr(rome, "compute_vs", spy)
    return seen


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # the lean forward and the model's modules
def test_z_clamp_and_decay_are_relative_to_the_residual_stream(arch, tokenizer, monkeypatch):
    """MEMIT's compute_z: max_norm = clamp_norm_factor * |target_init| and decay
    v_weight_decay * |delta| / |target_init|^2, target_init the residual stream leaving
    block z_block at the subject's last token of the bare prompt (not the MLP output)."""
    from conftest import build_tiny

    from steamviz import lean

    lm = build_tiny(arch, tokenizer)
    L = 2  # z_block
    assert (lean.unsupported(lm.model, L) is None) == (arch == "llama")
    clear_caches("memit")
    clear_caches("rome")
    seen = _spy_compute_v(monkeypatch)
    hp = MEMITHparams(blocks=(1, L), clamp_norm_factor=0.05, v_weight_decay=0.5, v_lr=0.5,
                      v_num_grad_steps=4, early_stop_loss=0.0,
                      context_template_length_params=((5, 2),))
    edit = memit.apply(lm, [TORONTO], hp)
    edit.restore()
    (v,) = seen
    # the residual stream and the MLP output at the subject's last token, by hand
    text = TORONTO.rewrite_prompt
    pos = _subject_last(lm, text[: text.index("Toronto") + len("Toronto")])
    ids = torch.tensor([list(lm.prefix_ids) + lm.tok(text, add_special_tokens=False)["input_ids"]])
    got = {}
    h = MLP_OUT[arch](lm.model, L).register_forward_hook(
        lambda m, a, out: got.__setitem__("mlp", out[0, pos].detach()))
    try:
        with torch.no_grad():
            hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    finally:
        h.remove()
    resid = hs[L + 1][0, pos].norm().item()  # output of block L (L + 1 < n_blocks: pre-norm)
    mlp = got["mlp"].norm().item()
    assert abs(resid - mlp) > 0.2 * resid  # the two references are far apart here
    assert v.steps == 3  # the clamp bound after every step
    assert v.delta.norm().item() == pytest.approx(0.05 * resid, rel=1e-4)
    assert v.delta.norm().item() != pytest.approx(0.05 * mlp, rel=0.1)
    # the decay recorded at the last step: 0.5 * |delta| / |resid|^2 = 0.5 * 0.05 / |resid|
    assert v.losses[-1]["decay"] == pytest.approx(0.5 * 0.05 / resid, rel=1e-4)
    assert edit.info["final_losses"][0]["decay"] == pytest.approx(0.5 * 0.05 / resid, rel=1e-4)


def test_keys_are_the_mean_of_per_type_means(tokenizer, monkeypatch):
    """MEMIT's compute_ks: the mean key within each context-template type (the bare "{}",
    then one type per (length, n) pair), then the mean of those means; checked on the
    written update, dW = delta k^T / (w s + k.k) for one request at one block (C = s I)."""
    from conftest import build_tiny

    from steamviz.core.context import context_templates

    lm = build_tiny("llama", tokenizer)
    L = 2
    params = ((5, 2), (10, 3))
    ctx = context_templates(lm, params, seed=0)
    assert len(ctx) == 6 and ctx[0] == "{}"
    # per-context keys by hand: the input of down_proj at the subject's last token
    keys = []
    for c in ctx:
        text = c.replace("{}", TORONTO.rewrite_prompt)
        head = c.replace("{}", TORONTO.prompt)
        pos = _subject_last(lm, head[: head.index("{}")] + "Toronto")
        ids = torch.tensor([list(lm.prefix_ids)
                            + lm.tok(text, add_special_tokens=False)["input_ids"]])
        got = {}
        h = lm.model.model.layers[L].mlp.down_proj.register_forward_hook(
            lambda m, a, out: got.__setitem__("k", a[0][0, pos].detach()))
        try:
            with torch.no_grad():
                lm.model(input_ids=ids)
        finally:
            h.remove()
        keys.append(got["k"])
    K = torch.stack(keys).double()
    k_types = (K[0] + K[1:3].mean(0) + K[3:6].mean(0)) / 3
    k_flat = K.mean(0)
    clear_caches("memit")
    clear_caches("rome")
    seen = _spy_compute_v(monkeypatch)
    w = 64.0
    hp = MEMITHparams(blocks=(L,), v_num_grad_steps=3, mom2_update_weight=w,
                      context_template_length_params=params)
    edit = memit.apply(lm, [TORONTO], hp)
    edit.restore()
    (v,) = seen
    dW = edit.deltas[f"model.layers.{L}.mlp.down_proj.weight"].double()
    s = K.pow(2).sum(-1).mean() / K.shape[-1]  # steamviz's C = s I without a corpus
    d = v.delta.double()

    def expect(k):
        return torch.outer(d, k) / (w * s + k @ k)

    torch.testing.assert_close(dW, expect(k_types), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(dW, expect(k_flat), rtol=1e-2, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # the lean forward and the model's modules
def test_batched_z_equal_one_request_at_a_time(arch, tokenizer):
    """MEMIT's z of several requests (different lengths: padded) optimised together
    (z_batch) equal each optimised alone, and so do the edits they make."""
    from conftest import build_tiny

    lm = build_tiny(arch, tokenizer)
    reqs = [TORONTO,
            EditRequest(prompt="{} is the capital of", subject="Oslo", target_new="Peru",
                        target_true="Norway"),
            EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux",
                        target_new="English language", target_true="French")]
    hp = MEMITHparams(blocks=(1, 2), v_num_grad_steps=5, early_stop_loss=0.0,
                      context_template_length_params=((5, 2),))
    out = {}
    for zb in (1, 3):
        clear_caches("memit")
        clear_caches("rome")
        with memit.apply(lm, reqs, hp.replace(z_batch=zb)) as e:
            out[zb] = ({k: d.clone() for k, d in e.deltas.items()}, e.info["final_losses"])
    (d1, l1), (d3, l3) = out[1], out[3]
    assert d1.keys() == d3.keys()
    for k in d1:
        torch.testing.assert_close(d3[k], d1[k], rtol=1e-3, atol=1e-5)
    for a, b in zip(l1, l3):
        assert b["nll"] == pytest.approx(a["nll"], rel=1e-4, abs=1e-5)
    with pytest.raises(ValueError, match="z_batch"):
        hp.replace(z_batch=0)
