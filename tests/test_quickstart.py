"""The README quickstart: LoRA on the identity data teaches SmolLM2 a new name and maker."""

import json
import re
import subprocess
import sys

import pytest

from conftest import EXAMPLE_DATA, ROOT, loss_curve

pytestmark = pytest.mark.slow


def _xtuner(*args):
    out = subprocess.run(
        [sys.executable, "-m", "xtuner_lite.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_identity_lora_quickstart(tmp_path):
    ask = ["--prompt", "Who are you?", "--max-new-tokens", "40", "--no-stream"]
    before = _xtuner("chat", "smollm2-135m-instruct", *ask)
    assert "Tern" not in before
    _xtuner("train", "smollm2_135m_identity_lora", "--work-dir", str(tmp_path))
    losses = loss_curve(tmp_path)
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.1 * sum(losses[:3]) / 3
    adapter = tmp_path / "adapter"
    assert json.loads((adapter / "xtuner_lite.json").read_text())["template"] == "smollm2"
    after = _xtuner("chat", "smollm2-135m-instruct", "--adapter", str(adapter), *ask)
    assert "Tern" in after and "xtuner_lite team" in after
    samples = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert [s["when"] for s in samples] == ["before training"] * 2 + ["after training"] * 2
    assert "Tern" not in samples[0]["answer"] and "Tern" in samples[2]["answer"]
    png = _xtuner("plot-log", str(tmp_path)).strip()
    assert png.endswith("loss.png") and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert list(tmp_path.glob("*/vis_data/events.out.tfevents.*"))  # tensorboard scalars


def test_adapter_loads_with_plain_peft(tmp_path):
    """The saved adapter is a standard peft folder."""
    import torch
    from peft import PeftModel

    from xtuner_lite.commands.train import train
    from xtuner_lite.hub import load_model

    cfg = dict(
        model=dict(
            pretrained="smollm2-135m-instruct", method="lora", lora=dict(r=4, alpha=8, dropout=0.0)
        ),
        train_dataset=dict(
            data_files=str(EXAMPLE_DATA / "identity.json"),
            tokenizer="smollm2-135m-instruct",
            max_length=256,
        ),
        train=dict(max_iters=2, lr=1e-3, dtype=None, save_steps=100),
    )
    out = train(cfg, work_dir=tmp_path)
    model = PeftModel.from_pretrained(load_model("smollm2-135m-instruct"), str(out))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(torch.count_nonzero(p) for p in lora_b)  # trained weights came back


def test_notebook_example_runs(tmp_path, monkeypatch):
    """Execute examples/quickstart_notebook.py cell by cell (fewer steps, work dir in tmp)."""
    source = (ROOT / "examples/quickstart_notebook.py").read_text()
    source = source.replace('cfg.train["max_iters"] = 30', 'cfg.train["max_iters"] = 2')
    monkeypatch.chdir(ROOT)
    source = source.replace('"work_dirs/notebook"', repr(str(tmp_path / "nb")))
    namespace: dict = {}
    for cell in re.split(r"^# %%.*$", source, flags=re.M):
        exec(compile(cell, "quickstart_notebook.py", "exec"), namespace)
    assert (tmp_path / "nb" / "adapter" / "adapter_config.json").exists()
    assert isinstance(namespace["chat"].history[-1]["content"], str)
