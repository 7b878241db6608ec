import csv
import json

import numpy as np
import pytest

from saelab.data.corpus import (
    EMBEDDED,
    build_embedded_corpus,
    corpus_info,
    iter_documents,
    split_of,
    stdlib_documents,
    strip_wiki_markup,
)


def test_strip_wiki_markup():
    raw = ("'''Aristotle''' was a {{lang|grc|Greek}} [[philosopher]] from [[Stagira|Stageira]]."
           "<ref>Smith 2001</ref>\n== Life ==\n[[File:A.jpg|thumb|a [[bust]]]]\n{|\n| table\n|}\n* born 384 BC")
    text = strip_wiki_markup(raw)
    assert text == "Aristotle was a philosopher from Stageira.\nLife\nborn 384 BC"


def test_split_is_fixed_and_by_document():
    ids = [f"doc{i}" for i in range(2000)]
    splits = [split_of(i) for i in ids]
    assert splits == [split_of(i) for i in ids]
    assert 0.07 < splits.count("validation") / len(ids) < 0.13


def test_stdlib_documents_are_real_modules():
    docs = list(stdlib_documents())
    assert len(docs) > 300
    assert any(d.id == "python/json/decoder.py" for d in docs)
    assert all(len(d.text) > 200 for d in docs)


def test_local_sources(tmp_path, text_jsonl):
    train = list(iter_documents(str(text_jsonl), "train"))
    val = list(iter_documents(str(text_jsonl), "validation"))
    assert train and val and not {d.id for d in train} & {d.id for d in val}
    folder = tmp_path / "txt"
    folder.mkdir()
    for i in range(30):
        (folder / f"{i}.txt").write_text(f"document number {i}")
    both = list(iter_documents(str(folder), "train")) + list(iter_documents(str(folder), "validation"))
    assert sorted(d.text for d in both) == sorted(f"document number {i}" for i in range(30))


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither 'embedded', 'hf:NAME' nor an existing file"):
        list(iter_documents(str(tmp_path / "missing.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no field 'text'"):
        list(iter_documents(str(bad), "train")) + list(iter_documents(str(bad), "validation"))
    (tmp_path / "x.xlsx").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        list(iter_documents(str(tmp_path / "x.xlsx")))
    (tmp_path / "t.csv").write_text("id,body\n1,hello\n")
    with pytest.raises(ValueError, match=r"t.csv:2: no field 'text'"):
        list(iter_documents(str(tmp_path / "t.csv"), "train")) + list(iter_documents(str(tmp_path / "t.csv"), "validation"))
    np.save(tmp_path / "f.npy", np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"integer \[documents, tokens\]"):
        list(iter_documents(str(tmp_path / "f.npy")))


def _both(source, **kw):
    return list(iter_documents(source, "train", **kw)) + list(iter_documents(source, "validation", **kw))


def test_table_and_pretokenized_sources_give_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"d{i}", "body": f"text of document {i}, with a comma", "toks": [i, i + 1, i + 2]}
            for i in range(40)]
    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "body"])
        w.writeheader()
        w.writerows({"id": r["id"], "body": r["body"]} for r in rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    as_csv = _both(str(tmp_path / "t.csv"), text_field="body")
    as_parquet = _both(str(tmp_path / "t.parquet"), text_field="body")
    assert sorted((d.id, d.text) for d in as_csv) == sorted((r["id"], r["body"]) for r in rows)
    assert [(d.id, d.text) for d in as_csv] == [(d.id, d.text) for d in as_parquet]
    assert {split_of(d.id) for d in iter_documents(str(tmp_path / "t.csv"), "validation", "body")} <= {"validation"}
    # pre-tokenized: a column of token-id lists, or an integer array [documents, tokens]
    toks = _both(str(tmp_path / "t.jsonl"), text_field="toks")
    assert sorted(d.ids for d in toks) == sorted(tuple(r["toks"]) for r in rows) and toks[0].text == ""
    np.save(tmp_path / "a.npy", np.arange(40 * 5, dtype=np.int64).reshape(40, 5))
    arr = _both(str(tmp_path / "a.npy"))
    assert sorted(d.ids for d in arr) == [tuple(range(5 * i, 5 * i + 5)) for i in range(40)]


@pytest.mark.embedded
def test_embedded_corpus_has_three_sources_split_by_document():
    build_embedded_corpus()
    info = corpus_info()
    assert set(info["sources"]) == {"shakespeare", "wikipedia", "python"}
    for counts in info["sources"].values():
        assert counts["train"] > 0 and counts["validation"] > 0
    train = {d.id for d in iter_documents(EMBEDDED, "train")}
    val = {d.id for d in iter_documents(EMBEDDED, "validation")}
    assert not train & val
    assert any(i.startswith("wikipedia/") for i in train)
