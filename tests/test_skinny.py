"""Our decode kernel (inference/skinny.py): the products, norms, rotary embedding, gated
activation and attention it computes, and the fallback to oneDNN where it cannot be built.
The engine's greedy tokens through it: tests/test_inference.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from xtuner_lite.inference import skinny

needs_kernel = pytest.mark.skipif(
    skinny.machine_isa() is None, reason="our decode kernel needs AVX-512 or AVX2 with FMA"
)


@pytest.fixture(params=list(skinny.ISAS))
def isa(request, monkeypatch):
    """Each build of our kernels this CPU can run (an AVX-512 CPU runs both)."""
    if not skinny.ISAS[request.param][0] <= skinny.cpu_flags():
        pytest.skip(f"this CPU cannot run the {request.param} build")
    monkeypatch.setenv(skinny.SWITCH, request.param)
    assert skinny.machine_isa() == request.param
    return request.param


@pytest.mark.parametrize("rows", [1, 6, 7, 16, 17, 40])
@pytest.mark.parametrize("out_features,in_features", [(16, 64), (48, 576), (960, 576), (576, 1536)])
def test_our_products_equal_f_linear(isa, rows, out_features, in_features):
    """One block, an odd number of blocks, the model's widths; partial row tiles, several
    tiles; with a bias and without."""
    gen = torch.Generator().manual_seed(rows * out_features)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    x = torch.randn(rows, in_features, generator=gen)
    bias = torch.randn(out_features, generator=gen)
    assert skinny.supports(weight)
    packed = skinny.pack(weight)
    for b in (None, bias):
        exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
        got = skinny.linear(x, packed, b)
        assert got.shape == (rows, out_features) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), exact, rtol=0, atol=2e-5)
        torch.testing.assert_close(got, F.linear(x, weight, b), rtol=0, atol=2e-5)


def test_weights_it_does_not_take_are_left_to_onednn():
    assert not skinny.supports(torch.ones(97, 64))  # rows not a multiple of its block
    assert not skinny.supports(torch.ones(64, 48, dtype=torch.bfloat16))  # K not whole tiles
    assert not skinny.supports(torch.ones(64, 64, dtype=torch.float16))


@pytest.mark.skipif(not skinny.amx_available(), reason="our bf16 products need AMX's bf16 tiles")
@pytest.mark.parametrize("rows", [1, 16, 17, 40])
@pytest.mark.parametrize("out_features,in_features", [(16, 32), (48, 64), (960, 576), (576, 1536)])
def test_our_amx_products_are_f_linears_in_bf16(rows, out_features, in_features):
    """One block, an odd number of blocks, the model's widths; one row tile, a partial second;
    with a bias and without: every value F.linear's (oneDNN's AMX kernel, which sums in the
    same order) up to 17 rows; past them, within one bf16 rounding of the exact product; the
    widened product (the decoder's logits) is the bf16 one as fp32, bit for bit."""
    gen = torch.Generator().manual_seed(rows * out_features)
    weight = (torch.randn(out_features, in_features, generator=gen) * 0.05).to(torch.bfloat16)
    x = torch.randn(rows, in_features, generator=gen).to(torch.bfloat16)
    bias = torch.randn(out_features, generator=gen).to(torch.bfloat16)
    assert skinny.supports(weight) and skinny.product_for(weight) is skinny.amx_linear
    packed = skinny.pack(weight)
    for b in (None, bias):
        got = skinny.amx_linear(x, packed, b)
        assert got.shape == (rows, out_features) and got.dtype == torch.bfloat16
        if rows <= 17:
            assert torch.equal(got, F.linear(x, weight, b))
        exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
        torch.testing.assert_close(got.double(), exact, rtol=2**-8, atol=1e-3)
        widened = skinny.amx_linear(x, packed, b, widened=True)
        assert widened.dtype == torch.float32 and torch.equal(widened, got.float())


@needs_kernel
def test_a_machine_that_cannot_build_it_keeps_onednn_and_says_why(tmp_path):
    """No working compiler (a fresh build directory, so nothing cached is loaded): a warning
    naming the cause, and every weight left to oneDNN."""
    code = (
        "import logging, torch; logging.basicConfig();"
        "from xtuner_lite.inference import skinny;"
        "print('supports', skinny.supports(torch.ones(64, 64)))"
    )
    env = dict(os.environ, CXX="/bin/false", XTUNER_LITE_CACHE=str(tmp_path))
    env.pop(skinny.SWITCH, None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "supports False" in done.stdout
    assert "building our decode kernel once" in done.stderr
    assert "our decode kernel could not be built" in done.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_our_rms_norm_is_transformers_rms_norm(isa, dtype):
    """fp32: within rounding (its mean sums in another order); bf16: every value equal."""
    gen = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(576, eps=1e-5)
    norm.weight.data = torch.randn(576, generator=gen)
    norm = norm.to(dtype)
    x = (torch.randn(16, 576, generator=gen) * 3).to(dtype)
    got = skinny.rms_norm(x, norm.weight, norm.variance_epsilon)
    if dtype == torch.bfloat16:
        assert torch.equal(got, norm(x))
    else:
        torch.testing.assert_close(got, norm(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_our_rotary_is_transformers_rotary(isa, dtype):
    """On strided rows (a split of a fused q/k/v product's output), 9 query heads of 64 with
    one position per row: transformers' ``apply_rotary_pos_emb``, every value equal."""
    config = LlamaConfig(hidden_size=576, num_attention_heads=9, max_position_embeddings=512)
    rotary = LlamaRotaryEmbedding(config)
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(16, 960, generator=gen).to(dtype)
    q = qkv[:, :576]
    positions = torch.randint(0, 500, (16, 1), generator=gen)
    cos, sin = rotary(q, positions)  # (16, 1, 64)
    want, _ = apply_rotary_pos_emb(q.reshape(16, 1, 9, 64), q.reshape(16, 1, 9, 64), cos, sin, 2)
    got = skinny.rotary(q, cos.reshape(16, 64), sin.reshape(16, 64), 9)
    assert torch.equal(got, want.reshape(16, 576))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_our_add_rms_norm_is_the_add_then_the_norm(isa, dtype):
    """The residual add rounded as torch's, on a strided delta; the norm as ``rms_norm``."""
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(16, 576, generator=gen).to(dtype)
    delta = torch.randn(16, 1152, generator=gen).to(dtype)[:, 576:]
    weight = torch.randn(576, generator=gen).to(dtype)
    total, normed = skinny.add_rms_norm(h, delta, weight, 1e-5)
    assert torch.equal(total, h + delta)
    assert torch.equal(normed, skinny.rms_norm(h + delta, weight, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_our_silu_mul_is_torchs(isa, dtype):
    """The halves of a fused gate/up product (strided rows, a width that is not a multiple of
    the kernel's chunk): fp32 within its exponential's rounding; bf16 every value equal."""
    gen = torch.Generator().manual_seed(2)
    gate, up = (torch.randn(7, 2 * 1000, generator=gen) * 4).to(dtype).split([1000, 1000], -1)
    got, want = skinny.silu_mul(gate, up), F.silu(gate) * up
    if dtype == torch.bfloat16:  # the exponential's last-bit differences vanish in bf16
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _attention_reference(q, k, v, cos, sin, keys, values, length, mask, scale):
    """The decoder's torch path: rotate, write the cache column, sdpa over the real columns,
    in float64 (``q``/``k`` rotated in their dtype first, as the decoder does)."""
    rows, kv_heads, _, dim = keys.shape
    heads = q.shape[1] // dim
    q = skinny.rotary(q, cos, sin, heads).view(rows, kv_heads, heads // kv_heads, dim)
    keys[:, :, length] = skinny.rotary(k, cos, sin, kv_heads).view(rows, kv_heads, dim)
    values[:, :, length] = v.reshape(rows, kv_heads, dim)
    additive = torch.zeros(mask.shape, dtype=torch.float64).masked_fill_(mask == 0, -torch.inf)
    out = F.scaled_dot_product_attention(
        q.double(),
        keys[:, :, : length + 1].double(),
        values[:, :, : length + 1].double(),
        attn_mask=additive[:, None, None, :],
        scale=scale,
    )
    return out.reshape(rows, -1)


@pytest.mark.parametrize(
    "dtype,tiles", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)]
)
@pytest.mark.parametrize("dim,kv_heads,groups", [(64, 3, 3), (128, 2, 4), (32, 1, 2)])
@pytest.mark.parametrize("length", [0, 5, 150])
def test_our_attention_is_sdpa_over_the_cache(isa, dtype, tiles, dim, kv_heads, groups, length):
    """One new token a row against a KV buffer with room (left padding that differs by row,
    a hole in one row, the first step with no column cached): the new key and value land in
    column ``length`` exactly as the torch path writes them, and the output is float64 sdpa's
    within the dtype's rounding; head dims our register kernel serves (64, 128) and one it
    does not (32); bf16 scores as AMX tile products (16 adjacent keys; the hole and the
    padding break some runs) and without; tiles asked for where the build or CPU has none
    (the AVX2 build) fall back to the same exact-enough result."""
    gen = torch.Generator().manual_seed(length + dim)
    rows, capacity, heads = 5, length + 7, kv_heads * groups
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    angles = torch.rand(rows, dim, generator=gen) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    keys = torch.randn(rows, kv_heads, capacity, dim, generator=gen).to(dtype)
    values = torch.randn(rows, kv_heads, capacity, dim, generator=gen).to(dtype)
    mask = torch.ones(rows, length + 1, dtype=torch.long)
    for row in range(rows):
        mask[row, : min(row * 2, length)] = 0
    if length > 20:
        mask[1, 10:20] = 0
    want_keys, want_values = keys.clone(), values.clone()
    want = _attention_reference(q, k, v, cos, sin, want_keys, want_values, length, mask, 0.125)
    got = skinny.attend(q, k, v, cos, sin, (keys, values, length), mask, 0.125, tiles=tiles)
    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tolerance)


@needs_kernel
def test_our_attention_names_a_buffer_without_room():
    keys = torch.zeros(2, 1, 4, 64)
    q = k = v = torch.zeros(2, 64)
    cos = sin = torch.zeros(2, 64)
    mask = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(RuntimeError, match="past the buffers' 4"):
        skinny.attend(q, k, v, cos, sin, (keys, keys.clone(), 4), mask, 1.0)
