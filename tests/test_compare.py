"""Paired comparisons: per-edit differences, bootstrap intervals and the sign-flip test."""

import numpy as np
import pandas as pd
import pytest

from steamviz.measure.compare import ci_mean, paired, paired_layers, sign_flip_p


def test_sign_flip_is_exact_for_small_samples():
    assert sign_flip_p([1.0, 1.0, 1.0, 1.0]) == pytest.approx(2 / 16)
    assert sign_flip_p([0.5, 0.2, 0.1, 0.3, 0.4]) == pytest.approx(2 / 32)
    assert sign_flip_p([1.0, -1.0, 1.0, -1.0]) == 1.0
    assert sign_flip_p([0.0, 0.0]) == 1.0


def test_sign_flip_monte_carlo_agrees_with_a_t_like_effect():
    rng = np.random.default_rng(0)
    assert sign_flip_p(rng.normal(1.0, 1.0, 50)) < 0.001
    assert sign_flip_p(rng.normal(0.0, 1.0, 50)) > 0.01


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = ci_mean(rng.normal(0.3, 1.0, 20))
    large = ci_mean(rng.normal(0.3, 1.0, 2000))
    assert small[1] < small[0] < small[2] and large[1] < 0.3 < large[2]
    assert (large[2] - large[1]) < (small[2] - small[1]) / 5


def test_paired_matches_cases_not_rows():
    df = pd.DataFrame(dict(
        case_id=[1, 2, 3, 3, 1, 2, 4],
        method=["rome"] * 3 + ["steam-rome"] * 4,
        lam=[None] * 3 + [20.0] * 4,
        cos=[0.1, 0.2, 0.3, 0.6, 0.2, 0.2, 9.0]))  # case 4 has no baseline: left out
    t = paired(df, ["cos"], n_boot=500).iloc[0]
    assert t.n == 3 and t["diff"] == pytest.approx((0.1 + 0.0 + 0.3) / 3)
    assert t.low <= t["diff"] <= t.high and t.p == pytest.approx(4 / 8)
    with pytest.raises(ValueError, match="several rows per case_id"):
        paired(pd.concat([df, df[df.method == "rome"]]), ["cos"])


def test_paired_layers_gives_a_band_per_layer():
    rows = []
    for c in range(6):
        rows.append(dict(case_id=c, method="rome", lam=None, x_layers=[0.0, 0.0, 0.0]))
        rows.append(dict(case_id=c, method="steam-rome", lam=50.0,
                         x_layers=[0.0, 0.1 * c, 1.0]))
    t = paired_layers(pd.DataFrame(rows), "x_layers", n_boot=500)
    assert t.layer_index.tolist() == [0, 1, 2] and set(t.n) == {6}
    assert t["diff"].tolist() == pytest.approx([0.0, 0.25, 1.0])
    assert t.low[1] < 0.25 < t.high[1] and t.low[2] == t.high[2] == 1.0


def test_anchor_seeds_pair_within_seed_and_average_per_edit():
    rows = []
    for c in range(4):
        for s, shift in ((0, 0.0), (1, 1.0)):  # seed 1's anchors read higher for everyone
            rows.append(dict(case_id=c, anchor_seed=s, method="rome", lam=None,
                             cos=0.1 * c + shift, cos_layers=[shift, shift]))
            rows.append(dict(case_id=c, anchor_seed=s, method="steam-rome", lam=20.0,
                             cos=0.1 * c + shift + 0.2 + 0.1 * s, cos_layers=[shift, shift + 1]))
    df = pd.DataFrame(rows)
    t = paired(df, ["cos"], n_boot=500).iloc[0]
    assert t.n == 4 and t["diff"] == pytest.approx(0.25)  # (0.2 + 0.3) / 2 per edit
    lay = paired_layers(df, "cos_layers", n_boot=500)
    assert lay["diff"].tolist() == pytest.approx([0.0, 1.0]) and set(lay.n) == {4}


def test_sentences_state_the_measured_difference_and_what_its_interval_says():
    from steamviz.measure.compare import sentences

    rows = []
    for c in range(6):
        for block in (3, 7):
            rows.append(dict(case_id=c, method="rome", lam=None, block=block, m=0.1 * c))
            # STEAM higher by 0.2 at block 3; at block 7 a difference whose sign varies
            rows.append(dict(case_id=c, method="steam-rome", lam=50.0, block=block,
                             m=0.1 * c + (0.2 if block == 3 else (-1) ** c * 0.1)))
        rows.append(dict(case_id=c, method="unedited", lam=None, block=None, m=0.0))
    df = pd.DataFrame(rows)
    s = sentences(df, ["m"], by="block", n_boot=2000)
    assert len(s) == 2  # one per edited block; the unedited model is not a method compared
    assert s[0].startswith("At block 3: STEAM λ=50 − ROME, m: +0.200 (95% CI +0.200 to +0.200")
    assert s[0].endswith("higher with STEAM λ=50 on these edits.")
    assert s[1].startswith("At block 7: STEAM λ=50 − ROME, m: +0.000")
    assert s[1].endswith("the interval includes 0, so these edits show no difference.")
    with pytest.raises(ValueError, match="several rows per case_id"):
        sentences(df, ["m"])  # ROME at two blocks: no single baseline without by=
    # 2 edits, both higher: the bootstrap interval excludes 0, but the test cannot (p = 0.5)
    two = df[(df.case_id < 2) & (df.block == 3)]
    (s2,) = sentences(two, ["m"], n_boot=2000)
    assert "p = 0.50" in s2 and s2.endswith(
        "the interval excludes 0, but 2 edits are too few for the sign-flip test "
        "(p < 0.05 needs 6 or more): no verdict.")


def test_table_puts_a_column_per_method_and_bolds_only_clear_differences():
    from steamviz.measure.compare import table

    rng = np.random.default_rng(0)
    n = 20
    base = rng.normal(0.5, 0.1, n)
    df = pd.DataFrame(dict(
        case_id=list(range(n)) * 3, method=["rome"] * n + ["steam-rome"] * n + ["kne"] * n,
        lam=[None] * n + [20.0] * n + [None] * n,
        cos=np.concatenate([base, base + 0.05 + rng.normal(0, 0.01, n),
                            base + rng.normal(0, 0.05, n)])))
    df["portability"] = np.nan  # a data set without portability prompts: no row for it
    df["knn"] = df.cos.where(df.case_id >= 5)  # measured on 15 of the 20 edits only
    df = df.iloc[::-1]  # the columns follow the registry, not the rows' order
    out = table(paired(df, ["cos", "portability", "knn"], n_boot=2000)).splitlines()
    assert out[0] == "| metric | ROME | STEAM λ=20 − ROME (n=20) | KNE − ROME (n=20) |"
    assert [r.split(" | ")[0] for r in out[2:]] == ["| cos", "| knn"]
    assert out[3].endswith("(n=15) |")
    steam, kne = out[2].split(" | ")[2:4]
    assert steam.startswith("**+0.05") and "p=" in steam  # a clear, consistent shift
    assert not kne.startswith("**")
    assert out[2].split(" | ")[1] == f"{base.mean():.3f}"
