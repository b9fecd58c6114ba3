"""Reading data files: every user mistake is a one-line LorafitError naming the file and the fix; odd but valid
files (BOM, empty texts, string labels, several text columns) load; the validation split is stratified and seeded."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lorafit.config import DataConfig
from lorafit.data import load_data
from lorafit.errors import LorafitError

SEED = 42


def cfg(source, **kw) -> DataConfig:
    return DataConfig(source=str(source), **kw)


def load(source, seed: int = SEED, **kw):
    return load_data(cfg(source, **kw), seed)


def error_of(source, **kw) -> str:
    """The LorafitError message of load_data; it must be a single line."""
    with pytest.raises(LorafitError) as e:
        load(source, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def write_bytes(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def write_csv(tmp_path: Path, name: str, text: str) -> Path:
    return write_bytes(tmp_path, name, text.encode("utf-8"))


def rows_csv(tmp_path: Path, n_per_class: int = 10, labels=("0", "1"), name: str = "data.csv") -> Path:
    """n_per_class rows of each label with distinct texts."""
    lines = ["text,label"] + [f"row {lab} {i},{lab}" for lab in labels for i in range(n_per_class)]
    return write_csv(tmp_path, name, "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# Files that cannot be read


def test_missing_file(tmp_path):
    msg = error_of(tmp_path / "nope.csv")
    assert msg.startswith("data.source: ") and "nope.csv not found" in msg and ".csv, .parquet or .jsonl" in msg


def test_folder_instead_of_a_file(tmp_path):
    msg = error_of(tmp_path)
    assert str(tmp_path) in msg and "is a folder" in msg and "expected a .csv" in msg


def test_unsupported_suffix(tmp_path):
    msg = error_of(write_csv(tmp_path, "data.txt", "text,label\na,0\n"))
    assert "suffix '.txt'" in msg and ".csv" in msg and ".parquet" in msg and ".jsonl" in msg


@pytest.mark.parametrize("name", ["empty.csv", "empty.parquet", "empty.jsonl"])
def test_empty_file(tmp_path, name):
    msg = error_of(write_bytes(tmp_path, name, b""))
    assert name in msg and "is empty" in msg and "expected a header and rows" in msg


def test_blank_lines_only(tmp_path):
    msg = error_of(write_csv(tmp_path, "blank.csv", "\n\n\n"))
    assert "blank.csv has no columns" in msg


def test_header_only_csv(tmp_path):
    msg = error_of(write_csv(tmp_path, "header.csv", "text,label\n"))
    assert "header.csv has a header but no rows" in msg and "at least one row" in msg


def test_ragged_csv(tmp_path):
    msg = error_of(write_csv(tmp_path, "ragged.csv", "text,label\nhello,0\nworld,1,extra\nfoo,0\n"))
    assert "ragged.csv could not be parsed as csv" in msg
    assert "Expected 2 fields in line 3, saw 3" in msg and "number of fields per row" in msg


def test_truncated_csv(tmp_path):
    msg = error_of(write_csv(tmp_path, "cut.csv", 'text,label\n"hello, world,0\n'))  # the quote never closes
    assert "cut.csv could not be parsed as csv" in msg and "check quoting" in msg


@pytest.mark.parametrize(
    "name, data",
    [
        ("latin1.csv", "text,label\ncaf\xe9,0\nthé,1\n".encode("latin-1")),
        ("latin1.jsonl", '{"text": "caf\xe9", "label": 0}\n'.encode("latin-1")),
        ("utf16.csv", "text,label\na,0\n".encode("utf-16")),
    ],
)
def test_not_utf8(tmp_path, name, data):
    msg = error_of(write_bytes(tmp_path, name, data))
    assert f"{name} is not valid UTF-8" in msg and "re-save it as UTF-8" in msg


def test_broken_parquet(tmp_path):
    msg = error_of(write_bytes(tmp_path, "broken.parquet", b"PAR1" + bytes(range(200)) + b"PAR1"))
    assert "broken.parquet" in msg and "parquet" in msg


def test_broken_jsonl(tmp_path):
    msg = error_of(write_csv(tmp_path, "broken.jsonl", '{"text": "a", "label": 0}\n{"text": \n'))
    assert "broken.jsonl could not be parsed as jsonl" in msg


def test_errors_of_other_sources_name_their_key(tmp_path, small_csv):
    assert error_of(small_csv, val_source=str(tmp_path / "val.csv")).startswith("data.val_source: ")
    assert error_of(small_csv, test_source=str(tmp_path / "test.csv")).startswith("data.test_source: ")


# ---------------------------------------------------------------------------------------------------------------------
# Odd but valid files


def test_utf8_bom_csv_works(tmp_path):
    text = "text,label\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(20))
    data = load(write_bytes(tmp_path, "bom.csv", b"\xef\xbb\xbf" + text.encode("utf-8")))
    assert data.label_names == ["a", "b"]
    assert len(data.train) + len(data.val) == 20
    assert not any("\ufeff" in t for t in data.train.texts + data.val.texts)


def test_tsv_jsonl_json_and_parquet_work(tmp_path):
    df = pd.DataFrame({"text": [f"row {i}" for i in range(20)], "label": [i % 2 for i in range(20)]})
    df.to_csv(tmp_path / "d.tsv", sep="\t", index=False)
    df.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    df.to_json(tmp_path / "d.json", orient="records")  # one JSON array
    df.to_parquet(tmp_path / "d.parquet")
    for name in ("d.tsv", "d.jsonl", "d.json", "d.parquet"):
        data = load(tmp_path / name)
        assert data.label_names == ["0", "1"], name
        assert sorted(data.train.texts + data.val.texts) == sorted(df.text), name


def test_several_text_columns_are_joined_with_a_space(tmp_path):
    path = write_csv(
        tmp_path,
        "two.csv",
        "title,body,label\n" + "".join(f"T{i},B{i},{i % 2}\n" for i in range(19)) + ",only body,1\n",
    )
    data = load(path, text_columns=["title", "body"])
    texts = set(data.train.texts + data.val.texts)
    assert "T0 B0" in texts and "T7 B7" in texts
    assert "only body" in texts  # a missing part leaves no stray space


def test_string_labels_become_sorted_names(tmp_path):
    animals = ["dog", "cat", "bird"]
    path = write_csv(tmp_path, "animals.csv", "text,label\n" + "".join(f"t{i},{animals[i % 3]}\n" for i in range(30)))
    data = load(path)
    assert data.label_names == ["bird", "cat", "dog"]
    for t, y in zip(
        data.train.texts + data.val.texts, data.train.labels.tolist() + data.val.labels.tolist(), strict=True
    ):
        assert data.label_names[y] == animals[int(t[1:]) % 3]


def test_integer_labels_are_class_ids(small_csv):
    data = load(small_csv)
    assert data.label_names == ["0", "1", "2", "3"]
    assert data.train.labels.dtype == np.int64 and set(data.train.labels) == {0, 1, 2, 3}


def test_label_names_from_the_config_give_the_id_order(tmp_path):
    path = write_csv(tmp_path, "pn.csv", "text,label\n" + "".join(f"t{i},{['pos', 'neg'][i % 2]}\n" for i in range(20)))
    data = load(path, label_names=["pos", "neg"])
    assert data.label_names == ["pos", "neg"]
    for t, y in zip(data.train.texts, data.train.labels, strict=True):
        assert y == int(t[1:]) % 2


def test_empty_and_nan_texts_are_dropped_with_a_note(tmp_path):
    body = "".join(f"row {i},{i % 2}\n" for i in range(17)) + ',0\n   ,1\n"",1\n'
    data = load(write_csv(tmp_path, "gaps.csv", "text,label\n" + body))
    assert len(data.train) + len(data.val) == 17
    assert "" not in data.train.texts + data.val.texts
    assert any("gaps.csv: dropped 3 of 20 rows with empty or missing text" in n for n in data.train.notes), (
        data.train.notes
    )


def test_rows_without_a_label_are_dropped_with_a_note(tmp_path):
    body = "".join(f"row {i},{i % 2}\n" for i in range(18)) + "x,\ny,\n"
    data = load(write_csv(tmp_path, "nolabel.csv", "text,label\n" + body))
    assert len(data.train) + len(data.val) == 18
    assert any("dropped 2 of 20 rows with a missing label" in n for n in data.train.notes), data.train.notes


# ---------------------------------------------------------------------------------------------------------------------
# Wrong columns and labels


def test_missing_text_column_lists_the_columns(tmp_path):
    msg = error_of(write_csv(tmp_path, "cols.csv", "sentence,label\na,0\nb,1\n"))
    assert "cols.csv: text column(s) ['text'] not found" in msg
    assert "the file has columns ['sentence', 'label']" in msg and "data.text_columns" in msg


def test_one_of_several_text_columns_missing(small_csv):
    msg = error_of(small_csv, text_columns=["text", "body"])
    assert "text column(s) ['body'] not found" in msg and "'text', 'label'" in msg


def test_missing_label_column_lists_the_columns(tmp_path):
    msg = error_of(write_csv(tmp_path, "cols.csv", "text,category\na,0\nb,1\n"))
    assert "label column 'label' not found" in msg
    assert "the file has columns ['text', 'category']" in msg and "data.label_column" in msg


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_fractional_number_labels_are_refused(tmp_path, suffix):
    """0.5, 1.5, ... are not class ids: read as class names they trained into a useless model; refused instead."""
    df = pd.DataFrame({"text": [f"row {i}" for i in range(20)], "label": [0.5, 1.5] * 10})
    path = tmp_path / f"frac{suffix}"
    df.to_csv(path, index=False) if suffix == ".csv" else df.to_parquet(path)
    msg = error_of(path)
    assert (
        "column 'label' holds numbers that are not integers (20 rows, e.g. 0.5)" in msg and "data.label_column" in msg
    )


def test_integral_float_labels_are_still_class_ids(tmp_path):
    df = pd.DataFrame({"text": [f"row {i}" for i in range(20)], "label": [0.0, 1.0] * 10})
    df.to_parquet(tmp_path / "floats.parquet")
    data = load(tmp_path / "floats.parquet")
    assert data.label_names == ["0", "1"] and set(data.train.labels) == {0, 1}


def test_integer_labels_outside_label_names(tmp_path):
    path = write_csv(
        tmp_path, "ids.csv", "text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(10)) + "x,5\ny,7\nz,5\n"
    )
    msg = error_of(path, label_names=["neg", "pos"])
    assert "ids.csv: 3 row(s) of column 'label' have class ids [5, 7] outside 0..1" in msg
    assert "['neg', 'pos']" in msg and "fix the labels or data.label_names" in msg


def test_string_labels_not_in_label_names(tmp_path):
    path = write_csv(
        tmp_path,
        "names.csv",
        "text,label\n" + "".join(f"t{i},{['neg', 'pos'][i % 2]}\n" for i in range(10)) + "x,neutral\ny,Pos\n",
    )
    msg = error_of(path, label_names=["neg", "pos"])
    assert "2 row(s) of column 'label' have labels ['Pos', 'neutral'] not in data.label_names ['neg', 'pos']" in msg


def test_all_nan_label_column(tmp_path):
    msg = error_of(write_csv(tmp_path, "nolabels.csv", "text,label\na,\nb,\nc,\n"))
    assert "nolabels.csv: column 'label' has no labels (all 3 empty or NaN)" in msg


def test_all_nan_label_column_parquet(tmp_path):
    pd.DataFrame({"text": ["a", "b", "c"], "label": [np.nan] * 3}).to_parquet(tmp_path / "nan.parquet")
    assert "has no labels (all 3 empty or NaN)" in error_of(tmp_path / "nan.parquet")


def test_no_text_at_all(tmp_path):
    msg = error_of(write_csv(tmp_path, "notext.csv", "text,label\n,0\n  ,1\n"))
    assert "notext.csv: no usable rows" in msg and "['text']" in msg


def test_single_class(tmp_path):
    msg = error_of(write_csv(tmp_path, "one.csv", "text,label\n" + "".join(f"t{i},spam\n" for i in range(10))))
    assert "one.csv: the training data has a single class ('spam')" in msg and "at least two" in msg


def test_duplicate_label_names(small_csv):
    assert "data.label_names has duplicates" in error_of(small_csv, label_names=["a", "b", "a", "c"])


def test_too_few_rows_for_a_validation_split(tmp_path):
    msg = error_of(write_csv(tmp_path, "tiny.csv", "text,label\na,0\nb,1\n"))
    assert "tiny.csv: 2 rows are too few to hold out data.val_fraction=0.06" in msg and "data.val_source" in msg


# ---------------------------------------------------------------------------------------------------------------------
# The validation split


def test_validation_split_is_stratified_disjoint_and_seeded(tmp_path):
    path = rows_csv(tmp_path, n_per_class=40, labels=("a", "b", "c", "d"))  # 160 distinct rows
    data = load(path, val_fraction=0.25)
    train = list(zip(data.train.texts, data.train.labels.tolist(), strict=True))
    val = list(zip(data.val.texts, data.val.labels.tolist(), strict=True))
    assert len(val) == 40 and len(train) == 120
    assert not set(data.train.texts) & set(data.val.texts)
    assert sorted(data.train.texts + data.val.texts) == sorted(f"row {lab} {i}" for lab in "abcd" for i in range(40))
    assert Counter(y for _, y in val) == {0: 10, 1: 10, 2: 10, 3: 10}  # stratified
    assert all(data.label_names[y] == t.split()[1] for t, y in train + val)

    again = load(path, val_fraction=0.25)
    assert again.val.texts == data.val.texts and again.train.texts == data.train.texts
    other = load(path, seed=SEED + 1, val_fraction=0.25)
    assert other.val.texts != data.val.texts


def test_validation_split_of_the_small_csv(small_csv):
    data = load(small_csv, val_fraction=0.1)
    assert len(data.val) == 24 and len(data.train) == 216
    assert Counter(data.val.labels.tolist()) == {0: 6, 1: 6, 2: 6, 3: 6}
    assert Counter(data.train.texts) + Counter(data.val.texts) == Counter(pd.read_csv(small_csv).text.str.strip())


def test_val_source_replaces_the_split(tmp_path):
    train, val = rows_csv(tmp_path, 10, name="train.csv"), rows_csv(tmp_path, 3, name="val.csv")
    data = load(train, val_source=str(val))
    assert len(data.train) == 20 and len(data.val) == 6


# ---------------------------------------------------------------------------------------------------------------------
# End to end: `lorafit train` exits non-zero with one line and leaves no run folder


def run_train(tmp_path: Path, source: str, *extra: str) -> subprocess.CompletedProcess:
    parent = tmp_path / "runs"
    parent.mkdir()
    out = parent / "r1"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "lorafit", "train", "--set", f"data.source={source}", *extra, "-o", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lorafit: error:"), proc.stderr
    assert not out.exists()
    assert list(parent.iterdir()) == [], "no (partial) run folder may be left behind"
    assert not (tmp_path / "runs" / ".r1.partial").exists()
    return proc


def test_cli_missing_file(tmp_path):
    proc = run_train(tmp_path, str(tmp_path / "nope.csv"))
    assert proc.returncode == 2 and "nope.csv not found" in proc.stderr


def test_cli_ragged_csv(tmp_path):
    path = write_csv(tmp_path, "ragged.csv", "text,label\nhello,0\nworld,1,extra\n")
    assert "Expected 2 fields in line 3, saw 3" in run_train(tmp_path, str(path)).stderr


def test_cli_not_utf8(tmp_path):
    path = write_bytes(tmp_path, "latin1.csv", "text,label\ncaf\xe9,0\n".encode("latin-1"))
    assert "is not valid UTF-8" in run_train(tmp_path, str(path)).stderr


def test_cli_missing_text_column(tmp_path):
    path = write_csv(tmp_path, "cols.csv", "sentence,label\na,0\nb,1\n")
    assert "the file has columns ['sentence', 'label']" in run_train(tmp_path, str(path)).stderr


def test_cli_labels_outside_label_names(tmp_path):
    path = write_csv(tmp_path, "names.csv", "text,label\na,neg\nb,pos\nc,neutral\n")
    proc = run_train(tmp_path, str(path), "--set", "data.label_names=[neg,pos]")
    assert "labels ['neutral'] not in data.label_names ['neg', 'pos']" in proc.stderr


def test_cli_fractional_labels_leave_nothing(tmp_path):
    path = write_csv(tmp_path, "frac.csv", "text,label\n" + "".join(f"row {i},{i % 2 + 0.5}\n" for i in range(20)))
    assert "holds numbers that are not integers" in run_train(tmp_path, str(path)).stderr
