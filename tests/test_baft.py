"""BaFT: a gated low-rank intervention on the residual stream; the weights never change and
removing the hooks gives the original model back exactly."""

import pytest
import torch

from steamviz import baft
from steamviz.edit.baft import BaFTHparams, BasisIntervention
from steamviz.edit.editors import edit as edit_with
from steamviz.core.forward import greedy, next_token_logits, target_logprobs
from steamviz.data.requests import EditRequest

FAST = dict(context_template_length_params=((5, 1), (10, 1)))
REQ = EditRequest(prompt="The capital of {} is", subject="France", target_new="Rome",
                  target_true="Paris")
# not in baft.LOC_PROMPTS: locality is measured on prompts the edit never saw
UNRELATED = ["The largest planet in the solar system is", "My favourite food is"]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def _kl(p_logits, q_logits):
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


def test_intervention_starts_as_identity_and_keeps_orthonormal_rows():
    g = torch.Generator().manual_seed(0)
    iv = BasisIntervention(32, 4, g)
    h = torch.randn(2, 5, 32, generator=g)
    assert torch.allclose(iv(h), h, atol=1e-5)  # W = R, b = 0
    opt = torch.optim.Adam(iv.parameters(), lr=0.05)
    target = torch.randn(2, 5, 32, generator=g)
    for _ in range(30):
        opt.zero_grad()
        loss = (iv(h) - target).pow(2).mean()
        loss.backward()
        opt.step()
    R = iv.R.detach()
    assert not torch.allclose(iv(h), h, atol=1e-3)  # it trained
    assert torch.allclose(R @ R.T, torch.eye(4), atol=1e-5)
    w = iv.weights(h)
    assert w.shape == (2, 5, 4) and bool(((w > 0) & (w < 1)).all())
    # the edit lives in R's row space: the orthogonal complement is untouched
    P = torch.eye(32) - R.T @ R
    assert torch.allclose((iv(h) - h) @ P, torch.zeros(2, 5, 32), atol=1e-4)


def test_hparams():
    hp = BaFTHparams(blocks=[3, 5])
    assert hp.blocks == (3, 5) and hp.replace(rank=2).rank == 2
    assert hp.to_dict()["rank"] == 4
    with pytest.raises(ValueError, match="increasing"):
        BaFTHparams(blocks=(5, 3))
    with pytest.raises(ValueError):
        BaFTHparams(rank=0)
    assert BaFTHparams.for_model("smollm2-135m").blocks == baft.MODEL_DEFAULTS["smollm2-135m"]["blocks"]


def test_distractors_skip_held_out_prompts_and_the_subject():
    req = EditRequest(prompt="The city of {} is in", subject="Berlin", target_new="Tokyo",
                      neighborhood_prompts=["The city of London is in"],
                      neighborhood_answers=["England"])
    got = baft._distractor_prompts(req, n=len(baft.DISTRACTORS), seed=0)
    assert "The city of London is in" not in got  # an evaluation prompt
    assert not any(s in p for p in got for s in ("Berlin", "Tokyo"))
    assert len(got) == len(baft.DISTRACTORS) - 3
    assert got == baft._distractor_prompts(req, n=len(baft.DISTRACTORS), seed=0)


def test_tiny_models_train_apply_and_restore_exactly(tiny):
    req = EditRequest(prompt="The capital of {} is", subject="France", target_new="Rome")
    prompts = [req.rewrite_prompt, "A cat sat on the"]
    state = _state(tiny.model)
    hooks0 = _hooks(tiny.model)  # transformers may keep hooks of its own installed
    before = next_token_logits(tiny, prompts)
    hp = BaFTHparams(blocks=(1, 2), rank=2, steps=4, lr=1e-2, n_distractors=1,
                     loc_prompts=("Water is",), **FAST)
    rng = torch.random.get_rng_state()
    e = baft.apply(tiny, req, hp)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the caller's RNG is left alone
    assert e.info["steps"] >= 1 and len(e.info["losses"]) == e.info["steps"] + 1
    assert len(e.info["loc_kl"]) == len(e.info["loc_prompts"]) == 2
    assert _same(tiny.model, state)  # weights untouched while the edit is on
    during = next_token_logits(tiny, prompts)
    assert not torch.equal(during, before)
    assert set(e.weights(tiny, prompts)) == {1, 2}
    e.restore()
    assert torch.equal(next_token_logits(tiny, prompts), before)
    assert _same(tiny.model, state)
    assert _hooks(tiny.model) == hooks0  # every hook of the edit is gone
    with baft.apply(tiny, req, hp) as again:  # seeded: the same training again
        assert again.info["losses"] == e.info["losses"]
        assert torch.equal(next_token_logits(tiny, prompts), during)
    assert torch.equal(next_token_logits(tiny, prompts), before)


def _hooks(model):
    return {(n, k) for n, m in model.named_modules()
            for k in (*m._forward_hooks, *m._forward_pre_hooks)}


@pytest.mark.model
def test_edit_lands_locally_and_undoes_exactly(lm):
    state = _state(lm.model)
    flags = [p.requires_grad for p in lm.model.parameters()]
    hooks0 = _hooks(lm.model)
    probe = [REQ.rewrite_prompt] + UNRELATED
    before = next_token_logits(lm, probe)
    p0 = target_logprobs(lm, [REQ.rewrite_prompt], [REQ.target_new])[0]["prob"]
    e = edit_with(lm, REQ, "baft")
    assert isinstance(e, baft.BaFTEdit) and e.method == "BaFT"
    assert {"hparams", "losses", "steps", "seconds"} <= set(e.info)
    p1 = target_logprobs(lm, [REQ.rewrite_prompt], [REQ.target_new])[0]
    assert p1["prob"] > max(0.5, 10 * p0) and p1["greedy"], (p0, p1)
    assert greedy(lm, [REQ.rewrite_prompt], max_new_tokens=2)[0].strip().startswith("Rome")
    during = next_token_logits(lm, probe)
    # locality is learned, so only approximate: unrelated prompts keep their top-1 token and
    # move by a small KL (the edited prompt, for scale, moves by several nats)
    kl = _kl(before, during)
    assert kl[0] > 1.0
    assert bool((kl[1:] < 0.1).all()), kl
    assert torch.equal(during[1:].argmax(-1), before[1:].argmax(-1))
    assert _same(lm.model, state)  # weights bitwise unchanged throughout
    assert [p.requires_grad for p in lm.model.parameters()] == flags
    e.restore()
    assert not e.active and _same(lm.model, state)
    assert _hooks(lm.model) == hooks0
    assert torch.equal(next_token_logits(lm, probe), before)
    e.restore()  # idempotent


@pytest.mark.model
def test_context_manager_restores_on_exception(lm):
    probe = [REQ.rewrite_prompt]
    before = next_token_logits(lm, probe)
    hp = BaFTHparams.for_model(lm).replace(steps=3, **FAST)
    with pytest.raises(KeyError):
        with baft.apply(lm, REQ, hp) as e:
            assert not torch.equal(next_token_logits(lm, probe), before)
            raise KeyError("boom")
    assert not e.active
    assert torch.equal(next_token_logits(lm, probe), before)
    assert getattr(lm.model, "_steamviz_active_edits", 0) == 0


@pytest.mark.model
def test_bad_layers_are_refused(lm):
    with pytest.raises(ValueError, match="out of range"):
        baft.apply(lm, REQ, BaFTHparams(blocks=(lm.n_blocks,)))
