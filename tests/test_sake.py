"""SAKE: the OT map's math, the scope, hooks that apply the map and leave exactly as they came."""

import pytest
import torch

from steamviz import editors, sake
from steamviz.core.arch import cache_kwargs, output_cache
from steamviz.core.forward import greedy, next_token_logits, space, target_logprobs
from steamviz.data.requests import EditRequest
from steamviz.core.tokens import token_ids

# no model-written context prefixes (sampling them costs ~10 s), fewer negatives
FAST = dict(context_template_length_params=(), n_negative_subjects=8, n_generic=24)
TINY = dict(context_template_length_params=(), n_negative_subjects=4, n_generic=8)

OUT_OF_SCOPE = ["The capital of Japan is", "The capital of Italy is", "The capital of Germany is",
                "The official language of France is", "France is a country in",
                "My favourite food is"]
IN_SCOPE = ["The capital of France is", "The capital city of France is",
            "France's capital is the city of"]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def _n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _spd(d, g):
    M = torch.randn(d, d, generator=g, dtype=torch.float64)
    return M @ M.T + 0.1 * torch.eye(d, dtype=torch.float64)


# -- the optimal-transport map -----------------------------------------------------------------
def test_ot_map_pushes_one_gaussian_onto_the_other():
    g = torch.Generator().manual_seed(0)
    d = 6
    S_s, S_t = _spd(d, g), _spd(d, g)
    mu_s, mu_t = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(
        d, generator=g, dtype=torch.float64)
    A, b = sake.ot_map(mu_s, S_s, mu_t, S_t)
    # symmetric PSD + pushes N(mu_s, S_s) onto N(mu_t, S_t): Brenier's optimal map
    assert torch.allclose(A, A.T)
    assert bool((torch.linalg.eigvalsh(A) > 0).all())
    assert torch.allclose(A @ S_s @ A.T, S_t, atol=1e-9)
    assert torch.allclose(A @ mu_s + b, mu_t, atol=1e-12)
    # on samples
    X = mu_s + torch.randn(40000, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(
        S_s).T
    mu_y, S_y = sake.gaussian(X @ A.T + b)
    assert torch.allclose(mu_y, mu_t, atol=0.05)
    assert (S_y - S_t).norm() / S_t.norm() < 0.03
    # equal covariances: a translation; commuting ones: sqrt of the variance ratio
    A2, b2 = sake.ot_map(mu_s, S_s, mu_t, S_s)
    assert torch.allclose(A2, torch.eye(d, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(b2, mu_t - mu_s, atol=1e-9)
    v_s, v_t = torch.rand(d, generator=g, dtype=torch.float64) + 0.5, torch.rand(
        d, generator=g, dtype=torch.float64) + 0.5
    A3, _ = sake.ot_map(mu_s, torch.diag(v_s), mu_t, torch.diag(v_t))
    assert torch.allclose(A3, torch.diag((v_t / v_s).sqrt()), atol=1e-9)


def test_psd_sqrt():
    g = torch.Generator().manual_seed(1)
    S = _spd(5, g)
    r, ri = sake.psd_sqrt(S), sake.psd_sqrt(S, inverse=True)
    assert torch.allclose(r @ r, S, atol=1e-10)
    assert torch.allclose(r @ ri, torch.eye(5, dtype=torch.float64), atol=1e-10)
    with pytest.raises(ValueError, match="singular"):
        sake.psd_sqrt(torch.zeros(3, 3), inverse=True)


def test_fit_map_with_few_samples_needs_the_ridge():
    """n < d: rank-deficient covariances; the ridge makes the map well-posed, and a large
    ridge turns it into the difference of means."""
    g = torch.Generator().manual_seed(2)
    n, d = 12, 32
    Hs = torch.randn(n, d, generator=g) * 3 + 1
    Ht = Hs @ (torch.eye(d) + 0.2 * torch.randn(d, d, generator=g)) + 2.0
    for ridge in (1e-3, 0.1, 10.0):
        A, b, diag = sake.fit_transport(Hs, Ht, ridge)
        assert torch.isfinite(A).all() and torch.allclose(A, A.T)
        assert diag["rank_source"] == n - 1 and diag["covariance_residual"] < 1e-8
        assert diag["A_eig_min"] > 0
        # the source mean goes to the target mean whatever the ridge
        assert torch.allclose(Hs.double().mean(0) @ A.T + b, Ht.double().mean(0), atol=1e-6)
    A0, _, d0 = sake.fit_transport(Hs, Ht, 1e-3)
    A_big, b_big, d_big = sake.fit_transport(Hs, Ht, 1e6)
    assert torch.allclose(A_big, torch.eye(d, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(b_big, (Ht - Hs).double().mean(0), atol=1e-3)
    assert d0["transport_error"] < d_big["transport_error"]  # covariances fitted, not just means
    assert sake.fit_transport(Hs, Ht, 0.0)[2]["ridge_abs"] > 0  # a jitter keeps ridge=0 invertible


def test_hparams():
    hp = sake.SAKEHparams(ridge=3.0)
    assert hp.replace(seed=1).seed == 1 and hp.to_dict()["ridge"] == 3.0
    with pytest.raises(ValueError):
        sake.SAKEHparams(target_prob=1.5)
    with pytest.raises(ValueError):
        sake.SAKEHparams(ridge=-1)


# -- tiny models of every architecture ---------------------------------------------------------
def _toronto():
    return EditRequest(prompt="The city of {} is located in the country of", subject="Toronto",
                       target_new="Japan", target_true="Canada",
                       paraphrase_prompts=["Toronto is a city in"], relation_id="city_country")


def test_target_states_reach_the_goal(tiny):
    h = torch.stack([f[-1] for f in sake.hidden_states(tiny, ["The city of Toronto is", "Hello"],
                                                   [1])[1]])
    tok = token_ids(tiny, space("Japan"))[0]
    x = sake.target_states(tiny, h, tok, target_prob=0.9)
    head, soft = sake.head_parts(tiny)
    p = soft(head(x)).softmax(-1)[:, tok]
    assert bool((p > 0.89).all()), p


def test_tiny_apply_and_restore_exactly(tiny):
    req = _toronto()
    prompts = [req.rewrite_prompt, "The capital of Japan is"]
    state, n_hooks = _state(tiny.model), _n_hooks(tiny.model)
    logits0 = next_token_logits(tiny, prompts)
    lp0 = target_logprobs(tiny, prompts, ["Japan", "Tokyo"])
    gen0 = greedy(tiny, prompts, 4)
    e = editors.edit(tiny, req, "sake", **TINY)
    assert isinstance(e, sake.SAKEEdit) and e.active
    assert _n_hooks(tiny.model) == n_hooks + 4
    for key in ("hparams", "n_prompts", "fit", "scope"):
        assert key in e.info
    assert e.info["scope"]["query_threshold"] == e.scope.query_threshold
    assert e.in_scope([req.rewrite_prompt]) == [True]  # a fit prompt is its own reference
    lp1 = target_logprobs(tiny, prompts, ["Japan", "Tokyo"])
    assert lp1[0]["first_prob"] > lp0[0]["first_prob"]
    assert e.n_mapped > 0
    assert _same(tiny.model, state)  # hooks only
    e.restore()
    e.restore()  # idempotent
    assert not e.active and _n_hooks(tiny.model) == n_hooks
    assert _same(tiny.model, state)
    assert torch.equal(next_token_logits(tiny, prompts), logits0)
    assert target_logprobs(tiny, prompts, ["Japan", "Tokyo"]) == lp0
    assert greedy(tiny, prompts, 4) == gen0


# -- the real model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def france(lm):
    """A fitted Paris -> Rome edit (restored: tests install it again with ``replay()``) and
    the unedited model's outputs."""
    req = EditRequest(prompt="The capital of {} is", subject="France", target_new="Rome",
                      target_true="Paris", paraphrase_prompts=["The capital city of France is"],
                      # named here so that the scope's calibration never sees them
                      neighborhood_prompts=OUT_OF_SCOPE[:3],
                      neighborhood_answers=["Tokyo", "Rome", "Berlin"],
                      relation_id="country_capital")
    prompts = IN_SCOPE + OUT_OF_SCOPE
    base = dict(logits=next_token_logits(lm, prompts),
                lp=target_logprobs(lm, prompts, ["Rome"] * len(prompts)),
                gen=greedy(lm, prompts, 6), state=_state(lm.model), n_hooks=_n_hooks(lm.model))
    fitted = sake.apply(lm, req, sake.SAKEHparams(**FAST))
    fitted.restore()
    return fitted, base


@pytest.mark.model
def test_edit_lands_in_scope_and_spares_the_rest(lm, france):
    fitted, base = france
    n_in = len(IN_SCOPE)
    with fitted.replay() as e:
        assert e.in_scope(IN_SCOPE) == [True] * n_in
        assert e.in_scope(OUT_OF_SCOPE) == [False] * len(OUT_OF_SCOPE)
        lp = target_logprobs(lm, IN_SCOPE + OUT_OF_SCOPE, ["Rome"] * (n_in + len(OUT_OF_SCOPE)))
        logits = next_token_logits(lm, IN_SCOPE + OUT_OF_SCOPE)
        gen = greedy(lm, IN_SCOPE + OUT_OF_SCOPE, 6)
    for before, after in zip(base["lp"][:n_in], lp[:n_in]):
        assert after["prob"] > max(0.5, 20 * before["prob"]) and after["greedy"], (before, after)
    assert all(g.startswith(" Rome") for g in gen[:n_in]), gen
    # outside the scope nothing changes, bit for bit
    assert torch.equal(logits[n_in:], base["logits"][n_in:])
    assert lp[n_in:] == base["lp"][n_in:]
    assert gen[n_in:] == base["gen"][n_in:]
    info = fitted.info
    assert info["n_prompts"] > 10 and info["fit"]["mapped_p_new"] > 0.8
    assert info["scope"]["subject"]["separable"]


@pytest.mark.model
def test_restore_leaves_the_model_as_before(lm, france):
    fitted, base = france
    e = fitted.replay()
    assert _same(lm.model, base["state"])  # no weight is touched
    e.restore()
    prompts = IN_SCOPE + OUT_OF_SCOPE
    assert _same(lm.model, base["state"]) and _n_hooks(lm.model) == base["n_hooks"]
    assert torch.equal(next_token_logits(lm, prompts), base["logits"])
    assert target_logprobs(lm, prompts, ["Rome"] * len(prompts)) == base["lp"]
    assert greedy(lm, prompts, 6) == base["gen"]


@pytest.mark.model
def test_context_manager_restores_on_exception(lm, france):
    fitted, base = france
    with pytest.raises(RuntimeError, match="boom"):
        with fitted.replay() as e:
            assert _n_hooks(lm.model) == base["n_hooks"] + 4
            raise RuntimeError("boom")
    assert not e.active and _n_hooks(lm.model) == base["n_hooks"]
    # the same batch as the reference (a batch of another shape may round differently)
    assert torch.equal(next_token_logits(lm, IN_SCOPE + OUT_OF_SCOPE), base["logits"])


@pytest.mark.model
def test_kv_cache_carries_the_subject_over(lm, france):
    """The subject in the cached part, the question in a later call: the cached forward
    maps the same positions as one full forward."""
    fitted, _ = france
    ids = torch.tensor([list(lm.prefix_ids) + token_ids(lm, "The capital of France is")])
    with fitted.replay() as e:
        full = lm.model(input_ids=ids, use_cache=False).logits[0, -1]
        first = lm.model(input_ids=ids[:, :-1], use_cache=True)
        assert not bool(e.last_mask.any())  # no question yet
        step = lm.model(input_ids=ids[:, -1:], use_cache=True,
                        **cache_kwargs(lm.model, output_cache(first))).logits[0, -1]
        assert bool(e.last_mask.all())
        # a cache the edit never saw: conservatively out of scope
        cold = output_cache(lm.model(input_ids=ids[:, :-1], use_cache=True))
        e._cache = None
        lm.model(input_ids=ids[:, -1:], use_cache=True, **cache_kwargs(lm.model, cold))
        assert not bool(e.last_mask.any())
    rome = token_ids(lm, " Rome")[0]
    assert int(full.argmax()) == int(step.argmax()) == rome
    assert torch.allclose(full, step, atol=1e-3)


# -- issue 18.4: the subject from the template's slot -----------------------------------------
@pytest.mark.model
def test_subject_references_sit_at_the_slot(lm):
    """A context prefix that names the subject ("Toronto is big. {}") and the old-object
    prompts (the rewrite prompt, then the question): the subject gate's reference token is
    the question's slot, not the subject's first mention."""
    req = _toronto()
    hp = sake.SAKEHparams(prefixes=("Toronto is big. {}",), **FAST).resolved(lm)
    fit = sake.fit_prompts(lm, req, hp, negatives=dict(near=["x"], other=["y"]))
    facts = {p.text: p for p in fit.of("fact")}
    pos = dict(zip(facts, sake.subject_positions(lm, req, list(facts.values()))))
    n0 = len(lm.prefix_ids)

    def last_token(text, upto):  # index of the token that ends text[:upto]
        return n0 + len(token_ids(lm, text[:upto])) - 1

    q = req.rewrite_prompt
    ctx = "Toronto is big. " + q
    assert facts[ctx].question == q and facts[ctx].subject_start == 16 + 12
    assert pos[ctx] == last_token(ctx, 16 + 12 + 7) > last_token(ctx, 7)
    old = f"{q} Canada? No, that is outdated. {q}"
    assert facts[old].subject_start == len(old) - len(q) + 12
    assert pos[old] == last_token(old, len(old) - len(q) + 12 + 7) > last_token(old, 12 + 7)
    assert pos[q] == last_token(q, 12 + 7)
    alone = {p.text: p for p in fit.of("alone")}
    assert sake.subject_positions(lm, req, [alone["I mean Toronto"]]) == [
        last_token("I mean Toronto", 14)]


# -- issue 18.1: the fit never reads an evaluation prompt -------------------------------------
def _norm(s):
    return " ".join(s.split()).lower()


def _tail(a, b):
    return a.endswith(b) and (len(a) == len(b) or not a[-len(b) - 1].isalnum())


def _evaluation_prompts(req):
    """What steamviz.measure.metrics.evaluate reads, but the rewrite prompt (efficacy reads the edit
    itself): written out here, independently of sake.evaluation_prompts."""
    from steamviz.measure.metrics import generation_prompts

    return (req.paraphrase_prompts + req.neighborhood_prompts + req.portability_prompts
            + generation_prompts(req))


def _leaks(lm, req, fit) -> list:
    """Fit prompts that read an evaluation prompt: the same text, or the same question (the
    bare prompt behind a context prefix or a preamble)."""
    rw = _norm(req.rewrite_prompt)
    evals = {_norm(p) for p in _evaluation_prompts(req)} - {rw}
    bad = []
    for p in fit.prompts:
        t, q = _norm(p.text), _norm(p.question)
        assert _tail(t, q), p  # the question is what the prompt ends with
        if t in evals:
            bad.append((p.text, "same text"))
        elif q != rw and any(_tail(e, q) or _tail(q, e) for e in evals):
            bad.append((p.text, "same question"))
        elif any(_tail(t, e) for e in evals) and not _tail(t, rw):
            bad.append((p.text, "ends with an evaluation prompt"))
    return bad


def _check_disjoint(lm, requests):
    from steamviz.data.datasets import load_reference_facts

    try:
        facts = load_reference_facts()
    except Exception:
        facts = None
    hp = sake.SAKEHparams().resolved(lm)  # the defaults apply uses
    assert not hp.use_paraphrases
    n_fit = 0
    for req in requests:
        fit = sake.fit_prompts(lm, req, hp, facts=facts)  # what sake.apply fits on
        assert req.rewrite_prompt in fit.texts("fact")  # the request itself is used
        assert fit.of("near") and fit.of("other") and fit.of("alone")
        assert _leaks(lm, req, fit) == [], req.case_id
        n_fit += len(fit.prompts)
    return n_fit


@pytest.mark.model
def test_fit_and_evaluation_prompts_are_disjoint_on_the_default_set(lm):
    from steamviz.data.datasets import load_named

    reqs = load_named("default")
    assert len(reqs) >= 100
    _check_disjoint(lm, reqs)


@pytest.mark.model
def test_fit_and_evaluation_prompts_are_disjoint_on_counterfact(lm):
    from conftest import data_missing

    why = data_missing("counterfact")
    if why:
        pytest.skip(why)
    from steamviz.data.datasets import load_named

    reqs = load_named("counterfact", 8)
    assert len(reqs) == 8
    _check_disjoint(lm, reqs)


def test_held_out_rules():
    """Which prompts the fit may read, on a hand-made request."""
    req = EditRequest(prompt="The city of {} is located in the country of", subject="Toronto",
                      target_new="Japan", target_true="Canada",
                      paraphrase_prompts=["Lots of snow there. Toronto is a city in",
                                          "Toronto is located in the country of"],
                      neighborhood_prompts=["The city of Montreal is located in the country of"],
                      neighborhood_answers=["Canada"],
                      portability_prompts=["The currency used in Toronto is the"],
                      portability_answers=["Japanese yen"], relation_id="city_country")
    held = sake.HeldOut(req)
    assert req.rewrite_prompt not in held.prompts
    assert held.reads(req.rewrite_prompt) is None  # the request itself
    assert held.reads("Fun fact: " + req.rewrite_prompt, req.rewrite_prompt) is None
    assert held.reads("toronto  IS located in the country of ")  # normalised text
    assert held.reads("Fun fact: Toronto is a city in", "Toronto is a city in")  # preamble
    assert held.reads("The currency used in Toronto is the")  # a portability prompt
    assert held.reads("The city of Montreal is located in the country of")
    assert held.reads("Toronto is a city in the state of") is None
    hp = sake.SAKEHparams(**TINY)
    # of the relation's templates, "{} is located in the country of" is a paraphrase and
    # "{} is a city in" the question of one (behind its preamble)
    kept = "Toronto is a city in the country of"
    assert sake.base_prompts(req, hp) == [req.rewrite_prompt, kept]
    neg = sake.negative_prompts(req, hp)
    assert "The currency used in Toronto is the" not in neg["other"]
    assert not any("Montreal" in p for p in neg["near"] + neg["other"])
    # opting in: the request's paraphrases are fitted on (the paraphrase score in-sample)
    both = sake.base_prompts(req, hp.replace(use_paraphrases=True))
    assert set(req.paraphrase_prompts) <= set(both)
    assert sake.base_prompts(req, hp, exclude=[kept]) == [req.rewrite_prompt]  # e.g. a batch's


def test_apply_reads_exactly_the_fit_prompts(tokenizer, monkeypatch):
    """Every prompt apply runs through the model comes from fit_prompts (the function the
    disjointness tests check), and info["held_out"] says what was left out."""
    from conftest import build_tiny

    lm = build_tiny("llama", tokenizer)
    req = _toronto()
    req.portability_prompts, req.portability_answers = (
        ["The currency used in Toronto is the"], ["Japanese yen"])
    hp = sake.SAKEHparams(**TINY)
    seen = []
    states = sake.hidden_states

    def spy(lm_, prompts, *a, **kw):
        seen.extend(prompts)
        return states(lm_, prompts, *a, **kw)

    from steamviz import sake_fit

    for where in (sake, sake_fit):  # the edit and the scope calibration read states
        monkeypatch.setattr(where, "hidden_states", spy)
    with sake.apply(lm, req, hp) as e:
        fit = sake.fit_prompts(lm, req, hp.resolved(lm))
        assert sorted(set(seen)) == sorted(set(fit.texts()))
        assert e.info["n_prompts"] == len(fit.of("fact"))
        held = e.info["held_out"]
        assert held["n_dropped"] == len(fit.dropped) > 0
        assert set(held["reads"]) <= set(sake.evaluation_prompts(req))
        assert "The currency used in Toronto is the" in held["reads"]
    assert not any(_norm(p) in {_norm(x) for x in sake.evaluation_prompts(req)} for p in seen)
