"""Paired comparisons of editing methods: per-edit differences (method - baseline), bootstrap
95% confidence intervals and a sign-flip permutation test.

Every method of a sweep edits the same requests, so each request is its own control: the
difference ``method - baseline`` is taken per request (``case_id``) and summarised.

>>> import pandas as pd
>>> df = pd.DataFrame(dict(case_id=[1, 2, 3, 1, 2, 3], method=["rome"] * 3 + ["steam-rome"] * 3,
...                        lam=[None] * 3 + [20.0] * 3, cos=[0.1, 0.2, 0.3, 0.2, 0.3, 0.5]))
>>> t = paired(df, ["cos"], n_boot=2000)
>>> t[["method", "lam", "metric", "n", "diff"]].round(3).values.tolist()
[['steam-rome', 20.0, 'cos', 3, 0.133]]
>>> ci_mean([1.0, 1.0, 1.0])
(1.0, 1.0, 1.0)
"""

from __future__ import annotations

from itertools import product
from typing import Sequence

import numpy as np
import pandas as pd

#: the columns that name a grid point (a method's setting), present or not in a frame
POINT_COLUMNS = ("method", "lam", "block", "align_layers", "centered", "batch")


def ci_mean(x, n_boot: int = 10_000, level: float = 0.95, seed: int = 0
            ) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``x`` and its percentile-bootstrap interval."""
    x = np.asarray(x, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return (float("nan"),) * 3
    m = float(x.mean())
    if len(x) == 1 or np.all(x == x[0]):
        return m, m, m
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(1)
    a = (1 - level) / 2
    return m, float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def sign_flip_p(d, n_perm: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value of a mean paired difference ``d`` against 0: the share of random
    sign flips whose |mean| is at least the observed one (exact enumeration up to 16 pairs;
    the observed assignment counts, so p > 0)."""
    d = np.asarray(d, dtype=float)
    d = d[~np.isnan(d)]
    if len(d) == 0:
        return float("nan")
    obs = abs(d.mean())
    if np.all(d == 0):
        return 1.0
    if len(d) <= 16:
        signs = np.array(list(product((1.0, -1.0), repeat=len(d))))
        return float((np.abs((signs * d).mean(1)) >= obs - 1e-12).mean())
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(n_perm, len(d)))
    hits = (np.abs((signs * d).mean(1)) >= obs - 1e-12).sum()
    return float((hits + 1) / (n_perm + 1))


def _groups(df: pd.DataFrame, baseline: str):
    """``(point, rows)`` for each grid point of ``df`` other than the baseline method."""
    cols = [c for c in POINT_COLUMNS if c in df.columns]
    rest = df[df.method != baseline]
    keyed = rest.assign(**{c: rest[c].astype(str) for c in cols})  # NaN-safe grouping
    for _, g in keyed.groupby(cols, sort=False, dropna=False):
        g = df.loc[g.index]
        yield {c: g[c].iloc[0] for c in cols}, g


def _pair_keys(df: pd.DataFrame) -> list[str]:
    """Rows pair on the edit, and on the anchor-sampling seed when there are several."""
    return ["case_id"] + (["anchor_seed"] if "anchor_seed" in df.columns else [])


def _baseline(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    keys = _pair_keys(df)
    base = df[df.method == baseline]
    if base.duplicated(keys).any():
        raise ValueError(f"the baseline {baseline!r} has several rows per {' and '.join(keys)}; "
                         "select one grid point of it first")
    return base.set_index(keys)


def paired(df: pd.DataFrame, metrics: Sequence[str], baseline: str = "rome",
           n_boot: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """One row per (grid point other than the baseline, metric): the number of paired edits
    ``n``, the mean difference ``diff`` (point - baseline) with its bootstrap 95% CI
    ``low``/``high``, the sign-flip ``p``, and both means. Pairs are matched on ``case_id``
    (and ``anchor_seed``: differences are averaged over seeds within an edit, so edits stay
    the independent units). The baseline must have one row per pair."""
    if "case_id" not in df.columns:
        raise ValueError("paired comparisons need a case_id column")
    keys = _pair_keys(df)
    base = _baseline(df, baseline)
    out = []
    for point, g in _groups(df, baseline):
        g = g.set_index(keys)
        for m in metrics:
            if m not in g.columns or m not in base.columns:
                continue
            a, b = g[m].astype(float), base[m].astype(float)
            common = a.index.intersection(b.index)
            d = (a.loc[common] - b.loc[common]).dropna()
            a_m, b_m = a.loc[d.index], b.loc[d.index]
            if len(keys) > 1:  # average over anchor seeds within each edit
                d, a_m, b_m = (x.groupby(level="case_id").mean() for x in (d, a_m, b_m))
            mean, lo, hi = ci_mean(d.values, n_boot=n_boot, seed=seed)
            out.append(dict(point, metric=m, n=len(d), diff=mean, low=lo, high=hi,
                            p=sign_flip_p(d.values, seed=seed),
                            mean=float(a_m.mean()) if len(d) else float("nan"),
                            baseline_mean=float(b_m.mean()) if len(d) else float("nan")))
    table = pd.DataFrame(out)
    table.attrs["baseline"] = baseline
    return table


def paired_layers(df: pd.DataFrame, col: str, baseline: str = "rome", n_boot: int = 4000,
                  seed: int = 0) -> pd.DataFrame:
    """Per layer: the paired difference of a per-layer column (``*_layers``: a list per row)
    between each grid point and the baseline, with its bootstrap 95% CI."""
    def arr(v):
        if isinstance(v, str):
            import json

            v = json.loads(v)
        return np.asarray(v, dtype=float) if v is not None and not (
            isinstance(v, float) and np.isnan(v)) else None

    keys = _pair_keys(df)
    base = {k: arr(v) for k, v in _baseline(df, baseline)[col].items()}
    out = []
    for point, g in _groups(df, baseline):
        per_case: dict = {}
        for k, v in g.set_index(keys)[col].items():
            a, b = arr(v), base.get(k)
            if a is not None and b is not None:
                per_case.setdefault(k[0] if isinstance(k, tuple) else k, []).append(a - b)
        diffs = [np.mean(v, axis=0) for v in per_case.values()]  # seeds averaged per edit
        if not diffs:
            continue
        D = np.stack(diffs)  # [pair, layer]
        for layer in range(D.shape[1]):
            mean, lo, hi = ci_mean(D[:, layer], n_boot=n_boot, seed=seed)
            out.append(dict(point, layer_index=layer, n=len(D), diff=mean, low=lo, high=hi))
    return pd.DataFrame(out)


#: how :func:`sentences` names a metric
METRIC_NAMES = {
    "cos_centered": "centred cosine to the anchor (held out, mean over the alignment layers)",
    "cos_centered_control": "the same cosine to control anchors",
    "cos_centered_trained": "centred cosine to the anchor on the rewrite prompt (trained)",
    "efficacy": "efficacy", "paraphrase": "paraphrase success",
    "neighborhood": "neighbourhood preserved", "portability": "portability",
    "knn_share": "kNN share (held out)", "axis": "old→new axis position (held out)",
}


def _point_name(row) -> str:
    from ..edit.editors import display

    d = display(row["method"])
    lam = row.get("lam")
    if lam is None or (isinstance(lam, float) and np.isnan(lam)) or str(lam) in ("nan", "None"):
        return d.label
    cen = " centred" if str(row.get("centered")) == "True" else ""
    return f"{d.short} λ={float(lam):g}{cen}"


def _signed(v: float) -> str:
    """``+0.012``; a value that rounds to zero is ``+0.000`` (never ``-0.000``)."""
    v = round(float(v), 3)
    return f"{v + 0.0:+.3f}"


def sentences(df: pd.DataFrame, metrics: Sequence[str], baseline: str = "rome",
              by: str | None = None, n_boot: int = 10_000, alpha: float = 0.05) -> list[str]:
    """One sentence per (grid point, metric) of :func:`paired` (the unedited model left
    out), built from the numbers: the mean paired difference point - ``baseline`` with its
    95% CI, the number of edits and the sign-flip p, and what they say: "higher" or "lower"
    when the interval excludes 0 and p < ``alpha``; "no verdict" when the interval excludes
    0 but there are too few edits for the test (the exact sign-flip p of n edits is at
    least 2 / 2^n: p < 0.05 takes 6); "no difference shown" when it includes 0. ``by``: a
    grid column to compare within (e.g. ``"block"`` when the baseline ran at several
    edited blocks).

    >>> df = pd.DataFrame(dict(case_id=[1, 2, 3, 1, 2, 3], method=["rome"] * 3 + ["steam-rome"] * 3,
    ...                        lam=[None] * 3 + [20.0] * 3, efficacy=[0, 1, 1, 1, 1, 1]))
    >>> s = sentences(df, ["efficacy"], n_boot=2000)[0]
    >>> s.split(" (95%")[0]
    'STEAM λ=20 − ROME, efficacy: +0.333'
    >>> s.endswith("the interval includes 0, so these edits show no difference.")
    True
    """
    from ..edit.editors import display

    parts = [(None, df)]
    if by is not None:
        vals = sorted(df[by].dropna().unique(), key=lambda v: (str(type(v)), v))
        parts = [(v, df[(df[by] == v) | ((df.method == "unedited") & df[by].isna())])
                 for v in vals]
    out = []
    base = display(baseline).label
    for v, d in parts:
        t = paired(d[d.method != "unedited"], metrics, baseline=baseline, n_boot=n_boot)
        if len(t) and "lam" in t:  # lambdas in ascending order, metrics as asked
            t = t.assign(_lam=pd.to_numeric(t["lam"], errors="coerce"),
                         _m=t.metric.map({m: i for i, m in enumerate(metrics)}))
            t = t.sort_values(["method", "_lam", "_m"], kind="stable")
        pre = f"At {by} {v:g}: " if isinstance(v, (int, float, np.number)) else (
            f"At {by} {v}: " if v is not None else "")
        for _, r in t.iterrows():
            what = METRIC_NAMES.get(r.metric, r.metric)
            if r.n == 0:
                out.append(f"{pre}{_point_name(r)} − {base}, {what}: no paired edits.")
                continue
            if r.n < 2:
                verdict = "one edit gives no interval."
            elif (r.low > 0 or r.high < 0) and r.p < alpha:
                verdict = (f"{'higher' if r.low > 0 else 'lower'} with {_point_name(r)} on "
                           "these edits.")
            elif r.low > 0 or r.high < 0:
                verdict = (f"the interval excludes 0, but {r.n} edits are too few for the "
                           f"sign-flip test (p < {alpha:g} needs "
                           f"{int(np.ceil(np.log2(2 / alpha)))} or more): no verdict.")
            else:
                verdict = "the interval includes 0, so these edits show no difference."
            out.append(f"{pre}{_point_name(r)} − {base}, {what}: {_signed(r['diff'])} (95% CI "
                       f"{_signed(r.low)} to {_signed(r.high)}; {r.n} edits, p = {r.p:.2f}): "
                       f"{verdict}")
    return out


def table(t: pd.DataFrame, alpha: float = 0.05, digits: int = 3) -> str:
    """A markdown table of :func:`paired`'s rows: one row per metric, the baseline's mean, then
    one column per grid point (methods in registry order) with ``diff [low, high]``; bold
    (with ``p``) where the CI excludes 0 and the sign-flip p < ``alpha``. Column heads give
    the number of paired edits; a cell resting on fewer pairs (e.g. the integration metrics of
    edits whose new object has no anchor) says its own ``n``. A metric no pair has (e.g.
    portability on a data set without portability prompts) is left out.

    >>> df = pd.DataFrame(dict(case_id=[1, 2, 3, 1, 2, 3], method=["rome"] * 3 + ["kne"] * 3,
    ...                        cos=[0.1, 0.2, 0.3, 0.2, 0.3, 0.5]))
    >>> print(table(paired(df, ["cos"], n_boot=2000)))
    | metric | ROME | KNE − ROME (n=3) |
    |---|---|---|
    | cos | 0.200 | +0.133 [+0.100, +0.200] |
    """
    from ..edit.editors import label, ordered_points

    if t.empty:
        raise ValueError("no paired rows to tabulate")
    cols = [c for c in POINT_COLUMNS if c in t.columns]
    base = label(t.attrs.get("baseline", "rome"))
    key = t[cols].map(str).agg("|".join, axis=1)  # (astype(str) keeps NaN in pandas 3)
    firsts = {k: t[key == k].iloc[0] for k in dict.fromkeys(key)}
    order = ordered_points([(p["method"], p.get("lam"), p.get("centered"), k)
                            for k, p in firsts.items()])
    points, heads, sizes = [], [], []
    for *_, k in order:
        g, p = t[key == k], firsts[k]
        points.append(g.set_index("metric"))
        sizes.append(int(g.n.max()))
        heads.append(f"{label(p['method'], p.get('lam'), p.get('centered'))} − {base} "
                     f"(n={sizes[-1]})")
    metrics = [m for m in dict.fromkeys(t.metric) if (t[t.metric == m].n > 0).any()]
    f = f"{{:+.{digits}f}}"
    lines = ["| metric | " + base + " | " + " | ".join(heads) + " |",
             "|---" * (len(heads) + 2) + "|"]
    for m in metrics:
        first = next(g.loc[m] for g in points if m in g.index and g.loc[m].n > 0)
        cells = [f"{first.baseline_mean:.{digits}f}"]
        for g, size in zip(points, sizes):
            if m not in g.index or g.loc[m].n == 0:
                cells.append("")
                continue
            r = g.loc[m]
            cell = f"{f.format(r['diff'])} [{f.format(r.low)}, {f.format(r.high)}]"
            if (r.low > 0 or r.high < 0) and r.p < alpha:
                cell = f"**{f.format(r['diff'])}** [{f.format(r.low)}, {f.format(r.high)}], p={r.p:.2g}"
            if r.n < size:
                cell += f" (n={int(r.n)})"
            cells.append(cell.replace("-", "−"))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
