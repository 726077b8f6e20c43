"""The claims report: does STEAM do what it claims, on public data, per edit, paired?

    steamviz claims --out runs/claims          # resumable; writes RUN/claims.md and prints it

What runs (each part a resumable sweep in its own folder under RUN):

1. **Requests.** The first ``n_cf`` CounterFact val cases whose new object has an anchor
   (reference-fact pool, >= 3 recalled facts, every anchor seed), and the first ``n_port``
   portability cases (MQuAKE single-edit cases, then zsRE) with anchors. Written to
   ``RUN/requests-*.jsonl``; cases without an anchor are counted with their reason.
2. **Sweeps.** ROME and STEAM-ROME with the raw-cosine loss at each of ``lams``, and with the
   centred loss at ``centred_lam`` (chosen on the project's default edit set by
   :func:`tune_centred_lambda`, never on the evaluated data), default alignment layers, a
   matched step budget, every anchor seed.
3. **The table.** One row per claim and STEAM setting: the paired effect (setting - ROME, per
   edit, anchor seeds averaged), its bootstrap 95% CI, the sign-flip p and a verdict.

Verdicts: an "up" claim is *supported* when the CI lies above 0, *not supported* when it lies
at or below 0, else *inconclusive*; a "kept" claim (within a margin) is supported when the
CI's lower end is above -margin, not supported when its upper end is below -margin. An "up"
claim whose metric takes one value on every case for ROME and the setting alike (portability
0 when the model answers no question after either edit) gets *no signal*: the data cannot
tell (a "kept" claim with one value is kept).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.io import write_json, write_text


@dataclass
class ClaimsConfig:
    n_cf: int = 200
    n_port: int = 100
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    lams: list = field(default_factory=lambda: [20.0, 50.0])
    centred_lam: float | None = None  # None: tune on the default edit set
    # centred-loss lambdas tried on the default edit set (wide enough that the choice is not
    # the grid's edge: 50 was, on the grid up to 50)
    tune_lams: list = field(default_factory=lambda: [5.0, 10.0, 20.0, 50.0, 100.0, 200.0])
    n_tune: int = 20
    candidates: int = 400  # CounterFact val cases screened for anchors
    # portability cases screened (None: every one in the data; few have anchors, as their
    # new objects are mostly people and works the model does not know)
    port_candidates: int | None = None
    # where they come from (PORTABILITY): "mirror", the data mirror's fixed halves of MQuAKE
    # and zsRE; "full", the whole public files (what a machine without the mirror can fetch)
    portability: str = "mirror"
    hparams: dict = field(default_factory=dict)  # ROME overrides (e.g. fewer steps in tests)
    max_new_tokens: int = 20
    bank_size: int = 2000
    recall_rule: str = "greedy"  # which reference facts count as known (anchors.recall_rule_ok)
    # candidate facts per relation for objects short of an anchor (pool.widen; 0: off)
    widen_to: int = 400
    # ParaRel pattern per relation: "best" (pool.choose_patterns, on subjects not evaluated
    # here) or "first" (the file's first usable one)
    pararel_patterns: str = "best"


#: (claim, metric, data, kind, margin): kind "up" or "kept"; margin of "kept" in metric units
#: (None: 2% of ROME's mean)
CLAIMS = [
    ("efficacy kept (within 2 points)", "efficacy", "cf", "kept", 0.02),
    ("paraphrase up", "paraphrase", "cf", "up", None),
    ("neighborhood kept (within 2 points)", "neighborhood", "cf", "kept", 0.02),
    ("portability up", "portability", "port", "up", None),
    ("held-out centred cosine to the new anchor up (alignment layers)", "cos_centered", "cf",
     "up", None),
    ("... and beyond the control anchors", "cos_centered_specific", "cf", "up", None),
    ("kNN share of new-object facts up", "knn_share", "cf", "up", None),
    ("fluency kept at the largest lambda (within 2%)", "fluency", "cf", "kept", None),
]


def verdict(kind: str, low: float, high: float, margin: float = 0.0) -> str:
    """See the module docstring."""
    if np.isnan(low) or np.isnan(high):
        return "inconclusive"
    if kind == "up":
        return "supported" if low > 0 else "not supported" if high <= 0 else "inconclusive"
    return ("supported" if low > -margin else "not supported" if high < -margin
            else "inconclusive")


def _anchored(lm, requests, seeds, facts, n: int, log, rule: str = "greedy",
              widen_to: int = 400) -> tuple[list, dict]:
    """The first ``n`` requests whose new object has an anchor for every seed (the others
    excluded from anchors as in the run), and the reasons of those without one."""
    from ..measure.references import build_references

    refs = build_references(lm, requests, seeds=tuple(seeds), facts=facts, n_control=0,
                            widen_to=widen_to,
                            anchor_kw={} if rule == "greedy" else {"recall_rule": rule})
    keep, why = [], {}
    for r in requests:
        miss = [refs.missing.get((r.target_new, s)) for s in seeds]
        if any(miss):
            why[str(r.case_id)] = next(m for m in miss if m)
        elif len(keep) < n:
            keep.append(r)
    log(f"[claims] {len(keep)} of {len(requests)} screened requests kept "
        f"({len(why)} without an anchor)")
    return keep, why


#: ``ClaimsConfig.portability`` -> (data set, file) of MQuAKE and of zsRE
PORTABILITY = {
    "mirror": {"mquake": ("mquake", "mquake/MQuAKE-CF-subset.json"),
               "zsre": ("zsre", "zsre_portability/zsre_portability.json")},
    "full": {"mquake": ("mquake-full", "mquake/MQuAKE-CF_akew.json"),
             "zsre": ("zsre-full", "zsre_portability/zsre_mend_eval_portability_gpt4.json")},
}


def portability_requests(which: str = "mirror") -> list:
    """Every portability case the claims screen: MQuAKE's single-edit cases, then zsRE's,
    with case ids made unique (:func:`unique_case_ids`); ``which``: a key of
    :data:`PORTABILITY`."""
    from ..data import fetch
    from ..data.datasets import load_mquake, load_zsre

    if which not in PORTABILITY:
        raise ValueError(f"portability {which!r}: use one of {sorted(PORTABILITY)}")
    paths = {}
    for part, (name, rel) in PORTABILITY[which].items():
        try:
            paths[part] = fetch.path(name, rel)
        except fetch.DataError as e:
            hint = (" Without the data mirror, use the whole public files: --portability full "
                    "(steamviz data get mquake-full zsre-full)." if which == "mirror" else "")
            raise fetch.DataError(f"{e}{hint}") from None
    return unique_case_ids({
        "mquake": load_mquake(paths["mquake"], single_edit_only=True),
        "zsre": load_zsre(paths["zsre"])})


def unique_case_ids(parts: dict) -> list:
    """The requests of several data sets (name -> requests) in one list whose case ids are
    unique: an id that an earlier data set already used becomes ``"name:id"`` (MQuAKE and
    zsRE number their cases independently; rows are paired by case id). Ids that do not repeat
    are kept, so a run's store keys do not change.

    >>> from steamviz.data.requests import EditRequest
    >>> r = lambda i: EditRequest("{} is in", "X", "Y", case_id=i)
    >>> [q.case_id for q in unique_case_ids({"mquake": [r(1), r(2)], "zsre": [r(2), r(3)]})]
    [1, 2, 'zsre:2', 3]
    """
    import dataclasses

    seen, out = set(), []
    for name, reqs in parts.items():
        for r in reqs:
            if r.case_id is not None and r.case_id in seen:
                r = dataclasses.replace(r, case_id=f"{name}:{r.case_id}")
                if r.case_id in seen:
                    raise ValueError(f"case id {r.case_id!r} repeats within {name!r}")
            seen.add(r.case_id)
            out.append(r)
    return out


def _write_requests(path: Path, reqs) -> str:
    write_text(path, "".join(json.dumps(r.to_dict()) + "\n" for r in reqs))
    return str(path)


#: the centred-lambda tuning keeps lambdas whose efficacy CI lower end is above -TUNE_MARGIN
TUNE_MARGIN = 0.02


def tune_centred_lambda(lm, cfg: ClaimsConfig, run: Path, log=print) -> float:
    """The centred-loss lambda, chosen on the project's default edit set (never on evaluated
    data): the lambda with the largest held-out centred-cosine gain over ROME among those
    whose efficacy stays within 2 points of ROME's (CI lower end). Kept in RUN/tuning.json."""
    from ..measure.compare import paired
    from .sweep import SweepConfig, run_sweep

    path = run / "tuning.json"
    grid = dict(tune_lams=[float(x) for x in cfg.tune_lams], n_tune=int(cfg.n_tune),
                hparams=dict(cfg.hparams))
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("grid") == grid:
            return float(stored["centred_lam"])
        log(f"[claims] RUN/tuning.json was tuned on {stored.get('grid', 'an unrecorded grid')},"
            f" this run asks for {grid}: tuning again (points already in RUN/tune are reused)")
    sc = SweepConfig.from_dict(dict(
        data="default", n_edits=cfg.n_tune, methods=["rome", "steam-rome"],
        lams=[float(x) for x in cfg.tune_lams], centered=[True], generation=False,
        include_unedited=False, hparams=dict(cfg.hparams), bank_size=cfg.bank_size))
    # RUN/tune is this function's own folder: a changed grid adds its points to it (and
    # only this grid's points are read back)
    df = run_sweep(sc, run / "tune", lm=lm, progress=False, log=log, force=True)
    # paraphrase is kept for the report (the cost of each lambda); the rule reads the other two
    t = paired(df, ["efficacy", "cos_centered", "paraphrase"])
    eff = t[t.metric == "efficacy"].set_index("lam")
    cos = t[t.metric == "cos_centered"].set_index("lam")
    ok = [lam for lam in cos.index if eff.loc[lam, "low"] > -TUNE_MARGIN]
    best = max(ok or list(cos.index), key=lambda lam: cos.loc[lam, "diff"])
    write_json(path, dict(centred_lam=float(best), tuned_on=f"default edit set, first "
                          f"{cfg.n_tune}", grid=grid, table=t.to_dict(orient="records")))
    log(f"[claims] centred lambda {best:g} (tuned on the default edit set)")
    return float(best)


def tuning_lines(run: Path, lam: float | None = None) -> list[str]:
    """The report's account of the centred lambda: the rule, and per tuned lambda its paired
    differences from ROME on the tuning edits (``RUN/tuning.json``). No lines without the
    file, or when it chose another lambda than ``lam`` (the one the run used)."""
    path = Path(run) / "tuning.json"
    if not path.is_file():
        return []
    stored = json.loads(path.read_text())
    t = pd.DataFrame(stored.get("table") or [])
    if not len(t) or (lam is not None and float(stored["centred_lam"]) != float(lam)):
        return []
    lines = ["", f"How the centred-loss lambda was chosen ({stored.get('tuned_on')}, never "
             "evaluated here): the largest held-out centred-cosine gain over ROME among the "
             f"lambdas whose efficacy CI stays above {-TUNE_MARGIN:g}. Paraphrase is shown for "
             "its cost; the rule does not read it.", "",
             "| lambda | centred cosine | efficacy | paraphrase | chosen |", "|---|---|---|---|---|"]
    for x in sorted(t.lam.unique()):  # each tuned lambda
        cells = []
        for m in ("cos_centered", "efficacy", "paraphrase"):
            r = t[(t.lam == x) & (t.metric == m)]
            cells.append("-" if r.empty else "{:+.3f} [{:+.3f}, {:+.3f}]".format(
                *r[["diff", "low", "high"]].iloc[0]))
        chosen = "yes" if float(x) == float(stored["centred_lam"]) else ""
        lines.append(f"| {x:g} | {' | '.join(cells)} | {chosen} |")
    return lines


def run_claims(cfg: ClaimsConfig, out, lm=None, log=print, executor: str = "local",
               **executor_options) -> pd.DataFrame:
    """Run (or resume) everything and write RUN/claims.md; returns the claims table.

    ``executor`` (and ``executor_options``: ``address``, ``workers``) run the evaluated
    sweeps' points elsewhere, as :func:`~steamviz.run.sweep.run_sweep` does (e.g. ``"ray"``
    with 2 single-threaded workers on this 2-core CPU); screening and tuning run here."""
    from ..data import fetch
    from ..data.datasets import load_counterfact
    from ..core.models import load_model
    from ..look.pool import load_pool
    from .sweep import SweepConfig, run_sweep

    t0 = time.perf_counter()
    run = Path(out)
    lm = lm or load_model()
    cf_all = load_counterfact(fetch.path("counterfact",
                                         "counterfact_easyedit/counterfact-val.json"))
    cf = cf_all[: cfg.candidates]
    port_all = portability_requests(cfg.portability)
    port = [r for r in port_all if r.portability_prompts][: cfg.port_candidates]
    patterns = "first"
    templates = None
    if cfg.pararel_patterns == "best":
        from ..look.pool import best_templates

        # chosen on subjects that are never evaluated here: every subject of the data sets
        # the requests come from, however many are screened, so the choice (and its cached
        # recall checks) does not depend on --candidates / --n-port
        templates = best_templates(lm, {r.subject for r in cf_all + port_all},
                                   cfg.recall_rule, log)
        patterns = str(run / "pararel_patterns.json")
        write_json(Path(patterns), templates)
    facts = load_pool(pararel_templates=templates)
    cf, cf_why = _anchored(lm, cf, cfg.seeds, facts, cfg.n_cf, log, cfg.recall_rule,
                           cfg.widen_to)
    port, port_why = _anchored(lm, port, cfg.seeds, facts, cfg.n_port, log, cfg.recall_rule,
                               cfg.widen_to)
    lam_c = cfg.centred_lam if cfg.centred_lam is not None else tune_centred_lambda(
        lm, cfg, run, log)
    frames = {}
    for part, reqs, gen in (("cf", cf, True), ("port", port, False)):
        data = _write_requests(run / f"requests-{part}.jsonl", reqs)
        base = dict(data=data, n_edits=len(reqs), anchor_seeds=list(cfg.seeds),
                    reference_facts="pool", generation=gen, max_new_tokens=cfg.max_new_tokens,
                    hparams=dict(cfg.hparams), bank_size=cfg.bank_size,
                    recall_rule=cfg.recall_rule, pararel_patterns=patterns,
                    widen_to=cfg.widen_to)
        raw = SweepConfig.from_dict(dict(base, methods=["rome", "steam-rome"],
                                         lams=[float(x) for x in cfg.lams], centered=[False]))
        cen = SweepConfig.from_dict(dict(base, methods=["steam-rome"], lams=[float(lam_c)],
                                         centered=[True], include_unedited=False))
        kw = dict(lm=lm, progress=False, log=log, executor=executor, **executor_options)
        a = run_sweep(raw, run / part, **kw)
        b = run_sweep(cen, run / f"{part}-centred", **kw)
        frames[part] = pd.concat([a, b], ignore_index=True)
    table = claims_table(frames)
    secs = time.perf_counter() - t0
    from .store import Store

    tune = Store(run / "tune").frame() if (run / "tune" / "points").is_dir() else pd.DataFrame()
    compute = {"tuning": tune, **frames}
    md = report(table, cfg, lam_c, len(cf), len(port), cf_why, port_why, secs,
                {k: _minutes(d) for k, d in compute.items()}, _seeds_line(frames),
                tuning_lines(run, lam_c) if cfg.centred_lam is None else
                ["", f"Centred-loss lambda {lam_c:g} set by the caller (--centred-lam), not tuned."])
    write_text(run / "claims.md", md)
    table.to_csv(run / "claims.csv", index=False)
    log(md)
    return table


def _current(df: pd.DataFrame, now: dict) -> pd.Series:
    """Rows of ``df`` whose request is in ``now`` (case id -> :func:`request_digest`) as it is
    now. Rows stored before rows carried a digest are matched by case id alone."""
    ids = df.case_id.isin(list(now))
    if "request_digest" not in df:
        return ids
    same = df.request_digest == df.case_id.map(now)
    return ids & (same | df.request_digest.isna())


def report_so_far(out, log=print) -> pd.DataFrame:
    """The table of a claims run that has not finished (nothing is run, no model loaded):
    every part's requests (those of ``RUN/requests-*.jsonl``) that hold all their grid points,
    paired as in the full report.
    Writes ``RUN/claims-so-far.md`` (and ``.csv``), saying how many requests each part has;
    the full report (:func:`run_claims`) overwrites nothing of it."""
    from ..data.datasets import load_requests
    from .plan import SweepConfig, grid, request_digest
    from .store import Store

    run = Path(out)
    if not (run / "cf" / "points").is_dir():
        raise FileNotFoundError(f"{run} holds no claims run (no {run / 'cf' / 'points'}); "
                                f"start one with: steamviz claims --out {run}")
    frames, counts, lam_c = {}, {}, None
    for part in ("cf", "port"):
        got = []
        # the part's requests as the run last wrote them: points of requests no longer in
        # it (a screening that changed), or of an earlier content under the same case id, are
        # not this run's
        reqs = run / f"requests-{part}.jsonl"
        now = ({r.case_id: request_digest(r.to_dict()) for r in load_requests(reqs)}
               if reqs.is_file() else None)
        for sub in (part, f"{part}-centred"):
            d = run / sub
            if not (d / "points").is_dir():
                continue
            cfg = SweepConfig.from_yaml(d / "config.yaml")
            df = Store(d).frame()
            if now is not None and len(df):
                df = df[_current(df, now)]
            if not len(df):
                continue
            n_grid = len(grid(cfg, default_block=0))
            per = df.groupby("case_id").size()
            whole = set(per[per >= n_grid].index)
            counts[sub] = (len(whole), cfg.n_edits)
            if sub.endswith("centred"):
                lam_c = float(cfg.lams[0])
            got.append(df[df.case_id.isin(whole)])
        frames[part] = pd.concat(got, ignore_index=True) if got else pd.DataFrame(
            columns=["case_id", "method"])
    table = claims_table(frames)
    said = "; ".join(f"{k}: {a} of {b} requests" for k, (a, b) in counts.items())
    lines = ["# STEAM's claims on public data: the run so far (NOT the final report)", "",
             f"Requests holding all their grid points, per part: {said}. Same pairing, CIs and "
             "verdicts as the final report; centred-loss lambda "
             f"{'not run yet' if lam_c is None else f'{lam_c:g}'}.", "",
             "| claim | setting | n | ROME | STEAM | effect [95% CI] | p | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [_row(r) for r in table.itertuples()]
    seeds = _seeds_line(frames)
    lines += ["", seeds] if seeds else []
    lines += tuning_lines(run, lam_c) if lam_c is not None else []
    md = "\n".join(lines) + "\n"
    write_text(run / "claims-so-far.md", md)
    table.to_csv(run / "claims-so-far.csv", index=False)
    log(md)
    return table


def _row(r) -> str:
    return (f"| {r.claim} | {r.setting} | {r.n} | {r.rome:.3f} | {r.steam:.3f} | "
            f"{r.effect:+.3f} [{r.low:+.3f}, {r.high:+.3f}] | {r.p:.3g} | {r.verdict} |")


def claims_table(frames: dict) -> pd.DataFrame:
    """One row per claim and STEAM setting (see module docstring)."""
    from ..measure.compare import paired

    rows = []
    for claim, metric, part, kind, margin in CLAIMS:
        df = frames[part].copy()
        if metric == "cos_centered_specific" and "cos_centered_control" in df.columns:
            df[metric] = df["cos_centered"] - df["cos_centered_control"]
        if metric not in df.columns or not (df.method == "rome").any():
            continue
        t = paired(df[df.method.isin(["rome", "steam-rome"])], [metric])
        if metric == "fluency" and len(t):
            t = t[t.lam.astype(float) == t.lam.astype(float).max()]
        for r in t.itertuples():
            m = margin if margin is not None else 0.02 * abs(r.baseline_mean)
            v = verdict(kind, r.low, r.high, m)
            one = _one_value(df, metric, r.lam, r.centered) if kind == "up" else None
            if one is not None:
                v = f"no signal (every value {one:g})"
            rows.append(dict(claim=claim, setting=_setting(r.lam, r.centered), n=r.n,
                             rome=r.baseline_mean, steam=r.mean, effect=r.diff, low=r.low,
                             high=r.high, p=r.p, verdict=v))
    return pd.DataFrame(rows)


def _one_value(df: pd.DataFrame, metric: str, lam, centered) -> float | None:
    """The one value ``metric`` takes on every ROME row and every row of the STEAM setting
    (``lam``, ``centered``), or None when it varies."""
    steam = df[(df.method == "steam-rome") & (df.lam.astype(float) == float(lam))
               & (df.centered.astype(str) == str(centered))]
    vals = pd.concat([df.loc[df.method == "rome", metric], steam[metric]]).dropna()
    return float(vals.iloc[0]) if len(vals) and vals.nunique() == 1 else None


def distinct_anchors(df: pd.DataFrame) -> tuple[int, int]:
    """(requests whose anchor seeds give different anchors, requests measured at 2 or more
    seeds), read from ROME's points: one edit measured against each seed's anchor, so equal
    raw cosines mean the seeds drew the same facts (no relation of the new object has more
    recalled facts than an anchor takes: every seed takes them all)."""
    if not len(df) or "anchor_seed" not in df.columns or "cos_raw" not in df.columns:
        return 0, 0
    r = df[(df.method == "rome") & df.cos_raw.notna()]
    g = r.groupby("case_id").agg(seeds=("anchor_seed", "nunique"),
                                 values=("cos_raw", "nunique"))
    g = g[g.seeds > 1]
    return int((g["values"] > 1).sum()), len(g)


def _seeds_line(frames: dict) -> str:
    said = []
    for part, df in frames.items():
        k, n = distinct_anchors(df)
        if n:
            said.append(f"{part}: {k} of {n} requests")
    if not said:
        return ""
    return ("Anchor seeds give different anchors for " + "; ".join(said) + " (the others' "
            "new object has no relation with more recalled facts than an anchor takes, so "
            "every seed takes the same facts: averaging over seeds averages less than it "
            "looks).")


def _minutes(df: pd.DataFrame) -> float:
    """Minutes the points of ``df`` took, each its own ``seconds`` (the first point of a
    request includes the optimisation of every target vector its grid shares)."""
    return float(df["seconds"].fillna(0).sum()) / 60 if "seconds" in df.columns else 0.0


def _setting(lam, centered) -> str:
    c = centered in (True, "True")
    return f"λ={float(lam):g} {'centred' if c else 'raw'}"


_PORT_SOURCE = {"mirror": "the data mirror's fixed halves", "full": "the whole public files"}


def report(table: pd.DataFrame, cfg: ClaimsConfig, lam_c: float, n_cf: int, n_port: int,
           cf_why: dict, port_why: dict, seconds: float, minutes: dict | None = None,
           seeds: str = "", tuning: list[str] = ()) -> str:
    """The markdown report. ``minutes``: part -> minutes its points took (all of them, also
    those of earlier, resumed invocations); ``seeds``: how many anchors differ by seed;
    ``tuning``: lines on how the centred lambda was chosen (:func:`tuning_lines`)."""
    short = (f"; fewer than the {cfg.n_port} asked for: every screened case with an anchor is "
             "used" if n_port < cfg.n_port else "")
    lines = [
        "# STEAM's claims on public data",
        "",
        f"CounterFact val: {n_cf} cases with anchors ({len(cf_why)} screened cases had none); "
        f"portability (MQuAKE single-edit, zsRE; {_PORT_SOURCE[cfg.portability]}): {n_port} "
        f"cases ({len(port_why)} without an "
        f"anchor{short}). Anchor seeds {list(cfg.seeds)}; matched step budget; ROME hyperparameter "
        f"overrides {cfg.hparams or 'none'}; centred-loss lambda {lam_c:g}, tuned on the default "
        "edit set. Effects are STEAM-ROME minus ROME per edit (seeds averaged), bootstrap 95% "
        "CI, two-sided sign-flip p. Integration metrics are held out (paraphrase prompts).",
        "",
        "| claim | setting | n | ROME | STEAM | effect [95% CI] | p | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(r) for r in table.itertuples()]
    if seeds:
        lines += ["", seeds]
    lines += list(tuning)
    if minutes:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in minutes.items())
        lines += ["", f"Compute: {sum(minutes.values()):.1f} min, the sum of every point's own "
                      f"time ({parts}; a point's time also holds whatever else the machine ran "
                      "meanwhile), not counting the screening's recall checks."]
    lines += ["", f"Wall time of this invocation: {seconds / 60:.1f} min (a resumed run counts "
                  "only its new points here)."]
    return "\n".join(lines) + "\n"
