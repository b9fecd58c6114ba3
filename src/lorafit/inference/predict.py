"""Labelling new text with a trained run: `lorafit predict` and the Python API `lorafit.load(run_dir)`.

Both go through `Classifier`, so the command line and a notebook give the same numbers. Texts are joined from
the run's `data.text_columns` and preprocessed with its `data.preprocess` steps, exactly as in training.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .. import preprocess, runs
from ..atomic import atomic_write
from ..blend import note as blend_note
from ..data import join_texts, read_table, to_split
from ..errors import LorafitError
from .loaded import LoadedRun, load_run

INPUT_SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl", ".json", ".pkl", ".pickle")
OUTPUT_SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl")
DEFAULT_ID_COLUMN = "ID"


class Classifier:
    """A trained run ready for inference.

    >>> clf = lorafit.load("runs/20261128-120000-minilm")
    >>> clf.predict(["Stocks fell sharply on Monday", "The striker scored twice"])
    ['Business', 'Sports']
    >>> clf.predict_proba(["Stocks fell sharply on Monday"]).shape   # (texts, classes), rows sum to 1
    (1, 4)

    A text is what the run's `data.text_columns` join to (one string per example); the run's preprocessing
    is applied here. A DataFrame with those columns may be passed instead of a list of strings.
    """

    def __init__(self, run: LoadedRun):
        self.run = run
        self.cfg = run.cfg
        self.label_names: list[str] = list(run.label_names)

    def __repr__(self) -> str:
        return f"Classifier({str(self.run.folder)!r}, classes={self.label_names})"

    def prepare(self, texts) -> list[str]:
        """Raw texts (or a DataFrame with the run's text columns) -> the model's input strings."""
        if isinstance(texts, pd.DataFrame):
            return texts_of_frame(texts, self.cfg, self.label_names, "DataFrame")[0]
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise LorafitError(
                f"texts[{bad[0]}] is a {type(texts[bad[0]]).__name__}, not a string ({len(bad)} such item(s)); pass a list of strings"
            )
        return preprocess.apply([t.strip() for t in texts], self.cfg.data.preprocess)

    def logits_of_prepared(self, texts: list[str], progress: str | None = None) -> np.ndarray:
        """Logits (rows in input order) for texts already passed through `prepare`."""
        if not texts:
            return np.zeros((0, len(self.label_names)), dtype=np.float32)
        return self.run.classify(texts, progress=progress)

    def logits(self, texts) -> np.ndarray:
        return self.logits_of_prepared(self.prepare(texts))

    def predict_proba(self, texts) -> np.ndarray:
        """Class probabilities, shape (texts, classes), columns in `label_names` order."""
        return softmax(self.logits(texts))

    def predict(self, texts) -> list[str]:
        """The most probable class name for each text."""
        return [self.label_names[i] for i in self.logits(texts).argmax(-1)]


def load(run_dir: str | Path, precision: str | None = None) -> Classifier:
    """Load a run folder written by `lorafit train` for inference (precision: the run's own unless given)."""
    return Classifier(load_run(Path(run_dir), precision, merge=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------------------------------
# Reading the input and writing the output


def read_input(source: str) -> pd.DataFrame:
    """A table to label: a .csv/.tsv/.parquet/.jsonl file, a pickled DataFrame or datasets.Dataset, or '-' (JSON lines on stdin)."""
    if source == "-":
        return _read_stdin()
    suffix = Path(source).suffix.lower()
    if suffix not in INPUT_SUFFIXES:
        raise LorafitError(
            f"--input: {source} has suffix {suffix!r}; expected one of {', '.join(INPUT_SUFFIXES)} or - for JSON lines on stdin"
        )
    if suffix in (".pkl", ".pickle"):
        return _read_pickle(Path(source))
    return read_table(source, "--input")


def _read_stdin() -> pd.DataFrame:
    raw = sys.stdin.buffer.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LorafitError(
            f"--input -: standard input is not valid UTF-8 (byte {e.start}); send UTF-8 JSON lines"
        ) from None
    if not text.strip():
        raise LorafitError(
            '--input -: standard input is empty; expected JSON lines, one object per row (e.g. {"text": "..."})'
        )
    try:
        return pd.read_json(io.StringIO(text), lines=True, dtype=False)
    except ValueError as e:
        raise LorafitError(
            f"--input -: standard input could not be parsed as JSON lines: {str(e).splitlines()[0]}; send one JSON object per line"
        ) from None


def _read_pickle(path: Path) -> pd.DataFrame:
    """A pickled DataFrame or datasets.Dataset (as competitions ship them). Unpickling runs code: only open trusted files."""
    import pickle

    if not path.is_file():
        raise LorafitError(
            f"--input: file {path} not found; expected a .csv, .parquet, .jsonl or .pkl file, or - for stdin"
        )
    if path.stat().st_size == 0:
        raise LorafitError(f"--input: {path} is empty; expected a pickled DataFrame or datasets.Dataset")
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f)  # noqa: S301 (the user's own file, like pd.read_pickle)
    except Exception as e:  # UnpicklingError, EOFError, a missing module...
        raise LorafitError(
            f"--input: {path} could not be unpickled ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'truncated'}); expected a pickled DataFrame or datasets.Dataset"
        ) from None
    if type(obj).__name__ == "DatasetDict":
        raise LorafitError(
            f"--input: {path} holds a DatasetDict with splits {list(obj)}; pickle one split (e.g. ds['test']) instead"
        )
    if hasattr(obj, "to_pandas") and type(obj).__module__.startswith("datasets"):
        obj = obj.to_pandas()
    if not isinstance(obj, pd.DataFrame):
        raise LorafitError(
            f"--input: {path} holds a {type(obj).__name__}; expected a pickled pandas DataFrame or datasets.Dataset"
        )
    if len(obj) == 0:
        raise LorafitError(f"--input: {path} has no rows; expected at least one row")
    return obj.reset_index(drop=True)


def texts_of_frame(df: pd.DataFrame, cfg, label_names: list[str], source: str) -> tuple[list[str], int]:
    """Model input strings for every row (none dropped, unlike training data), and how many rows had no text."""
    cols = list(cfg.data.text_columns)
    has_text = (join_texts(df, cols, source) != "").to_numpy()  # names the missing text column, if any
    if not has_text.any():
        raise LorafitError(
            f"{source}: every one of the {len(df)} rows has empty text in {cols}; expected text in the run's data.text_columns"
        )
    texts = [""] * len(df)
    # only the text columns: an input's own label column (any values) plays no part in prediction
    split = to_split(df.loc[has_text, cols], cfg.data, label_names, source, require_labels=False)
    for i, t in zip(np.flatnonzero(has_text), split.texts, strict=True):
        texts[i] = t
    return texts, int((~has_text).sum())


def row_ids(df: pd.DataFrame, id_column: str | None, source: str) -> tuple[str, pd.Series]:
    """(output id column name, ids): the named column, else `ID` when present, else the row number from 0."""
    if id_column is None:
        if DEFAULT_ID_COLUMN not in df.columns:
            return DEFAULT_ID_COLUMN, pd.Series(np.arange(len(df)), name=DEFAULT_ID_COLUMN)
        id_column = DEFAULT_ID_COLUMN
    elif id_column not in df.columns:
        raise LorafitError(
            f"{source}: id column {id_column!r} not found; the input has columns {list(df.columns)}; pass --id-column with one of them, or leave it out to number the rows"
        )
    ids = df[id_column].reset_index(drop=True)
    missing = ids.isna()
    if missing.any():
        raise LorafitError(
            f"{source}: {int(missing.sum())} row(s) have no value in id column {id_column!r} (first at row {int(np.flatnonzero(missing)[0])}); fill them or use another --id-column"
        )
    dup = ids.duplicated(keep=False)
    if dup.any():
        examples = list(dict.fromkeys(ids[dup].astype(str)))[:3]
        raise LorafitError(
            f"{source}: id column {id_column!r} has {int(ids[dup].nunique())} duplicated value(s) in {int(dup.sum())} rows (e.g. {examples}); ids must be unique to match predictions back, fix them or use another --id-column"
        )
    return id_column, ids


def check_output(output: str, overwrite: bool) -> None:
    """Fail before any work when the output cannot be written."""
    if output == "-":
        return
    path = Path(output)
    suffix = path.suffix.lower()
    if path.is_dir():
        raise LorafitError(f"--output: {output} is a folder; expected a file name such as {path / 'predictions.csv'}")
    if suffix not in OUTPUT_SUFFIXES:
        raise LorafitError(
            f"--output: {output} has suffix {suffix!r}; expected one of {', '.join(OUTPUT_SUFFIXES)} or - for JSON lines on stdout"
        )
    if path.exists() and not overwrite:
        raise LorafitError(f"--output: {output} already exists; pass --overwrite to replace it or pick another file")
    if not path.parent.is_dir():
        raise LorafitError(f"--output: folder {path.parent} does not exist; create it first or pick another path")


def _write_frame(df: pd.DataFrame, f, suffix: str) -> None:
    """Write to the binary file `f`."""
    if suffix == ".parquet":
        df.to_parquet(f, index=False)
        return
    if suffix in (".csv", ".tsv"):
        text = df.to_csv(index=False, sep="\t" if suffix == ".tsv" else ",")
    else:
        text = df.to_json(orient="records", lines=True, force_ascii=False)
    f.write(text.encode("utf-8"))


def write_output(df: pd.DataFrame, output: str) -> None:
    """Write to a temporary sibling file and rename it: a failure never leaves a partial output file."""
    if output == "-":
        text = df.to_json(orient="records", lines=True, force_ascii=False)
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
        return
    path = Path(output)
    atomic_write(path, lambda f: _write_frame(df, f, path.suffix.lower()))


def predictions_frame(
    ids_name: str,
    ids: pd.Series,
    logits: np.ndarray,
    label_names: list[str],
    label_column: str,
    labels: str,
    proba: bool,
) -> pd.DataFrame:
    pred = logits.argmax(-1)
    out = {
        ids_name: ids.to_numpy(),
        label_column: pred if labels == "ids" else np.asarray(label_names, dtype=object)[pred],
    }
    if proba:
        p = softmax(logits)
        for j, name in enumerate(label_names):
            out[f"proba_{name}"] = p[:, j]
    return pd.DataFrame(out)


def main(
    run_dir: Path,
    source: str,
    output: str,
    id_column: str | None = None,
    label_column: str = "label",
    labels: str = "names",
    proba: bool = False,
    overwrite: bool = False,
    precision: str | None = None,
) -> pd.DataFrame:
    """`lorafit predict`: label every row of `source` and write ids, labels (and probabilities) to `output`."""

    def note(msg: str) -> None:  # stdout may carry the predictions
        print(msg, file=sys.stderr, flush=True)

    # every check that needs no model first: a bad input fails in a second, not after loading the model
    check_output(output, overwrite)
    cfg = runs.read_run_config(run_dir)
    label_names = runs.read_labels(run_dir)
    where = "stdin" if source == "-" else source
    df = read_input(source)
    ids_name, ids = row_ids(df, id_column, where)
    if label_column == ids_name:
        raise LorafitError(
            f"--label-column {label_column!r} is also the id column; pick another --label-column or --id-column"
        )
    texts, empty = texts_of_frame(df, cfg, label_names, where)
    clf = load(run_dir, precision)
    if empty:
        note(f"note: {where}: {empty} of {len(df)} rows have empty text; they get the model's guess for an empty text")
    if clf.run.blend is not None:
        note(f"note: {blend_note(clf.run.blend)}")
    start = time.perf_counter()
    logits = clf.logits_of_prepared(texts, "predict")
    seconds = time.perf_counter() - start
    out = predictions_frame(ids_name, ids, logits, clf.label_names, label_column, labels, proba)
    write_output(out, output)
    note(
        f"predicted {len(out):,} rows in {seconds:.1f}s ({len(out) / max(seconds, 1e-9):,.0f} rows/s) -> {'stdout' if output == '-' else output}"
    )
    return out
