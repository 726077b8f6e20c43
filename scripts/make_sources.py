#!/usr/bin/env python
"""Write steamviz/data/sources.json: every file of the public data sets steamviz uses, with its
size, sha256 and canonical public URL (a source repository at a fixed commit), in the layout
of the steamviz data mirror.

    python scripts/make_sources.py MIRROR      # e.g. ../shared/data

Sizes and checksums are read from MIRROR (the data mirror, laid out as below); the URLs
come from the table here (the repositories and commits each mirror folder's PROVENANCE.txt
names). A file with no URL exists only in the mirror (a subset or a conversion made there);
``steamviz data list`` says so.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

GH = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"

# name -> description, license, and (mirror path prefix, repo, commit, repo path prefix)
SETS = {
    "counterfact": dict(
        description="CounterFact (ROME) in EasyEdit's format: val (1,919) and train (10,000)",
        license="MIT (EasyEdit data release, from ROME's CounterFact)",
        rules=[("counterfact_easyedit/", "Jometeorie/KnowledgeSpread",
                "51d7402617c2e52bde0dc11b76e400c3725a181a", "data/counterfact/")]),
    "polyglot": dict(
        description="Polyglot-or-Not English fact completion (CounterFact + CalinET facts, "
                    "Wikidata relation ids)",
        license="Apache-2.0",
        rules=[("polyglot_fact_completion_en/en-fact-completion-3-21-23.parquet",
                "daniel-furman/polyglot-or-not", "9ccbffd2e098217d14de75ef4b0269b12c0d233b",
                "data/ingested_data/en-fact-completion-3-21-23.parquet")]),
    "lre": dict(
        description="LRE relations (Hernandez et al. 2023): 47 relations of (subject, object)",
        license="MIT",
        rules=[("lre_relations/LICENSE", "evandez/relations",
                "1b9ec3cf2b8368e42bde7e80fcef384312a6ec07", "LICENSE"),
               ("lre_relations/", "evandez/relations",
                "1b9ec3cf2b8368e42bde7e80fcef384312a6ec07", "data/")]),
    "pararel": dict(
        description="ParaRel (Elazar et al. 2021): T-REx facts of 41 relations and patterns",
        license="MIT",
        rules=[("pararel/LICENSE", "yanaiela/pararel",
                "cb5554678457beb5ac163d888f1ce8cf174b3f0b", "LICENSE"),
               ("pararel/", "yanaiela/pararel",
                "cb5554678457beb5ac163d888f1ce8cf174b3f0b", "data/")]),
    "mquake": dict(
        description="MQuAKE-CF multi-hop questions (a fixed half of AKEW's 354-case file) "
                    "and the official templates",
        license="MIT (MQuAKE)",
        rules=[("mquake/princeton_mquake_templates/LICENSE", "princeton-nlp/MQuAKE",
                "fb43dadc2d8cd19d08ce81c63d957b59deb3f3cd", "LICENSE"),
               ("mquake/princeton_mquake_templates/cloze_templates.json", "princeton-nlp/MQuAKE",
                "fb43dadc2d8cd19d08ce81c63d957b59deb3f3cd",
                "prompts/templates/cloze_templates.json"),
               ("mquake/princeton_mquake_templates/question_templates.json",
                "princeton-nlp/MQuAKE", "fb43dadc2d8cd19d08ce81c63d957b59deb3f3cd",
                "prompts/templates/question_templates.json"),
               ("mquake/princeton_mquake_templates/", "princeton-nlp/MQuAKE",
                "fb43dadc2d8cd19d08ce81c63d957b59deb3f3cd", "prompts/")]),
    "zsre": dict(
        description="zsRE eval records with a one-hop portability question (EasyEdit; a "
                    "fixed half of the 1,037)",
        license="MIT (EasyEdit data release)",
        rules=[]),
    "wikitext": dict(
        description="WikiText-2 raw test and WikiText-103 validation (covariance statistics, "
                    "TF-IDF fit)",
        license="CC BY-SA 3.0 / GFDL",
        rules=[("text_corpus/wikitext-2-raw/", "Tylogi/TyloQuant",
                "7989d038b13ca737da11a95fb90e77ae059f33c0", "data/wikitext-2-raw/"),
               ("text_corpus/wikitext-103-tokens/wiki.valid.tokens",
                "rajeev-sr/Learning-from-Teaching-Regularization",
                "7833fcc7478c34b548b5d55caba8a684ff365ad7", "data/wikitext-103/valid.txt")]),
    "known1000": dict(
        description="ROME's known_1000.json (facts GPT-2 XL knows; causal tracing)",
        license="MIT (ROME)",
        rules=[("rome_known_1000/known_1000.json", "MaxLEAF3824/gpt_re",
                "a0134700ce4c073ad92b75facb15ae180c9b3e24", "data/known_1000.json")]),
}
FOLDERS = {"counterfact": ["counterfact_easyedit"], "polyglot": ["polyglot_fact_completion_en"],
           "lre": ["lre_relations"], "pararel": ["pararel"], "mquake": ["mquake"],
           "zsre": ["zsre_portability"], "wikitext": ["text_corpus/wikitext-2-raw",
                                                      "text_corpus/wikitext-103-tokens"],
           "known1000": ["rome_known_1000"]}
SKIP = ("PROVENANCE.txt", "UPSTREAM_README.md")
# mirror files that are conversions of a published file (steamviz.data.corpus), which
# `steamviz data get` makes from it on a machine without the mirror
DERIVED = {
    "polyglot_fact_completion_en/en-fact-completion-3-21-23.jsonl": dict(
        **{"from": "polyglot_fact_completion_en/en-fact-completion-3-21-23.parquet"},
        how="parquet-jsonl"),
    "text_corpus/wikitext-103-tokens/wiki.valid.clean.txt": dict(
        **{"from": "text_corpus/wikitext-103-tokens/wiki.valid.tokens"}, how="csv-text"),
}
# whole public files whose fixed halves the mirror holds (checksums from PROVENANCE.txt)
FULL = {
    "mquake-full": dict(
        description="MQuAKE-CF as redistributed by AKEW: all 354 cases (not in the mirror)",
        license="MIT (MQuAKE)",
        files=[dict(path="mquake/MQuAKE-CF_akew.json", size=3183842,
                    sha256="8469d4a0b8a4ff4168de987576e7ecea4754202627cd3ab3181339ffc411ddc5",
                    url=GH.format(repo="BobXWu/AKEW",
                                  commit="75fdc23f63cc06673bf75e3e39b12597ce18fec7",
                                  path="datasets/MQuAKE-CF.json"))]),
    "zsre-full": dict(
        description="zsRE eval records with portability questions: all 1,037 (not in the "
                    "mirror)",
        license="MIT (EasyEdit data release)",
        files=[dict(path="zsre_portability/zsre_mend_eval_portability_gpt4.json", size=842861,
                    sha256="0cf155da229b2eccae19fcfe5f7a09523363d357f5f15508d1521f495ad5ecd9",
                    url=GH.format(repo="JasonForJoy/Model-Editing-Hurt",
                                  commit="b1504a8e5f76b51f30fa49ba3eb8eeace69f8edd",
                                  path="edited-data/zsre_mend_eval_portability_gpt4.json"))]),
}


def url_for(rules, rel: str) -> str | None:
    for prefix, repo, commit, path in rules:
        if rel == prefix or (prefix.endswith("/") and rel.startswith(prefix)):
            tail = rel[len(prefix):] if prefix.endswith("/") else ""
            return GH.format(repo=repo, commit=commit, path=path + tail)
    return None


def main(mirror: Path) -> None:
    out = {}
    for name, spec in SETS.items():
        files = []
        for folder in FOLDERS[name]:
            for p in sorted((mirror / folder).rglob("*")):
                if not p.is_file() or p.name in SKIP:
                    continue
                rel = p.relative_to(mirror).as_posix()
                data = p.read_bytes()
                files.append(dict(path=rel, size=len(data),
                                  sha256=hashlib.sha256(data).hexdigest(),
                                  url=url_for(spec["rules"], rel)))
                if rel in DERIVED:
                    files[-1]["derived"] = DERIVED[rel]
        out[name] = dict(description=spec["description"], license=spec["license"],
                         files=files)
    out.update(FULL)
    dest = Path(__file__).resolve().parent.parent / "steamviz" / "data" / "sources.json"
    dest.write_text(json.dumps(out, indent=1) + "\n")
    n = sum(len(v["files"]) for v in out.values())
    print(f"wrote {dest} ({len(out)} data sets, {n} files, "
          f"{sum(f['url'] is None for v in out.values() for f in v['files'])} mirror-only)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
