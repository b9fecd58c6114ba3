"""Bad input, tried systematically through the command line.

Every broken data file, config or model path in the corpus below must end `lorafit train` (or `lorafit eval`) with
exactly one line `lorafit: error: ...` that names the file, row or key, a non-zero exit, no traceback and no output
folder. Odd but valid files (BOM, CRLF, a 1 MB text, duplicated ids, ...) must train. Hypothesis then throws
generated configs, `--set` values and CSV files at the loaders: accepted and valid, or a LorafitError, never
another exception. The number of cases tried is printed at the end of the test run (conftest.py).

The loaders' messages are checked word for word in test_data_errors.py and test_config.py; this module is about
the contract at the command line, over the whole corpus.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafit.cli import main
from lorafit.config import METHODS, Config, DataConfig, all_keys, load_config, validate
from lorafit.data import load_data
from lorafit.errors import LorafitError


@pytest.fixture(autouse=True)
def keep_threads():
    """`lorafit train` sets torch's thread count; give the next test what it had."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def fails_in_one_line(capsys, tmp_path: Path, argv: list[str]) -> str:
    """Run the CLI in-process (an exception other than LorafitError would propagate: a traceback, the test fails)."""
    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("lorafit: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "runs").exists(), "no (partial) output may be left behind"
    return lines[0]


def train_args(tmp_path: Path, *items: str) -> list[str]:
    return ["train", *sum((["--set", item] for item in items), []), "-o", str(tmp_path / "runs" / "r")]


def rows(n: int = 10, labels=("0", "1")) -> str:
    return "".join(f"row {i} of {lab},{lab}\n" for lab in labels for i in range(n))


# ---------------------------------------------------------------------------------------------------------------------
# Training data files: (file name, content, extra --set items, what the message must name)

GOOD = "text,label\n" + rows()
DATA_CASES = {
    "truncated-csv": (
        "cut.csv",
        'text,label\n"hello, world,0\nmore,1\n',
        [],
        ["cut.csv could not be parsed as csv", "quoting"],
    ),
    "ragged-csv": ("ragged.csv", "text,label\nhello,0\nworld,1,extra\nfoo,0\n", [], ["ragged.csv", "line 3"]),
    "semicolon-delimiter": (
        "semi.csv",
        "text;label\n" + rows().replace(",", ";"),
        [],
        ["semi.csv", "semicolon-separated"],
    ),
    "tab-delimiter-in-csv": (
        "tabs.csv",
        "text\tlabel\n" + rows().replace(",", "\t"),
        [],
        ["tabs.csv", "tab-separated", ".tsv"],
    ),
    "latin1-bytes": (
        "latin1.csv",
        b"text,label\nok,0\nfine,1\ncaf\xe9,0\n",
        [],
        ["latin1.csv is not valid UTF-8", "line 4"],
    ),
    "utf16": ("utf16.csv", "text,label\na,0\nb,1\n".encode("utf-16"), [], ["utf16.csv is not valid UTF-8", "line 1"]),
    "binary-garbage": ("garbage.csv", bytes(range(256)) * 8, [], ["garbage.csv is not valid UTF-8"]),
    "empty-file": ("empty.csv", b"", [], ["empty.csv is empty"]),
    "blank-lines": ("blank.csv", "\n\n\n", [], ["blank.csv has no columns"]),
    "header-only": ("header.csv", "text,label\n", [], ["header.csv has a header but no rows"]),
    "all-nan-labels": (
        "nolabels.csv",
        "text,label\na,\nb,\nc,\n",
        [],
        ["nolabels.csv", "column 'label' has no labels"],
    ),
    "labels-not-in-label-names": (
        "names.csv",
        "text,label\n" + rows(labels=("neg", "pos")) + "x,neutral\n",
        ["data.label_names=[neg,pos]"],
        ["names.csv", "labels ['neutral'] not in data.label_names"],
    ),
    "ids-outside-label-names": (
        "ids.csv",
        GOOD + "x,7\n",
        ["data.label_names=[a,b]"],
        ["ids.csv", "class ids [7] outside 0..1"],
    ),
    "single-class": ("one.csv", "text,label\n" + rows(labels=("spam",)), [], ["one.csv", "single class ('spam')"]),
    "codes-not-ids": (
        "years.csv",
        "text,label\n" + rows(labels=("2019", "2020")),
        [],
        ["years.csv", "integers up to 2020", "data.label_names"],
    ),
    "huge-label-id": (
        "huge.csv",
        "text,label\n" + rows(labels=("0", str(10**30))),
        [],
        ["huge.csv", "integers up to 1" + "0" * 30],
    ),
    "missing-text-column": (
        "cols.csv",
        "sentence,label\n" + rows(),
        [],
        ["cols.csv", "text column(s) ['text'] not found", "['sentence', 'label']"],
    ),
    "missing-label-column": (
        "cols.csv",
        "text,category\n" + rows(),
        [],
        ["cols.csv", "label column 'label' not found"],
    ),
    "no-text-at-all": ("notext.csv", "text,label\n,0\n  ,1\n", [], ["notext.csv: no usable rows"]),
    "too-few-rows": ("tiny.csv", "text,label\na,0\nb,1\n", [], ["tiny.csv", "too few to hold out data.val_fraction"]),
    "duplicate-label-names": ("dup.csv", GOOD, ["data.label_names=[a,a]"], ["data.label_names has duplicates"]),
    "broken-parquet": ("broken.parquet", b"PAR1" + bytes(range(200)) + b"PAR1", [], ["broken.parquet", "parquet"]),
    "broken-jsonl": (
        "broken.jsonl",
        '{"text": "a", "label": 0}\n{"text": \n',
        [],
        ["broken.jsonl could not be parsed as jsonl"],
    ),
    "json-scalar": ("scalar.json", "42", [], ["scalar.json", "not found"]),
    "unsupported-suffix": ("data.txt", GOOD, [], ["data.txt has suffix '.txt'"]),
    "missing-file": (None, None, [], ["data.source", "nope.csv not found"]),
    "folder-not-file": ("", None, [], ["is a folder"]),
    "bad-val-source": ("ok.csv", GOOD, ["data.val_source={tmp}/val.csv"], ["data.val_source", "val.csv not found"]),
    "bad-test-labels": (
        "ok.csv",
        GOOD,
        ["data.test_source={tmp}/ok2.csv"],
        ["ok2.csv", "labels ['maybe'] not in data.label_names"],
    ),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_training_data(case, tmp_path, tiny_bert, capsys, cases_tried):
    name, content, extra, expected = DATA_CASES[case]
    if name is None:
        path = tmp_path / "nope.csv"
    elif name == "":
        path = tmp_path
    else:
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    (tmp_path / "ok2.csv").write_text(GOOD + "x,maybe\n")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    msg = fails_in_one_line(
        capsys,
        tmp_path,
        train_args(tmp_path, f"model.name={tiny_bert}", f"data.source={path}", "speed.num_threads=1", *extra),
    )
    for part in expected:
        assert part in msg, msg
    cases_tried["training-data"] += 1


def test_odd_but_valid_data_trains_and_evaluates(tmp_path, tiny_bert, capsys, cases_tried):
    """BOM, CRLF line ends, a quoted newline, an unused id column with duplicates, an extra column and one 1 MB text."""
    huge = " ".join(["word"] * 200_000)  # 1 MB: truncated to model.max_length tokens
    lines = (
        ["id,text,extra,label"]
        + [f"{i // 2},row {i},x,{i % 2}" for i in range(40)]
        + ['7,"two\nlines",x,0', f"7,{huge},x,1"]
    )
    path = tmp_path / "odd.csv"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8") + b"\r\n")
    assert path.stat().st_size > 1_000_000
    out = tmp_path / "run"
    args = [
        "train",
        "--set",
        f"model.name={tiny_bert}",
        "--set",
        f"data.source={path}",
        "--set",
        "train.max_steps=2",
        "--set",
        "train.batch_size=8",
        "--set",
        "data.val_fraction=0.25",
        "--set",
        "speed.num_threads=1",
        "--set",
        "model.max_length=32",
        "-o",
        str(out),
    ]
    assert main(args) == 0, capsys.readouterr().err
    assert main(["eval", str(out), "--data", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "samples: 42" in printed  # every row, the 1 MB one and the two-line one included
    cases_tried["odd-but-valid"] += 6


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation data and run folders


EVAL_CASES = {
    "latin1-bytes": ("latin1.csv", b"text,label\ncaf\xe9,0\n", ["latin1.csv is not valid UTF-8 (line 2"]),
    "missing-text-column": ("cols.csv", b"body,label\na,0\n", ["cols.csv", "text column(s) ['text'] not found"]),
    "unknown-label": ("names.csv", b"text,label\na,0\nb,9\n", ["names.csv", "class ids [9] outside 0..3"]),
    "empty-file": ("empty.csv", b"", ["empty.csv is empty"]),
    "ragged-csv": ("ragged.csv", b"text,label\na,0\nb,1,2\n", ["ragged.csv", "line 3"]),
    "missing-file": (None, None, ["nope.csv not found"]),
}


@pytest.mark.parametrize("case", EVAL_CASES)
def test_bad_evaluation_data(case, tmp_path, tiny_run, capsys, cases_tried):
    name, content, expected = EVAL_CASES[case]
    path = tmp_path / (name or "nope.csv")
    if content is not None:
        path.write_bytes(content)
    msg = fails_in_one_line(capsys, tmp_path, ["eval", str(tiny_run), "--data", str(path)])
    for part in expected:
        assert part in msg, msg
    cases_tried["evaluation-data"] += 1


@pytest.mark.parametrize("case", ["missing", "empty-folder", "half-written"])
def test_eval_of_something_that_is_not_a_run(case, tmp_path, small_csv, capsys, cases_tried):
    folder = tmp_path / "run"
    if case != "missing":
        folder.mkdir()
    if case == "half-written":
        (folder / "config.yaml").write_text("lora: {r: 4}\n")
    msg = fails_in_one_line(capsys, tmp_path, ["eval", str(folder), "--data", str(small_csv)])
    assert str(folder) in msg and ("not found" in msg if case == "missing" else "not a complete lorafit run" in msg)
    cases_tried["run-folders"] += 1


# ---------------------------------------------------------------------------------------------------------------------
# Configs: files, values, types


LEAF_KEYS = [key for key, _, _ in all_keys()]
WRONG = {"wrong": [1]}  # a type no key accepts: not a string, number, list or flag; a dict of the wrong shape


CONFIG_FILES = {
    "bad-indentation": ("lora:\n  r: 8\n bad: 1\n", ["run.yaml", "YAML syntax error at line 3"]),
    "tab-indentation": ("lora:\n\tr: 8\n", ["run.yaml", "YAML syntax error at line 2"]),
    "unclosed-bracket": ("train:\n  lr: 0.1\nlora: {r: 8\n", ["run.yaml", "YAML syntax error at line 4"]),
    "unclosed-quote": ("train:\n  scheduler: 'cosine\n", ["run.yaml", "YAML syntax error"]),
    "not-a-mapping": ("- lora\n- train\n", ["run.yaml", "expected a mapping of sections", "found list"]),
    "scalar-section": ("lora: 8\n", ["lora: got 8: expected a section"]),
    "python-tag": ("lora: !!python/object:os.system {}\n", ["run.yaml", "YAML syntax error"]),
    "not-utf8": (b"model:\n  name: caf\xe9\n", ["run.yaml: not UTF-8"]),
}


@pytest.mark.parametrize("case", CONFIG_FILES)
def test_bad_config_file(case, tmp_path, capsys, cases_tried):
    text, expected = CONFIG_FILES[case]
    path = tmp_path / "run.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    msg = fails_in_one_line(capsys, tmp_path, ["train", "-c", str(path), "-o", str(tmp_path / "runs" / "r")])
    for part in expected:
        assert part in msg, msg
    cases_tried["config-files"] += 1


def test_missing_config_file(tmp_path, capsys, cases_tried):
    msg = fails_in_one_line(
        capsys, tmp_path, ["train", "-c", str(tmp_path / "nope.yaml"), "-o", str(tmp_path / "runs" / "r")]
    )
    assert "nope.yaml not found" in msg
    cases_tried["config-files"] += 1


def test_a_config_with_every_key_wrong_names_every_key(tmp_path, capsys, cases_tried):
    data: dict = {}
    for key in LEAF_KEYS:
        *sections, leaf = key.split(".")
        node = data
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = WRONG
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    msg = fails_in_one_line(capsys, tmp_path, ["train", "-c", str(path), "-o", str(tmp_path / "runs" / "r")])
    assert f"{len(LEAF_KEYS)} problem(s)" in msg
    assert [k for k in LEAF_KEYS if f"{k}: got" not in msg and f"'{k}." not in msg and f"{k}." not in msg] == []
    cases_tried["config-files"] += 1


@pytest.mark.parametrize("key", LEAF_KEYS)
def test_wrong_type_for_each_key(key, tmp_path, capsys, cases_tried):
    msg = fails_in_one_line(capsys, tmp_path, train_args(tmp_path, f"{key}={{wrong: [1]}}"))
    assert "1 problem(s)" in msg and key in msg
    cases_tried["config-types"] += 1


BAD_VALUES = {
    "lora.r=0": "greater than 0",
    "lora.r=-1": "greater than 0",
    "lora.r=2.5": "integer",
    "lora.r=abc": "valid integer",
    "lora.dropout=1": "less than 1",
    "lora.dropout=1.5": "less than 1",
    "lora.dropout=-0.1": "greater than or equal to 0",
    "lora.alpha=0": "greater than 0",
    "lora.target_modules=(": "not a valid regular expression",
    "lora.rank_pattern={'[': 4}": "not a valid regular expression",
    "lora.alpha_pattern={x: -1}": "alphas must be positive",
    "lora.init=kaiming": "pissa_niter_N",
    "lora.bias=some": "'none', 'all' or 'lora_only'",
    "train.scheduler=warmup_cosine": "'cosine', 'linear', 'constant' or 'reduce_on_plateau'",
    "train.lr=0": "greater than 0",
    "train.lr=.nan": "finite number",
    "train.lr=.inf": "finite number",
    "train.batch_size=0": "greater than 0",
    "train.epochs=-1": "greater than 0",
    "train.warmup_ratio=1": "less than 1",
    "eval.every=0": "positive number of steps",
    "eval.every=never": "'epoch' or a valid integer",
    "train.precision=fp64": "'auto', 'fp32', 'bf16' or 'fp16'",
    "eval.early_stopping.metric=acc": "'val_loss'",
    "checkpoint.every=0": "greater than 0",
    "checkpoint.keep=0": "greater than 0",
    "model.max_length=0": "greater than 0",
    "model.head=mlp": "'default', 'linear' or 'mean'",
    "data.val_fraction=0": "greater than 0",
    "data.text_columns=[]": "at least 1 item",
    "data.preprocess=[lower]": "'lowercase'",
    "budget.max_trainable=-5": "greater than 0",
    "lora.rank=8": "did you mean 'lora.r'?",
    "trian.lr=1": "did you mean 'train'?",
}


@pytest.mark.parametrize("item", BAD_VALUES)
def test_bad_config_value(item, tmp_path, capsys, cases_tried):
    msg = fails_in_one_line(capsys, tmp_path, train_args(tmp_path, item))
    key = item.split("=")[0]
    assert (f"unknown key '{key.split('.')[0]}'" if key.startswith("trian") else key) in msg and BAD_VALUES[
        item
    ] in msg, msg
    cases_tried["config-values"] += 1


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--set", "lora.r"], "expected KEY=VALUE"),
        (["--set", "lora.target_modules=[query"], "not valid YAML"),
        (["--set", "lora.r.x=1"], "lora.r: got {'x': 1}"),
        (["--resume"], "expected one argument"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
    ids=["no-equals", "bad-yaml-value", "below-a-value", "resume-without-run", "unknown-flag"],
)
def test_bad_command_line(argv, expected, tmp_path, capsys, cases_tried):
    try:
        msg = fails_in_one_line(capsys, tmp_path, ["train", *argv, "-o", str(tmp_path / "runs" / "r")])
    except SystemExit as e:  # argparse's own usage errors exit from parse_args, still as one line
        assert e.code == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("lorafit: error: "), err
        msg = err
    assert expected in msg
    cases_tried["command-line"] += 1


# ---------------------------------------------------------------------------------------------------------------------
# Model paths


def _model_case(tmp_path: Path, tiny_bert: Path, case: str) -> str:
    if case == "missing-absolute":
        return str(tmp_path / "no" / "model")
    if case == "missing-relative":
        return "./no-such-model"
    if case == "unknown-builtin":
        return "builtin:bert"
    if case == "hub-id-offline":
        return "someone/no-such-model"
    folder = tmp_path / case
    folder.mkdir()
    if case == "broken-config":
        (folder / "config.json").write_text("{not json")
    elif case == "no-weights":
        (folder / "config.json").write_text((tiny_bert / "config.json").read_text())
    elif case == "unknown-architecture":
        (folder / "config.json").write_text('{"model_type": "no-such-architecture"}')
    return str(folder)  # "no-config": an empty folder


MODEL_CASES = {
    "missing-absolute": "no such folder",
    "missing-relative": "no such folder",
    "unknown-builtin": "unknown builtin model",
    "hub-id-offline": "hub is unreachable",
    "no-config": "has no config.json",
    "broken-config": "could not load the config",
    "no-weights": "could not load the weights",
    "unknown-architecture": "could not load the config",
}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_bad_model_path(case, tmp_path, tiny_bert, small_csv, capsys, cases_tried):
    name = _model_case(tmp_path, tiny_bert, case)
    msg = fails_in_one_line(
        capsys, tmp_path, train_args(tmp_path, f"model.name={name}", f"data.source={small_csv}", "speed.num_threads=1")
    )
    assert f"model.name={name!r}" in msg or repr(name) in msg
    assert MODEL_CASES[case] in msg, msg
    cases_tried["model-paths"] += 1


# ---------------------------------------------------------------------------------------------------------------------
# Generated inputs (hypothesis): accepted and valid, or a LorafitError, never another exception

SECTIONS = {  # the sections; `method` is a top-level key of its own
    name: field.annotation
    for name, field in Config.model_fields.items()
    if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields")
}
SECTION_KEYS = {name: list(ann.model_fields) for name, ann in SECTIONS.items()}
SECTION_KEYS["train"].append("early_stopping")

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["epoch", "all-linear", "cosine", "fp32", "default", "val_loss", "(", "[a-z]+", "query", "1e-4"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.text(max_size=6), st.integers()), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def config_dicts(draw):
    """Mostly real sections and keys (some with values of the right kind), plus misspellings and junk."""
    out = {}
    if draw(st.integers(0, 2)) == 0:
        out["method"] = draw(st.one_of(st.sampled_from([*METHODS, "dora"]), values))
    for section in draw(st.lists(st.sampled_from([*SECTIONS, "trian", "x"]), max_size=5, unique=True)):
        if draw(st.integers(0, 9)) == 0:
            out[section] = draw(values)
            continue
        keys = draw(
            st.lists(
                st.sampled_from(SECTION_KEYS.get(section, ["lr"]) + ["rank", "learning_rate", "zz"]),
                max_size=6,
                unique=True,
            )
        )
        out[section] = {}
        for key in keys:
            default = getattr(getattr(Config(), section), key, None) if section in SECTIONS else None
            plausible = (
                st.just(default)
                if not hasattr(default, "model_dump")
                else st.fixed_dictionaries(
                    {}, optional={"patience": st.integers(-2, 5), "metric": st.sampled_from(["val_loss", "acc"])}
                )
            )
            # mostly sensible: some configs pass
            out[section][key] = draw(st.one_of(plausible, plausible, plausible, values))
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(config_dicts(), values))
def test_generated_configs_are_valid_or_lorafit_errors(data, cases_tried):
    cases_tried["generated-configs"] += 1
    try:
        cfg = validate(data, "generated")
    except LorafitError as e:
        assert "\n" not in str(e)
        return
    # accepted: a valid config that survives being saved and read back as YAML
    again = validate(yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False)), "round trip")
    assert again == cfg


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(LEAF_KEYS + ["lora.rank", "x.y", "train"]), raw=st.text(max_size=30))
def test_generated_set_values_are_valid_or_lorafit_errors(key, raw, cases_tried):
    cases_tried["generated-set-values"] += 1
    try:
        load_config(None, [f"{key}={raw}"])
    except LorafitError as e:
        assert "\n" not in str(e)


plain = st.text(st.characters(blacklist_characters=',"\r\n', blacklist_categories=("Cs",)), max_size=8)
texts = st.one_of(
    plain,
    plain,
    plain,
    st.text(max_size=8),
    st.sampled_from(["hello world", "", " ", '"quoted, comma"', '"open', "a,b", "\u00e9t\u00e9", "\x00"]),
)
labels = st.one_of(
    st.sampled_from(["0", "1", "2", "a", "b", "", "nan", "-1", "1.5", "inf", "1e400", "99999999999999999999", "2020"]),
    st.text(max_size=4),
)


@st.composite
def csv_bytes(draw):
    """Mostly text,label rows over a few classes (many files load), with stray cells, quotes, odd labels and bytes."""
    header = draw(st.sampled_from(["text,label"] * 4 + ["text;label", "label,text", "text", "text,label,label", ""]))
    lines = []
    for _ in range(draw(st.integers(0, 40))):
        cells = [draw(texts), draw(st.sampled_from(["0", "1", "2"])) if draw(st.integers(0, 3)) else draw(labels)]
        if not draw(st.integers(0, 60)):  # a ragged row
            cells = draw(st.lists(st.one_of(texts, labels), max_size=4))
        lines.append(",".join(cells))
    data = (header + "\n" + "\n".join(lines)).encode("utf-8")
    if not draw(st.integers(0, 5)):
        data = draw(st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b"\xe9"])) + data
    return data


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(data=csv_bytes())
def test_generated_csv_files_load_or_fail_with_lorafit_errors(data, tmp_path, cases_tried):
    cases_tried["generated-csv-files"] += 1
    path = tmp_path / "gen.csv"
    path.write_bytes(data)
    try:
        loaded = load_data(DataConfig(source=str(path), val_fraction=0.2), 0)
    except LorafitError as e:
        assert "\n" not in str(e)
        return
    assert len(loaded.train) > 0 and len(loaded.val) > 0 and len(loaded.label_names) >= 2
    assert loaded.train.labels.min() >= 0 and loaded.train.labels.max() < len(loaded.label_names)
