#!/usr/bin/env python
"""Check the project's data files and measure what the unedited model recalls of them.

Reads ``relations.json``, ``reference_facts.jsonl`` and ``edits.jsonl`` from the data folder
(default ``steamviz.core.paths.data_dir()``), then reports:

- schema problems (missing/extra keys, templates without exactly one ``{}``, subjects missing
  from their prompts, question marks, unknown relations, duplicate facts or case ids);
- per relation: how many reference facts the model recalls with the relation's template
  (and, with ``--paraphrases``, with each paraphrase template);
- per object: how many recalled reference facts it has (the facts a STEAM anchor is built
  from), for every edit's ``target_new``: count, min and median;
- per edit: is ``target_true`` recalled on the rewrite prompt, does ``target_new`` have at
  least ``--min-anchor`` recalled facts (other subjects than the edit's), and how many
  paraphrase / neighborhood prompts the model answers correctly before editing.

"Recalled" means greedy decoding from the prompt starts with the object's tokens
(``" " + object``): every object token is the argmax after the prompt and the tokens before
it (teacher forcing, :func:`steamviz.core.forward.target_logprobs`).

The script writes nothing unless ``--out report.json`` is given. Exit status 1 when a schema
problem is found or an edit fails a hard check (target_true not recalled, anchor too small).

    python scripts/probe_data.py                      # default model, ~3-5 min on 2 CPU cores
    python scripts/probe_data.py --paraphrases --out /tmp/probe.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import textwrap
import time
from collections import Counter, defaultdict
from pathlib import Path

EDIT_KEYS = (
    "case_id", "relation_id", "prompt", "subject", "target_true", "target_new",
    "paraphrase_prompts", "neighborhood_prompts", "neighborhood_answers",
    "portability_prompts", "portability_answers",
)
RELATION_KEYS = ("name", "template", "paraphrases", "subject_type", "object_type")
FACT_KEYS = ("subject", "relation", "object")


# ------------------------------------------------------------------------------------------
# reading and schema checks (no model needed)
# ------------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path.name} line {n}: not JSON ({e})") from None
    return rows


def check_relations(rels: dict) -> list[str]:
    probs = []
    for rid, r in rels.items():
        if set(r) != set(RELATION_KEYS):
            probs.append(f"relation {rid}: keys {sorted(r)} != {sorted(RELATION_KEYS)}")
            continue
        temps = [r["template"]] + list(r["paraphrases"])
        if not 2 <= len(r["paraphrases"]) <= 4:
            probs.append(f"relation {rid}: {len(r['paraphrases'])} paraphrases (want 2-4)")
        for t in temps:
            if t.count("{}") != 1 or "?" in t or t != t.strip():
                probs.append(f"relation {rid}: bad template {t!r}")
        if len(set(temps)) != len(temps):
            probs.append(f"relation {rid}: a paraphrase repeats a template")
    return probs


def check_facts(facts: list[dict], rels: dict) -> list[str]:
    probs = []
    seen = Counter()
    for i, f in enumerate(facts):
        if set(f) != set(FACT_KEYS):
            probs.append(f"fact {i}: keys {sorted(f)} != {sorted(FACT_KEYS)}")
            continue
        if f["relation"] not in rels:
            probs.append(f"fact {i}: unknown relation {f['relation']!r}")
        if not all(isinstance(f[k], str) and f[k].strip() == f[k] and f[k] for k in FACT_KEYS):
            probs.append(f"fact {i}: empty field or surrounding whitespace: {f}")
        seen[(f["subject"], f["relation"])] += 1
    probs += [f"facts: ({s!r}, {r}) has {n} objects" for (s, r), n in seen.items() if n > 1]
    return probs


def check_edits(edits: list[dict], rels: dict) -> list[str]:
    probs = []
    ids = Counter(e.get("case_id") for e in edits)
    probs += [f"case_id {c!r} used {n} times" for c, n in ids.items() if n > 1]
    for e in edits:
        cid = e.get("case_id")
        if tuple(sorted(e)) != tuple(sorted(EDIT_KEYS)):
            missing, extra = set(EDIT_KEYS) - set(e), set(e) - set(EDIT_KEYS)
            probs.append(f"{cid}: keys missing {sorted(missing)}, extra {sorted(extra)}")
            continue
        rel = rels.get(e["relation_id"])
        if rel is None:
            probs.append(f"{cid}: unknown relation {e['relation_id']!r}")
        elif e["prompt"] != rel["template"]:
            probs.append(f"{cid}: prompt {e['prompt']!r} is not the relation's template")
        if e["prompt"].count("{}") != 1:
            probs.append(f"{cid}: prompt needs exactly one '{{}}'")
        if e["target_new"] == e["target_true"]:
            probs.append(f"{cid}: target_new == target_true")
        s = e["subject"]
        for fld in ("paraphrase_prompts", "portability_prompts"):
            for p in e[fld]:
                if s not in p:
                    probs.append(f"{cid}: subject {s!r} missing from {fld} {p!r}")
        for fld in ("paraphrase_prompts", "neighborhood_prompts", "portability_prompts"):
            for p in e[fld]:
                if "{}" in p or "?" in p or p != p.strip():
                    probs.append(f"{cid}: {fld} {p!r} is not a filled completion prompt")
        for p in e["neighborhood_prompts"]:
            if s in p:
                probs.append(f"{cid}: neighborhood prompt {p!r} mentions the edited subject")
        for q, a in (("neighborhood_prompts", "neighborhood_answers"),
                     ("portability_prompts", "portability_answers")):
            if len(e[q]) != len(e[a]):
                probs.append(f"{cid}: {len(e[q])} {q} but {len(e[a])} {a}")
        if len(e["paraphrase_prompts"]) != 2:
            probs.append(f"{cid}: {len(e['paraphrase_prompts'])} paraphrase prompts (want 2)")
        if not 2 <= len(e["neighborhood_prompts"]) <= 3:
            probs.append(f"{cid}: {len(e['neighborhood_prompts'])} neighborhood prompts (want 2-3)")
        if not 1 <= len(e["portability_prompts"]) <= 2:
            probs.append(f"{cid}: {len(e['portability_prompts'])} portability prompts (want 1-2)")
    return probs


# ------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------
class Recall:
    """Memoised, batched 'is object the greedy continuation of prompt' for the model."""

    def __init__(self, lm, batch_size: int):
        self.lm, self.bs, self.cache = lm, batch_size, {}

    def __call__(self, pairs: list[tuple[str, str]]) -> list[dict]:
        from steamviz.core.forward import target_logprobs
        from steamviz.core.tokens import token_ids

        todo = sorted({p for p in pairs if p not in self.cache},
                      key=lambda pt: len(token_ids(self.lm, pt[0] + " " + pt[1])))
        # sorted by length: batches of similar length waste little on padding
        for s in range(0, len(todo), self.bs):
            chunk = todo[s : s + self.bs]
            res = target_logprobs(self.lm, [p for p, _ in chunk], [t for _, t in chunk],
                                  batch_size=self.bs)
            for pt, r in zip(chunk, res):
                self.cache[pt] = {"recalled": r["greedy"], "prob": r["prob"]}
        return [self.cache[p] for p in pairs]


def wrap(text: str) -> str:
    return textwrap.fill(text, width=100, initial_indent="    ", subsequent_indent="    ")


def rate(xs) -> str:
    xs = list(xs)
    return f"{sum(xs)}/{len(xs)} = {sum(xs) / len(xs):.2f}" if xs else "0/0"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="data folder (default data_dir())")
    ap.add_argument("--model", default=None, help="model name or path (default: SmolLM2-135M)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--min-anchor", type=int, default=6,
                    help="recalled reference facts a target_new needs (default 6)")
    ap.add_argument("--paraphrases", action="store_true",
                    help="also measure every paraphrase template on every reference fact")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--out", type=Path, default=None, help="write a JSON report here")
    ap.add_argument("-v", "--verbose", action="store_true", help="list every failing edit check")
    args = ap.parse_args(argv)

    import torch

    from steamviz.data.datasets import load_edits, load_reference_facts, load_relations
    from steamviz.core.models import load_model
    from steamviz.core.paths import data_dir

    folder = args.data or data_dir()
    rels = json.loads((folder / "relations.json").read_text(encoding="utf-8"))
    facts = read_jsonl(folder / "reference_facts.jsonl")
    edits_path = folder / "edits.jsonl"
    edits = read_jsonl(edits_path) if edits_path.exists() else []

    # --- schema ---------------------------------------------------------------------------
    problems = check_relations(rels) + check_facts(facts, rels) + check_edits(edits, rels)
    try:  # the project's own loaders must accept the files too
        load_relations(folder / "relations.json")
        load_reference_facts(folder / "reference_facts.jsonl", folder / "relations.json")
        if edits_path.exists():
            load_edits(edits_path)
    except Exception as e:  # noqa: BLE001 - report whatever the loader objects to
        problems.append(f"steamviz.data.datasets refuses the files: {e}")
    print(f"== files in {folder}")
    print(f"relations {len(rels)}, reference facts {len(facts)}, edits {len(edits)}")
    if not edits_path.exists():
        problems.append(f"no {edits_path.name}")
    for p in problems:
        print("  SCHEMA:", p)
    print(f"schema problems: {len(problems)}")

    # --- model ----------------------------------------------------------------------------
    torch.set_num_threads(args.threads)
    t0 = time.time()
    lm = load_model(args.model, device=args.device)
    recall = Recall(lm, args.batch_size)

    pairs = [(rels[f["relation"]]["template"].format(f["subject"]), f["object"]) for f in facts]
    fact_res = recall(pairs)
    for f, (p, _), r in zip(facts, pairs, fact_res):
        f.update(prompt=p, **r)

    print("\n== recall of reference facts, per relation (template)")
    by_rel = defaultdict(list)
    for f in facts:
        by_rel[f["relation"]].append(f)
    rel_report = {}
    for rid, fs in by_rel.items():
        rec = [f["recalled"] for f in fs]
        rel_report[rid] = {"template": rels[rid]["template"], "n": len(fs), "recalled": sum(rec)}
        print(f"  {rid:22s} {rate(rec):>16s}   {rels[rid]['template']!r}")
        if args.paraphrases:
            rel_report[rid]["paraphrases"] = {}
            for t in rels[rid]["paraphrases"]:
                rr = recall([(t.format(f["subject"]), f["object"]) for f in fs])
                k = sum(r["recalled"] for r in rr)
                rel_report[rid]["paraphrases"][t] = k
                print(f"  {'':22s} {rate([r['recalled'] for r in rr]):>16s}   {t!r}")
    print(f"  {'all':22s} {rate(f['recalled'] for f in facts):>16s}")

    # --- anchors --------------------------------------------------------------------------
    anchors = defaultdict(list)  # object -> its recalled facts
    n_facts, subjects = Counter(), defaultdict(set)
    for f in facts:
        n_facts[f["object"]] += 1
        subjects[f["object"]].add(f["subject"])
        if f["recalled"]:
            anchors[f["object"]].append(f)
    popular = sorted(n_facts, key=lambda o: (-len(anchors[o]), o))
    print(f"\n== objects with >= {args.min_anchor} recalled facts: "
          f"{sum(len(anchors[o]) >= args.min_anchor for o in popular)} of {len(popular)}")
    print("  recalled/all facts, for objects with >= 5 subjects:")
    print(wrap(", ".join(f"{o} {len(anchors[o])}/{n_facts[o]}" for o in popular
                         if len(subjects[o]) >= 5)))

    # --- edits ----------------------------------------------------------------------------
    edit_rows, failures = [], []
    for e in edits:
        cid = e["case_id"]
        rewrite = e["prompt"].format(e["subject"])
        [true_r] = recall([(rewrite, e["target_true"])])
        para = recall([(p, e["target_true"]) for p in e["paraphrase_prompts"]])
        neigh = recall(list(zip(e["neighborhood_prompts"], e["neighborhood_answers"])))
        anchor = [f for f in anchors[e["target_new"]] if f["subject"] != e["subject"]]
        row = {
            "case_id": cid, "relation_id": e["relation_id"], "subject": e["subject"],
            "target_true": e["target_true"], "target_new": e["target_new"],
            "true_recalled": true_r["recalled"], "p_true": true_r["prob"],
            "anchor_facts": len(anchor),
            "paraphrase_recalled": sum(r["recalled"] for r in para),
            "neighborhood_recalled": sum(r["recalled"] for r in neigh),
            "n_neighborhood": len(neigh),
        }
        edit_rows.append(row)
        if not row["true_recalled"]:
            failures.append(f"{cid}: target_true {e['target_true']!r} not recalled on "
                            f"{rewrite!r}")
        if row["anchor_facts"] < args.min_anchor:
            failures.append(f"{cid}: target_new {e['target_new']!r} has only "
                            f"{row['anchor_facts']} recalled reference facts")
        if args.verbose and row["neighborhood_recalled"] < row["n_neighborhood"]:
            print(f"  note {cid}: {row['neighborhood_recalled']}/{row['n_neighborhood']} "
                  "neighborhood prompts recalled")

    print(f"\n== edits: {len(edits)} over {len({e['relation_id'] for e in edits})} relations, "
          f"{len({e['target_new'] for e in edits})} distinct target_new")
    if edits:
        print("  per relation: " + ", ".join(
            f"{r} {n}" for r, n in Counter(e["relation_id"] for e in edits).most_common()))
        print(f"  target_true recalled on the rewrite prompt: {rate(r['true_recalled'] for r in edit_rows)}")
        print(f"  paraphrase prompts recalling target_true:   "
              f"{sum(r['paraphrase_recalled'] for r in edit_rows)}/"
              f"{sum(len(e['paraphrase_prompts']) for e in edits)}")
        print(f"  neighborhood prompts recalled:              "
              f"{sum(r['neighborhood_recalled'] for r in edit_rows)}/"
              f"{sum(r['n_neighborhood'] for r in edit_rows)}")
        per_new = {o: len(anchors[o]) for o in sorted({e["target_new"] for e in edits})}
        counts = sorted(per_new.values())
        print(f"  recalled anchor facts per target_new: min {counts[0]}, "
              f"median {statistics.median(counts):g}, max {counts[-1]}")
        print(wrap(", ".join(f"{o} {n}" for o, n in sorted(per_new.items(), key=lambda x: x[1]))))
    for msg in failures:
        print("  FAIL:", msg)
    print(f"edit failures: {len(failures)}   ({time.time() - t0:.0f} s with the model)")

    if args.out:
        from steamviz.core.io import write_json

        fact_keys = ("subject", "relation", "object", "prompt", "recalled", "prob")
        report = {
            "data": str(folder), "model": lm.name, "fingerprint": lm.fingerprint,
            "schema_problems": problems, "relations": rel_report,
            "facts": [{k: f[k] for k in fact_keys} for f in facts],
            "anchors": {o: len(anchors[o]) for o in popular},
            "edits": edit_rows, "edit_failures": failures,
        }
        write_json(args.out, report)
        print(f"report written to {args.out}")
    return 1 if problems or failures else 0


if __name__ == "__main__":
    sys.exit(main())
