"""Tests for steamviz.data.datasets: the shared public data (skipped when absent) and small
hand-written files covering every format and the malformed-input errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from steamviz.data.datasets import (
    Fact,
    load_counterfact,
    load_edits,
    load_lre,
    load_mquake,
    load_mquake_all,
    load_pararel,
    load_reference_facts,
    load_relations,
    load_requests,
    load_zsre,
)
from steamviz import fetch
from steamviz.core.paths import data_dir
from steamviz.data.requests import EditRequest, RequestError

_WHY = [w for w in (fetch.available(n) for n in ("counterfact", "zsre", "mquake", "lre",
                                                  "pararel")) if w]
SHARED = None if _WHY else fetch.data_root()
needs_shared = pytest.mark.skipif(SHARED is None, reason=_WHY[0] if _WHY else "")


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# shared public data
# --------------------------------------------------------------------------------------------
@needs_shared
def test_counterfact_easyedit_val_first_100():
    reqs = load_counterfact(SHARED / "counterfact_easyedit/counterfact-val.json", limit=100)
    assert len(reqs) == 100
    assert all(isinstance(r, EditRequest) for r in reqs)
    by_id = {r.case_id: r for r in reqs}
    assert len(by_id) == 100
    r = by_id[10]
    assert r.subject == "BBC One"
    assert r.prompt == "{}, by"
    assert r.rewrite_prompt == "BBC One, by"
    assert (r.target_new, r.target_true) == ("Sega", "BBC")
    assert r.paraphrase_prompts == ["BBC One is my favorite product out of everything owned by"]
    assert r.neighborhood_prompts == ["BBC Radio, by"]
    assert r.neighborhood_answers == ["BBC"]
    assert r.portability_prompts == [] and r.relation_id is None
    assert by_id[42].prompt == "The profession of {} is"
    assert (by_id[42].target_new, by_id[42].target_true) == ("actor", "politician")
    assert [r.case_id for r in reqs[:2]] == [10, 42]


@needs_shared
def test_counterfact_easyedit_val_whole_file_and_sniffing():
    path = SHARED / "counterfact_easyedit/counterfact-val.json"
    reqs = load_requests(path)  # format sniffed
    assert len(reqs) == 1919
    assert all(r.rewrite_prompt.count(r.subject) >= 1 for r in reqs)
    assert load_requests(path, fmt="counterfact", limit=3) == reqs[:3]


@needs_shared
def test_zsre_with_portability():
    path = SHARED / "zsre_portability/zsre_portability.json"
    with pytest.warns(UserWarning, match="20 zsRE record\\(s\\) whose 'alt' equals the answer"):
        reqs = load_zsre(path)
    assert len(reqs) == 518 - 20 and 47 not in {r.case_id for r in reqs}
    r = reqs[0]
    assert r.case_id == 0
    assert r.subject == "Ramalinaceae"
    assert r.prompt == "Which family does {} belong to?"
    assert (r.target_new, r.target_true) == ("Lamiinae", "Lecanorales")
    assert r.paraphrase_prompts == ["What family are Ramalinaceae?"]
    assert r.neighborhood_prompts == ["nq question: types of skiing in the winter olympics 2018"]
    assert r.neighborhood_answers == ["Downhill"]
    assert r.portability_prompts == [
        "Which family does Ramalinaceae now belong to after the reclassification?"
    ]
    assert r.portability_answers == ["Cerambycidae"]
    assert all(len(q.portability_prompts) == 1 for q in reqs)
    # EasyEdit stores some new targets with a leading space: record 9 is " MAT-49"
    raw = json.loads(path.read_text())
    assert raw[9]["alt"] == " MAT-49"
    assert reqs[9].target_new == "MAT-49" and reqs[9].case_id == 9
    assert not any(q.target_new != q.target_new.strip() for q in reqs)
    with pytest.warns(UserWarning):
        assert load_requests(path, limit=50) == [r for r in reqs if r.case_id < 50]


@needs_shared
def test_mquake_multihop_questions():
    path = SHARED / "mquake/MQuAKE-CF-subset.json"
    reqs = load_mquake(path)
    assert len(reqs) == 177
    r = reqs[0]
    assert r.case_id == 1
    assert r.subject == "Ellie Kemper"
    assert r.prompt == "{} is a citizen of"
    assert (r.target_new, r.target_true, r.relation_id) == (
        "Croatia", "United States of America", "P27"
    )
    assert r.paraphrase_prompts == ["What is the country of citizenship of Ellie Kemper?"]
    assert len(r.portability_prompts) == 3
    assert r.portability_prompts[0] == (
        "Who is the head of state of the country where Ellie Kemper holds a citizenship?"
    )
    assert r.portability_answers == ["Kolinda Grabar-Kitarović"] * 3

    groups = load_mquake_all(path)
    assert Counter(len(g) for g in groups) == {1: 129, 2: 44, 3: 4}
    assert [g[0] for g in groups] == reqs
    multi = next(g for g in groups if len(g) > 1)
    assert {q.case_id for q in multi} == {multi[0].case_id}
    assert all(q.portability_prompts == [] for q in multi[1:])
    assert len(load_mquake(path, single_edit_only=True)) == 129
    assert load_requests(path, limit=2) == reqs[:2]


@needs_shared
def test_lre_city_in_country():
    root = SHARED / "lre_relations"
    facts = load_lre(root / "factual/city_in_country.json")
    assert len(facts) == 27
    assert facts[0] == Fact("New York City", "city_in_country", "United States", "{} is part of")
    assert facts[0].prompt == "New York City is part of"
    assert {f.relation for f in facts} == {"city_in_country"}
    picked = load_lre(root, relations=["city_in_country", "country_capital_city"])
    assert Counter(f.relation for f in picked) == {"city_in_country": 27,
                                                   "country_capital_city": 24}
    assert picked[:27] == facts
    with pytest.raises(ValueError, match="no_such_relation"):
        load_lre(root, relations=["no_such_relation"])


@needs_shared
def test_lre_whole_tree_strips_and_deduplicates():
    facts = load_lre(SHARED / "lre_relations")
    assert len({f.relation for f in facts}) == 47
    assert len(facts) == 11049  # 11,089 samples less 40 exact duplicates
    carter = [f for f in facts if f.relation == "presidents_birth_year" and "Carter" in f.subject]
    assert [(f.subject, f.object) for f in carter] == [("Jimmy Carter", "1924")]  # was "Jimmy Carter "


@needs_shared
def test_pararel_p36():
    facts = load_pararel(SHARED / "pararel", relations=["P36"])
    assert facts[0] == Fact("Cook County", "P36", "Chicago", "The capital of {} is")
    assert facts[0].prompt == "The capital of Cook County is"
    assert {f.template for f in facts} == {"The capital of {} is"}
    second = load_pararel(SHARED / "pararel", relations=["P36"], pattern_index=1)
    assert second[0].template == "The capital city of {} is"  # "[Y]." without the space
    with pytest.raises(ValueError, match="P36"):
        load_pararel(SHARED / "pararel", relations=["P36"], pattern_index=99)


@needs_shared
def test_pararel_all_relations():
    facts = load_pararel(SHARED / "pararel")
    rels = {f.relation for f in facts}
    assert len(rels) == 39 and "P31" not in rels  # P31, P527: facts without patterns
    assert all(f.template.count("{}") == 1 and "[" not in f.template for f in facts)
    assert all(not f.template.endswith((".", " ", "{}")) for f in facts)
    assert len(facts) == 27593
    with pytest.raises(ValueError, match="P31"):
        load_pararel(SHARED / "pararel", relations=["P31"])


# --------------------------------------------------------------------------------------------
# original ROME counterfact.json layout (hand-written)
# --------------------------------------------------------------------------------------------
ROME_RECORD = {
    "case_id": 0,
    "pararel_idx": 2796,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": [
        "Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
        (
            "An album was recorded for Capitol Nashville but never released. "
            "Danielle Darrieux spoke the language"
        ),
    ],
    "neighborhood_prompts": [
        "The mother tongue of Léon Blum is",
        "The native language of Montesquieu is",
    ],
    "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}


def test_rome_counterfact_format(tmp_path):
    path = write_json(tmp_path / "counterfact.json", [ROME_RECORD])
    [r] = load_counterfact(path)
    assert r == EditRequest(
        prompt="The mother tongue of {} is",
        subject="Danielle Darrieux",
        target_new="English",
        target_true="French",
        paraphrase_prompts=ROME_RECORD["paraphrase_prompts"],
        neighborhood_prompts=ROME_RECORD["neighborhood_prompts"],
        neighborhood_answers=["French", "French"],
        relation_id="P103",
        case_id=0,
    )
    assert load_requests(path) == [r]
    assert load_requests(path, fmt="counterfact") == [r]


def test_rome_counterfact_neighborhood_dicts_and_jsonl(tmp_path):
    rec = json.loads(json.dumps(ROME_RECORD))
    rec["neighborhood_prompts"] = [{"prompt": "nq question: who is Blum?", "target": " Léon"}]
    path = write_jsonl(tmp_path / "cf.jsonl", [rec, dict(rec, case_id=1)])
    reqs = load_counterfact(path)
    assert [r.case_id for r in reqs] == [0, 1]
    assert reqs[0].neighborhood_prompts == ["nq question: who is Blum?"]
    assert reqs[0].neighborhood_answers == ["Léon"]


def test_rome_counterfact_missing_target_true_with_neighbors(tmp_path):
    rec = json.loads(json.dumps(ROME_RECORD))
    del rec["requested_rewrite"]["target_true"]
    path = write_json(tmp_path / "cf.json", [rec])
    with pytest.raises(RequestError, match=r"record 0 \(case_id 0\).*requested_rewrite.target_true"):
        load_counterfact(path)


# --------------------------------------------------------------------------------------------
# EasyEdit / zsRE / MQuAKE layouts (hand-written)
# --------------------------------------------------------------------------------------------
def easyedit_record(**over):
    rec = {
        "case_id": 7,
        "prompt": "Toronto is located in the country of",
        "target_new": " Japan",
        "subject": "Toronto",
        "ground_truth": " Canada",
        "rephrase_prompt": "Toronto, which is in",
        "locality_prompt": "Montreal is located in the country of",
        "locality_ground_truth": "Canada",
    }
    rec.update(over)
    return rec


def test_easyedit_counterfact_strips_targets_and_keeps_prompt(tmp_path):
    path = write_json(tmp_path / "cf.json", [easyedit_record()])
    [r] = load_counterfact(path)
    assert r.prompt == "{} is located in the country of"
    assert (r.target_new, r.target_true) == ("Japan", "Canada")
    assert r.paraphrase_prompts == ["Toronto, which is in"]
    assert (r.neighborhood_prompts, r.neighborhood_answers) == (
        ["Montreal is located in the country of"], ["Canada"]
    )
    assert r.case_id == 7


def test_easyedit_counterfact_relation_id_and_knowedit_portability(tmp_path):
    rec = easyedit_record(
        relation_id="P17",
        portability={
            "Subject_Aliasing": [{"prompt": "The Queen City is in", "ground_truth": [["Japan"]]}],
            "reasoning": [{"prompt": "The capital of Toronto's country is",
                           "ground_truth": "Tokyo"}],
        },
    )
    [r] = load_counterfact(write_json(tmp_path / "cf.json", [rec]))
    assert r.relation_id == "P17"
    assert r.portability_prompts == ["The Queen City is in", "The capital of Toronto's country is"]
    assert r.portability_answers == ["Japan", "Tokyo"]


def test_zsre_portability_list_form(tmp_path):
    rec = {
        "subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
        "pred": "x", "rephrase": "Which university did Watts Humphrey go to?",
        "alt": " University of Michigan", "answers": ["Trinity College"],
        "loc": "nq question: who played desmond", "loc_ans": "Henry Ian Cusick",
        "portability": [{"New Question": "In which state did Watts Humphrey study?",
                         "New Answer": "Michigan"}],
    }
    [r] = load_zsre(write_json(tmp_path / "zsre.json", [rec]))
    assert r.prompt == "What university did {} attend?"
    assert (r.target_new, r.target_true) == ("University of Michigan", "Trinity College")
    assert r.portability_prompts == ["In which state did Watts Humphrey study?"]
    assert r.portability_answers == ["Michigan"]
    assert r.case_id == 0
    del rec["portability"]
    [r] = load_zsre(write_jsonl(tmp_path / "zsre.jsonl", [rec]))
    assert r.portability_prompts == [] and r.neighborhood_answers == ["Henry Ian Cusick"]


def mquake_record():
    return {
        "case_id": 5,
        "requested_rewrite": [
            {"prompt": "{} is a citizen of", "relation_id": "P27", "subject": "Ellie Kemper",
             "target_new": {"str": "Croatia"}, "target_true": {"str": "United States"},
             "question": "What is the country of citizenship of Ellie Kemper?"},
            {"prompt": "The head of state of {} is", "relation_id": "P35", "subject": "Croatia",
             "target_new": {"str": "Jane Doe"}, "target_true": {"str": "Kolinda"}},
        ],
        "questions": ["Who heads the country of Ellie Kemper?", "Who leads Ellie Kemper's land?"],
        "answer": "Donald Trump",
        "new_answer": "Jane Doe",
    }


def test_mquake_groups_by_hand(tmp_path):
    path = write_json(tmp_path / "mq.json", [mquake_record()])
    [group] = load_mquake_all(path)
    assert [r.subject for r in group] == ["Ellie Kemper", "Croatia"]
    assert [r.relation_id for r in group] == ["P27", "P35"]
    assert group[0].portability_answers == ["Jane Doe", "Jane Doe"]
    assert group[1].portability_prompts == [] and group[1].paraphrase_prompts == []
    assert load_mquake(path) == [group[0]]
    assert load_mquake(path, single_edit_only=True) == []
    assert load_requests(path) == [group[0]]
    with pytest.raises(RequestError, match="load_mquake_all"):
        load_counterfact(path)


# --------------------------------------------------------------------------------------------
# the project's own files (hand-written)
# --------------------------------------------------------------------------------------------
RELATIONS = {
    "P17": {"name": "country", "template": "{} is located in the country of",
            "paraphrases": ["{}, which is in the country of"],
            "subject_type": "place", "object_type": "country"},
    "P36": {"name": "capital", "template": "The capital of {} is", "paraphrases": [],
            "subject_type": "country", "object_type": "city"},
}


def test_relations_and_reference_facts(tmp_path):
    rel_path = write_json(tmp_path / "relations.json", RELATIONS)
    facts_path = write_jsonl(tmp_path / "reference_facts.jsonl", [
        {"subject": "Toronto", "relation": "P17", "object": "Canada"},
        {"subject": "France", "relation": "P36", "object": " Paris"},
    ])
    assert load_relations(rel_path) == RELATIONS
    facts = load_reference_facts(facts_path, relations=rel_path)
    assert facts == [
        Fact("Toronto", "P17", "Canada", "{} is located in the country of"),
        Fact("France", "P36", "Paris", "The capital of {} is"),
    ]
    assert facts[1].prompt == "The capital of France is"
    assert load_reference_facts(facts_path, relations=load_relations(rel_path)) == facts


def test_default_paths_follow_steamviz_data(tmp_path, monkeypatch):
    monkeypatch.setenv("STEAMVIZ_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="STEAMVIZ_DATA"):
        load_edits()
    with pytest.raises(FileNotFoundError, match="relations.json"):
        load_relations()
    write_json(tmp_path / "relations.json", RELATIONS)
    write_jsonl(tmp_path / "reference_facts.jsonl",
                [{"subject": "Toronto", "relation": "P17", "object": "Canada"}])
    req = EditRequest("{} is in", "Toronto", "Japan", "Canada", case_id="e1", relation_id="P17",
                      neighborhood_prompts=["Montreal is in"], neighborhood_answers=["Canada"])
    write_jsonl(tmp_path / "edits.jsonl", [req.to_dict()])
    assert load_reference_facts()[0].prompt == "Toronto is located in the country of"
    assert load_edits() == [req]


def test_edits_roundtrip_and_limit(tmp_path):
    reqs = [
        EditRequest("{} is located in", "Toronto", "Japan", "Canada",
                    paraphrase_prompts=["Toronto lies in"],
                    portability_prompts=["The language spoken in Toronto is"],
                    portability_answers=["Japanese"], relation_id="P17", case_id=i)
        for i in range(3)
    ]
    path = write_jsonl(tmp_path / "edits.jsonl", [r.to_dict() for r in reqs])
    assert load_edits(path) == reqs
    assert load_edits(path, limit=2) == reqs[:2]
    assert load_requests(path) == reqs
    # a JSON list is accepted too, and filled prompts become templates
    rome_style = [{"prompt": "Toronto is located in", "subject": "Toronto",
                   "target_new": {"str": "Japan"}, "case_id": 9}]
    [r] = load_edits(write_json(tmp_path / "edits.json", rome_style))
    assert (r.prompt, r.target_new, r.target_true) == ("{} is located in", "Japan", None)


@pytest.mark.skipif(not (data_dir() / "edits.jsonl").exists(),
                    reason="the project's data/edits.jsonl is not written yet")
def test_project_edit_set_loads():
    reqs = load_edits()
    assert reqs, "data/edits.jsonl holds no requests"
    ids = [r.case_id for r in reqs]
    assert len(set(ids)) == len(ids), "duplicate case_id in data/edits.jsonl"
    assert all(r.subject in r.rewrite_prompt for r in reqs)
    if (data_dir() / "relations.json").exists():
        relations = load_relations()
        unknown = {r.relation_id for r in reqs if r.relation_id not in relations}
        assert not unknown, f"relation ids missing from data/relations.json: {unknown}"
        if (data_dir() / "reference_facts.jsonl").exists():
            assert load_reference_facts(relations=relations)


# --------------------------------------------------------------------------------------------
# malformed input: the message names the record and the field
# --------------------------------------------------------------------------------------------
def test_missing_field_names_record_and_field(tmp_path):
    bad = easyedit_record(case_id=8)
    del bad["subject"]
    path = write_json(tmp_path / "cf.json", [easyedit_record(), bad])
    with pytest.raises(RequestError) as e:
        load_counterfact(path)
    msg = str(e.value)
    assert "record 1 (case_id 8) of cf.json" in msg and "'subject'" in msg


def test_prompt_without_subject(tmp_path):
    path = write_json(tmp_path / "cf.json", [easyedit_record(prompt="Tokyo is in")])
    with pytest.raises(RequestError) as e:
        load_counterfact(path)
    msg = str(e.value)
    assert "record 0 (case_id 7)" in msg and "field 'prompt'" in msg and "'Toronto'" in msg


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("target_new", 5, "'target_new'"),
        ("target_new", {"id": "Q17"}, "'target_new'"),
        ("target_new", ["Japan", "Korea"], "'target_new'"),
        ("target_true", "  ", "'target_true'"),
        ("paraphrase_prompts", "Toronto lies in", "'paraphrase_prompts'"),
        ("neighborhood_prompts", ["Montreal is in", 3], "'neighborhood_prompts[1]'"),
        ("neighborhood_answers", ["Canada", "Canada"], "'neighborhood_answers'"),  # 1 prompt
        ("relation_id", 17, "'relation_id'"),
        ("prompt", "{} is in {}", "'prompt'"),
        ("paraphrases", ["typo"], "'paraphrases'"),  # unknown field
    ],
)
def test_wrong_types_in_edits(tmp_path, field, value, named):
    good = {"case_id": "c0", "prompt": "{} is in", "subject": "Toronto", "target_new": "Japan",
            "neighborhood_prompts": ["Montreal is in"], "neighborhood_answers": ["Canada"]}
    path = write_jsonl(tmp_path / "edits.jsonl", [good, dict(good, case_id="c1", **{field: value})])
    with pytest.raises(RequestError) as e:
        load_edits(path)
    msg = str(e.value)
    assert "record 1 (case_id 'c1') of edits.jsonl" in msg and named in msg


def test_zsre_wrong_types(tmp_path):
    rec = {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
           "alt": "MIT", "answers": 3, "rephrase": "Which university?"}
    with pytest.raises(RequestError, match=r"record 0 of zsre.json: field 'answers'"):
        load_zsre(write_json(tmp_path / "zsre.json", [rec]))
    rec = dict(rec, answers=["Trinity"], portability={"New Question": "Where?"})
    with pytest.raises(RequestError, match=r"record 0 of zsre.json: field 'portability.New Answer'"):
        load_zsre(write_json(tmp_path / "zsre.json", [rec]))


def test_mquake_bad_rewrite_names_rewrite(tmp_path):
    rec = mquake_record()
    rec["requested_rewrite"][1]["prompt"] = "The head of state is"
    with pytest.raises(RequestError, match=r"record 0 \(case_id 5\).*'requested_rewrite\[1\]\.prompt'"):
        load_mquake_all(write_json(tmp_path / "mq.json", [rec]))


def test_bad_json_line_and_non_object(tmp_path):
    path = tmp_path / "edits.jsonl"
    path.write_text('{"prompt": "{} is in", "subject": "A", "target_new": "B"}\n{"prompt": \n')
    with pytest.raises(RequestError, match="edits.jsonl: line 2: invalid JSON"):
        load_edits(path)
    with pytest.raises(RequestError, match="record 0 of x.json: expected a JSON object"):
        load_edits(write_json(tmp_path / "x.json", [["not", "a", "dict"]]))


def test_relations_and_facts_errors(tmp_path):
    bad = dict(RELATIONS, P19={"name": "born", "template": "{} was born in {}"})
    with pytest.raises(RequestError, match=r"relation 'P19' of relations.json: field 'template'"):
        load_relations(write_json(tmp_path / "relations.json", bad))
    facts = write_jsonl(tmp_path / "facts.jsonl", [
        {"subject": "Toronto", "relation": "P17", "object": "Canada"},
        {"subject": "Rome", "relation": "P999", "object": "Italy"},
    ])
    with pytest.raises(RequestError, match=r"record 1 of facts.jsonl: field 'relation'.*P999"):
        load_reference_facts(facts, relations=RELATIONS)
    with pytest.raises(RequestError, match=r"record 0 of f2.jsonl: missing field 'object'"):
        load_reference_facts(write_jsonl(tmp_path / "f2.jsonl", [{"subject": "A",
                                                                 "relation": "P17"}]),
                             relations=RELATIONS)


def test_lre_and_pararel_by_hand(tmp_path):
    lre = tmp_path / "lre" / "factual"
    lre.mkdir(parents=True)
    write_json(lre / "capital.json", {
        "name": "capital", "prompt_templates": ["The capital of {} is", "{}'s capital is"],
        "samples": [{"subject": "France ", "object": "Paris"},
                    {"subject": "France", "object": "Paris"},
                    {"subject": "Japan", "object": "Tokyo"}],
    })
    assert load_lre(tmp_path / "lre") == [
        Fact("France", "capital", "Paris", "The capital of {} is"),
        Fact("Japan", "capital", "Tokyo", "The capital of {} is"),
    ]
    write_json(lre / "broken.json", {"prompt_templates": ["no slot"], "samples": []})
    with pytest.raises(RequestError, match=r"broken.json: field 'prompt_templates\[0\]'"):
        load_lre(tmp_path / "lre")

    root = tmp_path / "pararel"
    (root / "trex_lms_vocab").mkdir(parents=True)
    (root / "pattern_data" / "graphs_json").mkdir(parents=True)
    write_jsonl(root / "trex_lms_vocab" / "P36.jsonl",
                [{"sub_label": "France", "obj_label": "Paris"}])
    write_jsonl(root / "pattern_data" / "graphs_json" / "P36.jsonl", [
        {"pattern": "[Y] is the capital of [X] ."},   # [Y] first: unusable
        {"pattern": "[X]'s capital is [Y] ."},
        {"pattern": "The capital of [X] is [Y]."},
    ])
    assert load_pararel(root) == [Fact("France", "P36", "Paris", "{}'s capital is")]
    assert load_pararel(root, pattern_index=1)[0].prompt == "The capital of France is"
    assert load_pararel(root, pattern_index=2) == []  # no such pattern: relation skipped
    with pytest.raises(ValueError, match="P36"):
        load_pararel(root, relations=["P36"], pattern_index=2)


def test_missing_files_say_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass the path of the CounterFact file"):
        load_counterfact(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="lre_relations folder"):
        load_lre(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="pararel folder"):
        load_pararel(tmp_path)
    with pytest.raises(ValueError, match="unknown format"):
        load_requests(tmp_path / "nope.json", fmt="csv")


def test_fact_validates_template():
    assert Fact("Paris", "P17", "France", "{} is in").prompt == "Paris is in"
    with pytest.raises(ValueError, match="template"):
        Fact("Paris", "P17", "France", "{} is in {}")
    with pytest.raises(ValueError, match="object"):
        Fact("Paris", "P17", "", "{} is in")


def test_sniff_rejects_unknown_layout(tmp_path):
    with pytest.raises(RequestError, match="cannot tell the format"):
        load_requests(write_json(tmp_path / "x.json", [{"question": "q", "answer": "a"}]))
