"""Work the classifier does not need, removed without changing what it computes.

- Dropout masks on CPU: `torch.nn.Dropout` draws one Bernoulli sample per element from the CPU generator, and with
  hidden, attention and LoRA dropout that is a large share of a small encoder's training step (docs/performance.md
  has the measurements of every item here). Here one 64-bit
  draw gives four 16-bit uniforms, so a mask costs a quarter of the generator calls; the drop probability is
  rounded to a multiple of 1/65536 and the kept values are scaled by the exact 1/(1 - p) of that probability.
  Masks come from torch's default generator, so `torch.manual_seed` and checkpointed RNG states reproduce them.
- Attention dropout on CPU: with dropout, SDPA falls back to its unfused math path anyway; the same math with the
  cheaper masks (`lorafit_attention`, registered with transformers' attention interface).
- Attention without dropout or gradient (evaluation, prediction) on a bf16 CPU: lorafit's kernel (kernels.py), the
  same numerics as PyTorch's CPU flash attention at a fraction of its fixed cost per head.
- DoRA's per-channel scales are computed in fp32 and cast once to the compute dtype, instead of peft's fp32
  magnitude turning every adapted layer's bf16 output into fp32 and back.
- The last encoder layer of BERT/RoBERTa computes only the first token, the only one the head reads.
- Prediction on CPU (a merged, frozen model): each linear layer's weight is reordered once into oneDNN's blocked
  layout, and the GELU after a feed-forward layer is fused into its matmul; this is what torch.compile's freezing
  pass does for these layers, without the compile.

On CUDA, dropout stays torch's own (its Philox generator is already cheap there).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import kernels
from .device import cpu_has_bf16

_LEVELS = 1 << 16


def dropout_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A boolean keep-mask with P(drop) = round(p * 65536) / 65536, and the scale 1 / P(keep)."""
    n = math.prod(shape)
    drop = min(round(p * _LEVELS), _LEVELS - 1)  # p within 2^-17 of 1 keeps one value in 65536
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), (1 << 63) - 1)
    keep = bits.view(torch.int16)[:n].view(shape) >= drop - (1 << 15)  # the int16 values are uniform on [-32768, 32767]
    return keep, _LEVELS / (_LEVELS - drop)


class _Scale(torch.autograd.Function):
    """x * mask, where the mask already holds 0 or 1/P(keep) in x's dtype: one pass each way, no casts."""

    @staticmethod
    def forward(ctx, x, mask):
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def fast_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    if p <= 0.0:
        return x
    if p >= 1.0:
        return torch.zeros_like(x)
    keep, scale = dropout_mask(x.shape, p, x.device)
    return _Scale.apply(x, keep.to(x.dtype) * scale)


class FastDropout(nn.Dropout):
    """nn.Dropout with cheaper masks on CPU; torch's own dropout elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return super().forward(x)
        return fast_dropout(x, self.p)


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every nn.Dropout in the model (hidden, classifier, LoRA) for FastDropout; returns how many.

    The instances keep their p and train/eval state; only their class changes, so module names, state dicts
    and peft's own checks (which look for nn.Identity, not nn.Dropout) are unaffected.
    """
    swapped = 0
    for m in model.modules():
        if type(m) is nn.Dropout:
            m.__class__ = FastDropout
            swapped += 1
    return swapped


def lorafit_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling=None,
    *,
    cheap_dropout: bool = True,
    kernel: bool = False,
    **kwargs,
):
    """transformers' SDPA attention, with two CPU shortcuts: attention dropout by the math path with the cheaper
    masks (cheap_dropout), and inference calls (no dropout, no gradient, bf16) by lorafit's kernel (kernel)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packing = kwargs.pop("lorafit_packing", None)
    if packing is not None:  # the encoder runs on real tokens only: attention sees each text padded, as before
        query, key, value = (packing.pad_heads(t) for t in (query, key, value))
        out, _ = lorafit_attention(
            module,
            query,
            key,
            value,
            packing.mask,
            dropout,
            scaling,
            cheap_dropout=cheap_dropout,
            kernel=kernel,
            **kwargs,
        )
        return packing.unpad(out), None
    if kernel and dropout == 0.0 and not (getattr(module, "is_causal", False) or kwargs.get("is_causal")):
        if kernels.attention_applies(query, key, value, attention_mask):
            return kernels.attention(query, key, value, attention_mask, scaling), None
    if not cheap_dropout or dropout == 0.0 or query.device.type != "cpu":
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scores = torch.matmul(query, key.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(fast_dropout(probs, dropout), value)
    return out.transpose(1, 2).contiguous(), None


# the registered variants of lorafit_attention: (cheap_dropout, kernel) by name
ATTENTIONS = {"lorafit_sdpa": (True, False), "lorafit_kernel": (False, True), "lorafit_sdpa_kernel": (True, True)}
# SDPA itself, through lorafit_attention: what a model whose attention takes neither shortcut needs to skip padding
PLAIN_ATTENTION = "lorafit_plain"


def register_attention() -> None:
    from functools import partial

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for name, (cheap_dropout, kernel) in [*ATTENTIONS.items(), (PLAIN_ATTENTION, (False, False))]:
        AttentionInterface.register(name, partial(lorafit_attention, cheap_dropout=cheap_dropout, kernel=kernel))
        AttentionMaskInterface.register(name, sdpa_mask)


def use_lorafit_attention(model: nn.Module, cheap_dropout: bool, kernel: bool) -> str | None:
    """Point an SDPA model's attention at the lorafit_attention variant that does what is asked and applies here:
    cheap dropout where the model has attention dropout, the kernel where it is built and the model is on CPU.
    Returns the variant's name, or None when nothing applies (the model keeps SDPA)."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return None
    cheap_dropout = cheap_dropout and any(p > 0 for p in _attention_dropouts(model))
    if kernel:  # the kernel takes bf16 only: a model stored in bf16 on the CPU
        params = list(model.parameters())
        kernel = (
            all(p.device.type == "cpu" for p in params)
            and any(p.dtype == torch.bfloat16 for p in params)
            and kernels.attention_kernel() is not None
        )
    name = next((n for n, flags in ATTENTIONS.items() if flags == (cheap_dropout, kernel)), None)
    if name is None:
        return None
    register_attention()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(name)
    return name if base.config._attn_implementation == name else None  # a PeftModel's config is its base model's


def _attention_dropouts(model: nn.Module):
    for m in model.modules():
        if hasattr(m, "attention_head_size") and isinstance(getattr(m, "dropout", None), nn.Dropout):
            yield m.dropout.p


def _dora_forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default"):
    """peft's DoRA output term, (m / ||W + s·BA|| - 1) · W x + (m / ||W + s·BA||) · s · B A x, with the per-channel
    scales computed in fp32 and cast once to the compute dtype. peft multiplies the fp32 magnitude straight into
    the bf16 activations, which turns every adapted layer's output into fp32 and back, in both passes; it also
    takes the norm of a bf16 copy of W + s·BA, which leaves m / ||.|| - 1 off by up to 2^-8 where it should be 0."""
    from peft.utils.integrations import dequantize_module_weight
    from peft.utils.other import transpose

    weight = dequantize_module_weight(base_layer)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):  # the norm is a constant (DoRA paper, 4.3)
        full = transpose(weight, self.fan_in_fan_out).float() + scaling * (
            lora_B.weight.float() @ lora_A.weight.float()
        )
        weight_norm = torch.linalg.norm(full, dim=1)
    scale = self.weight / weight_norm  # fp32, and the magnitude's gradient flows through it
    lora_result = lora_B(lora_A(x))
    if base_result is not None:
        if base_layer.bias is not None:
            base_result = base_result - base_layer.bias
    else:
        base_result = torch.nn.functional.linear(x, transpose(weight, self.fan_in_fan_out))
    dtype = lora_result.dtype
    return (scale - 1).to(dtype) * base_result + (scale * scaling).to(dtype) * lora_result


def use_fast_dora(model: nn.Module) -> int:
    """Give every DoRA linear layer the forward above; returns how many. State dicts, merging and saving are peft's."""
    from peft.tuners.lora.dora import DoraLinearLayer

    n = 0
    for m in model.modules():
        if type(m) is DoraLinearLayer:
            m.forward = _dora_forward.__get__(m)
            n += 1
    return n


def _first_token_forward(
    self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs
) -> torch.Tensor:
    """A BERT/RoBERTa layer that computes only the first token's output (the one every classification head reads).

    Keys and values still come from every token; the query, attention output and feed-forward run on one row
    per text instead of all of them. The result for that row is the same as the full layer's.
    """
    att = self.attention.self
    heads, size = att.num_attention_heads, att.attention_head_size
    packing = kwargs.get("lorafit_packing")
    # the query first, then keys and values: the order their (LoRA) dropout masks are drawn in
    if packing is not None:  # (1, real tokens, hidden): each text's first token, keys and values padded per text
        first = hidden_states[0].index_select(0, packing.first).unsqueeze(1)
        b, n = len(packing.first), hidden_states.shape[1]
        q = att.query(first).view(b, 1, heads, size).transpose(1, 2)
        k, v = (
            packing.pad_heads(f(hidden_states).view(1, n, heads, size).transpose(1, 2)) for f in (att.key, att.value)
        )
        mask = packing.mask
    else:
        b, t, _ = hidden_states.shape
        first = hidden_states[:, :1]
        q = att.query(first).view(b, 1, heads, size).transpose(1, 2)
        k = att.key(hidden_states).view(b, t, heads, size).transpose(1, 2)
        v = att.value(hidden_states).view(b, t, heads, size).transpose(1, 2)
        mask = attention_mask[:, :, :1] if attention_mask is not None else None  # (b, 1, t, t) -> (b, 1, 1, t)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    dropout = att.dropout.p if self.training else 0.0
    # the kernel, where it applies
    if dropout == 0.0 and ATTENTIONS.get(att.config._attn_implementation, (False, False))[1]:
        ctx = lorafit_attention(att, q, k, v, mask, 0.0, att.scaling, cheap_dropout=False, kernel=True)[0]
    else:
        ctx = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, scale=att.scaling
        ).transpose(1, 2)
    ctx = ctx.reshape(b, 1, heads * size)
    return self.feed_forward_chunk(self.attention.output(ctx, first))


FIRST_TOKEN_HEADS = ("bert", "roberta", "xlm-roberta")


def first_token_last_layer(model: nn.Module) -> bool:
    """Let the last encoder layer compute only the first token, for models whose classification head reads
    only that token (BERT, RoBERTa): about a sixth less work for a 6-layer model, a twelfth for 12 layers.
    Returns whether it applied; other architectures keep their full forward."""
    if any(getattr(m, "reads_every_token", False) for m in model.modules()):  # model.head=mean
        return False
    encoder = bert_encoder(model)
    if encoder is None or not hasattr(encoder.layer[-1].attention, "self"):
        return False
    last = encoder.layer[-1]
    last.forward = _first_token_forward.__get__(last)
    return True


def bert_encoder(model: nn.Module) -> nn.Module | None:
    """The encoder of a BERT/RoBERTa classifier (the one module whose `layer` list holds its layers), or None for
    other architectures and decoders."""
    if getattr(model.config, "model_type", None) not in FIRST_TOKEN_HEADS or model.config.is_decoder:
        return None
    encoders = [
        m
        for m in model.modules()
        if isinstance(getattr(m, "layer", None), nn.ModuleList)
        and len(m.layer)
        and all(hasattr(x, "feed_forward_chunk") for x in m.layer)
    ]
    return encoders[0] if len(encoders) == 1 else None


class PackedLinear(nn.Module):
    """A frozen nn.Linear whose weight oneDNN has reordered once into its blocked layout, optionally with the
    exact GELU that follows it fused into the matmul. Inference only: the packed weight has no gradient."""

    def __init__(self, linear: nn.Linear, gelu: bool = False):
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, None), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().to(weight.dtype)
        self.register_buffer("bias", bias, persistent=False)
        self.attr, self.algorithm = ("gelu", "none") if gelu else ("none", "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # under autocast, what F.linear's input would be cast to
        x = x.reshape(-1, shape[-1]).to(self.packed_weight.dtype)
        y = torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, self.attr, [], self.algorithm)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.packed_weight.dtype}, fused={self.attr}"


def _can_pack(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return type(module) is nn.Linear and w.device.type == "cpu" and w.dtype == torch.bfloat16 and not w.requires_grad


# peft methods whose layers call their base layer as it is, never reading its weight (which packing takes away);
# the others (LoHa and LoKr shape their update by it, OFT rotates it) keep a plain base layer
CALL_THE_BASE_LAYER = (
    "peft.tuners.lora.",
    "peft.tuners.adalora.",
    "peft.tuners.ia3.",
    "peft.tuners.vera.",
    "peft.tuners.fourierft.",
    "peft.tuners.beft.",
)


def _reads_base_weight(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer) and not type(module).__module__.startswith(CALL_THE_BASE_LAYER)


def pack_linear_layers(
    model: nn.Module, shared: dict[tuple[int, bool], nn.Module] | None = None, shareable: set[int] | None = None
) -> int:
    """Swap every frozen bf16 nn.Linear of a CPU model for a PackedLinear, fusing exact GELU into BERT/RoBERTa's
    feed-forward layers; returns how many were swapped (0 where oneDNN or its bf16 ops are missing).

    For prediction only (no gradients): a merged model, or an unmerged LoRA one, whose adapted layers keep their
    adapter and get a packed base layer (DoRA's need their base weight itself, and keep it). `shared` maps a
    weight's data pointer to its packed layer, so models whose frozen weights are the same tensors (runs served on
    one base) share the packed copy too; `shareable`, where given, limits that to weights at those data pointers
    (a weight freed once packed, a merged run's own, may leave its address to the next one, which must not find its
    layer). bf16 only: that is where the packed layout measured faster (docs/performance.md); fp32 linears keep
    torch's MKL path.
    """
    from transformers.activations import GELUActivation

    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise") and cpu_has_bf16()):
        return 0
    packed = {} if shared is None else shared
    n = 0
    for module_name, m in list(model.named_modules()):
        if any(part.startswith("lora_") for part in module_name.split(".")):
            continue  # an adapter's own A and B (stored in bf16 where that changes nothing): peft reads their weight
        act = getattr(m, "intermediate_act_fn", None)
        # BERT/RoBERTa's intermediate: dense, then GELU
        fusable = type(act) is GELUActivation and act.act is torch.nn.functional.gelu
        if any(getattr(m, "use_dora", {}).values()) or _reads_base_weight(m):
            continue
        for name, child in list(m.named_children()):
            if _can_pack(child):
                gelu = fusable and name == "dense"
                key = (child.weight.data_ptr(), gelu)
                if shareable is not None and key[0] not in shareable:
                    setattr(m, name, PackedLinear(child, gelu=gelu))
                else:
                    if key not in packed:
                        packed[key] = PackedLinear(child, gelu=gelu)
                    setattr(m, name, packed[key])
                if gelu:
                    m.intermediate_act_fn = nn.Identity()
                n += 1
    return n


def apply(model: nn.Module, speed) -> list[str]:
    """Switch on what the `speed` config section asks for and this model supports, for training; returns what is in effect."""
    on = []
    if speed.fast_dropout and use_fast_dropout(model):
        on.append("fast dropout masks")
    attention = use_lorafit_attention(model, cheap_dropout=speed.fast_dropout, kernel=speed.fast_attention)
    if attention:
        on.append(f"attention via {attention}")
    if speed.fast_dora and use_fast_dora(model):
        on.append("DoRA scales in the compute dtype")
    if speed.skip_unused_tokens and first_token_last_layer(model):
        on.append("first-token-only last layer")
    return on


# Above this share of real tokens (length-sorted batches, as predict makes them) the gathers cost about what the
# skipped padding would (scripts/inference-shortcuts): the batch runs padded.
MOSTLY_REAL = 0.9


class Packing:
    """Where a padded batch's real tokens are: the encoder runs on those alone, as one (1, real tokens, hidden)
    sequence, and attention pads them back per text for its own step.

    From the model's boolean attention mask (batch, 1, length, length), whose every query row is the key mask."""

    def __init__(self, keys: torch.Tensor):
        self.batch, self.length = keys.shape
        flat = keys.reshape(-1)
        self.rows = flat.nonzero().squeeze(1)  # the real tokens' positions in the flattened padded batch
        # for every padded position, the packed row it reads: its own where real; a real row of the same text where
        # padding, which the mask then hides (so no position reads outside the packed tensor)
        self.gather = (flat.cumsum(0) - 1).clamp_(min=0)
        self.first = self.gather[:: self.length]  # each text's first token
        self.mask = keys[:, None, None, :]

    @classmethod
    def of(cls, attention_mask: torch.Tensor | None) -> Packing | None:
        """The packing of a batch, or None where there is little to gain (one text, or mostly real tokens)."""
        if attention_mask is None or attention_mask.dtype != torch.bool or attention_mask.dim() != 4:
            return None
        keys = attention_mask[:, 0, 0, :]  # the first token is always real, so its row is the key mask
        if len(keys) < 2 or keys.sum() > MOSTLY_REAL * keys.numel():
            return None
        return cls(keys)

    def pack(self, hidden: torch.Tensor) -> torch.Tensor:
        """(batch, length, hidden) -> (1, real tokens, hidden)."""
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.rows).unsqueeze(0)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(1, real tokens, hidden) -> (batch, length, hidden), zeros where padding."""
        out = packed.new_zeros(self.batch * self.length, packed.shape[-1])
        out.index_copy_(0, self.rows, packed[0])
        return out.view(self.batch, self.length, -1)

    def pad_heads(self, t: torch.Tensor) -> torch.Tensor:
        """A packed (1, heads, real tokens, head size) query/key/value -> (batch, heads, length, head size)."""
        _, heads, n, size = t.shape
        padded = t.transpose(1, 2).reshape(n, heads * size).index_select(0, self.gather)
        return padded.view(self.batch, self.length, heads, size).transpose(1, 2)

    def unpad(self, out: torch.Tensor) -> torch.Tensor:
        """Attention's (batch, length, heads, head size) output -> packed (1, real tokens, heads, head size)."""
        heads, size = out.shape[2:]
        return out.reshape(-1, heads * size).index_select(0, self.rows).view(1, -1, heads, size)


def _packed_encoder_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    """The encoder on the real tokens only (inference); its output padded back, or (batch, 1, hidden) where the
    last layer computes only the first token."""
    packing = None if self.training or torch.is_grad_enabled() else Packing.of(attention_mask)
    if packing is None:
        return self.padded_forward(hidden_states, attention_mask, *args, **kwargs)
    out = self.padded_forward(packing.pack(hidden_states), None, *args, lorafit_packing=packing, **kwargs)
    if out.last_hidden_state.shape[0] == 1:
        out.last_hidden_state = packing.unpack(out.last_hidden_state)
    return out


def skip_padding(model: nn.Module) -> bool:
    """Let a BERT/RoBERTa encoder run on the real tokens of each inference batch only (see Packing); returns whether
    it applied. Needs the model's attention to be lorafit_attention (which pads back per text): an SDPA model is
    switched to the plain variant, the same computation. Gradient-enabled calls (training) keep the padded path."""
    encoder = bert_encoder(model)
    if encoder is None:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    implementation = base.config._attn_implementation
    if implementation not in ATTENTIONS and implementation != PLAIN_ATTENTION:
        if implementation != "sdpa":
            return False
        register_attention()
        base.set_attn_implementation(PLAIN_ATTENTION)
    if not hasattr(encoder, "padded_forward"):
        encoder.padded_forward = encoder.forward
        encoder.forward = _packed_encoder_forward.__get__(encoder)
    return True


def _lean_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A plain LoRA layer at inference: base(x) + s · (x Aᵀ) Bᵀ, the update added by one in-place addmm."""
    if self.training or torch.is_grad_enabled() or self.merged or self.disable_adapters or args or kwargs:
        return self.peft_forward(x, *args, **kwargs)
    out = self.base_layer(x)
    low = x.reshape(-1, x.shape[-1]).to(self.lean_a.dtype) @ self.lean_a  # autocast: in the compute dtype
    out.view(-1, out.shape[-1]).addmm_(low.to(out.dtype), self.lean_b.to(out.dtype), alpha=self.lean_scale)
    return out


def lean_lora(model: nn.Module) -> int:
    """Give every unmerged plain LoRA Linear layer of an inference model (one adapter, no DoRA or other variant; its
    dropout is off at inference) the forward above; returns how many. It keeps views of A and B as they are now:
    call it once their dtype is final. Calls with a gradient, in training mode, or after merging keep peft's."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for m in model.modules():
        if type(m) is not LoraLinear or list(m.lora_A) != ["default"] or m.lora_variant or m.fan_in_fan_out:
            continue
        m.lean_a, m.lean_b = m.lora_A["default"].weight.detach().t(), m.lora_B["default"].weight.detach().t()
        m.lean_scale = float(m.scaling["default"])
        if not hasattr(m, "peft_forward"):
            m.peft_forward = m.forward
            m.forward = _lean_lora_forward.__get__(m)
        n += 1
    return n
