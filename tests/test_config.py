"""The run configuration: YAML loading, `--set` overrides, one-line error messages, shipped configs, `lorafit keys`."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from lorafit.cli import main
from lorafit.config import Config, all_keys, load_config, parse_override, read_yaml, save_config, validate
from lorafit.errors import LorafitError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def error_of(overrides=(), path=None) -> str:
    """The LorafitError message of load_config; it must be a single line."""
    with pytest.raises(LorafitError) as e:
        load_config(path, list(overrides))
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def leaf_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every leaf key, walked independently of lorafit.config."""
    out = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += leaf_keys(field.annotation, prefix + name + ".")
        else:
            out.append(prefix + name)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Loading and overriding


def test_default_config_without_file():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.name == "builtin:minilm" and cfg.data.source == "builtin:ag_news_sample"


def test_yaml_file_loads_into_typed_sections(tmp_path):
    path = write(
        tmp_path,
        """
model:
  name: some/model
  max_length: 64
data:
  source: data/train.csv
  text_columns: [title, description]
  label_names: [neg, pos]
lora:
  r: 4
  target_modules: [query, value]
  rank_pattern: {'layer\\.[45]\\..*': 8}
train:
  lr: 2e-4
  eval_every: 50
  early_stopping:
    metric: val_macro_f1
budget:
  max_trainable: 1e6
""",
    )
    cfg = load_config(path)
    assert cfg.model.name == "some/model" and cfg.model.max_length == 64
    assert cfg.data.text_columns == ["title", "description"] and cfg.data.label_names == ["neg", "pos"]
    assert cfg.lora.r == 4 and cfg.lora.target_modules == ["query", "value"]
    assert cfg.lora.rank_pattern == {r"layer\.[45]\..*": 8}
    assert cfg.train.lr == pytest.approx(2e-4) and isinstance(cfg.train.lr, float)
    assert cfg.eval.every == 50 and cfg.eval.early_stopping.metric == "val_macro_f1"
    assert cfg.budget.max_trainable == 1_000_000 and isinstance(cfg.budget.max_trainable, int)
    # untouched keys keep their defaults
    assert cfg.lora.alpha == Config().lora.alpha and cfg.train.scheduler == "cosine"


def test_empty_yaml_file_is_the_default(tmp_path):
    assert load_config(write(tmp_path, "# nothing set\n")) == Config()


def test_set_values_are_parsed_as_yaml():
    cfg = load_config(
        None,
        [
            "lora.target_modules=[query,value]",
            "train.lr=1e-4",
            "lora.r=8",
            "lora.use_dora=true",
            "data.label_names=null",
            "eval.every=epoch",
        ],
    )
    assert cfg.lora.target_modules == ["query", "value"]
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(1e-4)
    assert cfg.lora.r == 8 and isinstance(cfg.lora.r, int)
    assert cfg.lora.use_dora is True
    assert cfg.data.label_names is None and cfg.eval.every == "epoch"


@pytest.mark.parametrize(
    "item, key, value",
    [
        ("lora.r=8", ["lora", "r"], 8),
        ("train.lr=1e-4", ["train", "lr"], 1e-4),  # PyYAML alone would give the string '1e-4'
        ("budget.max_trainable=1e6", ["budget", "max_trainable"], 1e6),
        ("train.lr=0.5", ["train", "lr"], 0.5),
        ("lora.target_modules=[query,value]", ["lora", "target_modules"], ["query", "value"]),
        ("lora.target_modules=query", ["lora", "target_modules"], "query"),
        ("data.source=a=b.csv", ["data", "source"], "a=b.csv"),  # only the first '=' splits
        ("lora.r=", ["lora", "r"], None),
        ("eval.early_stopping.metric=val_loss", ["eval", "early_stopping", "metric"], "val_loss"),
        (
            "train.early_stopping.metric=val_loss",
            ["eval", "early_stopping", "metric"],
            "val_loss",
        ),  # its name before the config sections split
    ],
)
def test_parse_override(item, key, value):
    k, v = parse_override(item)
    assert k == key and v == value and type(v) is type(value)


def test_set_overrides_the_file_and_keeps_its_other_keys(tmp_path):
    path = write(tmp_path, "lora:\n  r: 4\n  alpha: 32\ntrain:\n  lr: 0.01\n")
    cfg = load_config(path, ["lora.r=16", "train.batch_size=8"])
    assert (cfg.lora.r, cfg.lora.alpha, cfg.train.lr, cfg.train.batch_size) == (16, 32, 0.01, 8)


def test_set_without_equals_sign():
    msg = error_of(["lora.r"])
    assert "'lora.r'" in msg and "KEY=VALUE" in msg


def test_set_with_invalid_yaml_value():
    msg = error_of(["lora.target_modules=[query"])
    assert "lora.target_modules=[query" in msg and "not valid YAML" in msg


def test_set_below_a_value_is_an_error(tmp_path):
    msg = error_of(["lora.r.x=1"], write(tmp_path, "lora:\n  r: 4\n"))
    assert "'r' is a value, not a section" in msg


# ---------------------------------------------------------------------------------------------------------------------
# Unknown keys


@pytest.mark.parametrize(
    "item, key, near",
    [
        ("lora.rank=8", "lora.rank", "lora.r"),
        ("train.learning_rate=1e-4", "train.learning_rate", "train.lr"),
        ("trian.lr=1e-4", "trian", "train"),
        ("lora.lr=1e-4", "lora.lr", "train.lr"),  # a key of another section
        ("r=8", "r", "lora.r"),
        ("lora.dropuot=0.1", "lora.dropuot", "lora.dropout"),
        ("train.early_stoping.metric=val_loss", "train.early_stoping", "eval.early_stopping"),
        ("eval.early_stopping.patiance=2", "eval.early_stopping.patiance", "eval.early_stopping.patience"),
        ("data.text_column=[a]", "data.text_column", "data.text_columns"),
        ("model.model_name=x", "model.model_name", "model.name"),
    ],
)
def test_unknown_key_names_it_and_the_nearest_valid_key(item, key, near):
    msg = error_of([item])
    assert f"unknown key '{key}'" in msg
    assert f"did you mean '{near}'?" in msg


def test_unknown_key_without_a_near_match_lists_the_section_keys():
    msg = error_of(["lora.zzzzzz=1"])
    assert "unknown key 'lora.zzzzzz'" in msg and "valid keys here: r, alpha, dropout" in msg
    msg = error_of(["zzzzzz=1"])
    assert (
        "valid keys here: model, data, method, lora, adalora, ia3, vera, fourierft, loha, lokr, oft, bitfit, train, eval, checkpoint, speed, budget"
        in msg
    )


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = write(tmp_path, "lora:\n  rank: 8\ntrian:\n  lr: 0.1\n")
    msg = error_of(path=path)
    assert str(path) in msg and "2 problem(s)" in msg
    assert "unknown key 'lora.rank' (did you mean 'lora.r'?)" in msg
    assert "unknown key 'trian' (did you mean 'train'?)" in msg


# ---------------------------------------------------------------------------------------------------------------------
# Wrong types and values


@pytest.mark.parametrize(
    "item, field, shown, expected",
    [
        ("lora.r=abc", "lora.r", "'abc'", "valid integer"),
        ("lora.r=0", "lora.r", "0", "greater than 0"),
        ("lora.r=-4", "lora.r", "-4", "greater than 0"),
        ("lora.r=2.5", "lora.r", "2.5", "integer"),
        ("train.lr=-1", "train.lr", "-1", "greater than 0"),
        ("train.lr=fast", "train.lr", "'fast'", "valid number"),
        ("lora.dropout=1.5", "lora.dropout", "1.5", "less than 1"),
        ("train.scheduler=foo", "train.scheduler", "'foo'", "'cosine', 'linear', 'constant' or 'reduce_on_plateau'"),
        ("lora.init=bar", "lora.init", "'bar'", "pissa_niter_N"),
        ("data.preprocess=[lower]", "data.preprocess.0", "'lower'", "'lowercase'"),
        ("data.val_fraction=1", "data.val_fraction", "1", "less than 1"),
        ("data.text_columns=[]", "data.text_columns", "[]", "at least 1 item"),
        ("eval.every=0", "eval.every", "0", "positive number of steps"),
        ("lora.rank_pattern={'x': 0}", "lora.rank_pattern", "{'x': 0}", "ranks must be positive"),
    ],
)
def test_wrong_value_names_the_field_and_the_value(item, field, shown, expected):
    msg = error_of([item])
    assert "1 problem(s)" in msg
    assert f"{field}: got {shown}: " in msg
    assert expected in msg
    assert "`lorafit keys`" in msg


@pytest.mark.parametrize(
    "item, expected",
    [
        ("lora.target_modules=5", "lora.target_modules: got 5: Input should be a valid list or a valid string"),
        ("eval.every=foo", "eval.every: got 'foo': Input should be 'epoch' or a valid integer"),
    ],
)
def test_union_fields_give_one_message_without_pydantic_internals(item, expected):
    msg = error_of([item])
    assert "1 problem(s)" in msg and expected in msg
    for noise in ("list[str]", "literal[", "function-", "union[", "pydantic", "errors.pydantic.dev"):
        assert noise not in msg


def test_cross_key_check_does_not_dump_the_section():
    msg = error_of(["lora.layers_to_transform=[0,1]"])  # target_modules stays all-linear
    assert "lora: layers_to_transform needs target_modules as a list" in msg
    assert "got {" not in msg


def test_scalar_instead_of_a_section():
    msg = error_of(["lora=8"])
    assert "lora: got 8: expected a section" in msg and "LoraConfig" not in msg


def test_all_problems_are_reported_in_one_message(tmp_path):
    path = write(tmp_path, "lora:\n  r: abc\n  dropout: 1.5\ntrain:\n  learning_rate: 0.1\n")
    msg = error_of(["train.scheduler=foo", "trian.lr=1"], path)
    assert msg.startswith(f"{path} with --set overrides: 5 problem(s): ")
    for part in (
        "lora.r: got 'abc'",
        "lora.dropout: got 1.5",
        "unknown key 'train.learning_rate' (did you mean 'train.lr'?)",
        "train.scheduler: got 'foo'",
        "unknown key 'trian' (did you mean 'train'?)",
    ):
        assert part in msg
    assert msg.count(";") >= 4


# ---------------------------------------------------------------------------------------------------------------------
# YAML files


@pytest.mark.parametrize(
    "text, line",
    [
        ("lora:\n  r: 8\n bad: 1\n", 3),  # wrong indentation
        ("lora:\n\tr: 8\n", 2),  # a tab
        ("train:\n  lr: 0.1\nlora: {r: 8\n", 4),  # unclosed flow mapping
        ("model:\n  name: a: b\n", 2),
        ("train:\n  scheduler: 'cosine\n", 3),  # unclosed quote
    ],
)
def test_yaml_syntax_error_names_the_line(tmp_path, text, line):
    path = write(tmp_path, text)
    msg = error_of(path=path)
    assert str(path) in msg and "YAML syntax error" in msg and f"line {line}," in msg


def test_yaml_that_is_not_a_mapping(tmp_path):
    msg = error_of(path=write(tmp_path, "- lora\n- train\n"))
    assert "expected a mapping of sections" in msg and "found list" in msg


def test_missing_config_file(tmp_path):
    msg = error_of(path=tmp_path / "nope.yaml")
    assert "nope.yaml not found" in msg and "expected a YAML file" in msg


def test_config_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model:\n  name: caf\xe9\n".encode("latin-1"))
    assert "not UTF-8" in error_of(path=path)


def shipped_configs() -> list:
    files = sorted({*CONFIGS.rglob("*.yaml"), *CONFIGS.rglob("*.yml")}) if CONFIGS.is_dir() else []
    return [pytest.param(f, id=str(f.relative_to(CONFIGS))) for f in files] or [
        pytest.param(None, marks=pytest.mark.skip(reason="no YAML under configs/ yet"))
    ]


@pytest.mark.parametrize("path", shipped_configs())
def test_shipped_config_validates(path):
    data = read_yaml(path)
    if isinstance(data, dict) and data and set(data) <= {"grid", "points"}:  # a sweep file (`--grid-file`)
        from lorafit.experiments.points import apply_point, expand, read_points_file

        grid, points = read_points_file(path)
        for point in expand(points, grid):
            apply_point(Config(), point, f"{path} point {point}")
        return
    load_config(path)  # raises LorafitError with every problem


def test_default_config_round_trips(tmp_path):
    path = tmp_path / "config.yaml"
    save_config(Config(), path)
    cfg = validate(read_yaml(path), str(path))
    assert cfg == Config() and cfg.to_dict() == Config().to_dict()


def test_custom_config_round_trips(tmp_path):
    cfg = load_config(
        None,
        [
            "lora.target_modules=[query,value]",
            "lora.rank_pattern={'layer\\.1\\..*': 4}",
            "train.lr=1e-4",
            "eval.every=10",
            "data.label_names=[a, b]",
            "train.max_grad_norm=null",
            "lora.layers_to_transform=[0]",
        ],
    )
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert validate(read_yaml(path), str(path)) == cfg


# ---------------------------------------------------------------------------------------------------------------------
# The command line


def test_keys_lists_every_key(capsys):
    assert main(["keys"]) == 0
    out = capsys.readouterr().out
    listed = [line.split(" = ", 1)[0] for line in out.splitlines() if not line.startswith(" ")]
    assert listed == leaf_keys() == [k for k, _, _ in all_keys()]
    assert "lora.r = 8" in out and "eval.early_stopping.metric = val_loss" in out and "data.label_names = null" in out
    assert all(doc for _, _, doc in all_keys()), "every key needs a description"


def test_cli_config_error_is_one_line(capsys):
    assert main(["train", "--set", "lora.rank=8", "--set", "train.lr=-1"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lorafit: error: ")
    assert "did you mean 'lora.r'?" in lines[0] and "train.lr: got -1" in lines[0]
