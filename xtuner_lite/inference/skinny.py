"""Our kernels for a decode step's few rows (``csrc/``), built on first use.

Why our own kernels: at a decode step's few rows oneDNN's packed kernels read the weights well
below the memory's bandwidth, and a decode step is mostly those products (docs/benchmarks.md has
the measurements). Ours stream each 16-column weight block once, prefetched: in fp32 through a
register tile of rows (``csrc/skinny.cpp``; AVX-512: up to 16 rows × two blocks; AVX2: 6 rows ×
one), in bf16 as AMX B tiles (``csrc/amx.cpp``, on CPUs with AMX; elsewhere oneDNN's bf16
kernels serve: a VDPBF16PS version of ours was slower than them). The rest of a step is in
``csrc/step.cpp``: RMSNorm (alone and fused with the residual add before it), rotary embedding,
the SiLU gating and the attention of one new token a row over the KV cache (its bf16 scores
as AMX tile products where the CPU has them), one call each; and
``csrc/layers.cpp`` runs all the layers of a step in one call. It needs AVX-512 or AVX2 with FMA,
a C++ compiler and ninja; torch's extension loader builds it on first use (one warning says so)
into ``build_directory(isa)`` and rebuilds it when a source changes. Wherever any of that is
missing the callers keep oneDNN and torch's ops, with a warning saying why.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils import cpp_extension

from xtuner_lite.hub import cache_dir

CSRC = Path(__file__).resolve().parent / "csrc"
# the fp32 products; the bf16 ones on AMX; a step's other work; its layers in one call
SOURCES = [CSRC / name for name in ("skinny.cpp", "amx.cpp", "step.cpp", "layers.cpp")]
NAME = "xtuner_lite_skinny"
# "0" turns our kernels off (oneDNN and torch's ops serve); "avx2" builds the AVX2 version on an
# AVX-512 CPU (to test it, or to see what a CPU without AVX-512 gets)
SWITCH = "XTUNER_LITE_SKINNY"
# each build: the CPU flags it needs and its compiler flags
ISAS = {
    "avx512": ({"avx512f"}, ["-mavx512f", "-mfma"]),
    "avx2": ({"avx2", "fma"}, ["-mavx2", "-mfma"]),
}
LANES = 16  # a packed block's columns: a weight's rows must be a multiple of it
AMX_FLAGS = frozenset({"amx_tile", "amx_bf16"})  # the CPU flags our bf16 products need
AMX_DEPTH = 32  # a bf16 tile row's values: a weight's columns must be a multiple of it

logger = logging.getLogger(__name__)


@functools.cache  # read once: the flags do not change while the process runs
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def machine_isa() -> str | None:
    """The build of our kernels this machine runs: ``avx512`` where the CPU has AVX-512, else
    ``avx2`` (with FMA), else None; ``SWITCH`` turns them off or picks ``avx2``."""
    return _isa_for(os.environ.get(SWITCH))


@functools.cache  # every product asks which build runs: decided once per switch setting
def _isa_for(choice: str | None) -> str | None:
    if choice == "0":
        return None
    for isa in ("avx2",) if choice == "avx2" else tuple(ISAS):
        if ISAS[isa][0] <= cpu_flags():
            return isa
    return None


def build_directory(isa: str) -> Path:
    """Where a build is made and kept: one folder per torch and Python version and build."""
    version = f"torch-{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    return cache_dir() / "kernels" / version / isa


@functools.cache
def _extension(isa: str):
    """The built extension, or None (with the reason logged once) where it cannot be had."""
    folder, name = build_directory(isa), f"{NAME}_{isa}"
    try:
        if not (folder / f"{name}.so").exists():  # the first use pays the compiler's time
            logger.warning("xtuner_lite: building our decode kernel once, in %s", folder)
        folder.mkdir(parents=True, exist_ok=True)
        return cpp_extension.load(
            name=name,
            sources=[str(source) for source in SOURCES],
            # no contraction of a·b + c into one rounding: the elementwise ops round as torch's
            extra_cflags=["-O3", *ISAS[isa][1], "-fopenmp", "-ffp-contract=off"],
            extra_ldflags=["-fopenmp"],  # torch's threads are OpenMP's: the kernel joins them
            build_directory=str(folder),
            verbose=False,
        )
    except Exception as err:  # no compiler, no ninja, no headers: oneDNN serves instead
        logger.warning("xtuner_lite: our decode kernel could not be built (%s); using oneDNN", err)
        return None


def _module():
    """This machine's build (check ``available`` first)."""
    return _extension(machine_isa())


def available() -> bool:
    """Whether our kernels run on this machine (and are not switched off)."""
    isa = machine_isa()
    return isa is not None and _extension(isa) is not None


def amx_available() -> bool:
    """Whether our bf16 products run here: the AVX-512 build on a CPU with AMX's bf16 tiles,
    which the OS lets this process use."""
    return _amx_for(machine_isa())


@functools.cache
def _amx_for(isa: str | None) -> bool:
    if isa != "avx512" or not AMX_FLAGS <= cpu_flags():
        return False
    extension = _extension(isa)
    return extension is not None and bool(extension.amx_ready())


def supports(weight: torch.Tensor) -> bool:
    """Whether ``pack`` and ``product_for`` can take ``weight`` on this machine: fp32 where
    our kernels run, bf16 where they have AMX (else oneDNN's kernels, which use AMX too, serve)."""
    if weight.device.type != "cpu" or weight.dim() != 2 or weight.shape[0] % LANES:
        return False
    if weight.dtype == torch.float32:
        return available()
    return weight.dtype == torch.bfloat16 and weight.shape[1] % AMX_DEPTH == 0 and amx_available()


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, in) in our kernel's layout for its dtype (a copy; check ``supports``)."""
    weight = weight.detach().contiguous()
    if weight.dtype == torch.bfloat16:
        return _module().amx_pack(weight)
    return _module().pack(weight)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a fp32 (rows, in) ``x`` and ``packed = pack(weight)``."""
    return _module().linear(x.contiguous(), packed, bias)


def amx_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, widened: bool = False
) -> torch.Tensor:
    """``linear`` of bf16 ``x`` and weight on AMX tiles (fp32 sums, one rounding to bf16);
    ``widened``: those bf16 values returned as fp32 (what ``.float()`` of the result gives,
    without the second pass over it)."""
    return _module().amx_linear(x, packed, bias, widened)


def product_for(weight: torch.Tensor) -> Callable:
    """The product that reads ``pack(weight)``: ``linear`` or ``amx_linear``."""
    return amx_linear if weight.dtype == torch.bfloat16 else linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm of a CPU (rows, features) ``x`` (fp32 or bf16, ``weight``
    of its dtype) in one call: a decode step's norms of a few rows cost more in torch's
    per-op dispatch than in arithmetic."""
    return _module().rms_norm(x.contiguous(), weight, eps)


def add_rms_norm(
    h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h + delta, rms_norm(h + delta))``: a residual add and the norm after it in one call
    (``delta``'s rows may be strided), the sum rounded to the dtype as torch's add rounds."""
    total, normed = _module().add_rms_norm(h.contiguous(), delta, weight, eps)
    return total, normed


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` of (rows, features) tensors with unit column stride (the halves
    of a fused gate/up product), each op's result rounded to the dtype as torch's are; the
    exponential is a polynomial within 2 ulp of the exact one, where torch's is another."""
    return _module().silu_mul(gate, up)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor, int],
    mask: torch.Tensor,
    scale: float,
    tiles: bool = True,
) -> torch.Tensor:
    """One decode step's attention of a layer, one new token a row: ``q`` (rows, heads ·
    head_dim) and ``k`` get the rotary embedding, ``k`` and ``v`` (rows, kv_heads · head_dim)
    are stored in the layer's key/value buffers (rows, kv_heads, capacity, head_dim) at column
    ``length`` (``cache``: the two buffers and it), and every query head attends to its kv head's
    columns ``0..length`` where the int64 ``mask`` (rows, length + 1) is nonzero: softmax in
    fp32, as torch's attention computes it. In bf16 on a CPU with AMX (``tiles``), the scores
    of 16 adjacent cached keys are one tile product. Returns (rows, heads · head_dim)."""
    keys, values, length = cache
    return _module().attend(q, k, v, cos, sin, keys, values, length, mask, scale, tiles)


@dataclass(frozen=True)
class LayerPlan:
    """What ``decode_layers`` reads of a model's decoder layers, gathered once: per layer the
    packed q/k/v (fused), o, gate/up (fused) and down weights and their biases; per layer its
    post-attention norm and the norm after it (the next layer's input norm, the final norm
    after the last layer) with their epsilons; the widths of q, of k (and v), of the gated
    activation; the attention's scale."""

    weights: list[torch.Tensor]
    biases: list[torch.Tensor | None]
    norms: list[torch.Tensor]
    eps: list[float]
    q_size: int
    kv_size: int
    inter: int
    scale: float


def decode_layers(
    h: torch.Tensor,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
    cache: tuple[list[torch.Tensor], list[torch.Tensor], int],
    plan: LayerPlan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every decoder layer of a decode step in one call, where every product is ours: the
    same ``attend``, ``add_rms_norm``, ``silu_mul`` and products as the step in Python, with no
    return to Python between them. ``x``: the first layer's input norm of ``h``; ``cache``:
    each layer's key and value buffers and the filled length. Returns (h, the final norm of
    h)."""
    keys, values, length = cache
    h, x = _module().decode_layers(
        h, x, cos, sin, mask, length, plan.weights, plan.biases, plan.norms, plan.eps,
        keys, values, plan.q_size, plan.kv_size, plan.inter, plan.scale,
    )  # fmt: skip
    return h, x


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' rotate-half rotary embedding of ``x`` (rows, heads · head_dim; its rows
    may be strided, as a split of a fused product's output is) with ``cos``/``sin`` (rows,
    head_dim) in one call; each product and the sum rounded as torch's separate ops round."""
    x = x if x.stride(-1) == 1 else x.contiguous()  # a product's transposed result
    return _module().rotary(x, cos.contiguous(), sin.contiguous(), heads)


__all__ = [
    "AMX_DEPTH",
    "AMX_FLAGS",
    "ISAS",
    "LANES",
    "LayerPlan",
    "SOURCES",
    "SWITCH",
    "add_rms_norm",
    "amx_available",
    "amx_linear",
    "attend",
    "available",
    "build_directory",
    "cpu_flags",
    "decode_layers",
    "linear",
    "machine_isa",
    "pack",
    "product_for",
    "rms_norm",
    "rotary",
    "silu_mul",
    "supports",
]
