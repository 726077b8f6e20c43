"""Reading the files of the public data sets whose published form is not the form steamviz
reads, and the conversions that turn one into the other.

Two files of the data mirror are conversions made there, not published anywhere
(``sources.json`` lists them with ``derived``), and :mod:`steamviz.data.fetch` makes them
from their published file on any machine, byte for byte, checked by sha256:

- ``csv-text``: WikiText-103's validation split as published in its source repository
  (``wiki.valid.tokens``) is CSV-quoted, one quoted record per line; the plain text is the
  records joined (``wiki.valid.clean.txt``).
- ``parquet-jsonl``: Polyglot-or-Not's fact-completion table, published as parquet, one
  JSON object per row (``json.dumps(row, ensure_ascii=False)``, column order kept).

>>> p = fetch.path("wikitext", "text_corpus/wikitext-103-tokens/wiki.valid.tokens")  # doctest: +SKIP
>>> read_text(p)[:20]                                                # doctest: +SKIP
' = Homarus gammarus '
"""

from __future__ import annotations

import csv
import json
from pathlib import Path


def csv_text(path) -> str:
    """The text of a CSV-quoted file of one record per line (the records joined)."""
    with open(path, newline="", encoding="utf-8") as f:
        return "".join(r[0] if r else "" for r in csv.reader(f))


def parquet_jsonl(path) -> str:
    """A parquet table as JSON lines, one object per row in the table's column order."""
    import pyarrow.parquet as pq

    return "".join(json.dumps(row, ensure_ascii=False) + "\n"
                   for row in pq.read_table(path).to_pylist())


#: conversion name (``sources.json``'s ``derived.how``) -> function(source path) -> text
CONVERSIONS = {"csv-text": csv_text, "parquet-jsonl": parquet_jsonl}


def convert(how: str, source) -> bytes:
    """The bytes conversion ``how`` makes of the file ``source`` (UTF-8)."""
    if how not in CONVERSIONS:
        raise ValueError(f"unknown conversion {how!r}; known: {sorted(CONVERSIONS)}")
    return CONVERSIONS[how](Path(source)).encode("utf-8")


def read_text(path) -> str:
    """A corpus file as plain text: the WikiText ``.tokens`` of the data sets are CSV-quoted
    (:func:`csv_text`), every other file is read as UTF-8 text."""
    path = Path(path)
    if path.name.endswith(".tokens") and _csv_quoted(path):
        return csv_text(path)
    return path.read_text(encoding="utf-8", errors="ignore")


def _csv_quoted(path: Path) -> bool:
    # WikiText's own .tokens files are plain text (their lines start with a space or "=");
    # the data sets' copy starts every record with a quote
    with open(path, encoding="utf-8", errors="ignore") as f:
        first = f.readline()
    return first.startswith('"')
