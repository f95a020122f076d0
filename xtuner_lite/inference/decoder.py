"""One decode step of a Llama-family model, run straight from its modules' weights.

Why not the model's own forward for decoding: with one new token per row every projection is a
skinny (rows × features) product, and on CPU that is where a decode step's time goes. It runs faster
from weights packed once into a blocked layout than through the plain ``F.linear`` (the same
products, rounding differences at the 1e-6 level in fp32; see docs/benchmarks.md): our kernel's
layout where it runs (``inference/skinny.py``), else oneDNN's. The packed copy costs memory once
more the size of the projections, so it is made only for CPU models that leave room for it;
otherwise ``W @ x.T`` (faster than ``x @ W.T`` under MKL for few rows, bit-identical) is used.
The step also skips the generic forward's per-token mask building and module dispatch. Where our
extension runs, a layer is its products and four calls of it (attention with the rotary embedding
and the cache write, each residual add with the norm after it, the gated activation): torch's
flash attention is made for long queries, not one token a row, and a few rows' elementwise ops
cost more in dispatch than in arithmetic. Elsewhere (and with prompts held once) the norms and
rotary embedding are the model's arithmetic written out, the activation is the model's module.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation

from xtuner_lite.inference import skinny
from xtuner_lite.inference.kv_cache import KVCache
from xtuner_lite.inference.shared_prefix import SharedPrefixes, attention_with_lse

MODEL_TYPES = ("llama", "qwen2")  # full attention, RMSNorm, rotary, gated SiLU-family MLP
SILU = (nn.SiLU, SiLUActivation)  # the activations our step's silu_mul stands for
PACK_MEMORY_SHARE = 0.25  # pack only when the packed copy fits in this share of free memory

# (x, packed weight, bias) -> x · Wᵀ + bias: the product a packed weight is read by
Product = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``FastDecoder`` cannot run ``model`` (None when it can)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in MODEL_TYPES:
        return f"model type {getattr(config, 'model_type', None)!r} is not one of {MODEL_TYPES}"
    lm = causal_lm(model)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return "the logits are rescaled"
    for layer in getattr(getattr(lm, "model", None), "layers", None) or []:
        if getattr(layer.self_attn, "sliding_window", None):
            return "it uses sliding-window attention"
    try:
        layers = _linears(lm)
    except AttributeError as err:
        return f"its modules are not laid out as Llama's ({err})"
    odd = [type(m).__name__ for m in layers if type(m) is not nn.Linear and not _plain_lora(m)]
    if odd:
        return f"its projections are wrapped ({odd[0]}: quantized or not plain LoRA layers)"
    return None


def _plain_lora(module: nn.Module) -> bool:
    """A peft LoRA layer over a plain Linear, unmerged, without DoRA or other variants."""
    return (
        type(getattr(module, "base_layer", None)) is nn.Linear
        and hasattr(module, "lora_A")
        and not getattr(module, "merged_adapters", None)
        and not getattr(module, "lora_variant", None)
        and all(type(a) is nn.Linear for a in module.lora_A.values())
        and all(type(b) is nn.Linear for b in module.lora_B.values())
    )


def _base(module: nn.Module) -> nn.Linear:
    """The frozen Linear of a projection (itself when it has no adapter)."""
    return module.base_layer if hasattr(module, "base_layer") else module


def _groups(model: nn.Module) -> list[tuple[nn.Module, ...]]:
    """Every projection the decode step multiplies by (a Linear, or a LoRA layer holding one),
    grouped by the input they read (q/k/v, gate/up), the output head last."""
    groups: list[tuple[nn.Module, ...]] = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        groups += [
            (attn.q_proj, attn.k_proj, attn.v_proj),
            (attn.o_proj,),
            (mlp.gate_proj, mlp.up_proj),
            (mlp.down_proj,),
        ]
    return groups + [(model.lm_head,)]


def _linears(model: nn.Module) -> list[nn.Module]:
    """Every projection the decode step multiplies by, the output head last."""
    return [module for group in _groups(model) for module in group]


def _adapted(module: nn.Module) -> bool:
    """A LoRA layer with an active adapter."""
    if not hasattr(module, "base_layer") or module.disable_adapters:
        return False
    return any(name in module.lora_A for name in module.active_adapters)


@torch.no_grad()
def _merged_weight(layer: nn.Module) -> torch.Tensor:
    """``W + scaling · B·A`` over the active adapters, summed in fp32, in ``W``'s dtype."""
    weight = layer.base_layer.weight
    merged = weight.float()
    for name in layer.active_adapters:
        if name in layer.lora_A:
            a, b = layer.lora_A[name].weight.float(), layer.lora_B[name].weight.float()
            merged = torch.addmm(merged, b, a, alpha=layer.scaling[name])
    return merged.to(weight.dtype)


def _weight_bytes(linears: list[nn.Module]) -> int:
    return sum(_base(m).weight.numel() * _base(m).weight.element_size() for m in linears)


def _free_memory() -> int:
    """Bytes of memory available to new allocations (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _should_pack(model: nn.Module) -> bool:
    head = _base(model.lm_head)
    if head.weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return _weight_bytes(_linears(model)) <= PACK_MEMORY_SHARE * _free_memory()


def _onednn(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


# a packed product's kernel, by name
KERNELS = {skinny.linear: "ours", skinny.amx_linear: "ours (AMX)", _onednn: "oneDNN"}


def _pack(weight: torch.Tensor) -> tuple[Product, torch.Tensor] | None:
    """``weight`` packed for products with a few rows, with the product that reads it: ours
    where this machine runs it, else oneDNN's (None where its op is missing or disagrees with
    ``F.linear``)."""
    weight = weight.detach()
    if skinny.supports(weight):
        return skinny.product_for(weight), skinny.pack(weight)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
        probe = torch.ones(2, weight.shape[1], dtype=weight.dtype)
        got = _onednn(probe, packed, None)
    except (RuntimeError, AttributeError, NotImplementedError):
        return None
    if not torch.allclose(got, F.linear(probe, weight), rtol=1e-3, atol=1e-3):
        return None
    return _onednn, packed


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in transformers' rotate-half convention (same operations, same order)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """``_rotate`` of ``x`` (rows, heads · head_dim) with ``cos``/``sin`` (rows, head_dim)."""
    rows = x.shape[0]
    rotated = _rotate(x.reshape(rows, heads, -1), cos[:, None], sin[:, None])
    return rotated.reshape(rows, -1)


def _rotary_ours(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """``_rotary`` in one call of our kernel (``inference/skinny.py``) where its dtypes allow."""
    if x.dtype != cos.dtype or x.dtype not in (torch.float32, torch.bfloat16):
        return _rotary(x, cos, sin, heads)
    return skinny.rotary(x, cos, sin, heads)


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Llama-family RMSNorm's forward (same operations, same order) without the module call
    and autograd-function dispatch, which cost more than the arithmetic on a few rows."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * normed.to(x.dtype)


def _rms_norm_ours(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``_rms_norm`` in one call of our kernel (``inference/skinny.py``) where its dtypes allow."""
    if x.dtype != norm.weight.dtype or x.dtype not in (torch.float32, torch.bfloat16):
        return _rms_norm(norm, x)
    return skinny.rms_norm(x, norm.weight, norm.variance_epsilon)


class FastDecoder:
    """Next-token logits for one new token per row, reading and extending a ``KVCache``."""

    def __init__(self, model: nn.Module, pack: bool | None = None, merge_adapters: bool = False):
        """``pack``: multiply by oneDNN-packed copies of the weights (None: on CPU when the copy
        fits in a quarter of the free memory). ``merge_adapters`` (with packing): pack each
        LoRA projection with its active adapters merged in, a snapshot of the adapter as it is
        now: for a decoder that lives while the adapter does not change (one RL rollout), it
        drops the low-rank products from every step at no memory beyond the packed copy."""
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"FastDecoder cannot run this model: {reason}")
        model = causal_lm(model)
        self.model, self.inner = model, model.model
        self.heads = model.config.num_attention_heads
        self.kv_heads = model.config.num_key_value_heads
        self.head_dim = self.inner.layers[0].self_attn.head_dim
        cpu = self.inner.norm.weight.device.type == "cpu"
        ours = cpu and skinny.available()
        self._norm = _rms_norm_ours if ours else _rms_norm
        self._rotary = _rotary_ours if ours else _rotary
        # the step in our extension's calls where it takes the model: one dtype for the
        # embeddings and norms, fp32 or bf16, and SiLU gating
        self._dtype = model.get_input_embeddings().weight.dtype
        self._ours_step = ours and _takes_ours_step(self.inner, self._dtype)
        if pack is None:
            pack = _should_pack(model)
        # packed copies of the frozen weights (a LoRA layer's base; unless merged, its A and B
        # are read live, so the decoder follows an adapter being trained)
        self._packed: dict[nn.Linear, tuple[Product, torch.Tensor]] = {}
        self._merged: set[nn.Module] = set()  # LoRA layers whose packed weight has them merged
        # q/k/v and gate/up read the same input: one product each instead of three and two
        # (fewer oneDNN calls, and wider ones, which it splits better over the cores)
        self._fused: dict[
            tuple[nn.Module, ...], tuple[Product, torch.Tensor, torch.Tensor | None, list]
        ]
        self._fused = {}
        if pack and not all(self._pack_group(g, merge_adapters) for g in _groups(model)):
            # this build cannot: every product takes the plain path
            self._packed.clear()
            self._merged.clear()
            self._fused.clear()
        # every layer in one call of our extension, where all its products are ours
        self._plan = self._layer_plan() if self._ours_step else None

    def _pack_group(self, group: tuple[nn.Module, ...], merge_adapters: bool) -> bool:
        """Pack ``group``'s weights (active adapters merged in with ``merge_adapters``): as one
        product when no member has a live adapter (it is read only through the packed copy),
        else each on its own. False where this build cannot pack."""
        merged = [m for m in group if merge_adapters and _adapted(m)]
        self._merged.update(merged)
        weights = [_merged_weight(m) if m in merged else _base(m).weight for m in group]
        biases = [_base(m).bias for m in group]
        live = any(_adapted(m) and m not in merged for m in group)
        if len(group) > 1 and not live and len({b is None for b in biases}) == 1:
            packed = _pack(torch.cat(weights))
            if packed is not None:
                bias = None if biases[0] is None else torch.cat(biases)
                self._fused[group] = (*packed, bias, [w.shape[0] for w in weights])
                return True
        for module, weight in zip(group, weights):
            packed = _pack(weight)
            if packed is None:
                return False
            self._packed[_base(module)] = packed
        return True

    def _project(self, group: tuple[nn.Module, ...], x: torch.Tensor) -> list[torch.Tensor]:
        """Each of ``group``'s products with ``x`` (one fused product when packed as one)."""
        fused = self._fused.get(group)
        if fused is None:
            return [self._linear(module, x) for module in group]
        product, packed, bias, sizes = fused
        return list(product(x, packed, bias).split(sizes, dim=-1))

    @property
    def packed_bytes(self) -> int:
        """Memory held by the packed weight copies."""
        fused = sum(_weight_bytes([_base(m) for m in group]) for group in self._fused)
        return _weight_bytes(list(self._packed)) + fused

    @property
    def packed_by(self) -> dict[str, int]:
        """How many packed products each kernel runs (``ours``, ``oneDNN``)."""
        products = [p for p, _ in self._packed.values()] + [f[0] for f in self._fused.values()]
        return dict(Counter(KERNELS[p] for p in products))

    @property
    def layers_in_one_call(self) -> bool:
        """Whether a step runs all decoder layers in one call of our extension."""
        return self._plan is not None

    @property
    def merged_layers(self) -> int:
        """How many LoRA projections decode with their adapters merged into the packed copy."""
        return len(self._merged)

    def _linear(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``layer(x)`` for a (rows, features) ``x`` (see the module docstring); a LoRA layer
        adds each active adapter's ``B(A(x)) * scaling`` (in eval, dropout is the identity)."""
        if not hasattr(layer, "base_layer"):
            return self._plain(layer, x)
        out = self._plain(layer.base_layer, x)
        if layer in self._merged or layer.disable_adapters:  # merged: in the packed weight
            return out
        for name in layer.active_adapters:
            if name in layer.lora_A:
                a, b = layer.lora_A[name], layer.lora_B[name]
                low = self._plain(a, x.to(a.weight.dtype))
                out = out + (self._plain(b, low) * layer.scaling[name]).to(out.dtype)
        return out

    def _plain(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed.get(layer)
        if packed is not None:
            product, weight = packed
            return product(x, weight, layer.bias)
        if layer.bias is None:
            return torch.mm(layer.weight, x.t()).t()
        return torch.addmm(layer.bias[:, None], layer.weight, x.t()).t()

    @torch.no_grad()
    def __call__(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache,
        shared: SharedPrefixes | None = None,
    ) -> torch.Tensor:
        """``tokens``/``positions``: (rows,); ``mask``: (rows, cache.length + 1), nonzero where
        a column is a real token. Writes the new keys/values (``cache.reserve(1)`` first), then
        advances the cache; returns fp32 logits (rows, vocabulary). ``shared``: the prompts
        rows continue without holding them in ``cache`` (``inference/shared_prefix.py``)."""
        if shared is None and self._ours_step and cache.keys[0].dtype == self._dtype:
            return self._step_ours(tokens, positions, mask, cache)
        rows, linear, norm = tokens.shape[0], self._linear, self._norm
        h = self.inner.embed_tokens(tokens)
        cos, sin = self.inner.rotary_emb(h[:, None], positions[:, None])
        cos, sin = cos.reshape(rows, -1), sin.reshape(rows, -1)  # (rows, head_dim)
        # additive mask, (rows, 1, 1, columns): broadcast over kv heads and query heads
        attend = torch.zeros(mask.shape, dtype=h.dtype, device=h.device)
        attend = attend.masked_fill_(mask == 0, float("-inf"))[:, None, None, :]
        groups = self.heads // self.kv_heads
        layout = shared.layout(h.dtype) if shared is not None else None
        for i, layer in enumerate(self.inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = norm(layer.input_layernorm, h)
            # a kv head's query heads stand in for its query positions (as transformers does
            # for one-token decoding): no repeated keys, and the flash CPU kernel applies
            q, k, v = self._project((attn.q_proj, attn.k_proj, attn.v_proj), x)
            q = self._rotary(q, cos, sin, self.heads)
            q = q.view(rows, self.kv_heads, groups, self.head_dim)
            k = self._rotary(k, cos, sin, self.kv_heads).view(rows, self.kv_heads, 1, -1)
            v = v.reshape(rows, self.kv_heads, 1, self.head_dim)
            keys, values = cache.write(i, k, v)
            if shared is None:
                out = F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=attend, scale=attn.scaling
                )
            else:
                out, lse = attention_with_lse(q, keys, values, attend, attn.scaling)
                out = shared.attend(i, q, out, lse, layout, attn.scaling)
            h = h + linear(attn.o_proj, out.reshape(rows, -1))
            x = norm(layer.post_attention_layernorm, h)
            gate, up = self._project((mlp.gate_proj, mlp.up_proj), x)
            h = h + linear(mlp.down_proj, mlp.act_fn(gate) * up)
        cache.advance(1)
        return linear(self.model.lm_head, norm(self.inner.norm, h)).float()

    def _step_ours(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        """``__call__`` without held prompts, in our extension's calls: each layer's attention
        (rotary, the new key and value cached, softmax over the real columns) in one, its
        residual adds each with the norm after it, the gated activation in one."""
        rows, layers = tokens.shape[0], self.inner.layers
        h = self.inner.embed_tokens(tokens)
        cos, sin = self.inner.rotary_emb(h[:, None], positions[:, None])
        cos, sin = cos.reshape(rows, -1).contiguous(), sin.reshape(rows, -1).contiguous()
        mask = mask.long().contiguous()
        first = layers[0].input_layernorm
        x = skinny.rms_norm(h, first.weight, first.variance_epsilon)
        if self._plan is not None:
            slots = (cache.keys, cache.values, cache.length)
            h, x = skinny.decode_layers(h, x, cos, sin, mask, slots, self._plan)
            cache.advance(1)
            return self._logits(x)
        for i, layer in enumerate(layers):
            attn, mlp, post = layer.self_attn, layer.mlp, layer.post_attention_layernorm
            q, k, v = map(_unit_columns, self._project((attn.q_proj, attn.k_proj, attn.v_proj), x))
            slot = (cache.keys[i], cache.values[i], cache.length)
            out = skinny.attend(q, k, v, cos, sin, slot, mask, attn.scaling)
            delta = _unit_columns(self._linear(attn.o_proj, out))
            h, x = skinny.add_rms_norm(h, delta, post.weight, post.variance_epsilon)
            gate, up = map(_unit_columns, self._project((mlp.gate_proj, mlp.up_proj), x))
            delta = _unit_columns(self._linear(mlp.down_proj, skinny.silu_mul(gate, up)))
            after = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.inner.norm
            h, x = skinny.add_rms_norm(h, delta, after.weight, after.variance_epsilon)
        cache.advance(1)
        return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits of the final norm's rows ``x``: a bf16 head on AMX writes its bf16
        values straight as fp32, with no conversion pass after the product."""
        head = self.model.lm_head
        packed = self._packed.get(head)
        if packed is not None and packed[0] is skinny.amx_linear:
            return skinny.amx_linear(x, packed[1], head.bias, widened=True)
        return self._linear(head, x).float()

    def _layer_plan(self) -> skinny.LayerPlan | None:
        """``decode_layers``' arguments, where every product of every layer is ours and reads
        only its packed weight (no live adapter); else None."""
        weights, biases, norms, eps = [], [], [], []
        layers = self.inner.layers
        for group in _groups(self.model)[:-1]:
            packed = self._packed_product(group)
            if packed is None:
                return None
            weights.append(packed[0])
            biases.append(packed[1])
        for i, layer in enumerate(layers):
            after = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.inner.norm
            for norm in (layer.post_attention_layernorm, after):
                norms.append(norm.weight)
                eps.append(float(norm.variance_epsilon))
        scales = {layer.self_attn.scaling for layer in layers}
        if len(scales) != 1:
            return None
        return skinny.LayerPlan(
            weights=weights,
            biases=biases,
            norms=norms,
            eps=eps,
            q_size=self.heads * self.head_dim,
            kv_size=self.kv_heads * self.head_dim,
            inter=_base(layers[0].mlp.gate_proj).out_features,
            scale=scales.pop(),
        )

    def _packed_product(
        self, group: tuple[nn.Module, ...]
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(packed weight, bias) of ``group``'s one product where it is ours and reads only the
        packed weight; else None."""
        if len(group) > 1:
            fused = self._fused.get(group)
            if fused is None:
                return None
            product, packed, bias, _ = fused
        else:
            module = group[0]
            if hasattr(module, "base_layer") and module not in self._merged:
                return None  # an adapter is read live, by ``_linear``
            found = self._packed.get(_base(module))
            if found is None:
                return None
            (product, packed), bias = found, _base(module).bias
        return None if product is _onednn else (packed, bias)


def _takes_ours_step(inner: nn.Module, dtype: torch.dtype) -> bool:
    """Whether ``FastDecoder._step_ours`` runs this model (the modules of ``model.model``)."""
    if dtype not in (torch.float32, torch.bfloat16):
        return False
    norms = [inner.norm] + [n for layer in inner.layers for n in _norms(layer)]
    return all(n.weight.dtype == dtype for n in norms) and all(
        type(layer.mlp.act_fn) in SILU and layer.self_attn.head_dim % skinny.LANES == 0
        for layer in inner.layers
    )


def _unit_columns(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its columns adjacent, as our extension reads rows (the plain products'
    transposed results are copied; a fused product's splits are already so)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _norms(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    return layer.input_layernorm, layer.post_attention_layernorm
