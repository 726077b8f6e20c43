"""ROME: the fast v* optimisation equals the plain one, edits work on the bare prompt,
undo is bitwise, deltas replay, hyperparameters read EasyEdit YAML."""

import pytest
import torch

from steamviz import rome
from steamviz.edit.edits import load_edit
from steamviz.core.forward import greedy, target_logprobs
from steamviz.data.requests import EditRequest
from steamviz.edit.rome import ROMEHparams
from steamviz.core.tokens import token_ids

REQ = EditRequest(prompt="{} is located in the country of", subject="Toronto",
                  target_new="Japan", target_true="Canada",
                  paraphrase_prompts=["Toronto is a city in the country of"])
FAST = dict(context_template_length_params=((5, 3), (10, 2)))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_fast_v_equals_plain_implementation_tiny(tiny):
    """The prefix-cache path must match the full-forward path on every architecture."""
    req = EditRequest(prompt="The capital city of {} is", subject="France", target_new="Rome",
                      target_true="Paris")
    hp = ROMEHparams(block=1, v_num_grad_steps=4, **FAST)
    prep = rome.prepare(tiny, req, hp, use_cache=False)
    fast = rome.compute_v(tiny, prep, hp)
    plain = rome.compute_v_reference(tiny, prep, hp)
    assert [round(x["nll"], 4) for x in fast.losses] == [round(x["nll"], 4) for x in plain.losses]
    torch.testing.assert_close(fast.delta, plain.delta, rtol=1e-3, atol=1e-4)


@pytest.mark.model
def test_fast_v_equals_plain_implementation_real(lm):
    hp = ROMEHparams.for_model(lm).replace(v_num_grad_steps=3, **FAST)
    prep = rome.prepare(lm, REQ, hp, use_cache=False)
    fast, plain = rome.compute_v(lm, prep, hp), rome.compute_v_reference(lm, prep, hp)
    assert abs(fast.losses[-1]["nll"] - plain.losses[-1]["nll"]) < 1e-3
    assert (fast.delta - plain.delta).norm() / plain.delta.norm() < 1e-3


@pytest.mark.model
def test_edit_works_on_bare_prompt_and_restores_bitwise(lm, tmp_path):
    state = _state(lm.model)
    before = target_logprobs(lm, [REQ.rewrite_prompt] * 2, ["Japan", "Canada"])
    assert before[1]["prob"] > before[0]["prob"]
    edit = rome.apply(lm, REQ, ROMEHparams.for_model(lm).replace(**FAST))
    after = target_logprobs(lm, [REQ.rewrite_prompt] * 2, ["Japan", "Canada"])
    assert after[0]["prob"] > 0.5 > after[1]["prob"]
    # the bare prompt (subject at the first position after the start token) generates it
    assert greedy(lm, [REQ.rewrite_prompt], 2)[0].startswith(" Japan")
    assert not _same(lm.model, state)
    path = edit.save(tmp_path / "toronto.safetensors")
    edited = _state(lm.model)
    edit.restore()
    assert _same(lm.model, state)
    edit.restore()  # idempotent
    assert _same(lm.model, state)
    # replay the saved delta on the restored model: the same weights again
    replay = load_edit(path)
    assert replay.method == "ROME" and replay.info["request"]["subject"] == "Toronto"
    with replay.apply(lm.model):
        assert _same(lm.model, edited)
    assert _same(lm.model, state)


@pytest.mark.model
def test_context_manager_restores_on_exception(lm):
    state = _state(lm.model)
    with pytest.raises(RuntimeError, match="boom"):
        with rome.apply(lm, REQ, ROMEHparams.for_model(lm).replace(v_num_grad_steps=2, **FAST)):
            assert not _same(lm.model, state)
            raise RuntimeError("boom")
    assert _same(lm.model, state)


@pytest.mark.model
def test_failure_while_writing_leaves_model_untouched(lm, monkeypatch):
    from steamviz import edits

    state = _state(lm.model)
    calls = {"n": 0}
    orig = edits.WeightEdit.add_delta

    def flaky(self, name, delta, index=None):
        orig(self, name, delta, index)
        raise OSError("disk gone mid-edit")

    monkeypatch.setattr(edits.WeightEdit, "add_delta", flaky)
    with pytest.raises(OSError):
        rome.apply(lm, REQ, ROMEHparams.for_model(lm).replace(v_num_grad_steps=2, **FAST))
    assert _same(lm.model, state) and calls["n"] == 0
    assert getattr(lm.model, "_steamviz_active_edits", 0) == 0


def test_hparams_from_easyedit_yaml(tmp_path):
    y = tmp_path / "rome.yaml"
    y.write_text("alg_name: ROME\nmodel_name: x\nlayers: [7]\nfact_token: subject_last\n"
                 "v_num_grad_steps: 20\nv_lr: 0.5\nv_loss_layer: 29\nv_weight_decay: 0.001\n"
                 "clamp_norm_factor: 4\nkl_factor: 0.0625\nmom2_adjustment: false\n"
                 "context_template_length_params: [[5, 10], [10, 10]]\n"
                 "rewrite_module_tmp: model.layers.{}.mlp.down_proj\nmom2_n_samples: 100000\n")
    hp = ROMEHparams.from_yaml(y)
    assert hp.block == 7 and hp.v_num_grad_steps == 20 and hp.mom2_n_tokens == 100000
    assert hp.context_template_length_params == ((5, 10), (10, 10))
    y.write_text("layers: [7]\nv_lrr: 0.5\n")
    with pytest.raises(ValueError, match="unknown ROME hyperparameter 'v_lrr'"):
        ROMEHparams.from_yaml(y)
    y.write_text("layers: [3, 4]\n")
    with pytest.raises(ValueError, match="one block"):
        ROMEHparams.from_yaml(y)


def test_gpt2_conv1d_layout_edit(tokenizer):
    from conftest import build_tiny

    tiny = build_tiny("gpt2", tokenizer)
    req = EditRequest(prompt="The capital city of {} is", subject="France", target_new="Rome")
    state = _state(tiny.model)
    hp = ROMEHparams(block=1, v_num_grad_steps=6, **FAST)
    prep = rome.prepare(tiny, req, hp, use_cache=False)
    v = rome.compute_v(tiny, prep, hp)
    assert v.losses[-1]["nll"] < v.losses[0]["nll"] - 0.5
    edit = rome.write_update(tiny, prep, v)
    proj = tiny.model.transformer.h[1].mlp.c_proj  # Conv1D: weight [in, out]
    assert edit.deltas["transformer.h.1.mlp.c_proj.weight"].shape == proj.weight.shape
    with torch.no_grad():  # the edited projection maps the subject's key onto v*
        torch.testing.assert_close(proj(prep.k_bare[None])[0], v.target, rtol=1e-4, atol=1e-4)
    edit.restore()
    assert _same(tiny.model, state)


@pytest.mark.model
def test_second_moment_statistics_cached_and_used(lm, tmp_path, monkeypatch):
    from steamviz import stats

    monkeypatch.setenv("STEAMVIZ_CACHE", str(tmp_path))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(
        "\n".join("Paris is the capital of France and a large city in Europe with many museums."
                  f" Line {i} talks about rivers, trains and {i} bridges over the Seine."
                  for i in range(40)))
    C = stats.second_moment(lm, 5, corpus=corpus, n_tokens=2000, progress=False)
    assert C.shape == (1536, 1536) and torch.allclose(C, C.T)
    assert torch.linalg.eigvalsh(C).min() > -1e-6
    files = list((tmp_path / "stats").iterdir())
    assert len(files) == 1
    # the mean of k k^T over every token: a plain loop, one chunk at a time (no padding), the
    # whole model, float64 per token (second_moment batches by length, float32 per batch)
    from steamviz.core.arch import mlp_out_module

    ks = []
    h = mlp_out_module(lm.model, 5).register_forward_hook(
        lambda m, a, o: ks.append(a[0][0].double()))
    try:
        for chunk in stats.text_chunks(lm, stats.corpus_files(corpus), 2000, 128):
            with torch.no_grad():
                lm.model(input_ids=torch.tensor([chunk]))
    finally:
        h.remove()
    K = torch.cat(ks)
    torch.testing.assert_close(C, K.T @ K / len(K), rtol=1e-4, atol=1e-5)
    again = stats.second_moment(lm, 5, corpus=corpus, n_tokens=2000, progress=False)
    assert torch.equal(C, again)
    hp = ROMEHparams.for_model(lm).replace(v_num_grad_steps=3, mom2_adjustment=True,
                                           mom2_corpus=str(corpus), mom2_n_tokens=2000,
                                           mom2_ridge=1e-2, **FAST)
    prep = rome.prepare(lm, REQ, hp, use_cache=False)
    Cinv = stats.inverse(C, 1e-2).float()
    expect = Cinv @ prep.k_star
    torch.testing.assert_close(prep.u, expect / expect.norm(), rtol=1e-4, atol=1e-6)
    # the update maps the bare key exactly onto v*
    v = rome.compute_v(lm, prep, hp)
    upd = rome.update_matrix(prep, v)
    torch.testing.assert_close(upd @ prep.k_bare, v.target - prep.v_init, rtol=1e-3, atol=1e-4)
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        stats.second_moment(lm, 5, corpus=tmp_path / "nope")


def test_every_edit_counts_as_active_until_restored():
    from steamviz.edit.edits import Edit, WeightEdit
    from steamviz.core.guard import active_edits

    model = torch.nn.Linear(3, 2)
    w0 = model.weight.detach().clone()
    hook = Edit(model, "hook-only")  # e.g. SAKE or BaFT: no weight changes
    assert active_edits(model) == 1
    e = WeightEdit(model, "weights")
    with pytest.raises(RuntimeError, match="half"):
        with e.undo_on_error():
            e.add_delta("weight", torch.ones(2, 3))
            raise RuntimeError("failed half-way")
    assert not e.active and torch.equal(model.weight, w0) and active_edits(model) == 1
    hook.restore()
    hook.restore()  # idempotent
    assert active_edits(model) == 0


def test_kl_term_is_romes_direction(tokenizer):
    """The essence term is ROME's KL(P_edited || P_init) on "{subject} is a", read where ROME
    reads it: at the subject's last token (issue 18.3; the old code read the last token)."""
    from conftest import build_tiny

    from steamviz.core.arch import mlp_out_module

    lm = build_tiny("llama", tokenizer)
    hp = ROMEHparams(block=1, v_num_grad_steps=2, early_stop_loss=0.0, v_lr=2.0, kl_factor=1.0,
                     context_template_length_params=((5, 2),))
    prep = rome.prepare(lm, REQ, hp, use_cache=False)
    v = rome.compute_v(lm, prep, hp)
    text = "Toronto is a"
    ids = torch.tensor([list(lm.prefix_ids) + token_ids(lm, text)])
    sp = len(lm.prefix_ids) + len(token_ids(lm, "Toronto")) - 1  # as ROME finds it
    h = mlp_out_module(lm.model, 1).register_forward_hook(
        lambda m, a, o: o + torch.nn.functional.one_hot(torch.tensor(sp), ids.shape[1])[None, :, None]
        * v.delta)
    try:
        with torch.no_grad():
            lp = lm.model(input_ids=ids).logits[0, sp].float().log_softmax(-1)
    finally:
        h.remove()
    lp0 = prep.kl_logp_init[0]
    rome_dir = float((lp.exp() * (lp - lp0)).sum())
    other = float((lp0.exp() * (lp0 - lp)).sum())
    assert abs(v.losses[-1]["kl"] - rome_dir) < 1e-3 * max(rome_dir, 1e-3)
    assert abs(rome_dir - other) > 1e-2 * rome_dir


def test_kl_position_option_reads_the_prompts_last_token(tokenizer):
    from conftest import build_tiny

    lm = build_tiny("llama", tokenizer)
    hp = ROMEHparams(block=1, v_num_grad_steps=3, context_template_length_params=((5, 2),))
    a = rome.prepare(lm, REQ, hp, use_cache=False)
    b = rome.prepare(lm, REQ, hp.replace(kl_position="last"), use_cache=False)
    assert a.kl_pos.tolist() == [0] and b.kl_pos.tolist() == [2]  # "Toronto| is a|"
    for prep in (a, b):  # the oracle finds its positions on its own
        fast, plain = rome.compute_v(lm, prep), rome.compute_v_reference(lm, prep)
        torch.testing.assert_close(fast.delta, plain.delta, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="kl_position"):
        ROMEHparams(kl_position="middle")


def test_subject_is_located_from_the_template_not_by_search(tokenizer, monkeypatch):
    """A context prefix that names the subject must not move the key (issue 18.4)."""
    from conftest import build_tiny

    from steamviz import memit

    lm = build_tiny("llama", tokenizer)
    ctx = ["{}", "Toronto is big. {}"]
    from steamviz import rome_prepare

    monkeypatch.setattr(rome_prepare, "context_templates", lambda *a, **k: list(ctx))
    hp = ROMEHparams(block=1, v_num_grad_steps=2)
    prep = rome.prepare(lm, REQ, hp, use_cache=False)
    n0 = len(lm.prefix_ids)
    want = [n0 + len(token_ids(lm, c.replace("{}", "Toronto"))) - 1 for c in ctx]
    assert prep.subj_pos[:2] == want  # the old code took the context's "Toronto"
    k, k_all = memit._keys(lm, 1, [REQ], ctx)
    k_ref, _ = rome.keys_and_outputs(
        lm, 1, [c.replace("{}", REQ.rewrite_prompt) for c in ctx], ["Toronto"] * 2,
        starts=[c.index("{}") for c in ctx])
    torch.testing.assert_close(k_all, k_ref)
    assert not torch.allclose(k_all[1], rome.keys_and_outputs(
        lm, 1, ["Toronto is big. " + REQ.rewrite_prompt], ["Toronto"])[0][0])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # the lean forward, the model's modules
def test_batched_target_vectors_equal_one_at_a_time(tokenizer, arch):
    """compute_vs: several objectives of one request (plain ROME, STEAM at two lambdas, one
    centred) in one optimisation give each one's own compute_v result; a group that stops
    early keeps its delta while the others go on."""
    from conftest import build_tiny

    from steamviz.edit.steam import AlignLoss

    lm = build_tiny(arch, tokenizer)
    req = EditRequest(prompt="The capital city of {} is", subject="France", target_new="Rome",
                      target_true="Paris")
    g = torch.Generator().manual_seed(1)
    phi = torch.randn(2, 64, generator=g)
    aligns = [None,
              AlignLoss(lam=5.0, layers=[2, 3], phi=phi),
              AlignLoss(lam=0.0, layers=[3], phi=phi[:1]),
              AlignLoss(lam=20.0, layers=[2, 3], phi=phi, center=torch.randn(2, 64, generator=g))]
    base = ROMEHparams(block=1, v_num_grad_steps=6, **FAST)
    prep = rome.prepare(lm, req, base, use_cache=False)
    first = rome.compute_v(lm, prep, base).losses
    # stop plain ROME after its third step; the others run on
    stop = dict(early_stop_loss=(first[2]["loss"] + first[3]["loss"]) / 2)
    for hp, early in [(base, "rome"), (base.replace(**stop), "rome"), (base.replace(**stop), "total")]:
        many = rome.compute_vs(lm, prep, hp, aligns, early_stop_on=early)
        for a, got in zip(aligns, many):
            one = rome.compute_v(lm, prep, hp, align=a, early_stop_on=early)
            assert got.steps == one.steps
            assert [r.keys() for r in got.losses] == [r.keys() for r in one.losses]
            for x, y in zip(got.losses, one.losses):
                assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-5)
            torch.testing.assert_close(got.delta, one.delta, rtol=1e-3, atol=1e-4)
            assert (got.delta - one.delta).norm() <= 1e-4 * one.delta.norm()
    stopped = rome.compute_vs(lm, prep, base.replace(**stop), aligns, early_stop_on="total")
    assert stopped[0].steps == 3 and max(v.steps for v in stopped) > 3  # groups stopped apart


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # the lean forward, the model's modules
def test_target_vectors_of_many_requests_in_one_batch_equal_one_at_a_time(tokenizer, arch):
    """compute_vs with one preparation per objective (MEMIT's batch): requests of different
    prefix, suffix and target lengths (padded), each with its own objective and norm
    reference, give each one's compute_v result; groups that stop early leave the batch."""
    from conftest import build_tiny

    from steamviz.edit.steam import AlignLoss

    lm = build_tiny(arch, tokenizer)
    reqs = [REQ,
            EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux",
                        target_new="English language", target_true="French"),
            EditRequest(prompt="{} plays", subject="Ed", target_new="the violin",
                        target_true="piano")]
    g = torch.Generator().manual_seed(2)
    phi = torch.randn(2, 64, generator=g)
    aligns = [None, AlignLoss(lam=5.0, layers=[2, 3], phi=phi), None, AlignLoss(
        lam=20.0, layers=[2, 3], phi=phi, center=torch.randn(2, 64, generator=g))]
    which = [0, 1, 2, 0]  # the first request twice: two objectives
    base = ROMEHparams(block=1, v_num_grad_steps=6, **FAST)
    preps = [rome.prepare(lm, r, base, use_cache=False) for r in reqs]
    assert len({p.h_suffix.shape[1] for p in preps}) > 1  # padding is exercised
    assert len({p.mask4d.shape[-1] - p.h_suffix.shape[1] for p in preps}) > 1
    assert len({p.tgt_rows.shape[0] for p in preps}) > 1
    refs = [None, torch.randn(64, generator=g) * 3, None, None]
    # stop the group with the lowest loss after its third step; the others run on
    runs = [v.losses for v in rome.compute_vs(lm, [preps[i] for i in which], base, aligns,
                                                norm_ref=refs)]
    low = min(runs, key=lambda r: r[3]["loss"])
    stop = dict(early_stop_loss=(low[2]["loss"] + low[3]["loss"]) / 2)
    for hp in (base, base.replace(**stop)):
        many = rome.compute_vs(lm, [preps[i] for i in which], hp, aligns, norm_ref=refs)
        for i, a, ref, got in zip(which, aligns, refs, many):
            one = rome.compute_v(lm, preps[i], hp, align=a, norm_ref=ref)
            assert got.steps == one.steps
            for x, y in zip(got.losses, one.losses):
                assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-5)
            torch.testing.assert_close(got.delta, one.delta, rtol=1e-3, atol=1e-4)
            torch.testing.assert_close(got.target, preps[i].v_init + one.delta, rtol=1e-3,
                                       atol=1e-4)
    assert len({v.steps for v in many}) > 1  # groups stopped apart, and left the batch
    with pytest.raises(ValueError, match="one each"):
        rome.compute_vs(lm, preps[:2], base, [None])
    with pytest.raises(ValueError, match="same block"):
        rome.compute_vs(lm, [preps[0], rome.prepare(lm, REQ, base.replace(block=2))], base,
                        [None, None])


@pytest.mark.model
def test_target_vectors_of_many_requests_equal_one_at_a_time_real(lm):
    """The same on SmolLM2: three CounterFact-like requests of different lengths."""
    reqs = [REQ,
            EditRequest(prompt="The official language of {} is", subject="Brazil",
                        target_new="Japanese", target_true="Portuguese"),
            EditRequest(prompt="{}, whose capital is", subject="Hungary",
                        target_new="Buenos Aires", target_true="Budapest")]
    hp = ROMEHparams.for_model(lm).replace(v_num_grad_steps=4, early_stop_loss=0.0, **FAST)
    preps = [rome.prepare(lm, r, hp, use_cache=False) for r in reqs]
    many = rome.compute_vs(lm, preps, hp, [None] * 3)
    for p, got in zip(preps, many):
        one = rome.compute_v(lm, p, hp)
        assert (got.delta - one.delta).norm() <= 1e-4 * one.delta.norm()
