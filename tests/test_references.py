"""Evidence a paper can use: references come from the unedited model only, whatever the run
order; ROME and STEAM get the same step budget; integration is measured on held-out prompts
with a control; caches hold no pickle."""

import shutil

import numpy as np
import pytest
import torch

from steamviz import rome
from steamviz.look.anchors import Anchor, build_anchor, recalled, reference_bank
from steamviz.data.datasets import Fact
from steamviz.edit.edits import Edit
from steamviz.core.guard import EditedModelError
from steamviz.measure.metrics import reference_text
from steamviz.measure.references import build_references
from steamviz.data.requests import EditRequest
from steamviz.edit.rome import ROMEHparams
from steamviz.edit.steam import AlignLoss
from steamviz.run.sweep import Store, SweepConfig, run_sweep
from steamviz.core.memo import clear_caches

FACTS = [Fact(s, "capital_of", "Japan", "{} is the capital of") for s in
         ("Tokyo", "Kyoto", "Osaka", "Nara")] + [
    Fact(s, "capital_of", "France", "{} is the capital of") for s in
    ("Paris", "Lyon", "Nice", "Lille")]
REQ = EditRequest(prompt="The capital city of {} is", subject="France", target_new="Rome",
                  target_true="Paris", paraphrase_prompts=["{} has its capital in"])


def test_every_reference_builder_refuses_an_edited_model(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("STEAMVIZ_CACHE", str(tmp_path))
    # cached while unedited: the refusal does not depend on the cache state
    build_anchor(tiny, "Japan", facts=FACTS, require_recall=False)
    e = Edit(tiny.model, "probe")  # any edit in place, weights or hooks
    try:
        for build in (
            lambda: build_anchor(tiny, "Japan", facts=FACTS, require_recall=False),
            lambda: build_anchor(tiny, "Japan", facts=FACTS, require_recall=False,
                                 use_cache=False),
            lambda: reference_bank(tiny, facts=FACTS),
            lambda: recalled(tiny, FACTS),
            lambda: reference_text(tiny, "Japan", facts=FACTS),
            lambda: build_references(tiny, [REQ], facts=FACTS),
        ):
            with pytest.raises(EditedModelError, match="unedited model.*Build references before"):
                build()
    finally:
        e.restore()
    a = build_anchor(tiny, "Japan", facts=FACTS, require_recall=False)
    assert a.n == 4 and a.phi.shape == (tiny.n_blocks + 1, tiny.d_model)


def test_anchor_and_bank_caches_are_safetensors_and_validated(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("STEAMVIZ_CACHE", str(tmp_path))
    clear_caches("anchors")
    a = build_anchor(tiny, "Japan", facts=FACTS, require_recall=False)
    bank = reference_bank(tiny, facts=FACTS)
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert files and all(f.endswith(".safetensors") for f in files), files
    clear_caches("anchors")  # from disk now
    b = build_anchor(tiny, "Japan", facts=FACTS, require_recall=False)
    assert torch.equal(a.phi, b.phi) and b.facts == a.facts and b.report == a.report
    assert torch.equal(reference_bank(tiny, facts=FACTS).tensor, bank.tensor)
    # a file of the right name holding something else is rebuilt, not returned
    path = next(tmp_path.rglob("anchors/*.safetensors"))
    from steamviz.core.io import save_tensors

    save_tensors(path, {"phi": torch.zeros(3, 3)}, dict(kind="anchor", key="other"))
    clear_caches("anchors")
    with pytest.warns(UserWarning, match="bad anchor cache file"):
        c = build_anchor(tiny, "Japan", facts=FACTS, require_recall=False)
    assert torch.equal(c.phi, a.phi)
    path.write_bytes(b"not a tensor file")
    clear_caches("anchors")
    with pytest.warns(UserWarning, match="bad anchor cache file"):
        assert torch.equal(build_anchor(tiny, "Japan", facts=FACTS, require_recall=False).phi,
                           a.phi)


def test_references_leave_every_evaluated_subject_out(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("STEAMVIZ_CACHE", str(tmp_path))
    reqs = [EditRequest(prompt="{} is the capital of", subject="Tokyo", target_new="France",
                        target_true="Japan"),
            EditRequest(prompt="{} is the capital of", subject="Lyon", target_new="Japan",
                        target_true="France")]
    refs = build_references(tiny, reqs, facts=FACTS, anchor_kw=dict(require_recall=False),
                            n_control=1)
    assert refs.exclude == ("Lyon", "Tokyo")
    for a in refs.anchors.values():
        assert not {f.subject for f in a.facts} & {"Tokyo", "Lyon"}
    assert not {f.subject for f in refs.bank.facts} & {"Tokyo", "Lyon"}
    assert refs.anchor("Japan").n == 3 and refs.anchor("France").n == 3
    assert [c.object for c in refs.controls("Japan")] == ["France"]  # same relation
    again = build_references(tiny, list(reversed(reqs)), facts=FACTS, n_control=1,
                             anchor_kw=dict(require_recall=False))
    assert again.digest == refs.digest  # order of requests does not matter


def _align(lm, layers):
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(lm.n_blocks + 1, lm.d_model, generator=g)[layers]
    return AlignLoss(lam=50.0, layers=layers, phi=phi)


def test_matched_budget_gives_rome_and_steam_equal_steps(tiny):
    hp = ROMEHparams(block=1, context_template_length_params=((5, 2),), v_num_grad_steps=6,
                     early_stop_loss=0.0)
    prep = rome.prepare(tiny, REQ, hp, use_cache=False)
    plain = rome.compute_v(tiny, prep, hp)
    steam = rome.compute_v(tiny, prep, hp, align=_align(tiny, [2, 3]))
    # v_num_grad_steps forward passes, the last one only measures: 5 optimiser steps
    assert plain.steps == steam.steps == hp.v_num_grad_steps - 1
    assert len(plain.losses) == len(steam.losses) == hp.v_num_grad_steps
    # early stopping reads ROME's own terms by default: a huge alignment loss does not
    # keep STEAM running once NLL + KL + decay are below the threshold
    # (threshold 30: above ROME's terms on a random tiny model, ~11 nats, below ROME's terms
    # plus 50 x an alignment loss of ~1)
    loose = hp.replace(early_stop_loss=30.0)
    first = plain.losses[0]
    assert first["nll"] + first.get("kl", 0.0) < 30.0
    assert rome.compute_v(tiny, prep, loose, align=_align(tiny, [2, 3])).steps == 0
    assert rome.compute_v(tiny, prep, loose, align=_align(tiny, [2, 3]),
                          early_stop_on="total").steps > 0


def test_sweeps_default_to_a_fixed_step_budget():
    cfg = SweepConfig.from_dict(dict(n_edits=1))
    assert cfg.early_stop is False
    with pytest.raises(Exception, match="early_stop"):
        SweepConfig.from_dict(dict(n_edits=1, early_stop="no"))


def test_held_out_and_trained_columns_and_control(tiny, tmp_path, monkeypatch):
    from steamviz.look.anchors import Bank
    from steamviz.measure.integration import integration_rows

    g = torch.Generator().manual_seed(1)
    L, d = tiny.n_blocks + 1, tiny.d_model
    anchor = Anchor("Rome", torch.randn(L, d, generator=g), [], [])
    ctl = [Anchor(o, torch.randn(L, d, generator=g), [], []) for o in ("Oslo", "Lima")]
    bank = Bank(FACTS, torch.randn(len(FACTS), L, d, generator=g))
    row = integration_rows(tiny, REQ, anchor, bank, [2, 3], old_anchor=ctl[0], controls=ctl)
    for base in ("cos_raw", "cos_centered", "knn_share", "axis"):
        assert f"{base}_trained" in row and base in row
    for base in ("cos_raw", "cos_centered", "axis"):  # two prompt sets, two measurements
        assert row[f"{base}_trained"] != row[base]
    assert row["held_out_prompts"] == 1
    assert row["cos_centered_control_layers"].shape == (L,)
    # the control is the mean of the same measurement against each control anchor
    one = integration_rows(tiny, REQ, ctl[0], bank, [2, 3])["cos_centered_layers"]
    two = integration_rows(tiny, REQ, ctl[1], bank, [2, 3])["cos_centered_layers"]
    np.testing.assert_allclose(row["cos_centered_control_layers"], (one + two) / 2, atol=1e-6)
    bare = EditRequest(prompt="The capital city of {} is", subject="France", target_new="Rome")
    row = integration_rows(tiny, bare, anchor, bank, [2, 3])
    assert row["held_out_prompts"] == 0 and "cos_centered" not in row
    assert "cos_centered_trained" in row


SMALL = dict(data="default", n_edits=2, methods=["rome", "steam-rome"], lams=[50.0],
             generation=False, bank_size=100,
             hparams=dict(context_template_length_params=[[5, 2]], v_num_grad_steps=3))
REF_COLS = ("cos_raw", "cos_centered", "knn_share", "axis", "cos_centered_trained",
            "cos_centered_control", "anchor_facts", "p_new", "efficacy")


def _by_key(run):
    return {r["key"]: r for r in Store(run).rows()}


def _same(a: dict, b: dict, keys) -> None:
    for k in keys:
        for col in REF_COLS:
            va, vb = a[k].get(col), b[k].get(col)
            assert (va is None) == (vb is None), (k, col, va, vb)
            assert va is None or abs(va - vb) < 1e-6, (k, col, va, vb)


@pytest.mark.model
@pytest.mark.slow
def test_resumed_and_partial_runs_read_the_same_references(tmp_path, monkeypatch, lm):
    """A run resumed after its unedited points, and a run without unedited points, measure
    against exactly the references of a fresh run (built before any edit, from a cold
    cache each time)."""
    def cold():
        clear_caches("anchors")
        cache = tmp_path / f"cache{len(list(tmp_path.glob('cache*')))}"
        monkeypatch.setenv("STEAMVIZ_CACHE", str(cache))

    cold()
    run_sweep(SweepConfig.from_dict(SMALL), tmp_path / "fresh", lm=lm, progress=False,
              log=lambda s: None)
    fresh = _by_key(tmp_path / "fresh")
    assert len(fresh) == 6
    steam = [r for r in fresh.values() if r["method"] == "steam-rome"]
    from steamviz.cli import main

    assert main(["compare", str(tmp_path / "fresh")]) == 0  # paired table of the run
    assert all(r["steps"] == 2 for r in fresh.values() if r["method"] != "unedited")
    assert all(r.get("cos_centered") is not None for r in steam)

    # resumed: the unedited points are done, the edited ones run in a new process state
    (tmp_path / "resumed" / "points").mkdir(parents=True)
    for k, r in fresh.items():
        if r["method"] == "unedited":
            shutil.copy(tmp_path / "fresh" / "points" / f"{k}.json",
                        tmp_path / "resumed" / "points")
    cold()
    run_sweep(SweepConfig.from_dict(SMALL), tmp_path / "resumed", lm=lm, progress=False,
              log=lambda s: None)
    resumed = _by_key(tmp_path / "resumed")
    assert set(resumed) == set(fresh)
    _same(resumed, fresh, fresh)

    cold()  # no unedited points at all
    run_sweep(SweepConfig.from_dict(dict(SMALL, include_unedited=False)), tmp_path / "edited",
              lm=lm, progress=False, log=lambda s: None)
    edited = _by_key(tmp_path / "edited")
    assert len(edited) == 4 and set(edited) <= set(fresh)
    _same(edited, fresh, edited)


def test_anchor_seed_axis_multiplies_every_point():
    from steamviz.run.sweep import grid

    one = grid(SweepConfig.from_dict(dict(SMALL)), 5)
    assert all("anchor_seed" not in p for p in one)  # keys of single-seed runs unchanged
    three = grid(SweepConfig.from_dict(dict(SMALL, anchor_seeds=[0, 1, 2])), 5)
    assert len(three) == 3 * len(one)
    assert sorted({p["anchor_seed"] for p in three}) == [0, 1, 2]
    assert SweepConfig.from_dict(dict(SMALL, anchor_seeds=[3, 4])).seeds == [3, 4]
    for bad in ([], [1, 1], ["a"], 3):
        with pytest.raises(Exception, match="anchor_seeds"):
            SweepConfig.from_dict(dict(SMALL, anchor_seeds=bad))


def test_plain_rome_reuses_its_target_vector_exactly(tiny):
    hp = ROMEHparams(block=1, context_template_length_params=((5, 2),), v_num_grad_steps=3)
    clear_caches("rome")
    with rome.apply(tiny, REQ, hp) as a:
        first = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    with rome.apply(tiny, REQ, hp) as b:
        again = tiny.model.state_dict()
        assert all(torch.equal(first[k], again[k]) for k in first)
    assert a.info["v_reused"] is False and b.info["v_reused"] is True


@pytest.mark.model
@pytest.mark.slow
def test_a_sweep_over_anchor_seeds_pairs_within_seeds(tmp_path, lm):
    from steamviz.measure.compare import paired

    cfg = SweepConfig.from_dict(dict(SMALL, n_edits=1, anchor_seeds=[0, 1]))
    df = run_sweep(cfg, tmp_path / "run", lm=lm, progress=False, log=lambda s: None)
    assert len(df) == 6 and sorted(df.anchor_seed.unique()) == [0, 1]
    une = df[df.method == "unedited"].set_index("anchor_seed")
    # another sample of facts, another anchor: the unedited stream's cosine moves
    assert une.cos_centered[0] != une.cos_centered[1]
    rome_rows = df[df.method == "rome"]
    assert rome_rows.p_new.nunique() == 1  # one ROME edit, measured against two anchors
    t = paired(df, ["cos_centered", "efficacy"])
    assert set(t.method) == {"unedited", "steam-rome"} and set(t.n) == {1}
    # seed 1's unedited and ROME points reuse seed 0's anchor-free metrics (one edit, measured
    # once): the rows equal those of a run of seed 1 alone, column for column
    alone = run_sweep(SweepConfig.from_dict(dict(SMALL, n_edits=1, anchor_seeds=[1])),
                      tmp_path / "alone", lm=lm, progress=False, log=lambda s: None)
    timing = {"seconds", "edit_seconds", "key"}  # key: the references digest holds the seeds
    for m in ("unedited", "rome", "steam-rome"):
        a = df[(df.method == m) & (df.anchor_seed == 1)].iloc[0].drop(timing, errors="ignore")
        b = alone[alone.method == m].iloc[0].drop(timing, errors="ignore")
        # (frames come in plan order, so their columns too: the data at hand changes the
        # keys' hashes, not the order)
        assert a.index.equals(b.index)
        assert all(x == y or (x != x and y != y) for x, y in zip(a, b)), m


@pytest.mark.model
@pytest.mark.slow
def test_seeds_that_draw_the_same_anchor_share_one_steam_edits_metrics(tmp_path, lm,
                                                                        monkeypatch):
    """A STEAM edit whose anchor seeds drew the same facts is one edit: its anchor-free
    metrics are measured once and shared, equal to measuring them again; seeds whose anchors
    differ are measured each."""
    from steamviz.measure import metrics
    from steamviz.run.runner import Runner

    calls = []
    real = metrics.evaluate

    def counted(lm_, req, **kw):
        calls.append(req.case_id)
        return real(lm_, req, **kw)

    monkeypatch.setattr(metrics, "evaluate", counted)
    cfg = SweepConfig.from_dict(dict(SMALL, n_edits=1, anchor_seeds=[0, 1],
                                     include_unedited=False))
    df = run_sweep(cfg, tmp_path / "differ", lm=lm, progress=False, log=lambda s: None)
    assert len(calls) == 3  # ROME once; STEAM at each seed (the anchors differ)
    one_anchor = Runner.anchor
    monkeypatch.setattr(Runner, "anchor", lambda self, obj, seed=None: one_anchor(self, obj, 0))
    calls.clear()
    clear_caches("rome")
    same = run_sweep(cfg, tmp_path / "same", lm=lm, progress=False, log=lambda s: None)
    assert len(calls) == 2  # ROME once, STEAM once: seed 1's anchor is seed 0's
    st = same[same.method == "steam-rome"].set_index("anchor_seed")
    cols = ["efficacy_margin", "paraphrase_margin", "neighborhood_margin", "p_new"]
    # shared, and equal to the edit measured afresh (seed 0 of the first run: same anchor;
    # its target vector was optimised beside two others, not one: float tolerance)
    ref = df[(df.method == "steam-rome") & (df.anchor_seed == 0)].iloc[0]
    for c in cols:
        assert st[c][0] == st[c][1], c
        assert st[c][0] == pytest.approx(ref[c], rel=1e-4, abs=1e-6), c


def test_reference_texts_are_made_once_and_read_back(tiny, tmp_path, monkeypatch):
    """The unedited model's continuations behind consistency's reference text are kept by
    model, prompts and length: a later run (or the next part of a claims run) reads them back
    instead of generating again; another length generates."""
    from steamviz.measure import metrics

    monkeypatch.setenv("STEAMVIZ_CACHE", str(tmp_path))
    first = reference_text(tiny, "Japan", facts=FACTS)
    clear_caches("metrics.reftext")  # a new process: only the disk copy is left

    def no_generation(*a, **k):
        raise AssertionError("generated again")

    monkeypatch.setattr(metrics, "greedy", no_generation)
    assert reference_text(tiny, "Japan", facts=FACTS) == first
    assert list((tmp_path / "reftext").glob("*.json"))
    with pytest.raises(AssertionError, match="generated again"):
        reference_text(tiny, "Japan", facts=FACTS, max_new_tokens=5)
