"""Complete runs loaded for inference: each one's adapter and head on its base model, and its tokenizer.

`load_run` gives one run a base of its own (and can merge the adapter into it); `load_runs` loads many runs so that
those trained on the same base model share one copy of its frozen weights, each adding only its adapter and head.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import runs
from ..batching import Encoded, encode, predict_logits
from ..blend import Blend
from ..blend import load as load_blend
from ..config import Config
from ..fast.device import concurrent_passes, pick_device, release_free_memory, resolve_precision, store_frozen_in
from ..fast.patches import (
    first_token_last_layer,
    lean_lora,
    pack_linear_layers,
    skip_padding,
    use_fast_dora,
    use_lorafit_attention,
)
from ..models import build_model, head_modules, load_tokenizer, quiet_peft_warnings, resolve


@dataclass
class LoadedRun:
    folder: Path
    cfg: Config
    label_names: list[str]
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    shares_base: bool = field(default=False)  # its frozen base weights are shared with other loaded runs
    merged: bool = field(default=False)  # its adapter is merged into its own copy of the layers it adapts
    # the run's blend of its adapter with a TF-IDF model (blend/ in the folder), read with the run; runs with the
    # same vocabulary share it (blend.TfidfModel.load)
    blend: Blend | None = field(default=None, init=False)

    def __post_init__(self):
        self.blend = load_blend(self.folder, len(self.label_names))

    def encode(self, texts: list[str], labels: np.ndarray | None = None) -> Encoded:
        """The run's tokenisation of model input strings (already joined and preprocessed)."""
        labels = np.full(len(texts), -1) if labels is None else labels
        return encode(self.tokenizer, texts, labels, self.cfg.model.max_length)

    def predict_logits(self, enc: Encoded, progress: str | None = None) -> np.ndarray:
        """The adapter's logits for every encoded row, in input order, with the run's own batch size, device and
        precision (without the blend: see classify)."""
        return predict_logits(
            self.model,
            enc,
            self.cfg.eval.batch_size,
            self.tokenizer.pad_token_id,
            self.device,
            self.dtype,
            progress,
            concurrent_passes(self.device),
        )

    def blended(self, texts: list[str], adapter_logits: np.ndarray) -> np.ndarray:
        """The run's logits for these texts from the adapter's: the blend's where the run has one."""
        return adapter_logits if self.blend is None else self.blend.logits(texts, adapter_logits)

    def classify(self, texts: list[str], labels: np.ndarray | None = None, progress: str | None = None) -> np.ndarray:
        """The run's logits for model input strings (already joined and preprocessed), in input order: the
        adapter's, blended where the run has a blend. What predict, eval and serve answer with."""
        return self.blended(texts, self.predict_logits(self.encode(texts, labels), progress))


def load_run(folder: Path, precision: str | None = None, merge: bool = False) -> LoadedRun:
    """The saved adapter and head on top of a freshly loaded base model, ready for inference.

    merge=True folds the adapter into the base weights (in fp32, before any bf16 cast): prediction then costs
    exactly the base model's matmuls, and on a bf16 CPU the linear weights are packed for oneDNN
    (`speed.pack_weights`); such a model is for inference only. Logits match the unmerged model up to float rounding.
    """
    folder = Path(folder)
    cfg = runs.read_run_config(folder)
    label_names = runs.read_labels(folder)
    device = pick_device()
    dtype = resolve_precision(precision or cfg.train.precision, device)
    model = _adapted(folder, cfg, label_names, device, dtype, merge)
    if merge and cfg.speed.pack_weights:
        pack_linear_layers(model)  # after merging: the packed weights are final
    if not merge and cfg.speed.lean_lora:
        lean_lora(model)
    tokenizer = load_tokenizer(str(folder / runs.TOKENIZER))
    return LoadedRun(folder, cfg, label_names, model, tokenizer, device, dtype)


def _adapted(
    folder: Path, cfg: Config, label_names: list[str], device: torch.device, dtype: torch.dtype, merge: bool
) -> torch.nn.Module:
    """The run's adapter and head on a freshly loaded base (merged into it where asked, in fp32), for inference."""
    from peft import PeftModel

    with quiet_peft_warnings():
        model = PeftModel.from_pretrained(build_model(cfg, len(label_names), label_names), str(folder / runs.ADAPTER))
        if merge:
            model = model.merge_and_unload()
            model.requires_grad_(False)
    for_inference(model, cfg, device, dtype)
    return model


def for_inference(model: torch.nn.Module, cfg: Config, device: torch.device, dtype: torch.dtype) -> None:
    """What every loaded run gets: its device, eval mode, frozen weights in the compute dtype, and the speed
    patches its config asks for that apply to prediction."""
    model.to(device)
    model.eval()
    store_frozen_in(model, dtype)
    if cfg.speed.skip_unused_tokens:
        first_token_last_layer(model)
    if cfg.speed.fast_attention:
        use_lorafit_attention(model, cheap_dropout=False, kernel=True)
    if cfg.speed.skip_padding:
        skip_padding(model)


# Initialisations that rewrite the base weights they adapt (PiSSA, pissa_niter_N and OLoRA move the top singular
# directions into the adapter): a run using one needs base weights of its own.
INITS_THAT_CHANGE_THE_BASE = ("pissa", "olora")


def load_runs(
    folders: Iterable[Path],
    precision: str | None = None,
    merge: bool | None = None,
    loader: SharedBases | None = None,
) -> list[LoadedRun]:
    """Many runs for serving: runs on the same base model (and precision) share one copy of its frozen weights;
    each adds its adapter and head (see SharedBases).

    A merged run is merged as `lorafit predict` merges it (the same logits, bit for bit), and every tensor the
    merge left as the base's (embeddings, layer norms, layers it does not adapt) is still shared: it holds its own
    copy of the layers its adapter changes, and runs at the merged model's speed. merge=True merges every run,
    merge=False none (a run whose initialisation rewrites the base then gets a base of its own); merge=None, the
    default, merges the runs for which it costs nothing: a run alone on its base, and one whose initialisation
    rewrites the base (PiSSA, OLoRA), which could not share the base's adapted layers anyway.

    `loader`, where given, is the SharedBases to load on (a server keeps it, to merge more runs later).
    """
    folders = [Path(f) for f in folders]
    configs = [runs.read_run_config(f) for f in folders]
    loader = loader or SharedBases(precision)
    on_base = Counter(loader.key(cfg) for cfg in configs)
    loaded = []
    for folder, cfg in zip(folders, configs, strict=True):
        rewrites, alone = rewrites_base(cfg), on_base[loader.key(cfg)] == 1
        merged = (rewrites or alone) if merge is None else merge
        if merged and alone:  # nothing to share with
            run = load_run(folder, precision, merge=True)
            run.merged = True
            loaded.append(run)
        elif rewrites and not merged:
            loaded.append(load_run(folder, precision))
        else:
            loaded.append(loader.load(folder, cfg, merged))
    release_free_memory()  # the fp32 copies the bases were loaded as
    return loaded


def rewrites_base(cfg: Config) -> bool:
    """Whether the run's initialisation rewrote the base weights it adapts (its residual base is its own)."""
    return cfg.method == "lora" and cfg.lora.init.startswith(INITS_THAT_CHANGE_THE_BASE)


class SharedBases:
    """Loads runs so that runs on the same base model (and precision) share one copy of its frozen weights.

    Sharing is by tensor, not by module: each run has its own module tree (peft wraps Linear modules in place, so
    two runs cannot share a module), whose frozen parameters are the same tensors as the other runs'. On a bf16
    CPU the frozen Linear weights are packed for oneDNN once per base and the packed layers shared too; runs with
    identical tokenizer files share one tokenizer (each holds its vocabulary).
    """

    def __init__(self, precision: str | None = None):
        self.precision = precision
        self.device = pick_device()
        self._bases: dict[tuple[str, torch.dtype], dict[str, torch.Tensor]] = {}
        self._tokenizers: dict[str, object] = {}
        self._packed: dict[tuple[int, bool], torch.nn.Module] = {}  # (weight's data pointer, GELU fused) -> layer

    def key(self, cfg: Config) -> tuple[str, torch.dtype]:
        """What runs must have in common to share a base: the base model and the precision they run in."""
        return resolve(cfg.model.name)[0], resolve_precision(self.precision or cfg.train.precision, self.device)

    def load(self, folder: Path, cfg: Config, merged: bool) -> LoadedRun:
        """The run on its shared base: unmerged (its adapter and head on the shared frozen tensors), or merged as
        predict merges it, holding its own copy of the layers its adapter changes and sharing the rest."""
        from peft import PeftModel

        label_names = runs.read_labels(folder)
        key = self.key(cfg)
        dtype = key[1]
        if key not in self._bases:
            self._bases[key] = _frozen_tensors(build_model(cfg, len(label_names), label_names), self.device, dtype)
        base = self._bases[key]
        files = _digest(folder / runs.TOKENIZER)
        if files not in self._tokenizers:
            self._tokenizers[files] = load_tokenizer(str(folder / runs.TOKENIZER))
        tokenizer = self._tokenizers[files]
        if merged:
            model = _merged_sharing(folder, cfg, label_names, self.device, dtype, base, self._packed)
            return LoadedRun(folder, cfg, label_names, model, tokenizer, self.device, dtype, True, True)
        with quiet_peft_warnings():
            skeleton = build_model(cfg, len(label_names), label_names, weights=False)
            _use_tensors(skeleton, base)
            model = PeftModel.from_pretrained(skeleton, str(folder / runs.ADAPTER))
        for_inference(model, cfg, self.device, dtype)  # the shared tensors already are in dtype: no copy is made
        adapters_in(model, dtype)
        if cfg.speed.lean_lora:
            lean_lora(model)  # after adapters_in: it keeps views of A and B in their final dtype
        if cfg.speed.fast_dora:
            use_fast_dora(model)
        if cfg.speed.pack_weights:
            pack_linear_layers(model, shared=self._packed)
        return LoadedRun(folder, cfg, label_names, model, tokenizer, self.device, dtype, shares_base=True)


def merged_copy_bytes(run: LoadedRun) -> int:
    """What merging an unmerged run on a shared base would add: its own copy of every layer its adapter changes
    (the rest of a merged run is still the base's)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [m.get_base_layer() for m in run.model.modules() if isinstance(m, BaseTunerLayer)]
    return sum(t.numel() * t.element_size() for layer in adapted for t in [*layer.parameters(), *layer.buffers()])


def _merged_sharing(
    folder: Path,
    cfg: Config,
    label_names: list[str],
    device: torch.device,
    dtype: torch.dtype,
    base: dict[str, torch.Tensor],
    packed: dict,
) -> torch.nn.Module:
    """A run merged exactly as load_run(merge=True) merges it, whose tensors that the merge left equal to the
    shared base's are then replaced by the base's own (before packing, so the packed layers are shared too)."""
    model = _adapted(folder, cfg, label_names, device, dtype, merge=True)

    def shared_or_own(name: str, own: torch.Tensor) -> torch.Tensor:
        shared = base.get(name)
        if shared is not None and own.dtype == shared.dtype and torch.equal(own, shared):
            return shared
        # a copy of its own: a tensor loaded as a view into the checkpoint file would keep the whole file mapped,
        # and the pages read while merging resident (a copy then cost the base's size again)
        return own.clone()

    _replace_tensors(model, shared_or_own)
    if cfg.speed.pack_weights:
        pack_linear_layers(model, shared=packed, shareable={t.data_ptr() for t in base.values()})
    release_free_memory()  # the fp32 copy the run was merged in
    return model


def _digest(folder: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def adapters_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store LoRA's A and B in the compute dtype, where that changes no result: under autocast every matmul casts
    its fp32 weight to bf16 anyway, on every call (autocast caches only weights that require grad). DoRA layers
    keep fp32: their weight norm is taken in fp32 from A and B."""
    if dtype == torch.float32:
        return
    for m in model.modules():
        dora = getattr(m, "use_dora", {})
        for store in ("lora_A", "lora_B"):
            for name, linear in getattr(m, store, {}).items():
                if not dora.get(name, False):
                    linear.to(dtype)


def _frozen_tensors(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a loaded base model but its head, on `device`, floating ones in `dtype`."""
    heads = tuple(h + "." for h in head_modules(model))
    out = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not name.startswith(heads):
            t = t.detach().to(device)
            out[name] = t.to(dtype) if t.is_floating_point() else t
    return out


def _use_tensors(skeleton: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Point a meta-device skeleton's parameters and buffers at the shared tensors of the same name and shape;
    what is left (the head, which each run's adapter brings) gets zeros of its own."""

    def shared_or_zeros(name: str, current: torch.Tensor) -> torch.Tensor:
        shared = tensors.get(name)
        return (
            shared
            if shared is not None and shared.shape == current.shape
            else torch.zeros(current.shape, dtype=current.dtype)
        )

    _replace_tensors(skeleton, shared_or_zeros)


def _replace_tensors(model: torch.nn.Module, choose) -> None:
    """Replace each parameter and buffer (by its full name and current tensor) with `choose(name, tensor)`, where
    that is not None; parameters stay frozen parameters."""
    for module_name, module in model.named_modules():
        prefix = module_name + "." if module_name else ""
        for store in (module._parameters, module._buffers):
            for attr, current in list(store.items()):
                if current is None or (new := choose(prefix + attr, current)) is None:
                    continue
                store[attr] = torch.nn.Parameter(new, requires_grad=False) if store is module._parameters else new
