"""Every setting out of range is refused before any work, in one line naming the key and what
is accepted; misspelt keys are named with the closest match."""

import pytest
import torch

from xtuner_lite.errors import XtunerError
from xtuner_lite.training.runner import TrainSettings, total_steps

from conftest import tiny_train_cfg

BAD_TRAIN = [
    ("max_norm", -1, r"train\.max_norm must be a number > 0 \(or None"),
    ("lr", 0, r"train\.lr must be a number > 0"),
    ("lr", "abc", r"train\.lr must be a number > 0, got 'abc'"),
    ("max_iters", 0, r"train\.max_iters must be a positive integer or None"),
    ("warmup_ratio", 1.5, r"train\.warmup_ratio must be a number in \[0, 1\]"),
    ("log_interval", 0, r"train\.log_interval must be a positive integer"),
    ("dtype", "fp64", r"train\.dtype must be 'bf16', 'fp16' or None"),
    ("save_total_limit", 0, r"train\.save_total_limit must be a positive integer"),
    ("optimizer", "sgd", r"train\.optimizer must be one of adamw"),
    ("epochs", -1, r"train\.epochs must be a number > 0"),
]


@pytest.mark.parametrize("key,value,message", BAD_TRAIN)
def test_out_of_range_train_settings_are_refused_before_any_work(
    tmp_path, tiny_llama, key, value, message
):
    from xtuner_lite.commands.train import train

    cfg = tiny_train_cfg(tiny_llama, **{key: value})
    with pytest.raises(XtunerError, match=message) as info:
        train(cfg, work_dir=tmp_path / "run")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()  # nothing was started


def test_a_cuda_device_without_one_is_refused(tmp_path, tiny_llama):
    from xtuner_lite.commands.train import train

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(XtunerError, match="train.device='cuda' but this machine has no such"):
        train(tiny_train_cfg(tiny_llama, device="cuda"), work_dir=tmp_path / "run")


def test_several_problems_are_reported_together():
    from xtuner_lite.training.runner import TrainSettings

    with pytest.raises(XtunerError) as info:
        TrainSettings(lr=-1, max_iters=0, warmup_ratio=2)
    text = str(info.value)
    assert "train.lr" in text and "train.max_iters" in text and "train.warmup_ratio" in text


@pytest.mark.parametrize(
    "lora,message",
    [
        (dict(r=0), r"model\.lora\.r must be an integer >= 1, got 0"),
        (dict(dropout=1.0), r"model\.lora\.dropout must be a number in \[0, 1\)"),
        (dict(alpah=16), r"model\.lora: unknown key 'alpah'; did you mean 'alpha'"),
    ],
)
def test_lora_settings_are_checked_before_the_model_loads(tmp_path, tiny_llama, lora, message):
    from xtuner_lite.commands.train import train

    cfg = tiny_train_cfg(tiny_llama)
    cfg["model"]["lora"] = lora
    with pytest.raises(XtunerError, match=message):
        train(cfg, work_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_misspelt_top_level_dict_is_named(tmp_path):
    from xtuner_lite.config import load_config

    config = tmp_path / "typo.py"
    config.write_text(
        "model = dict(pretrained='x')\ntrian = dict(lr=1e-3)\nmy_paths = dict(root='/data')\n"
    )
    with pytest.raises(XtunerError, match="unknown top-level dict 'trian'; did you mean 'train'"):
        load_config(str(config))
    config.write_text("model = dict(pretrained='x')\nmy_paths = dict(root='/data')\n")
    assert load_config(str(config))["my_paths"]["root"] == "/data"  # the user's own names


BAD_OPTIONS = [
    ("chat smollm2-135m-instruct --top-p 0", "--top-p must be a number in (0, 1]"),
    ("chat smollm2-135m-instruct --temperature -1", "--temperature must be a number in [0, 2]"),
    ("chat smollm2-135m-instruct --max-new-tokens 0", "--max-new-tokens must be an integer >= 1"),
    ("chat smollm2-135m-instruct --repetition-penalty 0", "--repetition-penalty must be"),
    ("chat smollm2-135m-instruct --top-k -5", "--top-k must be an integer >= 0"),
    ("chat smollm2-135m-instruct --seed -1", "--seed must be an integer in [0, "),
    ("serve smollm2-135m-instruct --port 70000", "--port: must be a port in [0, 65535]"),
    ("serve smollm2-135m-instruct --max-batch-size 0", "--max-batch-size: must be an integer"),
    ("merge - a b --max-shard-size banana", "--max-shard-size: must be a size"),
    ("eval --models m --tasks t --limit -3", "--limit: must be an integer >= 1"),
    ("plan smollm2_135m_alpaca_lora --max-length -5", "--max-length: must be an integer >= 1"),
    ("plan smollm2_135m_alpaca_lora --gpu-mem lots", "--gpu-mem: must be a size"),
    ("contamination a.jsonl --task t --ngram 0", "--ngram: must be an integer >= 1"),
]


def _no_model_loads(monkeypatch):
    from xtuner_lite.commands import chat

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(chat.ChatModel, "load", refuse)


@pytest.mark.parametrize("argv,message", BAD_OPTIONS)
def test_bad_cli_options_exit_2_in_one_line_before_loading(argv, message, capsys, monkeypatch):
    from xtuner_lite.cli import main

    _no_model_loads(monkeypatch)
    try:
        code = main(argv.split())
    except SystemExit as exc:  # argparse's own checks
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_serve_on_a_busy_port_exits_2_before_loading(capsys, monkeypatch):
    import socket

    from xtuner_lite.cli import main

    _no_model_loads(monkeypatch)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "smollm2-135m-instruct", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("fast", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_trains_in_fp32(monkeypatch, fast):
    from xtuner_lite.training import runner
    from xtuner_lite.training.runner import TrainSettings, cpu_precision

    monkeypatch.setattr(runner, "cpu_has_fast_bf16", lambda: fast)
    model = dict(pretrained="x", method="qlora", dtype="bf16", compute_dtype="bf16")
    new_model, settings, changed = cpu_precision(model, TrainSettings(dtype="bf16", device="cpu"))
    if fast:
        assert (new_model, settings.dtype, changed) == (model, "bf16", [])
    else:
        assert (
            settings.dtype is None
            and new_model["dtype"] == new_model["compute_dtype"] == "fp32"
            and len(changed) == 3
        )
        assert model["dtype"] == "bf16"  # the caller's config is not changed in place


def test_xtuners_names_for_chat_samples_are_read_as_ours():
    from xtuner_lite.training.runner import renamed_settings

    ours = renamed_settings({"evaluation_inputs": ["hi"], "evaluation_freq": 5, "lr": 1e-4})
    assert ours == {"sample_prompts": ["hi"], "sample_freq": 5, "lr": 1e-4}
    with pytest.raises(XtunerError, match="evaluation_freq .* and train.sample_freq are both set"):
        renamed_settings({"evaluation_freq": 5, "sample_freq": 5})


def test_epochs_count_the_rows_every_data_parallel_group_takes_per_step():
    """N data-parallel processes take N × batch × accumulation rows a step (each its own), so
    one epoch is N times fewer steps; a sequence-parallel group shares one group's rows."""
    settings = TrainSettings(epochs=1, batch_size=2, accumulative_counts=2)
    assert total_steps(settings, 100) == 25
    assert total_steps(settings, 100, data_parallel=2) == 13  # ceil(100 / 8)
    assert total_steps(TrainSettings(max_iters=7), 100, data_parallel=4) == 7
