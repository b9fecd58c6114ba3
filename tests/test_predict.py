"""`lorafit predict` and `lorafit.load`: same numbers as `lorafit eval`, ids and order kept, every format, bad input."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

import lorafit
from lorafit.cli import main as cli

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


@pytest.fixture(scope="module")
def clf(tiny_run):
    return lorafit.load(tiny_run)


@pytest.fixture()
def labelled(tmp_path, ag_sample) -> pd.DataFrame:
    """40 rows per class in shuffled order, long and short texts mixed (so length sorting really reorders)."""
    df = ag_sample.groupby("label", group_keys=False).tail(40).sample(frac=1, random_state=3).reset_index(drop=True)
    df.loc[5, "text"] = "Oil."  # a very short one among ~55-token texts
    return df


def predict(run, inp, out, *args) -> int:
    return cli(["predict", str(run), "--input", str(inp), "--output", str(out), *args])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorafit: error:") and "\n" not in err, err
    assert "Traceback" not in err
    return err


def test_predict_equals_eval_on_a_labelled_file(tiny_run, labelled, tmp_path, capsys):
    data = tmp_path / "labelled.csv"
    labelled.to_csv(data, index=False)
    assert predict(tiny_run, data, tmp_path / "pred.csv", "--labels", "ids") == 0
    assert cli(["eval", str(tiny_run), "--data", str(data), "--json", str(tmp_path / "m.json")]) == 0
    pred = pd.read_csv(tmp_path / "pred.csv")
    m = json.loads((tmp_path / "m.json").read_text())
    assert (pred["label"] == labelled["label"]).mean() == m["accuracy"]
    # not only the same accuracy: the same confusion matrix, i.e. the same prediction for every class
    cm = np.zeros((4, 4), int)
    np.add.at(cm, (labelled["label"], pred["label"]), 1)
    assert cm.tolist() == m["confusion_matrix"]
    err = capsys.readouterr().err
    assert "predicted 160 rows in" in err and "rows/s" in err


def test_output_keeps_input_order_and_ids(tiny_run, clf, labelled, tmp_path):
    labelled.insert(0, "ID", [f"doc-{i:03d}" for i in np.random.default_rng(0).permutation(len(labelled))])
    labelled.to_csv(tmp_path / "in.csv", index=False)
    assert predict(tiny_run, tmp_path / "in.csv", tmp_path / "out.csv", "--proba") == 0
    out = pd.read_csv(tmp_path / "out.csv")
    assert out["ID"].tolist() == labelled["ID"].tolist()
    # each row's probabilities equal those of its own text predicted alone: rows went back where they came from
    alone = np.vstack([clf.predict_proba([t]) for t in labelled["text"][:12]])
    proba = out[[f"proba_{c}" for c in clf.label_names]].to_numpy()
    np.testing.assert_allclose(proba[:12], alone, atol=1e-5)
    assert len({tuple(r) for r in np.round(proba, 6)}) > 100  # the rows really differ


def test_ids_default_to_row_numbers_or_a_named_column(tiny_run, labelled, tmp_path):
    labelled.assign(doc=[f"d{i}" for i in range(len(labelled))]).to_csv(tmp_path / "in.csv", index=False)
    assert predict(tiny_run, tmp_path / "in.csv", tmp_path / "rows.csv") == 0
    rows = pd.read_csv(tmp_path / "rows.csv")
    assert list(rows.columns) == ["ID", "label"] and rows["ID"].tolist() == list(range(len(labelled)))
    assert (
        predict(tiny_run, tmp_path / "in.csv", tmp_path / "named.csv", "--id-column", "doc", "--label-column", "pred")
        == 0
    )
    named = pd.read_csv(tmp_path / "named.csv")
    assert list(named.columns) == ["doc", "pred"] and named["doc"].tolist() == [f"d{i}" for i in range(len(labelled))]
    assert named["pred"].tolist() == rows["label"].tolist()
    assert set(named["pred"]) <= {"0", "1", "2", "3"} | {0, 1, 2, 3}


def test_proba_columns_sum_to_one_and_match_the_api(tiny_run, clf, labelled, tmp_path):
    labelled.to_csv(tmp_path / "in.csv", index=False)
    assert predict(tiny_run, tmp_path / "in.csv", tmp_path / "out.parquet", "--proba") == 0
    out = pd.read_parquet(tmp_path / "out.parquet")
    cols = [f"proba_{c}" for c in clf.label_names]
    assert list(out.columns) == ["ID", "label", *cols]
    np.testing.assert_allclose(out[cols].sum(axis=1), 1.0, atol=1e-9)
    api = clf.predict_proba(labelled["text"].tolist())
    np.testing.assert_array_equal(out[cols].to_numpy(), api)  # same batches, same numbers
    assert out["label"].tolist() == clf.predict(labelled["text"].tolist())
    assert out["label"].tolist() == [clf.label_names[i] for i in api.argmax(1)]


def _write_input(df: pd.DataFrame, path, kind: str):
    if kind == "csv":
        df.to_csv(path, index=False)
    elif kind == "parquet":
        df.to_parquet(path, index=False)
    elif kind == "jsonl":
        df.to_json(path, orient="records", lines=True)
    elif kind == "pkl-dataframe":
        df.to_pickle(path)
    elif kind == "pkl-dataset":
        import datasets

        with open(path, "wb") as f:
            pickle.dump(datasets.Dataset.from_pandas(df, preserve_index=False), f)


@pytest.mark.parametrize(
    "kind,out_suffix",
    [("csv", ".jsonl"), ("parquet", ".csv"), ("jsonl", ".tsv"), ("pkl-dataframe", ".parquet"), ("pkl-dataset", ".csv")],
)
def test_every_input_and_output_format(tiny_run, clf, labelled, tmp_path, kind, out_suffix):
    df = labelled.drop(columns="label").assign(ID=range(100, 100 + len(labelled)))
    inp = tmp_path / f"in.{kind.split('-')[0]}"
    _write_input(df, inp, kind)
    out = tmp_path / f"out{out_suffix}"
    assert predict(tiny_run, inp, out) == 0
    got = {
        ".jsonl": lambda p: pd.read_json(p, lines=True),
        ".csv": pd.read_csv,
        ".tsv": lambda p: pd.read_csv(p, sep="\t"),
        ".parquet": pd.read_parquet,
    }[out_suffix](out)
    assert got["ID"].astype(int).tolist() == df["ID"].tolist()
    assert got["label"].astype(str).tolist() == clf.predict(df["text"].tolist())


def test_stdin_to_stdout_in_process(tiny_run, clf, labelled, monkeypatch, capsys):
    lines = labelled.head(20).drop(columns="label").to_json(orient="records", lines=True)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(lines.encode())))
    assert cli(["predict", str(tiny_run), "--input", "-", "--output", "-", "--labels", "ids"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["ID"] for r in rows] == list(range(20))
    assert [clf.label_names[r["label"]] for r in rows] == clf.predict(labelled["text"].head(20).tolist())


def test_stdout_carries_only_predictions(tiny_run, labelled):
    """The real pipe, in a fresh process: warnings, notes and the progress line go to stderr."""
    lines = labelled.head(5).to_json(orient="records", lines=True)
    p = subprocess.run(
        [sys.executable, "-m", "lorafit", "predict", str(tiny_run), "--input", "-", "--output", "-", "--proba"],
        input=lines,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(rows) == 5 and all(abs(sum(v for k, v in r.items() if k.startswith("proba_")) - 1) < 1e-9 for r in rows)
    assert "predicted 5 rows" in p.stderr


def test_run_text_columns_and_preprocessing_are_used(tiny_run, clf, labelled, tmp_path):
    """A run trained on [title, body] with lowercasing predicts from those columns, lowercased."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"].update(text_columns=["title", "body"], preprocess=["lowercase"])
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    words = labelled["text"].str.split(" ", n=4)
    df = pd.DataFrame({"title": words.str[:4].str.join(" "), "body": " " + words.str[4].fillna("") + "  "})
    df.to_csv(tmp_path / "in.csv", index=False)
    assert predict(run, tmp_path / "in.csv", tmp_path / "out.csv", "--proba") == 0
    out = pd.read_csv(tmp_path / "out.csv")
    expected = clf.predict_proba([(t + " " + b.strip()).lower() for t, b in zip(df["title"], df["body"], strict=True)])
    np.testing.assert_allclose(out[[f"proba_{c}" for c in clf.label_names]].to_numpy(), expected, atol=1e-12)
    assert lorafit.load(run).predict(df.head(3)) == clf.predict(
        [(t + " " + b.strip()).lower() for t, b in zip(df["title"][:3], df["body"][:3], strict=True)]
    )


def test_rows_with_empty_text_are_kept(tiny_run, labelled, tmp_path, capsys):
    labelled.loc[[3, 7], "text"] = ""
    labelled.to_csv(tmp_path / "in.csv", index=False)
    assert predict(tiny_run, tmp_path / "in.csv", tmp_path / "out.csv") == 0
    out = pd.read_csv(tmp_path / "out.csv")
    assert len(out) == len(labelled) and out["label"].notna().all()
    assert "2 of 160 rows have empty text" in capsys.readouterr().err


BAD_INPUTS = {
    "missing-text-column": (
        lambda p: pd.DataFrame({"body": ["a", "b"]}).to_csv(p, index=False),
        ".csv",
        "text column(s) ['text'] not found",
    ),
    "empty-file": (lambda p: p.write_bytes(b""), ".csv", "is empty"),
    "header-only": (lambda p: p.write_text("ID,text\n"), ".csv", "no rows"),
    "duplicated-ids": (
        lambda p: pd.DataFrame({"ID": [1, 2, 2, 3, 3], "text": list("abcde")}).to_csv(p, index=False),
        ".csv",
        "2 duplicated value(s) in 4 rows",
    ),
    "missing-ids": (lambda p: p.write_text("ID,text\n1,a\n,b\n"), ".csv", "no value in id column 'ID'"),
    "non-utf8-csv": (
        lambda p: p.write_bytes("ID,text\n1,caf\xe9 au lait\n".encode("latin-1")),
        ".csv",
        "not valid UTF-8",
    ),
    "non-utf8-jsonl": (lambda p: p.write_bytes(b'{"text": "caf\xe9"}\n'), ".jsonl", "UTF-8"),
    "all-texts-empty": (
        lambda p: p.write_text('ID,text\n1,""\n2,  \n'),
        ".csv",
        "every one of the 2 rows has empty text",
    ),
    "not-a-table-pickle": (lambda p: p.write_bytes(pickle.dumps([1, 2, 3])), ".pkl", "holds a list"),
    "broken-pickle": (lambda p: p.write_bytes(b"\x80\x04garbage"), ".pkl", "could not be unpickled"),
    "unknown-suffix": (lambda p: p.write_text("text\nhello\n"), ".xlsx", "expected one of .csv"),
    "missing-file": (lambda p: None, ".csv", "not found"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_leaves_no_output(tiny_run, tmp_path, capsys, case):
    make, suffix, message = BAD_INPUTS[case]
    inp = tmp_path / f"in{suffix}"
    make(inp)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert predict(tiny_run, inp, out_dir / "pred.csv") == 2
    assert message in one_line_error(capsys)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize(
    "args,message",
    [
        (["--id-column", "nope"], "id column 'nope' not found"),
        (["--label-column", "ID", "--id-column", "ID"], "is also the id column"),
    ],
)
def test_bad_options_are_one_line(tiny_run, labelled, tmp_path, capsys, args, message):
    labelled.assign(ID=range(len(labelled))).to_csv(tmp_path / "in.csv", index=False)
    assert predict(tiny_run, tmp_path / "in.csv", tmp_path / "out.csv", *args) == 2
    assert message in one_line_error(capsys)
    with pytest.raises(SystemExit) as exit_:  # usage errors come from argparse, one line too
        predict(tiny_run, tmp_path / "in.csv", tmp_path / "out.csv", "--labels", "codes")
    assert exit_.value.code == 2 and "invalid choice" in one_line_error(capsys)
    assert not (tmp_path / "out.csv").exists()


def test_bad_stdin_is_one_line(tiny_run, monkeypatch, capsys):
    for data, message in [
        (b"", "standard input is empty"),
        (b'{"text": "caf\xe9"}\n', "not valid UTF-8"),
        (b"not json\n", "could not be parsed"),
    ]:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
        assert cli(["predict", str(tiny_run), "--input", "-", "--output", "-"]) == 2
        assert message in one_line_error(capsys)


def test_bad_output_and_run_are_one_line(tiny_run, labelled, tmp_path, capsys):
    labelled.to_csv(tmp_path / "in.csv", index=False)
    for out, run, message in [
        (tmp_path / "out.xlsx", tiny_run, "expected one of .csv"),
        (tmp_path / "no" / "such" / "out.csv", tiny_run, "does not exist"),
        (tmp_path, tiny_run, "is a folder"),
        (tmp_path / "out.csv", tmp_path / "no-run", "not found"),
    ]:
        assert predict(run, tmp_path / "in.csv", out) == 2
        assert message in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


def test_refuses_to_overwrite_unless_asked(tiny_run, labelled, tmp_path, capsys):
    labelled.to_csv(tmp_path / "in.csv", index=False)
    out = tmp_path / "out.csv"
    out.write_text("precious\n")
    assert predict(tiny_run, tmp_path / "in.csv", out) == 2
    assert "already exists; pass --overwrite" in one_line_error(capsys)
    assert out.read_text() == "precious\n"
    assert predict(tiny_run, tmp_path / "in.csv", out, "--overwrite") == 0
    assert len(pd.read_csv(out)) == len(labelled)


def test_a_failed_write_leaves_no_partial_file(tiny_run, labelled, tmp_path, monkeypatch):
    import lorafit.inference.predict as predict_mod

    def half_then_fail(df, f, suffix):
        f.write(b"ID,label\n0,Wor")
        raise OSError(28, "No space left on device")

    labelled.head(5).to_csv(tmp_path / "in.csv", index=False)
    monkeypatch.setattr(predict_mod, "_write_frame", half_then_fail)
    with pytest.raises(OSError):
        predict(tiny_run, tmp_path / "in.csv", tmp_path / "out.csv")
    (tmp_path / "old.csv").write_text("old\n")
    with pytest.raises(OSError):
        predict(tiny_run, tmp_path / "in.csv", tmp_path / "old.csv", "--overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "old.csv"]  # no out.csv, no temporary files
    assert (tmp_path / "old.csv").read_text() == "old\n"  # the file being replaced is untouched


def test_api_accepts_a_string_and_rejects_non_strings(clf):
    assert clf.predict("Stocks fell on Monday") == clf.predict(["Stocks fell on Monday"])
    assert clf.predict_proba([]).shape == (0, 4)
    with pytest.raises(lorafit.errors.LorafitError, match=r"texts\[1\] is a NoneType"):
        clf.predict(["fine", None])
    assert "Classifier(" in repr(clf) and clf.label_names == ["0", "1", "2", "3"]


def test_import_lorafit_stays_cheap():
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, lorafit; assert callable(lorafit.load); print(sorted(m for m in ('torch', 'transformers', 'peft', 'pandas') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


@pytest.mark.slow
def test_embedded_minilm_predict_equals_eval_and_exports(minilm_run, tmp_path, capsys):
    """The real MiniLM at its default precision: predict and eval agree on 600 held-out rows; the export matches."""
    from lorafit.data import builtin_path
    from lorafit.inference.export import export_merged

    data = tmp_path / "test.parquet"
    pd.read_parquet(builtin_path("builtin:ag_news_sample_test")).sample(600, random_state=0).to_parquet(
        data, index=False
    )
    assert predict(minilm_run.folder, data, tmp_path / "pred.csv", "--labels", "ids") == 0
    assert cli(["eval", str(minilm_run.folder), "--data", str(data), "--json", str(tmp_path / "m.json")]) == 0
    truth = pd.read_parquet(data)["label"]
    pred = pd.read_csv(tmp_path / "pred.csv")["label"]
    m = json.loads((tmp_path / "m.json").read_text())
    assert (pred == truth).mean() == m["accuracy"] > 0.6
    assert export_merged(minilm_run.folder, tmp_path / "merged")["max_abs_logit_diff"] < 1e-4
