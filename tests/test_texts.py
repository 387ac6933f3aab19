"""Text readers and the bundled-text registry."""

import pytest

from steerport.errors import SteerportError
from steerport.texts import BUNDLED, bundled, neutral, read_rows, read_texts, read_texts_and_labels


def test_neutral_splits_are_disjoint_and_deterministic():
    fit, calib = neutral("fit"), neutral("calib")
    assert (len(fit), len(calib)) == (300, 60)
    assert not set(fit) & set(calib)
    assert neutral("all") == fit + calib
    assert neutral("calib", 5) == calib[:5]
    with pytest.raises(SteerportError, match="unknown neutral split"):
        neutral("test")


def test_every_bundled_text_exists_and_reads():
    for name, path in BUNDLED.items():
        assert path.is_file(), name
        assert read_texts(path, min_chars=1), name
    with pytest.raises(SteerportError, match="unknown bundled text"):
        bundled("nope")


def test_read_texts_jsonl_prompt_fields_and_window(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": {"text": "first prompt here"}}\n{"prompt": "second one"}\n\n{"text": "third text"}\n')
    assert read_texts(p, min_chars=1) == ["first prompt here", "second one", "third text"]
    assert read_texts(p, min_chars=1, skip=1, limit=1) == ["second one"]
    assert read_texts(p, min_chars=11) == ["first prompt here"]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok text"}\n{"other": 1}\n')
    with pytest.raises(SteerportError, match=r"b.jsonl:2: no string field 'text'"):
        read_texts(bad, min_chars=1)


def test_undecodable_bytes_name_file_and_line(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("fine line\nna\xefve caf\xe9\n".encode("latin-1"))
    with pytest.raises(SteerportError, match=r"latin1.txt:2: not UTF-8"):
        read_texts(p, min_chars=1)
    q = tmp_path / "latin1.jsonl"
    q.write_bytes(b'{"text": "a", "label": 1}\n{"text": "caf\xe9", "label": 0}\n')
    with pytest.raises(SteerportError, match=r"latin1.jsonl:2: not UTF-8"):
        read_texts_and_labels(q)


def test_labels_all_or_none_and_positive_mapping(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n{"text": "c", "label": "0"}\n')
    assert read_texts_and_labels(p, positive_labels=["0"]) == (["a", "b", "c"], [1, 0, 1])
    assert read_texts_and_labels(p, rows=slice(1, None)) == (["b", "c"], [1, 0])
    q = tmp_path / "e.jsonl"
    q.write_text('{"text": "a", "label": 0}\n{"text": "b"}\n')
    with pytest.raises(SteerportError, match="e.jsonl:2: no 'label' field, but earlier rows have one"):
        read_texts_and_labels(q)
    r = tmp_path / "f.jsonl"
    r.write_text('{"text": "a"}\n')
    with pytest.raises(SteerportError, match="labeled data is needed"):
        read_texts_and_labels(r)
    assert read_texts_and_labels(r, require_labels=False) == (["a"], None)


def test_csv_rows_and_unknown_format(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\nhello,1\n")
    assert read_rows(p) == [(2, {"text": "hello", "label": "1"})]
    with pytest.raises(SteerportError, match="unknown data format"):
        read_rows(tmp_path / "x.parquet") if (tmp_path / "x.parquet").write_text("") is not None else None
    with pytest.raises(SteerportError, match="no such"):
        read_texts(tmp_path / "missing.txt")
