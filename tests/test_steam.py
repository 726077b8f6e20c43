"""Anchors, the alignment loss and integration metrics: tests whose numbers move if a layer
index or a token position is wrong."""

import warnings

import numpy as np
import pytest
import torch

from steamviz import rome, steam
from steamviz.look.anchors import AnchorError, build_anchor, recalled
from steamviz.look.capture import capture
from steamviz.data.datasets import Fact
from steamviz.measure.integration import axis_position, knn_share, logit_lens
from steamviz.data.requests import EditRequest

pytestmark = pytest.mark.model
T = "The city of {} is located in the country of"
JAPAN = [Fact(s, "city_country", "Japan", T) for s in
         ("Tokyo", "Osaka", "Yokohama", "Nagoya", "Sapporo", "Kobe", "Hiroshima")]
JAPAN += [Fact(s, "landmark_country", "Japan", "The famous {} is located in the country of")
          for s in ("Mount Fuji", "Tokyo Tower")]
WRONG = Fact("Paris", "city_country", "Japan", T)  # not true: the model will not recall it
REQ = EditRequest(prompt=T, subject="Toronto", target_new="Japan", target_true="Canada",
                  paraphrase_prompts=["Toronto is a city in the country of"])
HP = dict(context_template_length_params=((5, 2), (10, 2)), v_num_grad_steps=4)


def test_anchor_is_mean_of_recalled_facts(lm):
    facts = JAPAN + [WRONG]
    ok = recalled(lm, facts)
    assert ok[-1] is False and sum(ok) >= 6
    a = build_anchor(lm, "Japan", facts=facts, n_per_relation=4, seed=1, use_cache=False)
    assert WRONG not in a.facts
    rep = {r["relation"]: r for r in a.report}
    assert rep["city_country"]["found"] == 8 and rep["city_country"]["used"] == 4
    assert rep["landmark_country"]["used"] <= 2 and a.n == sum(r["used"] for r in a.report)
    cap = capture(lm, [f.prompt for f in a.facts], positions=("last",)).get("last")
    torch.testing.assert_close(a.phi, cap.mean(0))
    b = build_anchor(lm, "Japan", facts=facts, n_per_relation=4, seed=2, use_cache=False)
    assert {f.subject for f in b.facts} != {f.subject for f in a.facts}  # seeded sampling


def test_too_few_facts_is_a_clear_error(lm):
    with pytest.raises(AnchorError, match="only 0 usable reference facts for object 'Japan'"):
        build_anchor(lm, "Japan", facts=[WRONG], use_cache=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        build_anchor(lm, "Japan", facts=JAPAN[:4], use_cache=False)
    assert any("averages only" in str(x.message) for x in w)


def test_alignment_loss_reads_the_right_layers_and_position(lm):
    hp = rome.ROMEHparams.for_model(lm).replace(**HP)
    a = build_anchor(lm, "Japan", facts=JAPAN, use_cache=False)
    layers = [8, 12, 20]
    align = steam.make_align(lm, a, lam=0.0, layers=layers)
    prep = rome.prepare(lm, REQ, hp, use_cache=False)
    v = rome.compute_v(lm, prep, hp, align=align)
    # step 0 has delta = 0: L_LA must equal 1 - cos of the unedited streams at the token
    # before the target (the rewrite prompts' last token), at residual-stream layers 8/12/20
    prompts = [c.format(REQ.rewrite_prompt) for c in prep.contexts]
    h = capture(lm, prompts, positions=("last",), layers=layers).get("last")  # [p, 3, d]
    cos = torch.nn.functional.cosine_similarity(h, a.phi[layers][None], dim=-1)
    expect = float((1 - cos.mean(0)).mean())
    assert v.losses[0]["align"] == pytest.approx(expect, rel=1e-4)
    # and an off-by-one layer set gives a different number (the test can fail)
    h2 = capture(lm, prompts, positions=("last",), layers=[x - 1 for x in layers]).get("last")
    wrong = float((1 - torch.nn.functional.cosine_similarity(
        h2, a.phi[layers][None], dim=-1).mean(0)).mean())
    assert abs(wrong - expect) > 1e-3


def test_lambda_zero_is_exactly_rome(lm):
    hp = rome.ROMEHparams.for_model(lm).replace(**HP)
    a = build_anchor(lm, "Japan", facts=JAPAN, use_cache=False)
    with rome.apply(lm, REQ, hp) as e1:
        d1 = next(iter(e1.deltas.values())).clone()
    with steam.apply(lm, REQ, lam=0.0, anchor=a, hparams=hp) as e2:
        d2 = next(iter(e2.deltas.values())).clone()
    assert torch.equal(d1, d2)


def test_alignment_pulls_towards_the_anchor(lm):
    hp = rome.ROMEHparams.for_model(lm).replace(**HP).replace(v_num_grad_steps=8,
                                                              early_stop_loss=0.0)
    a = build_anchor(lm, "Japan", facts=JAPAN, use_cache=False)
    layers = steam.default_layers(lm, hp.block)
    prep = rome.prepare(lm, REQ, hp, use_cache=False)
    plain = rome.compute_v(lm, prep, hp, align=steam.make_align(lm, a, 0.0, layers))
    pulled = rome.compute_v(lm, prep, hp, align=steam.make_align(lm, a, 50.0, layers))
    assert pulled.losses[-1]["align"] < plain.losses[-1]["align"] - 3e-4  # raw cosine: small
    assert pulled.losses[-1]["p_target"] > 0.2


def test_default_layers_are_mid_layers_above_the_edit(lm):
    assert steam.default_layers(lm, 5) == list(range(8, 21))
    with pytest.raises(ValueError, match="not above the edited block"):
        hp = rome.ROMEHparams.for_model(lm).replace(**HP)
        prep = rome.prepare(lm, REQ, hp)
        a = build_anchor(lm, "Japan", facts=JAPAN, use_cache=False)
        rome.compute_v(lm, prep, hp, align=steam.make_align(lm, a, 1.0, [3, 9]))


def test_integration_geometry_helpers():
    torch.manual_seed(0)
    old, new, center = torch.randn(3, 4, 8)
    h = torch.stack([old, new, 0.5 * (old + new)])  # [prompt, layer, d]
    ax = axis_position(h[:1].clone(), new, old, center)
    assert np.allclose(ax, 0.0, atol=1e-5)
    assert np.allclose(axis_position(h[1:2].clone(), new, old, center), 1.0, atol=1e-5)

    class B:
        tensor = torch.randn(20, 4, 8)
        objects = ["A"] * 10 + ["B"] * 10
        mean = torch.zeros(4, 8)

    B.tensor[:10] += 5 * torch.ones(8)  # A facts cluster along +1
    q = 5 * torch.ones(1, 4, 8)
    assert knn_share(q, B, "A", [0, 3], k=5).tolist() == [1.0, 1.0]
    assert knn_share(-q, B, "A", [0, 3], k=5).tolist() == [0.0, 0.0]


def test_logit_lens_last_layer_is_the_models_prediction(lm):
    rows = logit_lens(lm, "The capital of France is", {"new": "London", "old": "Paris"})
    last = {r["target"]: r for r in rows if r["layer"] == lm.n_blocks}
    assert last["old"]["rank"] == 0 and last["old"]["prob"] > 0.5
    assert last["new"]["rank"] > 0
    assert len(rows) == 2 * (lm.n_blocks + 1)
