"""Shared fixtures: offline hub, the real SmolLM2 tokenizer, and ../shared/data (skip or fail)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def shared_file(relative: str) -> Path:
    """A file under ../shared/data; skipped on a user's clone, a failure in CI (CI=true)."""
    path = SHARED / relative
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing; CI must run with ../shared beside the checkout")
        pytest.skip(f"{path} not present (../shared/data is only beside the project in CI)")
    return path


@pytest.fixture(scope="session")
def smol_tokenizer():
    from xtuner_lite.hub import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(autouse=True)
def _isolated_dataset_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XTUNER_LITE_DATA_CACHE", str(tmp_path / "dataset-cache"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smol_tokenizer):
    """A random 2-layer Llama with SmolLM2's vocabulary, saved as an HF folder (fp32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return str(path)


def wait_for_lines(path: Path, lines: int, proc, timeout: float = 300) -> None:
    """Poll until ``path`` has ``lines`` lines (or ``proc`` ends): the moment to kill a run."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return
        time.sleep(0.005)
