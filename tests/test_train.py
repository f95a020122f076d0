"""Training end to end: falling loss for every method, conversion, the schedule, clear errors."""

import json
import subprocess

import pytest

from xtuner_lite.errors import XtunerError

from conftest import EXAMPLE_DATA, ROOT, loss_curve, train_cmd

pytestmark = pytest.mark.slow

TINY_CONFIG = """
model = dict(pretrained={model!r}, method="lora", lora=dict(r=8, alpha=16, dropout=0.1))
train_dataset = dict(data_files={data!r}, tokenizer={model!r}, map_fn="alpaca",
                     template="smollm2", max_length=96, pack=True)
train = dict(batch_size=1, accumulative_counts=2, max_iters=16, lr=1e-2, dtype=None,
             save_steps=4, save_total_limit=2, log_interval=4)
"""


def test_unknown_train_key_is_named(tmp_path, tiny_llama):
    from xtuner_lite.commands.train import train

    cfg = dict(
        model=dict(pretrained=tiny_llama),
        train_dataset=dict(
            data_files=str(EXAMPLE_DATA / "alpaca_mini.json"),
            tokenizer=tiny_llama,
            template="smollm2",
        ),
        train=dict(max_iter=3),
    )
    with pytest.raises(XtunerError, match="unknown key 'max_iter'; did you mean 'max_iters'"):
        train(cfg, work_dir=tmp_path)


def test_non_positive_batch_settings_are_named():
    from xtuner_lite.training.runner import TrainSettings

    for name, value in (("pad_to_multiple_of", 0), ("batch_size", -1), ("chunk_size", 1.5)):
        with pytest.raises(XtunerError, match=f"train.{name} must be a positive integer"):
            TrainSettings(**{name: value})


@pytest.mark.parametrize("method", ["qlora", "full"])
def test_smollm2_configs_train_with_falling_loss(tmp_path, method):
    lr = "1e-3" if method == "qlora" else "5e-5"
    out = subprocess.run(
        train_cmd(
            f"smollm2_135m_alpaca_{method}",
            tmp_path,
            "--cfg-options",
            "train.max_iters=24",
            "train.epochs=None",
            "train.accumulative_counts=1",
            f"train.lr={lr}",
            "train.save_steps=100",
            "train_dataset.max_length=256",
            f"train_dataset.data_files={EXAMPLE_DATA / 'identity.json'}",
        ),
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    losses = loss_curve(tmp_path)
    assert len(losses) == 24
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.5 * first, losses
    folder = tmp_path / ("adapter" if method == "qlora" else "model")
    meta = json.loads((folder / "xtuner_lite.json").read_text())
    assert meta["template"] == "smollm2" and meta["method"] == method


def test_convert_pth_to_hf_gives_the_final_adapter(tmp_path, tiny_llama, capsys):
    import torch
    from safetensors.torch import load_file

    from xtuner_lite.cli import main

    config = tmp_path / "tiny_lora.py"
    config.write_text(
        TINY_CONFIG.format(model=tiny_llama, data=str(EXAMPLE_DATA / "alpaca_mini.json"))
    )
    work = tmp_path / "work"
    assert (
        main(["train", str(config), "--work-dir", str(work), "--cfg-options", "train.max_iters=4"])
        == 0
    )
    out = tmp_path / "converted"
    assert main(["convert", "pth_to_hf", str(config), str(work / "iter_4.pth"), str(out)]) == 0
    final = load_file(work / "adapter" / "adapter_model.safetensors")
    converted = load_file(out / "adapter_model.safetensors")
    assert final.keys() == converted.keys() and len(final) > 0
    assert all(torch.equal(final[k], converted[k]) for k in final)
    meta = json.loads((out / "xtuner_lite.json").read_text())
    assert meta["template"] == "smollm2" and meta["base_model"] == tiny_llama

    # the checkpoint of a different config is refused, naming the weight
    assert (
        main(
            [
                "convert",
                "pth_to_hf",
                str(config),
                str(work / "iter_4.pth"),
                str(out),
                "--force",
                "--cfg-options",
                "model.lora.r=4",
            ]
        )
        == 1
    )
    assert (
        "lora_A.default.weight has shape (8, 64), the config's model (4, 64)"
        in capsys.readouterr().err
    )
    assert (
        main(
            ["convert", "pth_to_hf", str(config), str(tmp_path / "nope.pth"), str(tmp_path / "o2")]
        )
        == 1
    )
    assert "nope.pth does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("max_iters,warmup_ratio", [(40, 0.03), (10, 0.1), (100, 0.03), (20, 0)])
def test_lr_schedule_reaches_the_peak_lr_and_decays(max_iters, warmup_ratio):
    """The schedule mmengine builds from our dicts: warmup ends at the configured lr, then the
    cosine falls to min_lr (a one-step LinearLR would keep lr/1000 for the whole run)."""
    import torch

    from xtuner_lite.training.runner import TrainSettings, lr_schedule

    settings = TrainSettings(lr=2e-4, warmup_ratio=warmup_ratio, min_lr_ratio=0.1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=settings.lr)
    schedulers = [
        cfg.pop("type")(optimizer, **cfg) for cfg in map(dict, lr_schedule(settings, max_iters))
    ]
    lrs = []
    for _ in range(max_iters):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
    peak = max(range(max_iters), key=lrs.__getitem__)
    assert lrs[peak] == pytest.approx(settings.lr, rel=1e-3)
    assert peak <= max(2, int(warmup_ratio * max_iters))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :]))
    assert settings.lr * 0.1 <= lrs[-1] < settings.lr * 0.2
