"""The reference-fact pool: public triples as anchor candidates, and the coverage report."""

import json

import pytest

from steamviz import pool
from steamviz.data.datasets import Fact
from steamviz.data.requests import EditRequest, RequestError
from steamviz.core.memo import clear_caches


def test_polyglot_rows_become_facts_with_the_subject_slot(tmp_path):
    p = tmp_path / "pg.jsonl"
    rows = [dict(stem="Trailer Park Boys was from", true="Canada", relation="P495",
                 subject="Trailer Park Boys"),
            dict(stem="The mother tongue of X is", true="French", relation="P103", subject="Y"),
            dict(stem="{weird} Z is in", true="A", relation="P17", subject="Z")]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    facts = pool.load_polyglot(p)
    assert facts == [Fact("Trailer Park Boys", "P495", "Canada", "{} was from")]


def test_user_facts_extend_the_pool_and_bad_lines_are_named(tmp_path):
    good = tmp_path / "mine.jsonl"
    good.write_text(json.dumps(dict(subject="Zog", relation="P17", object="Atlantis",
                                    template="{} is a city in")) + "\n")
    assert pool.load_user_facts(good)[0].object == "Atlantis"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"subject": "Zog", "relation": "P17", "object": "A"}\n')
    with pytest.raises(RequestError, match="bad.jsonl: line 1: not a fact"):
        pool.load_user_facts(bad)


def test_candidates_cap_each_object_and_relation_deterministically():
    facts = [Fact(f"s{i}", "P37", "English", "{} speaks") for i in range(100)] + [
        Fact("t", "P17", "France", "{} is in")]
    a, b = pool.candidates(facts, 10, seed=1), pool.candidates(facts, 10, seed=1)
    assert a == b and len(a) == 11
    assert pool.candidates(facts, 10, seed=2) != a
    assert len(pool.candidates(facts, None)) == 101


def test_relation_names_map_to_wikidata_ids():
    assert pool.RELATION_IDS["city_in_country"] == pool.RELATION_IDS["city_country"] == "P17"


def test_coverage_reports_every_request_with_its_reason(tiny):
    facts = [Fact(s, "P17", "Japan", "{} is a city in") for s in ("Osaka", "Kyoto", "Nara")]
    reqs = [EditRequest(prompt="{} is a city in", subject="Paris", target_new="Japan",
                        case_id=1),
            EditRequest(prompt="{} is a city in", subject="Lima", target_new="Mars", case_id=2)]
    rep = pool.coverage(tiny, reqs, facts)  # a random tiny model recalls nothing
    assert rep["requests"] == 2 and rep["anchored"] == 0 and len(rep["rows"]) == 2
    by = {r["case_id"]: r["reason"] for r in rep["rows"]}
    assert by[1] == "0 of 3 candidate facts recalled (need 3)"
    assert by[2] == "no candidate facts for 'Mars'"


@pytest.mark.model
def test_coverage_of_the_default_edit_set_with_the_project_facts(lm):
    from steamviz.data.datasets import load_edits

    reqs = load_edits(limit=20)
    rep = pool.coverage(lm, reqs, pool.load_pool(sources=("project",)))
    assert rep["share"] >= 0.8, rep


def test_the_published_parquet_and_the_mirror_conversion_give_the_same_facts():
    from conftest import data_missing

    from steamviz import fetch

    why = data_missing("polyglot")
    if why:
        pytest.skip(why)
    root = "polyglot_fact_completion_en/en-fact-completion-3-21-23"
    a = pool.load_polyglot(fetch.path("polyglot", root + ".parquet"))
    b = pool.load_polyglot(fetch.path("polyglot", root + ".jsonl"))
    assert a == b and len(a) > 20_000


def test_second_pass_widens_only_objects_short_of_an_anchor(tokenizer, monkeypatch):
    from conftest import build_tiny

    from steamviz import anchors

    tiny = build_tiny("llama", tokenizer)
    facts = ([Fact(f"a{i}", "P106", "actor", "{} works as") for i in range(60)]
             + [Fact(f"b{i}", "P17", "Japan", "{} is in") for i in range(60)])
    first = pool.candidates(facts, 10, seed=0)
    # the model "recalls" every Japan fact and no actor fact
    monkeypatch.setattr(anchors, "recalled",
                        lambda lm, fs, **kw: [f.object == "Japan" for f in fs])
    wide = pool.widen(tiny, facts, first, {"actor", "Japan"}, min_facts=3, per_relation=25)
    count = lambda fs, o: sum(f.object == o for f in fs)  # noqa: E731
    assert count(first, "actor") == 10 and count(wide, "actor") == 25  # widened to 25 in all
    assert [f for f in wide if f.object == "Japan"] == [f for f in first if f.object == "Japan"]
    assert wide[: len(first)] == first  # the first pass is kept as it was
    assert pool.widen(tiny, facts, first, {"actor"}, per_relation=0) == first  # off
    again = pool.widen(tiny, facts, first, {"actor", "Japan"}, min_facts=3, per_relation=25)
    assert again == wide  # seeded


def test_recall_rules_nest_and_the_cache_survives_a_torn_line(tokenizer, tmp_path, monkeypatch):
    from conftest import build_tiny

    from steamviz import anchors

    monkeypatch.setenv("STEAMVIZ_CACHE", str(tmp_path))
    clear_caches("anchors")
    tiny = build_tiny("llama", tokenizer)
    facts = [Fact(f"s{i}", "P17", o, "{} is a city in") for i, o in
             enumerate(["Japan", "France", "Italy", "Spain", "Chile", "Peru"] * 4)]
    g = anchors.recalled(tiny, facts)
    t3, t10 = (anchors.recalled(tiny, facts, rule=r) for r in ("top3", "top10"))
    assert all(a <= b <= c for a, b, c in zip(g, t3, t10))  # greedy => top3 => top10
    with pytest.raises(ValueError, match="recall rule 'top0'"):
        anchors.recalled(tiny, facts, rule="top0")
    path = anchors._recall_file(tiny)
    assert len(path.read_text().splitlines()) == len({(f.prompt, f.object) for f in facts})
    with open(path, "a") as fh:  # a process killed mid-write
        fh.write('["s0 is a city in", "Jap')
    clear_caches("anchors")
    assert anchors.recalled(tiny, facts, rule="top3") == t3  # read back, torn line skipped


def _pararel(tmp_path):
    """A two-relation ParaRel folder laid out like the release."""
    root = tmp_path / "pararel"
    (root / "trex_lms_vocab").mkdir(parents=True)
    (root / "pattern_data" / "graphs_json").mkdir(parents=True)
    facts = {"P30": [(f"Place{i}", ["Asia", "Europe", "Africa"][i % 3]) for i in range(30)],
             "P37": [(f"Land{i}", "French") for i in range(10)]}
    pats = {"P30": ["[X] is located in [Y] .", "[Y] holds [X] .",
                    "[X] is a part of the continent of [Y] ."],
            "P37": ["The official language of [X] is [Y] .", "[X] speaks [Y] ."]}
    for rel, fs in facts.items():
        (root / "trex_lms_vocab" / f"{rel}.jsonl").write_text(
            "".join(json.dumps(dict(sub_label=s, obj_label=o)) + "\n" for s, o in fs))
        (root / "pattern_data" / "graphs_json" / f"{rel}.jsonl").write_text(
            "".join(json.dumps(dict(pattern=p)) + "\n" for p in pats[rel]))
    return root


def test_pattern_choice_takes_the_pattern_the_model_completes_best(tokenizer, tmp_path,
                                                                    monkeypatch):
    from conftest import build_tiny

    from steamviz import anchors
    from steamviz.data.datasets import load_pararel, pararel_patterns

    tiny = build_tiny("llama", tokenizer)
    root = _pararel(tmp_path)
    assert pararel_patterns(root) == {  # "[Y] holds [X]" does not end with the object
        "P30": ["{} is located in", "{} is a part of the continent of"],
        "P37": ["The official language of {} is", "{} speaks"]}
    seen = []

    def fake(lm, fs, rule="greedy", **kw):  # recalls only after the continent pattern
        seen.extend(fs)
        return [f.template.endswith("continent of") and (rule != "greedy" or f.object != "Africa")
                for f in fs]

    monkeypatch.setattr(anchors, "recalled", fake)
    excluded = {"Place0", "Place1", "Land3"}
    ch = pool.choose_patterns(tiny, n=12, folder=root, exclude_subjects=excluded)
    assert ch["P30"]["template"] == "{} is a part of the continent of"
    assert ch["P30"]["recalled"] == 8 and ch["P30"]["top10"] == 12 and ch["P30"]["n"] == 12
    assert ch["P30"]["scores"][0] == ("{} is located in", 0, 0)
    assert ch["P37"]["template"] == "The official language of {} is"  # a tie: file order
    assert ch["P37"]["n"] == 9
    assert not {f.subject for f in seen} & excluded  # evaluated subjects never probed
    # one object at a time: 12 of 28 facts, 4 per continent
    from collections import Counter

    probe = {f for f in seen if f.template == "{} is located in"}
    assert Counter(f.object for f in probe) == {"Asia": 4, "Europe": 4, "Africa": 4}
    assert pool.choose_patterns(tiny, n=12, folder=root, exclude_subjects=excluded) == ch
    facts = load_pararel(root, templates={r: c["template"] for r, c in ch.items()})
    assert {f.template for f in facts if f.relation == "P30"} == {"{} is a part of the continent of"}
    with pytest.raises(ValueError, match="not one of its usable patterns"):
        load_pararel(root, templates={"P30": "{} holds"})
