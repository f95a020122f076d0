"""Our decode kernel (inference/skinny.py): the products it computes, and the fallback to oneDNN
where it cannot be built. The engine's greedy tokens through it: tests/test_inference.py."""

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
    assert not skinny.supports(torch.ones(64, 64, dtype=torch.bfloat16))


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
