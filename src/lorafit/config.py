"""The run configuration: one YAML file, validated into typed sections, overridable with `key=value`.

Every field has a default (the embedded default run) and a description (shown by `lorafit keys`).
Unknown keys and wrong types are errors; all problems of a file are reported at once.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .atomic import atomic_write_text
from .errors import LorafitError

PREPROCESS_STEPS = ("lowercase", "strip_punctuation", "remove_stopwords", "stem", "lemmatize")
INIT_CHOICES = "default | gaussian | pissa | pissa_niter_N | olora | eva"
TARGETS_HELP = "Module names to adapt (e.g. [query, value]), a regex matched against full module names, or all-linear."


class Section(BaseModel):
    # nan and inf pass `gt=0` style bounds (inf > 0) but are never a meaningful setting
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _check_regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"not a valid regular expression ({e})") from None
    return pattern


def _check_targets(targets: list[str] | str) -> list[str] | str:
    return _check_regex(targets) if isinstance(targets, str) and targets != "all-linear" else targets


class ModelConfig(Section):
    name: str = Field(
        "builtin:minilm",
        description="A local model folder, a Hugging Face hub id, or builtin:minilm (all-MiniLM-L6-v2, shipped offline).",
    )
    max_length: int = Field(128, gt=0, description="Texts are truncated to this many tokens.")
    head: Literal["default", "linear", "mean"] = Field(
        "default",
        description="default: the model's own classification head; linear: one Linear on the first token (fewer parameters for RoBERTa-like models); mean: one Linear on the mean of the token states (how sentence encoders such as all-MiniLM-L6-v2 were trained; BERT and RoBERTa types).",
    )
    dropout: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Dropout inside the base model while training (hidden states, attention probabilities, the classification head); null keeps the model's own (0.1 for BERT, RoBERTa and MiniLM). LoRA's own is lora.dropout.",
    )


class DataConfig(Section):
    source: str = Field(
        "builtin:ag_news_sample",
        description="Training data: builtin:ag_news_sample, hub:NAME[:SPLIT], or a local .csv/.parquet/.jsonl file.",
    )
    text_columns: list[str] = Field(
        ["text"], min_length=1, description="Columns joined with a space to form the text (e.g. [title, description])."
    )
    label_column: str = Field(
        "label", description="Column holding the class (an integer id or a name from label_names)."
    )
    label_names: list[str] | None = Field(
        None, description="Class names in id order; taken from the data when not given."
    )
    val_fraction: float = Field(
        0.06,
        gt=0,
        lt=1,
        description="Stratified, seeded share of the training source held out for validation when val_source is not given.",
    )
    val_source: str | None = Field(None, description="Optional validation file (same columns); replaces val_fraction.")
    test_source: str | None = Field(
        None,
        description="Optional test file, scored once at the end with the best checkpoint; never used for selection.",
    )
    max_train_samples: int | None = Field(
        None, gt=0, description="Use at most this many training rows (stratified, seeded), after the validation split."
    )
    preprocess: list[Literal[PREPROCESS_STEPS]] = Field(
        [], description="Text preprocessing, in this order: " + ", ".join(PREPROCESS_STEPS) + "."
    )


class LoraConfig(Section):
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: float = Field(
        16, gt=0, description="LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with use_rslora)."
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | str = Field("all-linear", description=TARGETS_HELP)
    bias: Literal["none", "all", "lora_only"] = Field(
        "none", description="Which biases train: none, all, or those of adapted layers."
    )
    use_dora: bool = Field(False, description="DoRA: adds a trainable magnitude vector per adapted layer.")
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha/sqrt(r) instead of alpha/r.")
    init: str = Field(
        "default",
        description=f"Adapter initialisation: {INIT_CHOICES} (eva: A from the SVD of each layer's inputs over lora.eva_batches training batches, before training).",
    )
    eva_batches: int = Field(
        16, gt=0, description="With init eva: training batches read to compute the initialisation (its cost is logged)."
    )
    rank_pattern: dict[str, int] = Field(
        {}, description="Per-module rank overrides, regex -> rank (e.g. {'layer\\.[45]\\..*': 8})."
    )
    alpha_pattern: dict[str, float] = Field({}, description="Per-module alpha overrides, regex -> alpha.")
    layers_to_transform: list[int] | None = Field(
        None,
        description="Adapt only these layer indices (needs target_modules as a list); negative ones count from the top (-1: the last layer).",
    )
    loraplus_lr_ratio: float | None = Field(
        None,
        gt=0,
        description="LoRA+: the B matrices and the vectors (biases, DoRA magnitudes) learn at train.lr times this (peft's create_loraplus_optimizer); null: one learning rate for all.",
    )

    @field_validator("init")
    @classmethod
    def _check_init(cls, v: str) -> str:
        if v in ("default", "gaussian", "pissa", "olora", "eva") or re.fullmatch(r"pissa_niter_\d+", v):
            return v
        raise ValueError(f"expected one of {INIT_CHOICES}")

    @field_validator("target_modules")
    @classmethod
    def _check_target_regex(cls, v):
        return _check_targets(v)

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _check_patterns(cls, v: dict, info: ValidationInfo) -> dict:
        """Keys are regexes over module names, values positive ranks or alphas."""
        bad = {k: x for k, x in v.items() if x <= 0}
        if bad:
            raise ValueError(
                f"{'ranks' if info.field_name == 'rank_pattern' else 'alphas'} must be positive, found {bad}"
            )
        for k in v:
            _check_regex(k)
        return v

    @model_validator(mode="after")
    def _check_layers(self) -> LoraConfig:
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ValueError(
                "layers_to_transform needs target_modules as a list of names (e.g. [query, value]), not a regex or all-linear"
            )
        return self


class MethodSection(Section):
    """What every method but LoRA shares: the modules it adapts (LoRA's own are in the `lora` section)."""

    target_modules: list[str] | str = Field("all-linear", description=TARGETS_HELP)

    @field_validator("target_modules")
    @classmethod
    def _check_target_regex(cls, v):
        return _check_targets(v)


class IA3Config(MethodSection):
    feedforward_modules: list[str] = Field(
        [],
        description="Of the adapted modules, those whose input is scaled instead of their output, as (IA)3 does for the feed-forward output layer (e.g. [output.dense] on BERT).",
    )

    @model_validator(mode="after")
    def _check_feedforward(self) -> IA3Config:
        if isinstance(self.target_modules, list) and (
            extra := sorted(set(self.feedforward_modules) - set(self.target_modules))
        ):
            raise ValueError(
                f"feedforward_modules {extra} are not among target_modules {self.target_modules}; add them there"
            )
        return self


class VeraConfig(MethodSection):
    r: int = Field(
        256, gt=0, description="Rank of the random projections all adapted layers share; they are frozen and saved."
    )
    d_initial: float = Field(0.1, gt=0, description="Initial value of the trained scaling vector on the rank side.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the VeRA input.")
    projection_seed: int = Field(0, description="Seed of the shared random projections.")


class FourierFTConfig(MethodSection):
    n_frequency: int = Field(
        1000, gt=0, description="Spectral coefficients trained per adapted layer (at most in_features x out_features)."
    )
    scaling: float = Field(150.0, gt=0, description="Scale of the weight change rebuilt from the spectrum.")
    frequency_seed: int = Field(777, description="Seed of the frequencies picked for each layer.")


class LycorisSection(MethodSection):
    r: int = Field(8, gt=0, description="Rank of each factor.")
    alpha: float = Field(8, gt=0, description="The update is scaled by alpha/r.")
    rank_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout over the rank dimension while training.")
    module_dropout: float = Field(
        0.0, ge=0, lt=1, description="Probability of leaving an adapted layer's update out of a training step."
    )


class LoHaConfig(LycorisSection):
    pass


class LoKrConfig(LycorisSection):
    decompose_both: bool = Field(
        False, description="Also factor the smaller Kronecker factor into two rank-r matrices."
    )
    decompose_factor: int = Field(
        -1, description="Size of the smaller Kronecker factor's dimensions; -1: as close to a square root as divides."
    )


class OFTConfig(MethodSection):
    block_size: int = Field(
        32,
        gt=0,
        description="Size of the orthogonal blocks; every adapted layer's in_features must be a multiple of it.",
    )
    module_dropout: float = Field(
        0.0, ge=0, lt=1, description="Probability of leaving an adapted layer's rotation out of a training step."
    )
    coft: bool = Field(False, description="Constrained OFT: keep each rotation within eps of the identity.")
    eps: float = Field(6e-5, gt=0, description="The constraint's radius with coft.")
    block_share: bool = Field(False, description="One rotation block shared by all blocks of a layer.")


class AdaLoraConfig(MethodSection):
    init_r: int = Field(
        12, gt=0, description="Rank every adapted layer starts with (what the budget counts: it all trains)."
    )
    target_r: int = Field(
        8,
        gt=0,
        description="Average rank left per adapted layer once allocation ends; the ranks go where they matter most.",
    )
    alpha: float = Field(8, gt=0, description="The update is scaled by alpha over the layer's current rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    warmup_share: float = Field(
        0.1, ge=0, lt=1, description="Share of the training steps before ranks start to be cut (peft's tinit)."
    )
    final_share: float = Field(
        0.2, ge=0, lt=1, description="Share of the training steps at the end with the ranks fixed (peft's tfinal)."
    )
    every: int = Field(10, gt=0, description="Steps between two rank reallocations (peft's deltaT).")
    beta1: float = Field(0.85, gt=0, lt=1, description="Smoothing of the importance scores.")
    beta2: float = Field(0.85, gt=0, lt=1, description="Smoothing of their uncertainty.")
    orth_reg_weight: float = Field(
        0.5, ge=0, description="Weight of the loss term that keeps each layer's singular vectors orthogonal."
    )

    @model_validator(mode="after")
    def _check_schedule(self) -> AdaLoraConfig:
        if self.warmup_share + self.final_share >= 1:
            raise ValueError(
                f"warmup_share + final_share is {self.warmup_share + self.final_share:g}; they must leave steps to allocate ranks in (sum below 1)"
            )
        if self.target_r > self.init_r:
            raise ValueError(f"target_r {self.target_r} exceeds init_r {self.init_r}; ranks can only be cut")
        return self


class BitFitConfig(MethodSection):
    """Bias-only tuning: every adapted Linear layer learns a bias of its own, added to its frozen one (peft's BEFT)."""


# The PEFT methods `method` selects, each with the config section of its own options (LoRA's is `lora`).
METHODS = ("lora", "adalora", "ia3", "vera", "fourierft", "loha", "lokr", "oft", "bitfit")


class EarlyStoppingConfig(Section):
    metric: Literal["val_loss", "val_accuracy", "val_macro_f1"] = Field(
        "val_loss", description="Metric that picks the best checkpoint and drives early stopping."
    )
    patience: int = Field(
        3, ge=0, description="Stop after this many evaluations without improvement; 0 turns early stopping off."
    )
    threshold: float = Field(
        0.01,
        ge=0,
        description="For early stopping, an evaluation improves only when it beats the best by more than this (absolute); the best checkpoint is the best evaluation by any margin.",
    )


class TrainConfig(Section):
    """What the optimisation computes: a resumed run must keep all of these but lr and precision."""

    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    batch_size: int = Field(32, gt=0, description="Training examples per step and device.")
    grad_accum: int = Field(1, gt=0, description="Gradient accumulation steps.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (fractions allowed).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    max_seconds: float | None = Field(
        None,
        gt=0,
        description="Also stop after this many wall-clock seconds of training; the learning-rate schedule then ends at whichever comes first, the planned steps or this deadline.",
    )
    scheduler: Literal["cosine", "linear", "constant", "reduce_on_plateau"] = Field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of the optimizer steps spent warming up linearly.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Cross-entropy label smoothing.")
    cache_frozen_layers: bool = Field(
        True,
        description="With adapters on the upper layers only (lora.layers_to_transform), run the frozen layers below them without dropout, once per training text, and keep their outputs in memory for later epochs (BERT/RoBERTa); false keeps their dropout and runs them every step.",
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null turns clipping off.")
    seed: int = Field(42, description="Seed for the split, the initialisation and the data order.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 where the hardware supports it (frozen base stored in bf16, adapters in fp32), else fp32.",
    )


class EvalConfig(Section):
    every: Literal["epoch"] | int = Field(
        "epoch", description="Evaluate on validation every epoch or every N optimizer steps."
    )
    batch_size: int = Field(64, gt=0, description="Examples per evaluation and prediction batch (length-sorted).")
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    baseline: bool = Field(
        True,
        description="Also train a TF-IDF + linear SVM on the same training rows and score it on the same validation and test rows (metrics.json, report, summary, compare); false skips it.",
    )
    blend: bool = Field(
        False,
        description="After training, blend the adapter with a TF-IDF linear model (its weights count toward the budget), weighted as validation picks; kept when more accurate on validation than the adapter alone, and then used by predict, eval and serve.",
    )

    @field_validator("every")
    @classmethod
    def _check_every(cls, v):
        if isinstance(v, int) and v <= 0:
            raise ValueError("expected 'epoch' or a positive number of steps")
        return v


class CheckpointConfig(Section):
    every: int | None = Field(
        None,
        gt=0,
        description="Also write a checkpoint every N optimizer steps (one is always written at the end of each epoch); null: epochs only. `lorafit train --resume RUN` continues from the newest.",
    )
    keep: int = Field(
        2,
        gt=0,
        description="Keep this many newest checkpoints (plus the one of the best evaluation) while training; removed once the run is complete.",
    )


class SpeedConfig(Section):
    """Switches that change how fast lorafit computes, not what (up to float rounding); measured in docs/performance.md."""

    num_threads: int | None = Field(None, gt=0, description="CPU threads; default: all physical cores.")
    group_by_length: bool = Field(True, description="Batch training texts of similar length together (less padding).")
    pad_to_multiple_of: int = Field(
        8,
        gt=0,
        le=128,
        description="Pad each training batch to a multiple of this many tokens: fewer distinct tensor sizes, so the CPU heap fragments less; 1 pads to the longest text only.",
    )
    fast_dropout: bool = Field(
        True,
        description="CPU training: dropout masks from a quarter of the random draws torch.nn.Dropout makes (p rounded to 1/65536), attention dropout included; same distribution, less time.",
    )
    fast_dora: bool = Field(
        True,
        description="DoRA: per-channel scales computed in fp32 and cast once to the compute dtype, instead of peft turning each adapted output into fp32 and back.",
    )
    skip_unused_tokens: bool = Field(
        True,
        description="The last layer computes only the first token, the one the classification head reads (BERT/RoBERTa; same result, less work).",
    )
    pack_weights: bool = Field(
        True,
        description="Inference only (eval, predict) on a bf16 CPU: each linear weight reordered once into oneDNN's blocked layout and exact GELU fused into the feed-forward matmul.",
    )
    fast_attention: bool = Field(
        True,
        description="Inference only (validation, eval, predict) on a CPU with AVX-512 BF16: attention by lorafit's own kernel, built once with the system C compiler (SDPA's numerics; SDPA where it cannot be built).",
    )
    skip_padding: bool = Field(
        True,
        description="Inference only (eval, predict, serve) on BERT/RoBERTa: the encoder layers run on each batch's real tokens, not its padding; attention still sees each text alone.",
    )
    lean_lora: bool = Field(
        True,
        description="Inference with an unmerged plain LoRA adapter (serve): each adapted layer adds its update to the base output in one fused matmul-add instead of peft's separate ops.",
    )


class BudgetConfig(Section):
    max_trainable: int = Field(
        1_000_000, gt=0, description="Hard limit on trainable parameters (adapters, DoRA magnitudes, head, biases)."
    )


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: Literal[METHODS] = Field(
        "lora",
        description="The PEFT method: lora (the `lora` section: LoRA, DoRA, rsLoRA), adalora, ia3, vera, fourierft, loha, lokr, oft or bitfit (bias-only), each with a section of its own options.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    adalora: AdaLoraConfig = Field(default_factory=AdaLoraConfig)
    ia3: IA3Config = Field(default_factory=IA3Config)
    vera: VeraConfig = Field(default_factory=VeraConfig)
    fourierft: FourierFTConfig = Field(default_factory=FourierFTConfig)
    loha: LoHaConfig = Field(default_factory=LoHaConfig)
    lokr: LoKrConfig = Field(default_factory=LoKrConfig)
    oft: OFTConfig = Field(default_factory=OFTConfig)
    bitfit: BitFitConfig = Field(default_factory=BitFitConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    speed: SpeedConfig = Field(default_factory=SpeedConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)

    @model_validator(mode="after")
    def _check_method(self) -> Config:
        if self.method != "lora" and self.lora.loraplus_lr_ratio is not None:
            raise ValueError(
                f"lora.loraplus_lr_ratio is LoRA+, for method lora, and method is {self.method}; remove it or set method=lora"
            )
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------------------------------
# Loading, overriding and error reporting


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _valid_keys(ann, prefix + name + ".")
    return keys


def all_keys() -> list[tuple[str, Any, str]]:
    """(dotted key, default, description) for every leaf field: the config reference."""
    out = []

    def walk(model: type[BaseModel], inst: BaseModel, prefix: str):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, getattr(inst, name), prefix + name + ".")
            else:
                out.append((prefix + name, getattr(inst, name), field.description or ""))

    walk(Config, Config(), "")
    return out


# Names other tools use for our keys (Hugging Face Trainer, PEFT), matched before spelling similarity; a dotted
# value names the key itself, a plain one a leaf name looked up in the same section first.
_ALIASES = {
    "learning_rate": "lr",
    "rank": "r",
    "lora_r": "r",
    "lora_rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "per_device_train_batch_size": "train.batch_size",
    "per_device_eval_batch_size": "eval.batch_size",
    "eval_batch_size": "eval.batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "eval_steps": "eval.every",
    "eval_every": "eval.every",
    "save_steps": "checkpoint.every",
    "save_total_limit": "checkpoint.keep",
    "lr_scheduler_type": "scheduler",
    "warmup": "warmup_ratio",
    "max_seq_length": "max_length",
    "model_name": "name",
    "model_name_or_path": "name",
    "target": "target_modules",
    "modules": "target_modules",
    "label": "label_column",
    "text": "text_columns",
    "text_column": "text_columns",
}


def suggest(loc: str) -> str:
    """'did you mean ...?' for an unknown dotted key, else the valid keys of its section."""
    parent, _, leaf = loc.rpartition(".")
    keys = _valid_keys(Config)
    siblings = [k for k in keys if k.rpartition(".")[0] == parent]
    others = [k for k in keys if k not in siblings and k.count(".") >= 1]

    def nearest(candidates: list[str], fuzzy: bool) -> str | None:
        by_leaf = {}
        for k in candidates:
            by_leaf.setdefault(k.rpartition(".")[2], k)
        name = leaf.lower()
        name = _ALIASES.get(name, name)
        if "." in name:
            return name if name in keys else None
        if name in by_leaf or not fuzzy:
            return by_leaf.get(name)
        near = difflib.get_close_matches(name, list(by_leaf), n=1, cutoff=0.55)
        return by_leaf[near[0]] if near else None

    # the exact name (or alias) in this section, then in another one (lora.lr -> train.lr), then a close spelling
    hit = nearest(siblings, False) or nearest(others, False) or nearest(siblings, True) or nearest(others, True)
    if hit:
        return f"did you mean '{hit}'?"
    return "valid keys here: " + ", ".join(k.rpartition(".")[2] for k in siblings)


def _user_loc(err: dict) -> str:
    """The user's dotted key: pydantic adds union members (e.g. 'list[str]', 'function-after[...]') to loc."""
    parts = [str(p) for p in err["loc"]]
    if err["type"] == "extra_forbidden":  # the user's own (misspelt) key, kept whatever it is
        return ".".join(parts)
    return ".".join(
        p for p in parts if not re.match(r"^(function-|union\[|literal\[|(list|str|int|float|dict|bool)\b)", p)
    )


def _problems(errors: list[dict]) -> list[str]:
    """One message per problem: union members failing on the same key and value become one message."""
    sections = set(_valid_keys(Config)) - {key for key, _, _ in all_keys()}
    grouped: dict[tuple[str, str], list[dict]] = {}
    for err in errors:
        grouped.setdefault((_user_loc(err), repr(err.get("input"))), []).append(err)
    out = []
    for (loc, _), errs in grouped.items():
        err = errs[0]
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            out.append(f"unknown key '{loc}' ({suggest(loc)})")
            continue
        if err["type"] == "model_type":
            out.append(f"{loc}: got {value!r}: expected a section of key: value settings, not {type(value).__name__}")
            continue
        msgs = [e["msg"].removeprefix("Value error, ") for e in errs]
        if len(msgs) > 1:  # e.g. 'Input should be a valid list' + 'Input should be a valid string'
            kinds = [re.sub(r", (unable to|got a number) .*$", "", m).removeprefix("Input should be ") for m in msgs]
            msgs = ["Input should be " + " or ".join(dict.fromkeys(kinds))]
        if loc in sections or not loc:  # a check across a section's keys: the whole section is no useful "value"
            out.append(f"{loc or 'config'}: {'; '.join(msgs)}")
        else:
            out.append(f"{loc}: got {value!r}: {'; '.join(msgs)}")
    return list(dict.fromkeys(out))


def _check_mapping(data: Any, origin: str) -> None:
    if not isinstance(data, dict):
        sections = ", ".join(Config.model_fields)
        raise LorafitError(f"{origin}: expected a mapping of sections ({sections}), found {type(data).__name__}")


def validate(data: dict, origin: str) -> Config:
    """Validate a nested dict (any lorafit version's layout) into a Config; raise one LorafitError listing every problem."""
    _check_mapping(data, origin)
    try:
        return Config.model_validate(migrate(data, origin))
    except ValidationError as e:
        problems = _problems(e.errors())
        raise LorafitError(
            f"{origin}: {len(problems)} problem(s): " + "; ".join(problems) + " (see `lorafit keys` for every key)"
        ) from None


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 numbers: 1e-4 and 1e6 are floats (plain PyYAML reads them as strings)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


# ---------------------------------------------------------------------------------------------------------------------
# Migrations: configs written by earlier versions of lorafit keep loading (run folders, sweep folders, studies)

# Keys (or whole sections) that moved, old dotted name -> new one.
MOVED_KEYS = {
    "train.eval_every": "eval.every",
    "train.eval_batch_size": "eval.batch_size",
    "train.early_stopping": "eval.early_stopping",
    "train.checkpoint_every": "checkpoint.every",
    "train.keep_checkpoints": "checkpoint.keep",
    "train.num_threads": "speed.num_threads",
    "train.group_by_length": "speed.group_by_length",
    "train.pad_to_multiple_of": "speed.pad_to_multiple_of",
    "train.fast_dropout": "speed.fast_dropout",
    "train.fast_dora": "speed.fast_dora",
    "train.skip_unused_tokens": "speed.skip_unused_tokens",
    "train.pack_weights": "speed.pack_weights",
    "train.fast_attention": "speed.fast_attention",
}


def migrate_key(key: str) -> str:
    """A dotted key's current name: 'train.eval_every' -> 'eval.every', 'train.early_stopping.metric' -> 'eval.early_stopping.metric'."""
    for old, new in MOVED_KEYS.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old) :]
    return key


def migrate(data: dict, origin: str = "config") -> dict:
    """A copy of a nested config dict with every moved key at its current place. Setting a key under both its
    old and its new name is an error (which one would win is not obvious)."""
    out = copy.deepcopy(data)
    for old, new in MOVED_KEYS.items():
        *old_path, old_leaf = old.split(".")
        parent = out
        for part in old_path:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or old_leaf not in parent:
            continue
        value = parent.pop(old_leaf)
        *new_path, new_leaf = new.split(".")
        node = out
        for part in new_path:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):  # a malformed section: validation reports it
                parent[old_leaf] = value
                break
            node = child
        else:
            if new_leaf in node and node[new_leaf] != value:
                raise LorafitError(
                    f"{origin}: '{old}' and '{new}' are the same setting ('{new}' is its current name); set it once, as '{new}'"
                )
            node[new_leaf] = value
    return out


def migrate_saved(data: dict) -> dict:
    """A run's saved config.yaml (or a checkpoint's config) as the current version reads it: moved keys, and the
    defaults that were different when the run was written (a resumed run must compute what it computed)."""
    data = migrate(data, "saved config")
    speed = data.get("speed") if isinstance(data.get("speed"), dict) else None
    if isinstance(data.get("train"), dict) and (speed is None or "pad_to_multiple_of" not in speed):
        data.setdefault("speed", {})["pad_to_multiple_of"] = (
            1  # saved before the key existed: padded to the longest text
        )
    if isinstance(data.get("train"), dict) and "cache_frozen_layers" not in data["train"]:
        data["train"]["cache_frozen_layers"] = False  # saved before the key existed: frozen layers kept their dropout
    return data


# Keys a resumed run may change: they do not alter what the remaining steps compute (threads, evaluation batch
# size, checkpointing), or they are the usual fixes after a numerical fault (a lower lr, fp32).
RESUME_OVERRIDES = (
    "train.lr",
    "train.precision",
    "speed.num_threads",
    "eval.batch_size",
    "checkpoint.every",
    "checkpoint.keep",
)


def flatten(config: dict) -> dict[str, Any]:
    """Dotted keys -> values, stopping at config leaves (rank_pattern and the like stay one value)."""
    leaves = {k for k, _, _ in all_keys()}
    out = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            key = prefix + str(k)
            if isinstance(v, dict) and key not in leaves:
                walk(v, key + ".")
            else:
                out[key] = v

    walk(config, "")
    return out


def config_changes(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
    """The keys two configs (any version's layout) set differently, sorted, each with (old value, new value); keys
    only one of them has are ignored, since a newer lorafit adds keys with defaults."""
    a, b = flatten(migrate(old)), flatten(migrate(new))
    return {k: (a[k], b[k]) for k in sorted(set(a) & set(b)) if a[k] != b[k] and k not in ignore}


# ---------------------------------------------------------------------------------------------------------------------
# Reading files and --set


def parse_override(item: str) -> tuple[list[str], Any]:
    """'lora.r=8' -> (['lora', 'r'], 8); the value is parsed as YAML, an old key name is read as its current one."""
    if "=" not in item:
        raise LorafitError(f"--set {item!r}: expected KEY=VALUE (e.g. --set lora.r=8)")
    key, raw = item.split("=", 1)
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise LorafitError(f"--set {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
    return migrate_key(key.strip()).split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise LorafitError(f"--set {item!r}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LorafitError(f"config file {path} not found: expected a YAML file (see configs/ for examples)")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise LorafitError(f"{path}: not UTF-8 text; expected a YAML config file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise LorafitError(
            f"{path}: YAML syntax error{where}: {getattr(e, 'problem', None) or e}; fix the file's indentation or quoting"
        ) from None
    return data if data is not None else {}


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (or the embedded default when path is None) and apply key=value overrides."""
    data = read_yaml(path) if path else {}
    origin = str(path) if path else "default config"
    _check_mapping(data, origin)
    data = apply_overrides(migrate(data, origin), list(overrides))
    return validate(data, origin + (" with --set overrides" if overrides else ""))


def save_config(cfg: Config, path: Path) -> None:
    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))  # a resumed run rewrites it


def reference_markdown() -> str:
    """The config reference as a Markdown table (README.md holds it between markers; a test keeps it current)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, doc in all_keys():
        value = yaml.safe_dump(default, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
        lines.append(f"| `{key}` | `{value}` | {doc.replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"
