"""Reading training, validation and test data into clean (texts, label ids) splits.

Every problem with a file (missing, unreadable, wrong columns, bad labels) is a one-line LorafitError that
names the file and says what was expected. Rows with empty or missing text are dropped and counted.
"""

from __future__ import annotations

import codecs
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from . import preprocess
from .config import Config, DataConfig
from .errors import LorafitError
from .models import hub_reachable

AG_NEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]
BUILTIN_DATA = {
    "builtin:ag_news_sample": "ag_news_sample.parquet",
    "builtin:ag_news_sample_test": "ag_news_sample_test.parquet",
}
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl", ".json")


@dataclass
class Split:
    texts: list[str]
    labels: np.ndarray  # int64 class ids; -1 where the data had no label (prediction input)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class Data:
    train: Split
    val: Split
    test: Split | None
    label_names: list[str]


def builtin_path(source: str) -> Path:
    if source not in BUILTIN_DATA:
        raise LorafitError(
            f"unknown builtin data set {source!r}; expected one of {sorted(BUILTIN_DATA)} or a file path"
        )
    return Path(str(resources.files("lorafit") / "builtin" / BUILTIN_DATA[source]))


def read_table(source: str, role: str = "data.source") -> pd.DataFrame:
    """Read a data source into a DataFrame: builtin:NAME, hub:NAME[:SPLIT], or a .csv/.tsv/.parquet/.jsonl file."""
    if source.startswith("builtin:"):
        return pd.read_parquet(builtin_path(source))
    if source.startswith("hub:"):
        return _read_hub(source, role)
    path = Path(source)
    if path.is_dir():
        raise LorafitError(f"{role}: {source} is a folder; expected a .csv, .parquet or .jsonl file inside it")
    if not path.is_file():
        raise LorafitError(
            f"{role}: file {source} not found; expected a .csv, .parquet or .jsonl file, builtin:ag_news_sample or hub:NAME"
        )
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise LorafitError(f"{role}: {source} has suffix {suffix!r}; expected one of {', '.join(TABLE_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise LorafitError(f"{role}: {source} is empty; expected a header and rows")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if suffix in (".csv", ".tsv"):
                df = pd.read_csv(
                    path,
                    sep="\t" if suffix == ".tsv" else ",",
                    encoding="utf-8-sig",
                    dtype=str,
                    keep_default_na=False,
                    na_values=[""],
                    on_bad_lines="error",
                )
            elif suffix == ".parquet":
                df = pd.read_parquet(path)
            else:  # JSON lines; a .json file may also hold one array of records
                with open(path, "rb") as fh:
                    array = suffix == ".json" and fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
                df = pd.read_json(path, lines=not array, encoding="utf-8-sig", dtype=False)
    except UnicodeDecodeError as e:
        raise LorafitError(
            f"{role}: {source} is not valid UTF-8 ({_first_bad_byte(path, e)}); re-save it as UTF-8"
        ) from None
    except pd.errors.EmptyDataError:
        raise LorafitError(f"{role}: {source} has no columns; expected a header row and data") from None
    except pd.errors.ParserError as e:
        raise LorafitError(
            f"{role}: {source} could not be parsed as {suffix[1:]}: {str(e).strip().splitlines()[-1]}; check quoting and the number of fields per row"
        ) from None
    except OSError as e:  # unreadable: permissions, I/O errors
        raise LorafitError(
            f"{role}: {source} could not be read ({e.strerror or str(e).splitlines()[0]}); expected a readable {suffix[1:]} file"
        ) from None
    except ValueError as e:  # malformed JSON lines
        raise LorafitError(f"{role}: {source} could not be parsed as {suffix[1:]}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # pyarrow errors for broken parquet files
        if type(e).__module__.startswith("pyarrow"):
            raise LorafitError(f"{role}: {source} is not a readable parquet file ({str(e).splitlines()[0]})") from None
        raise
    if len(df) == 0:
        raise LorafitError(f"{role}: {source} has a header but no rows; expected at least one row")
    return df


def _first_bad_byte(path: Path, err: UnicodeDecodeError) -> str:
    """'line L, byte B' of the first byte that is not UTF-8 (the reader's own offset is relative to its buffer)."""
    data = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        start = bom + e.start
        line = data.count(b"\n", 0, start) + 1
        return f"line {line}, byte {start}"
    return f"byte {err.start}"


def _read_hub(source: str, role: str) -> pd.DataFrame:
    name, _, split = source[4:].partition(":")
    split = split or ("test" if role == "data.test_source" else "train")
    if not hub_reachable():
        raise LorafitError(
            f"{role}={source!r}: the Hugging Face hub is unreachable; offline alternatives: builtin:ag_news_sample or a local .csv/.parquet/.jsonl file"
        )
    import datasets

    try:
        return datasets.load_dataset(name, split=split).to_pandas()
    except Exception as e:
        raise LorafitError(
            f"{role}={source!r}: could not load split {split!r} from the hub ({str(e).splitlines()[0]})"
        ) from None


def _delimiter_hint(df: pd.DataFrame) -> str:
    """A file read as one column whose name holds another separator was written with that separator."""
    if len(df.columns) == 1:
        for sep, name in ((";", "semicolon"), ("\t", "tab"), ("|", "pipe")):
            if sep in str(df.columns[0]):
                return (
                    f" (the header looks {name}-separated: .csv files are read comma-separated and .tsv tab-separated; "
                    f"re-save it with commas{' or rename it to .tsv' if sep == chr(9) else ''})"
                )
    return ""


def join_texts(df: pd.DataFrame, columns: list[str], source: str) -> pd.Series:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise LorafitError(
            f"{source}: text column(s) {missing} not found; the file has columns {list(df.columns)}{_delimiter_hint(df)}; set data.text_columns"
        )
    parts = [df[c].where(df[c].notna(), "").astype(str).str.strip() for c in columns]
    text = parts[0]
    for p in parts[1:]:
        text = (text + " " + p).str.strip()
    return text


def infer_label_names(df: pd.DataFrame, cfg: DataConfig) -> list[str]:
    """Class names for the run: from the config, the builtin data set, or the training labels."""
    if cfg.label_names:
        if len(set(cfg.label_names)) != len(cfg.label_names):
            raise LorafitError(f"data.label_names has duplicates: {cfg.label_names}; expected distinct class names")
        return list(cfg.label_names)
    if cfg.source.startswith("builtin:ag_news"):
        return list(AG_NEWS_LABELS)
    if cfg.label_column not in df.columns:
        raise LorafitError(
            f"{cfg.source}: label column {cfg.label_column!r} not found; the file has columns {list(df.columns)}{_delimiter_hint(df)}; set data.label_column"
        )
    values = df[cfg.label_column].dropna()
    ints = pd.to_numeric(values, errors="coerce")
    numbers = len(values) and ints.notna().all() and np.isfinite(ints).all()
    if numbers and not (ints == ints.round()).all():  # e.g. a regression target or probabilities, not classes
        fractional = values[ints != ints.round()]
        raise LorafitError(
            f"{cfg.source}: column {cfg.label_column!r} holds numbers that are not integers ({len(fractional)} rows, e.g. "
            f"{str(fractional.iloc[0]).strip()}); labels are class ids 0..C-1 or class names: pick the class column with "
            "data.label_column, or name the classes with data.label_names"
        )
    if numbers and ints.min() >= 0:
        distinct = ints.nunique()
        if ints.max() + 1 > max(2 * distinct, 100):  # not ids 0..C-1 but codes such as years: C would be huge
            largest = str(values.iloc[int(np.argmax(ints.to_numpy()))]).strip()
            raise LorafitError(
                f"{cfg.source}: column {cfg.label_column!r} holds integers up to {largest} but only {distinct} distinct values; "
                f"integer labels are class ids 0..C-1: renumber them, or name the classes with data.label_names (e.g. {sorted(values.astype(str).str.strip().unique())[:3]})"
            )
        return [str(i) for i in range(int(ints.max()) + 1)]
    return sorted(values.astype(str).str.strip().unique())


def known_num_labels(cfg: Config) -> int | None:
    """The number of classes when the config tells it without reading any data (label_names or a builtin set)."""
    if cfg.data.label_names:
        return len(cfg.data.label_names)
    if cfg.data.source.startswith("builtin:ag_news"):
        return len(AG_NEWS_LABELS)
    return None


def num_labels(cfg: Config) -> int:
    """The number of classes of cfg's run: from the config, else from the training data's labels."""
    known = known_num_labels(cfg)
    return known if known is not None else len(infer_label_names(read_table(cfg.data.source), cfg.data))


def _label_ids(series: pd.Series, names: list[str], source: str, column: str) -> np.ndarray:
    """Map a label column (ids or names) to class ids; -1 for missing labels."""
    ids = np.full(len(series), -1, dtype=np.int64)
    present = series.notna().to_numpy()
    values = series[present]
    as_int = pd.to_numeric(values, errors="coerce")
    index = {n: i for i, n in enumerate(names)}
    if (
        len(values)
        and as_int.notna().all()
        and np.isfinite(as_int).all()
        and (as_int == as_int.round()).all()
        and as_int.abs().max() < 2**62
    ):
        mapped = as_int.astype(np.int64).to_numpy()
        bad = (mapped < 0) | (mapped >= len(names))
        if bad.any() and all(str(v).strip() in index for v in values):  # names that happen to be digits
            mapped, bad = np.array([index[str(v).strip()] for v in values]), np.zeros(len(values), bool)
        if bad.any():
            found = sorted(set(mapped[bad].tolist()))[:5]
            raise LorafitError(
                f"{source}: {int(bad.sum())} row(s) of column {column!r} have class ids {found} outside 0..{len(names) - 1} (data.label_names has {len(names)} classes: {names}); fix the labels or data.label_names"
            )
    else:
        strings = values.astype(str).str.strip()
        unknown = sorted(set(strings) - set(index))
        if unknown:
            raise LorafitError(
                f"{source}: {int(strings.isin(unknown).sum())} row(s) of column {column!r} have labels {unknown[:5]} not in data.label_names {names}; add them to data.label_names or fix the rows"
            )
        mapped = strings.map(index).to_numpy(dtype=np.int64)
    ids[present] = mapped
    return ids


def to_split(df: pd.DataFrame, cfg: DataConfig, names: list[str], source: str, require_labels: bool = True) -> Split:
    """Join text columns, map labels, drop rows without text (and, for training data, without label)."""
    text = join_texts(df, cfg.text_columns, source)
    notes = []
    if require_labels or cfg.label_column in df.columns:
        if cfg.label_column not in df.columns:
            raise LorafitError(
                f"{source}: label column {cfg.label_column!r} not found; the file has columns {list(df.columns)}{_delimiter_hint(df)}; set data.label_column"
            )
        labels = _label_ids(df[cfg.label_column], names, source, cfg.label_column)
    else:
        labels = np.full(len(df), -1, dtype=np.int64)
    keep = (text != "").to_numpy().copy()
    if (~keep).any():
        notes.append(f"{source}: dropped {int((~keep).sum())} of {len(df)} rows with empty or missing text")
    if require_labels:
        if (labels < 0).all():
            raise LorafitError(
                f"{source}: column {cfg.label_column!r} has no labels (all {len(df)} empty or NaN); expected a class id or name per row"
            )
        unlabeled = keep & (labels < 0)
        if unlabeled.any():
            notes.append(f"{source}: dropped {int(unlabeled.sum())} of {len(df)} rows with a missing label")
        keep &= labels >= 0
    if not keep.any():
        raise LorafitError(
            f"{source}: no usable rows (every row lacks text or label); expected text in {cfg.text_columns}"
        )
    texts = preprocess.apply(text[keep].tolist(), cfg.preprocess)
    return Split(texts=texts, labels=labels[keep], notes=notes)


def _stratified_take(split: Split, n: int, seed: int) -> tuple[Split, Split]:
    """Take n rows stratified by label; return (taken, rest)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(split))
    counts = np.bincount(split.labels)
    stratify = split.labels if counts[counts > 0].min() >= 2 and n >= (counts > 0).sum() else None
    taken, rest = train_test_split(idx, train_size=n, random_state=seed, stratify=stratify)
    pick = lambda ix: Split([split.texts[i] for i in ix], split.labels[ix])  # noqa: E731
    return pick(np.sort(taken)), pick(np.sort(rest))


def load_data(cfg: DataConfig, seed: int) -> Data:
    """Training, validation and (optional) test splits. Validation comes from val_source or the training
    source (stratified, seeded); the test source is only ever scored, never used for selection."""
    df = read_table(cfg.source, "data.source")
    names = infer_label_names(df, cfg)
    train = to_split(df, cfg, names, cfg.source)
    notes = list(train.notes)
    present = np.unique(train.labels)
    if len(present) < 2:
        raise LorafitError(
            f"{cfg.source}: the training data has a single class ({names[present[0]]!r}); a classifier needs at least two"
        )
    if cfg.val_source:
        val = to_split(read_table(cfg.val_source, "data.val_source"), cfg, names, cfg.val_source)
        notes += val.notes
    else:
        n_val = max(int(round(cfg.val_fraction * len(train))), len(present))
        if n_val >= len(train):
            raise LorafitError(
                f"{cfg.source}: {len(train)} rows are too few to hold out data.val_fraction={cfg.val_fraction}; add rows or give data.val_source"
            )
        val, train = _stratified_take(train, n_val, seed)
    if cfg.max_train_samples and cfg.max_train_samples < len(train):
        train, _ = _stratified_take(train, cfg.max_train_samples, seed)
    test = None
    if cfg.test_source:
        test = to_split(read_table(cfg.test_source, "data.test_source"), cfg, names, cfg.test_source)
        notes += test.notes
    train.notes = notes
    return Data(train=train, val=val, test=test, label_names=names)
