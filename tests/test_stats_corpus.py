"""Reading a text corpus for the key statistics: the wikitext data set's split that is there
twice (published CSV-quoted, and decoded) is read once; a CSV-quoted ``.tokens`` alone is
decoded; WikiText's own plain ``.tokens`` is read as it is."""

from steamviz.data.corpus import read_text
from steamviz.look import stats

QUOTED = '""\n" = Title = \n"\n"A line , with ""quotes"" and more text .\n"\n'
PLAIN = ' = Title = \nA line , with "quotes" and more text .\n'


def test_a_split_there_twice_is_read_once(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a/wiki.valid.tokens").write_text(QUOTED)
    (tmp_path / "a/wiki.valid.clean.txt").write_text(PLAIN)
    (tmp_path / "b.raw").write_text("other text\n")
    assert [p.name for p in stats.corpus_files(tmp_path)] == ["wiki.valid.clean.txt", "b.raw"]


def test_tokens_files_are_decoded_only_when_csv_quoted(tmp_path):
    (tmp_path / "q.tokens").write_text(QUOTED)
    (tmp_path / "p.tokens").write_text(PLAIN)
    assert read_text(tmp_path / "q.tokens") == PLAIN
    assert read_text(tmp_path / "p.tokens") == PLAIN
    assert [p.name for p in stats.corpus_files(tmp_path)] == ["p.tokens", "q.tokens"]
