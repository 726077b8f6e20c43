"""KNE: integrated-gradient ensemble over FFN weights, sparse update, bitwise undo."""

import pytest
import torch

from steamviz import editors, kne
from steamviz.edit.edits import load_edit
from steamviz.core.forward import target_logprobs
from steamviz.edit.kne import KNEHparams
from steamviz.data.requests import EditRequest
from steamviz.core.tokens import fill, token_ids

REQ = EditRequest(prompt="The city of {} is located in the country of", subject="Toronto",
                  target_new="Japan", target_true="Canada")
# cheap settings for tests that check mechanics, not quality
FAST = dict(ig_steps=4, steps=2, context_template_length_params=((5, 1),))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def _changed(model, state) -> dict[str, int]:
    """Number of changed entries per parameter (only the parameters that changed)."""
    out = {}
    for k, v in model.state_dict().items():
        n = int((v != state[k]).sum())
        if n:
            out[k] = n
    return out


# -- unit -----------------------------------------------------------------------------------
def test_select_top_takes_the_requested_fraction():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(300, 200, generator=g), "b": torch.rand(1000, generator=g),
              "c": torch.rand(50, 40, generator=g) * 2}
    N = sum(v.numel() for v in scores.values())
    for frac in (0.001, 0.01, 0.1, 0.5):
        idx, thr = kne.select_top(scores, frac)
        k = round(frac * N)
        assert sum(i.numel() for i in idx.values()) == k
        flat = torch.cat([v.reshape(-1) for v in scores.values()])
        assert (flat > thr).sum() <= k <= (flat >= thr).sum()
        for name, i in idx.items():  # every selected entry is at least the threshold
            assert bool((scores[name].reshape(-1)[i] >= thr).all())
            assert torch.equal(i, i.sort().values)


def test_select_top_large_exact_and_ties():
    # more than torch.quantile's 16M limit: the sampled pre-filter must still be exact
    g = torch.Generator().manual_seed(1)
    scores = {"x": torch.rand(9_000_000, generator=g), "y": torch.rand(8_000_000, generator=g)}
    N = 17_000_000
    idx, thr = kne.select_top(scores, 0.01)
    assert sum(i.numel() for i in idx.values()) == round(0.01 * N)
    top = torch.cat([scores["x"], scores["y"]]).topk(round(0.01 * N)).values
    assert thr == pytest.approx(float(top[-1]))
    # ties: all equal scores, exactly k still
    idx, thr = kne.select_top({"z": torch.zeros(1000)}, 0.05)
    assert sum(i.numel() for i in idx.values()) == 50 and thr == 0.0
    with pytest.raises(ValueError, match="fraction"):
        KNEHparams(fraction=0.0)


def test_hparams():
    hp = KNEHparams().replace(fraction=0.02, blocks=[3, 4])
    assert hp.blocks == (3, 4) and hp.to_dict()["fraction"] == 0.02
    assert hp.resolve_blocks(30) == (3, 4)
    assert KNEHparams().resolve_blocks(30) == tuple(range(10))
    assert KNEHparams(block_span=1.0).resolve_blocks(4) == (0, 1, 2, 3)
    assert KNEHparams().resolve_blocks(2) == (0,) and KNEHparams().resolve_blocks(1) == (0,)
    with pytest.raises(ValueError, match="matrices"):
        KNEHparams(matrices="attn")


# -- tiny models of every architecture ------------------------------------------------------
def test_tiny_fast_attribution_matches_reference(tiny):
    w = kne.ffn_weights(tiny)
    fast = kne.attribute(tiny, "The city of Toronto is in", "Japan", w, steps=3, batch_size=2)
    ref = kne.attribute_reference(tiny, "The city of Toronto is in", "Japan", w, steps=3)
    for n in w:
        err = float((fast[n] - ref[n]).norm() / ref[n].norm())
        assert err < 1e-4, (n, err)
    signed = kne.attribute(tiny, "The city of Toronto is in", "Japan", w, steps=3, signed=True,
                           batch_size=2)
    assert all(torch.allclose(signed[n].abs(), fast[n]) for n in w)
    # through the subject's tokens only: part of the full gradient, not all of it
    subj = kne.attribute(tiny, "The city of Toronto is in", "Japan", w, steps=3,
                         signed=True, subject="Toronto")
    assert any(not torch.allclose(subj[n], signed[n]) for n in w)
    last = f"{tiny.adapter.blocks}.{tiny.n_blocks - 1}."
    for n in w:  # the last block's MLP at the subject's tokens cannot reach the answer
        assert (subj[n].abs().sum() == 0) == n.startswith(last), n


def test_tiny_attribution_goes_through_the_slot_not_the_first_mention(tiny):
    """Issue 18.4: the subject's tokens come from the template's slot. In "Toronto is big. I
    mean Toronto" the slot's Toronto ends the prompt, so the last block's MLP reaches the
    answer through it; through the first mention (a text search) it cannot."""
    w = kne.ffn_weights(tiny)
    prompt, at = fill("Toronto is big. I mean {}", "Toronto")
    assert at == 23
    kw = dict(steps=2, signed=True, batch_size=2, subject="Toronto")
    slot = kne.attribute(tiny, prompt, "Japan", w, subject_start=at, **kw)
    first = kne.attribute(tiny, prompt, "Japan", w, **kw)  # no offset: the search fallback
    last = f"{tiny.adapter.blocks}.{tiny.n_blocks - 1}."
    for n in w:
        if n.startswith(last):
            assert slot[n].abs().sum() > 0 and first[n].abs().sum() == 0, n
    with pytest.raises(ValueError, match="not at offset"):
        kne.attribute(tiny, prompt, "Japan", w, subject_start=3, **kw)


def test_apply_attributes_through_the_slot(tokenizer):
    """``info["attr_tokens"]``: the subject's token span from the slot, not the earlier
    mention of the subject in the template's own text."""
    from conftest import build_tiny

    lm = build_tiny("llama", tokenizer)
    req = EditRequest(prompt="Toronto is big. The city of {} is in", subject="Toronto",
                      target_new="Japan", target_true="Canada")
    text, at = fill(req.prompt, req.subject)
    assert text == req.rewrite_prompt and at == 28
    n0 = len(lm.prefix_ids)
    first = n0 + len(token_ids(lm, text[:at].rstrip()))  # " Toronto" takes the space
    last = n0 + len(token_ids(lm, text[: at + len("Toronto")])) - 1
    assert first > n0 + 1  # the first mention's tokens come earlier
    with kne.apply(lm, req, KNEHparams(**FAST)) as e:
        assert e.info["attr_tokens"] == [first, last]
    with kne.apply(lm, req, KNEHparams(attr_positions="all", **FAST)) as e:
        assert e.info["attr_tokens"] is None


def test_tiny_edit_runs_and_restores(tiny, tmp_path):
    state = _state(tiny.model)
    w = kne.ffn_weights(tiny)
    n_ffn = sum(v.numel() for v in w.values())
    assert len(w) == 2 * tiny.n_blocks or len(w) == 3 * tiny.n_blocks
    before = target_logprobs(tiny, [REQ.rewrite_prompt], [REQ.target_new])[0]["logprob"]
    hp = KNEHparams(fraction=0.02, ig_steps=4, steps=5, lr=1e-2, block_span=1.0,
                    context_template_length_params=((5, 1),))
    edit = kne.apply(tiny, REQ, hp)
    after = target_logprobs(tiny, [REQ.rewrite_prompt], [REQ.target_new])[0]["logprob"]
    assert after > before
    size = edit.info["ensemble_size"]
    assert size == round(0.02 * n_ffn)
    changed = _changed(tiny.model, state)
    assert set(changed) <= set(w) and 0 < sum(changed.values()) <= size
    assert sum(r["entries"] for r in edit.info["per_block"]) == size
    path = edit.save(tmp_path / "kne.safetensors")
    edited = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    edit.restore()
    assert _same(tiny.model, state)
    replay = load_edit(path).apply(tiny.model)  # dense deltas replay the sparse edit
    for k, v in tiny.model.state_dict().items():
        assert torch.allclose(v, edited[k], atol=1e-6), k
    replay.restore()
    assert _same(tiny.model, state)


# -- the real model -------------------------------------------------------------------------
@pytest.mark.model
def test_edit_lands_touches_only_the_ensemble_and_undoes(lm):
    state = _state(lm.model)
    before = target_logprobs(lm, [REQ.rewrite_prompt], [REQ.target_new])[0]["prob"]
    edit = editors.edit(lm, REQ, "kne")
    try:
        after = target_logprobs(lm, [REQ.rewrite_prompt], [REQ.target_new])[0]["prob"]
        assert after > max(0.5, 100 * before), (before, after)
        info = edit.info
        blocks = list(range(round(lm.n_blocks / 3)))  # default: the first third of the blocks
        n_ffn = sum(v.numel() for v in kne.ffn_weights(lm, blocks=blocks).values())
        assert info["n_entries"] == n_ffn and len(info["matrices"]) == 3 * len(blocks)
        assert info["ensemble_size"] == round(0.01 * n_ffn)
        assert info["ensemble_fraction"] == pytest.approx(0.01, rel=1e-3)
        changed = _changed(lm.model, state)
        assert set(changed) <= set(info["matrices"])  # no non-FFN parameter moved
        assert 0 < sum(changed.values()) <= info["ensemble_size"]
        assert [r["block"] for r in info["per_block"]] == blocks
        assert info["losses"][-1]["nll"] < info["losses"][0]["nll"]
        assert info["seconds"] > 0 and isinstance(info["hparams"], dict)
        assert getattr(lm.model, "_steamviz_active_edits", 0) == 1
    finally:
        edit.restore()
    assert _same(lm.model, state)
    assert getattr(lm.model, "_steamviz_active_edits", 0) == 0


@pytest.mark.model
def test_restores_on_exception_inside_the_block(lm):
    state = _state(lm.model)
    with pytest.raises(RuntimeError, match="boom"):
        with kne.apply(lm, REQ, KNEHparams(**FAST)) as e:
            assert not _same(lm.model, state)
            raise RuntimeError("boom")
    assert not e.active
    assert _same(lm.model, state)


@pytest.mark.model
def test_failure_while_writing_leaves_nothing(lm, monkeypatch):
    state = _state(lm.model)
    orig = kne.KNEEdit.set_entries
    calls = []

    def flaky(self, *a, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return orig(self, *a, **kw)

    monkeypatch.setattr(kne.KNEEdit, "set_entries", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        kne.apply(lm, REQ, KNEHparams(**FAST))
    assert _same(lm.model, state)
    assert getattr(lm.model, "_steamviz_active_edits", 0) == 0


@pytest.mark.model
def test_output_projection_only(lm):
    state = _state(lm.model)
    with kne.apply(lm, REQ, KNEHparams(matrices="out", blocks=(3, 4, 5), **FAST)) as e:
        assert set(_changed(lm.model, state)) <= {
            f"model.layers.{i}.mlp.down_proj.weight" for i in (3, 4, 5)}
        assert e.info["ensemble_size"] == round(0.01 * 3 * 576 * 1536)
    assert _same(lm.model, state)
