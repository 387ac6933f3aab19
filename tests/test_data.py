"""Reading labeled text: label mapping, splits, and every error path (file and line named)."""

from __future__ import annotations

import json

import pytest

from steerport.data import (
    BUILTINS,
    DataOptions,
    Example,
    load_data,
    pack_by_length,
    read_labeled,
    read_text_pair,
    split,
    tokenize,
)
from steerport.errors import SteerportError
from tests.tiny import tiny_tokenizer


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_positive_label_maps_others_to_negative(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0}, {"text": "c", "label": 2}])
    ex, counts = read_labeled(f, positive_labels=["0"])
    assert [(e.text, e.label) for e in ex] == [("a", -1.0), ("b", 1.0), ("c", -1.0)]
    assert ex[1].where == f"{f}:2"
    assert counts == {"skipped": 0, "neutral": 0}


def test_positive_and_negative_labels_skip_the_rest(tmp_path):
    rows = [{"text": t, "label": y} for t, y in [("a", 4), ("b", 0), ("c", 2), ("d", 3.0)]]
    ex, counts = read_labeled(write_jsonl(tmp_path / "d.jsonl", rows), positive_labels=["3", "4"], negative_labels=["0", "1"])
    assert [(e.text, e.label) for e in ex] == [("a", 1.0), ("b", -1.0), ("d", 1.0)]  # 3.0 matches "3"
    assert counts["skipped"] == 1


def test_real_labels_and_plus_minus_one(tmp_path):
    rows = [{"t": "a", "y": 1.0}, {"t": "b", "y": -0.5}, {"t": "c", "y": 0.0}]
    ex, counts = read_labeled(write_jsonl(tmp_path / "d.jsonl", rows), text_field="t", label_field="y", real=True)
    assert [e.label for e in ex] == [1.0, -0.5] and counts["neutral"] == 1
    ex, _ = read_labeled(write_jsonl(tmp_path / "e.jsonl", [{"text": "a", "label": -1}, {"text": "b", "label": "1"}]))
    assert [e.label for e in ex] == [-1.0, 1.0]


def test_csv_and_tsv_with_line_numbers(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('sentence,y\n"multi\nline",pos\nshort,neg\n', encoding="utf-8")
    ex, _ = read_labeled(f, text_field="sentence", label_field="y", positive_labels=["pos"])
    assert [(e.text, e.label) for e in ex] == [("multi\nline", 1.0), ("short", -1.0)]
    assert ex[1].where.endswith(":4")
    t = tmp_path / "d.tsv"
    t.write_text("text\tlabel\nhello\t1\nbye\t-1\n", encoding="utf-8")
    assert [e.label for e in read_labeled(t)[0]] == [1.0, -1.0]


def test_text_pair(tmp_path):
    p, n = tmp_path / "p.txt", tmp_path / "n.txt"
    p.write_text("good\n\nnice\n")
    n.write_text("bad\n")
    ex = read_text_pair(p, n)
    assert [(e.text, e.label) for e in ex] == [("good", 1.0), ("nice", 1.0), ("bad", -1.0)]
    assert ex[1].where == f"{p}:3"


def test_split_is_stratified_seeded_and_limited():
    ex = [Example(f"p{i}", 1.0, "") for i in range(30)] + [Example(f"n{i}", -1.0, "") for i in range(50)]
    train, held = split(ex, heldout_fraction=0.1, seed=3)
    assert sum(e.label > 0 for e in held) == 3 and sum(e.label < 0 for e in held) == 5
    assert len(train) + len(held) == 80 and not {e.text for e in train} & {e.text for e in held}
    assert split(ex, heldout_fraction=0.1, seed=3) == (train, held)
    assert split(ex, heldout_fraction=0.1, seed=4) != (train, held)
    train, held = split(ex, limit_per_class=10, heldout_fraction=0.2, seed=0)
    assert len(train) + len(held) == 20 and len(held) == 4
    train, held = split(ex, heldout_fraction=0.0)
    assert held == [] and len(train) == 80


def test_builtin_slices_load_without_shared_data():
    data = load_data(DataOptions(files=["sst2"]))
    assert data.positive_name == "positive sentiment"
    c = data.summary["counts"]
    assert c["train"] == {"positive": 450, "negative": 450} and c["heldout"] == {"positive": 50, "negative": 50}
    assert len(data.summary["sources"][0]["sha256"]) == 64
    detox = load_data(DataOptions(files=["paradetox"]))
    assert detox.positive_name == "non-toxic"
    toxic_row = next(e for e in detox.train if "fuck" in e.text)  # toxic rows train at -1
    assert toxic_row.label == -1.0
    for b in BUILTINS.values():
        assert b.path.is_file() and b.test_path.is_file()


def test_tokenize_truncates_and_pack_respects_budget():
    tok = tiny_tokenizer()
    ids = tokenize(tok, ["The movie was wonderful and the actors were great.", "What"], max_tokens=4)
    assert len(ids[0]) == 4 and len(ids[1]) >= 1
    lengths = [5, 30, 7, 30, 2, 12]
    batches = pack_by_length(lengths, tokens_per_batch=40)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert all(len(b) * max(lengths[i] for i in b) <= 40 or len(b) == 1 for b in batches)


# --------------------------------------------------------------------------- errors


def err(fn, *args, **kw) -> str:
    with pytest.raises(SteerportError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "lines, kw, expect",
    [
        (['{"text": "a", "label": 1}', "{oops"], {}, ":2: not valid JSON"),
        (['{"text": "a", "label": 1}', "[1, 2]"], {}, ":2: expected a JSON object"),
        (['{"text": "a", "label": 1}', '{"label": 1}'], {}, ":2: no 'text' field"),
        (['{"text": "a"}'], {}, ":1: no 'label' field"),
        (['{"text": 5, "label": 1}'], {}, ":1: field 'text' is int"),
        (['{"text": "  ", "label": 1}'], {}, ":1: empty text"),
        (['{"text": "a", "label": null}'], {}, ":1: empty label"),
        (['{"text": "a", "label": 0}'], {}, ":1: label 0 is not +1/-1; say which labels are positive"),
        (['{"text": "a", "label": "x"}'], {"real": True}, ":1: label 'x' is not a number"),
        (['{"text": "a", "label": 0}'], {"real": True}, "no usable examples"),
        (['{"text": "a", "label": 1}'], {"positive_labels": ["7"]}, "no row has a positive label"),
        ([], {}, "no usable examples (no rows)"),
    ],
)
def test_read_errors_name_file_and_line(tmp_path, lines, kw, expect):
    f = write_jsonl(tmp_path / "d.jsonl", lines)
    msg = err(read_labeled, f, **kw)
    assert str(f) in msg and expect in msg


def test_file_level_errors(tmp_path):
    assert "no such data file" in err(read_labeled, tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "a", "label": 1}\n{"text": "\xff", "label": 1}\n')
    assert f"{bad}:2: not UTF-8" in err(read_labeled, bad)
    txt = tmp_path / "d.txt"
    txt.write_text("hello\n")
    assert "unknown data format '.txt'" in err(read_labeled, txt)
    f = write_jsonl(tmp_path / "d.jsonl", ['{"text": "a", "label": 1}'])
    assert "both positive and negative" in err(read_labeled, f, positive_labels=["1"], negative_labels=["1"])
    assert "not both" in err(read_labeled, f, positive_labels=["1"], real=True)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert f"{empty}: no texts" in err(read_text_pair, empty, txt)


BAD_BYTES = b"\xff\xfe"  # not UTF-8 anywhere


@pytest.mark.parametrize("name, content, line", [
    ("d.jsonl", b'{"text": "a", "label": 1}\n{"text": "' + BAD_BYTES + b'", "label": -1}\n', 2),
    ("d.csv", b"text,label\na,1\n" + BAD_BYTES + b",-1\n", 3),
    ("d.tsv", b"text\tlabel\na\t1\n" + BAD_BYTES + b"\t-1\n", 3),
])
def test_undecodable_bytes_name_file_and_line_in_labeled_files(tmp_path, name, content, line):
    f = tmp_path / name
    f.write_bytes(content)
    for read in (lambda: read_labeled(f), lambda: load_data(DataOptions(files=[f]))):
        assert err(read).startswith(f"{f}:{line}: not UTF-8")


def test_undecodable_bytes_name_file_and_line_in_text_pairs(tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("fine\n")
    bad.write_bytes(b"ok\n\nb" + BAD_BYTES + b"d\n")
    assert err(read_text_pair, bad, good).startswith(f"{bad}:3: not UTF-8")
    assert err(read_text_pair, good, bad).startswith(f"{bad}:3: not UTF-8")
    assert err(load_data, DataOptions(positive_file=good, negative_file=bad)).startswith(f"{bad}:3: not UTF-8")


def test_unpaired_surrogate_escapes_are_refused_with_file_and_line(tmp_path):
    """JSON can spell text that is not Unicode ("\\ud800"); it reached the tokenizer as an obscure TypeError."""
    f = write_jsonl(tmp_path / "d.jsonl", ['{"text": "fine", "label": 1}', '{"text": "good \\ud800 film", "label": -1}'])
    msg = err(read_labeled, f)
    assert msg.startswith(f"{f}:2: not valid Unicode")
    assert err(load_data, DataOptions(files=[f])) == msg


def test_split_and_load_errors(tmp_path):
    one = [Example("a", 1.0, ""), Example("b", 1.0, "")]
    assert "no negative examples (one class only" in err(split, one)
    both = one + [Example("c", -1.0, "")]
    assert "held-out fraction" in err(split, both, heldout_fraction=1.0)
    assert "limit per class" in err(split, both, limit_per_class=0)
    assert "needs both --positive and --negative" in err(load_data, DataOptions(positive_file=tmp_path / "p.txt"))
    assert "no training data" in err(load_data, DataOptions())
    f = write_jsonl(tmp_path / "d.jsonl", ['{"text": "a", "label": 1}', '{"text": "b", "label": 1}'])
    assert "no negative examples" in err(load_data, DataOptions(files=[f]))
    assert "at least 2" in err(tokenize, tiny_tokenizer(), ["a"], 1)
