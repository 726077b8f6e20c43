"""One registry of in-process caches (steamviz.core.memo) and one clear_caches()."""

import re
from pathlib import Path

import pytest

import steamviz as sv
from steamviz import memo


def test_no_module_keeps_a_private_cache():
    """A private module-level dict outside the registry would survive clear_caches()
    (public module-level dicts are registries, e.g. the editors table)."""
    root = Path(sv.__file__).parent
    found = []
    for f in sorted(p for p in root.rglob("*.py") if p.name != "memo.py"):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if re.match(r"^_[A-Za-z_]+(: [^=]+)? = (\{\}|dict\(\))\s*(#.*)?$", line):
                found.append(f"{f.name}:{i}: {line}")
    assert not found, "use steamviz.core.memo.memo(name) for these caches:\n" + "\n".join(found)


def test_clear_caches_by_name_and_all():
    from steamviz import anchors, rome  # noqa: F401 (registers their caches)

    memo.memo("rome.v")["k"] = 1
    memo.memo("anchors.anchors")["k"] = 2
    sv.clear_caches("rome")
    assert "k" not in memo.memo("rome.v") and memo.memo("anchors.anchors")["k"] == 2
    assert memo.sizes()["anchors.anchors"] >= 1
    sv.clear_caches()
    assert set(memo.sizes().values()) == {0}


def test_unknown_cache_names_are_refused():
    with pytest.raises(ValueError, match="the caches are"):
        sv.clear_caches("romee")
    with pytest.raises(ValueError, match="memo.KNOWN"):
        memo.memo("mine.scratch")
