"""The claims report: verdict rules, the table from sweep rows, and a tiny end-to-end run."""

import json

import numpy as np
import pandas as pd
import pytest

from steamviz.run.claims import ClaimsConfig, claims_table, run_claims, verdict


def test_verdicts_follow_the_interval():
    assert verdict("up", 0.01, 0.2) == "supported"
    assert verdict("up", -0.1, 0.2) == "inconclusive"
    assert verdict("up", -0.3, 0.0) == "not supported"
    assert verdict("kept", -0.015, 0.01, 0.02) == "supported"
    assert verdict("kept", -0.05, -0.03, 0.02) == "not supported"
    assert verdict("kept", -0.05, 0.01, 0.02) == "inconclusive"
    assert verdict("up", float("nan"), 0.1) == "inconclusive"


def _rows(shift: dict, n=10, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n):
        base = dict(efficacy=1.0, paraphrase=rng.uniform(), neighborhood=0.8,
                    portability=rng.uniform(), cos_centered=rng.normal(0.1, 0.05),
                    cos_centered_control=0.05, knn_share=0.1, fluency=5.0)
        rows.append(dict(base, case_id=c, method="rome", lam=None, centered=None))
        for lam, cen, k in ((20.0, False, 1.0), (50.0, False, 2.0), (10.0, True, 3.0)):
            r = dict(base, case_id=c, method="steam-rome", lam=lam, centered=cen)
            for m, v in shift.items():
                r[m] = base[m] + k * v + rng.normal(0, 1e-3)
            rows.append(r)
    return pd.DataFrame(rows)


def test_claims_table_has_a_row_per_claim_and_setting():
    df = _rows(dict(cos_centered=0.02, paraphrase=0.0))
    t = claims_table({"cf": df, "port": df})
    cos = t[t.claim.str.startswith("held-out centred")]
    assert list(cos.setting) == ["λ=20 raw", "λ=50 raw", "λ=10 centred"]
    assert set(cos.verdict) == {"supported"} and cos.effect.iloc[1] == pytest.approx(0.04, abs=2e-3)
    eff = t[t.claim.str.startswith("efficacy")]
    assert set(eff.verdict) == {"supported"}  # unchanged efficacy: kept within 2 points
    flu = t[t.claim.str.startswith("fluency")]
    assert list(flu.setting) == ["λ=50 raw"]  # the largest lambda only
    spec = t[t.claim.str.startswith("... and beyond")]
    assert len(spec) == 3 and set(spec.verdict) == {"supported"}


def test_an_up_claim_at_one_value_everywhere_has_no_signal():
    """Portability 0 for ROME and every STEAM setting on every case (a model that answers no
    question after either edit): the table says the data cannot tell, not "not supported"; a
    setting that moves it, or a "kept" claim at one value, is read as before."""
    df = _rows({})
    df["portability"] = 0.0
    lift = (df.method == "steam-rome") & (df.lam == 50.0) & (df.case_id < 3)
    df.loc[lift, "portability"] = 1.0
    t = claims_table({"cf": df, "port": df})
    port = t[t.claim == "portability up"].set_index("setting")
    assert port.loc["λ=20 raw", "verdict"] == "no signal (every value 0)"
    assert port.loc["λ=10 centred", "verdict"] == "no signal (every value 0)"
    assert port.loc["λ=50 raw", "verdict"] in ("supported", "inconclusive")
    assert set(t[t.claim.str.startswith("efficacy")].verdict) == {"supported"}  # 1.0 everywhere


def test_the_report_says_how_many_anchors_differ_by_seed():
    """ROME's one edit measured against each seed's anchor: equal raw cosines at every seed
    mean the seeds took the same facts, and the report counts the requests where they differ."""
    from steamviz.run.claims import _seeds_line, distinct_anchors

    rows = []
    for case, cos in ((0, [0.1, 0.2, 0.3]), (1, [0.4, 0.4, 0.4]), (2, [0.5, 0.5, 0.6])):
        for seed, c in enumerate(cos):
            rows.append(dict(case_id=case, method="rome", anchor_seed=seed, cos_raw=c))
            rows.append(dict(case_id=case, method="steam-rome", anchor_seed=seed, cos_raw=0.9))
    rows.append(dict(case_id=3, method="rome", anchor_seed=0, cos_raw=0.2))  # one seed only
    df = pd.DataFrame(rows)
    assert distinct_anchors(df) == (2, 3)
    assert "cf: 2 of 3 requests" in _seeds_line({"cf": df, "port": df.iloc[:0]})
    assert distinct_anchors(df.drop(columns="anchor_seed")) == (0, 0)


@pytest.mark.model
@pytest.mark.slow
def test_merged_data_sets_get_unique_case_ids():
    # MQuAKE and zsRE both number their cases: the claims run's portability part held
    # case 452 twice, and its table failed after every point had run
    from steamviz.data.requests import EditRequest
    from steamviz.run.claims import unique_case_ids

    def r(i, subject="X"):
        return EditRequest("{} is in", subject, "Y", case_id=i)

    out = unique_case_ids({"a": [r(1), r(2), r(None)], "b": [r(2, "Z"), r(3), r(None)]})
    assert [q.case_id for q in out] == [1, 2, None, "b:2", 3, None]
    assert out[3].subject == "Z"  # the request itself is unchanged
    with pytest.raises(ValueError, match="'b:2' repeats within 'b'"):
        unique_case_ids({"a": [r(2)], "b": [r(2), r(2)]})


def test_the_portability_cases_of_the_mirror_have_unique_ids():
    from conftest import data_missing

    from steamviz.run.claims import portability_requests

    why = data_missing("mquake", "zsre")
    if why:
        pytest.skip(why)
    with pytest.warns(UserWarning, match="'alt' equals the answer"):
        reqs = portability_requests()
    ids = [r.case_id for r in reqs]
    assert len(set(ids)) == len(ids) == 627  # 129 MQuAKE single edits + 498 zsRE
    renamed = [i for i in ids if isinstance(i, str)]
    assert renamed and all(i.startswith("zsre:") for i in renamed)
    assert "zsre:452" in renamed and 452 in ids


def test_a_tiny_claims_run_end_to_end(tmp_path, lm):
    from conftest import data_missing

    why = data_missing("counterfact", "mquake", "zsre", "polyglot", "pararel", "lre")
    if why:
        pytest.skip(why)
    cfg = ClaimsConfig(n_cf=2, n_port=2, seeds=[0], lams=[50.0], tune_lams=[20.0], n_tune=2,
                       candidates=8, port_candidates=8, max_new_tokens=8,
                       pararel_patterns="first", widen_to=0,
                       bank_size=200,
                       hparams=dict(context_template_length_params=[[5, 2]],
                                    v_num_grad_steps=3))
    t = run_claims(cfg, tmp_path / "claims", lm=lm, log=lambda s: None)
    md = (tmp_path / "claims" / "claims.md").read_text()
    assert "| claim | setting |" in md and "tuned on the default edit set" in md
    assert set(t.setting) == {"λ=50 raw", "λ=20 centred"}
    assert set(t.n) <= {2} and (tmp_path / "claims" / "tuning.json").exists()
    assert "Compute: " in md and "(tuning " in md and ", cf " in md and ", port " in md
    # how the centred lambda was chosen: the rule and the tuned lambda's row, marked
    assert "How the centred-loss lambda was chosen" in md
    assert any(line.startswith("| 20 | ") and line.endswith("| yes |") for line in md.splitlines())
    # the run folder moved (another machine, a checkout): it resumes there, nothing recomputed
    moved = tmp_path / "elsewhere"
    (tmp_path / "claims").rename(moved)

    def count():
        return {p: len(list((moved / p / "points").glob("*.json"))) for p in ("cf", "port")}

    before = count()
    assert run_claims(cfg, moved, lm=lm, log=lambda s: None).equals(t)
    assert count() == before


def test_the_stored_tuning_is_reused_only_for_its_own_grid(tmp_path, monkeypatch):
    """RUN/tuning.json answers a run whose tuning grid (lambdas, edits, ROME overrides) is the
    one it was tuned on; another grid tunes again (a wider grid may choose another lambda)."""
    import steamviz.run.sweep as sweep
    from steamviz.run.claims import tune_centred_lambda

    calls = []

    def fake_sweep(sc, run_dir, **kw):  # the centred gain grows with lambda; efficacy kept
        calls.append((list(sc.lams), sc.n_edits, kw.get("force")))
        rows = []
        for c in range(8):
            rows.append(dict(case_id=c, method="rome", lam=None, block=5, align_layers=None,
                             centered=None, efficacy=1.0, cos_centered=0.1 + 0.01 * c))
            for lam in sc.lams:
                rows.append(dict(case_id=c, method="steam-rome", lam=lam, block=5,
                                 align_layers="default", centered=True, efficacy=1.0,
                                 cos_centered=0.1 + 0.01 * c + 1e-3 * lam + 1e-4 * (c % 3)))
        return pd.DataFrame(rows)

    monkeypatch.setattr(sweep, "run_sweep", fake_sweep)
    run = tmp_path / "claims"
    run.mkdir()
    cfg = ClaimsConfig(tune_lams=[5.0, 50.0], n_tune=8)
    assert tune_centred_lambda(None, cfg, run, log=lambda s: None) == 50.0
    assert tune_centred_lambda(None, cfg, run, log=lambda s: None) == 50.0
    assert len(calls) == 1  # the same grid: read from RUN/tuning.json
    said = []
    wider = ClaimsConfig(tune_lams=[5.0, 50.0, 200.0], n_tune=8)
    assert tune_centred_lambda(None, wider, run, log=said.append) == 200.0
    assert calls[-1] == ([5.0, 50.0, 200.0], 8, True) and "tuning again" in said[0]
    other = ClaimsConfig(tune_lams=[5.0, 50.0, 200.0], n_tune=8, hparams={"v_lr": 0.1})
    tune_centred_lambda(None, other, run, log=lambda s: None)
    assert len(calls) == 3  # ROME overrides are part of the grid


def _so_far_store(run, n: int, rows: pd.DataFrame) -> None:
    """A claims run's ``cf`` part (ROME and raw STEAM at lambda 20 on ``n`` requests) holding
    ``rows``, as a run that has not finished leaves it."""
    import yaml

    from steamviz.run.plan import SweepConfig
    from steamviz.run.store import Store

    cfg = SweepConfig(n_edits=n, methods=["rome", "steam-rome"], lams=[20.0],
                      include_unedited=False)
    (run / "cf").mkdir(parents=True)
    (run / "cf" / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    store = Store(run / "cf", writer=True)
    for i, r in enumerate(rows.to_dict(orient="records")):
        store.put(f"k{i}", {k: (None if isinstance(v, float) and np.isnan(v) else v)
                            for k, v in r.items()})
    store.close()


def _lam20(n: int) -> pd.DataFrame:
    rows = _rows(dict(cos_centered=0.05), n=n)
    return rows[(rows.lam.isna()) | (rows.lam == 20.0)]


def test_the_table_so_far_pairs_only_the_finished_requests(tmp_path):
    """`steamviz claims --so-far`: the requests that hold every point of their grid, no
    model loaded; an unfinished request (ROME's point only) is left out, and said so."""
    from steamviz.run.claims import report_so_far

    run = tmp_path / "claims"
    rows = _lam20(3)
    _so_far_store(run, 3, rows[~((rows.case_id == 2) & (rows.method == "steam-rome"))])
    t = report_so_far(run, log=lambda s: None)
    md = (run / "claims-so-far.md").read_text()
    assert "cf: 2 of 3 requests" in md and "NOT the final report" in md
    assert set(t.n) == {2} and set(t.setting) == {"λ=20 raw"}
    # a screening that no longer keeps request 1: its points stay in the store, unread
    (run / "requests-cf.jsonl").write_text("".join(
        json.dumps({"case_id": c, "prompt": "{} x", "subject": "s", "target_new": "n"}) + "\n"
        for c in (0, 2)))
    t = report_so_far(run, log=lambda s: None)
    assert set(t.n) == {1} and "cf: 1 of 3 requests" in (run / "claims-so-far.md").read_text()
    assert not (run / "claims.md").exists()
    with pytest.raises(FileNotFoundError, match="holds no claims run"):
        report_so_far(tmp_path / "nothing")


def test_the_table_so_far_leaves_out_rows_of_a_request_changed_under_its_case_id(tmp_path):
    """Rows carry their request's digest: a request whose content changed under the same case
    id (another data file, a fixed prompt) no longer pairs its old rows."""
    from steamviz.data.requests import EditRequest
    from steamviz.run.claims import report_so_far
    from steamviz.run.plan import request_digest

    def request(c, new="n"):
        return EditRequest("{} x", "s", new, case_id=c)

    def write(reqs):
        (run / "requests-cf.jsonl").write_text(
            "".join(json.dumps(q.to_dict()) + "\n" for q in reqs))

    run = tmp_path / "claims"
    rows = _lam20(2)
    rows["request_digest"] = [request_digest(request(c).to_dict()) for c in rows.case_id]
    _so_far_store(run, 2, rows)
    write([request(0), request(1)])
    assert set(report_so_far(run, log=lambda s: None).n) == {2}
    write([request(0, new="other"), request(1)])  # case 0 now asks for another edit
    t = report_so_far(run, log=lambda s: None)
    assert set(t.n) == {1} and "cf: 1 of 2 requests" in (run / "claims-so-far.md").read_text()


def test_portability_comes_from_the_mirror_halves_or_the_whole_public_files(monkeypatch,
                                                                            tmp_path):
    """``--portability full`` reads mquake-full and zsre-full (what a machine without the data
    mirror can fetch); without the mirror's halves the error names that option."""
    from steamviz.data import fetch
    from steamviz.run import claims

    with pytest.raises(ValueError, match="portability 'half'"):
        claims.portability_requests("half")
    monkeypatch.setenv("STEAMVIZ_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv(fetch.MIRROR_ENV, raising=False)
    with pytest.raises(fetch.DataError, match=r"--portability full \(steamviz data get "
                                              r"mquake-full zsre-full\)"):
        claims.portability_requests("mirror")
    # the whole files have the halves' layout: stand the halves in for them
    asked = []
    monkeypatch.setattr(fetch, "path", lambda name, rel=None: asked.append(name) or (
        tmp_path / rel))
    rows = {"mquake/MQuAKE-CF_akew.json": [dict(
        case_id=7, requested_rewrite=[dict(prompt="The capital of {} is", subject="France",
                                           target_new={"str": "Rome"},
                                           target_true={"str": "Paris"}, relation_id="P36",
                                           question="What is the capital of France?")],
        questions=["Which country has its capital in the city France's capital is?"],
        new_answer="Italy", answer="France")],
        "zsre_portability/zsre_mend_eval_portability_gpt4.json": [dict(
            subject="Paris", src="What country is Paris in?", alt="Spain", answers=["France"],
            rephrase="Paris is in which country?", loc="nq question: who", loc_ans="me",
            portability={"New Question": "What language is spoken in Paris?",
                         "New Answer": "Spanish"})]}
    import json

    for rel, recs in rows.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps(recs))
    reqs = claims.portability_requests("full")
    assert asked == ["mquake-full", "zsre-full"] and len(reqs) == 2
    assert [r.target_new for r in reqs] == ["Rome", "Spain"] and all(
        r.portability_prompts for r in reqs)
    cfg = ClaimsConfig(portability="full")
    assert "the whole public files" in claims.report(pd.DataFrame(columns=[
        "claim", "setting", "n", "rome", "steam", "effect", "low", "high", "p", "verdict"]),
        cfg, 20.0, 0, 2, {}, {}, 1.0)


def test_the_report_says_how_the_centred_lambda_was_chosen(tmp_path):
    """RUN/tuning.json becomes a table: per tuned lambda the paired differences from ROME
    (centred cosine, efficacy, paraphrase), the chosen one marked; no file, no lines."""
    from steamviz.run.claims import tuning_lines

    assert tuning_lines(tmp_path) == []

    def row(lam, metric, diff):
        return dict(lam=lam, metric=metric, diff=diff, low=diff - 0.01, high=diff + 0.01)

    table = [row(5.0, "cos_centered", 0.005), row(5.0, "efficacy", 0.0),
             row(200.0, "cos_centered", 0.024), row(200.0, "efficacy", 0.0),
             row(200.0, "paraphrase", -0.125)]
    (tmp_path / "tuning.json").write_text(json.dumps(
        dict(centred_lam=200.0, tuned_on="default edit set, first 20", table=table)))
    lines = tuning_lines(tmp_path)
    assert "default edit set, first 20" in lines[1] and "does not read it" in lines[1]
    assert lines[-2] == "| 5 | +0.005 [-0.005, +0.015] | +0.000 [-0.010, +0.010] | - |  |"
    assert lines[-1] == ("| 200 | +0.024 [+0.014, +0.034] | +0.000 [-0.010, +0.010] | "
                         "-0.125 [-0.135, -0.115] | yes |")
    assert tuning_lines(tmp_path, 200.0) == lines
    assert tuning_lines(tmp_path, 50.0) == []  # the run used another lambda: not this tuning
