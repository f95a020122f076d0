import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, shared_file

pytestmark = pytest.mark.integration


def xtuner(*args, stdin=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "xtuner_lite.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        input=stdin,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def test_help_lists_every_command():
    out = xtuner("--help")
    assert out.returncode == 0
    for command in (
        "download",
        "chat",
        "check-dataset",
        "list-cfg",
        "list-templates",
        "train",
        "plot-log",
        "copy-cfg",
        "merge",
        "convert",
        "export",
        "serve",
        "data",
    ):
        assert command in out.stdout
        sub = xtuner(command, "--help")
        assert sub.returncode == 0 and "usage: xtuner " + command in sub.stdout


def test_lmdeploy_backend_says_what_is_missing(monkeypatch, capsys):
    import sys
    import types

    from xtuner_lite.cli import main

    if "lmdeploy" not in sys.modules:  # the test environment never has it
        assert (
            main(["chat", "smollm2-135m-instruct", "--backend", "lmdeploy", "--prompt", "hi"]) == 1
        )
        assert "LMDeploy, which is not installed" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "lmdeploy", types.ModuleType("lmdeploy"))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["chat", "smollm2-135m-instruct", "--backend", "lmdeploy", "--prompt", "hi"]) == 1
    assert "needs a CUDA GPU and none is visible" in capsys.readouterr().err


def test_missing_command_is_an_error_not_help():
    out = xtuner()
    assert out.returncode == 2 and "required" in out.stderr


def test_unknown_config_key_exits_nonzero_with_suggestion():
    out = xtuner(
        "check-dataset",
        "alpaca_en_demo",
        "--show",
        "0",
        "--cfg-options",
        "train_dataset.max_lenght=5",
    )
    assert out.returncode == 1
    assert "unknown key 'max_lenght'; did you mean 'max_length'?" in out.stderr
    assert "Traceback" not in out.stderr


def test_check_dataset_bad_file_names_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"instruction": "q", "output": "a"})
        + "\n"
        + json.dumps({"instruction": "q", "output": ["a"]})
        + "\n"
    )
    out = xtuner("check-dataset", "alpaca_en_demo", "--show", "0", "--data", str(bad))
    assert out.returncode == 1
    assert f"{bad}, line 2, field 'output': expected a string, got list" in out.stderr


def test_check_dataset_on_real_alpaca():
    data = shared_file("sft/llamafactory_alpaca_en_demo.json")
    out = xtuner("check-dataset", "alpaca_en_demo", "--data", str(data))
    assert out.returncode == 0, out.stderr
    for stage in ("1. loaded", "2. after map fn", "3. chat template", "4. tokens", "5. first"):
        assert stage in out.stdout
    assert "⟦Making crepes is an easy" in out.stdout  # the answer is marked as trained
    assert "rows loaded" in out.stdout and "999" in out.stdout


def test_chat_one_shot_answers_greedily():
    out = xtuner(
        "chat",
        "smollm2-135m-instruct",
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "20",
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_chat_matches_transformers_generate(smol_tokenizer):
    import torch

    from xtuner_lite.commands.chat import ChatSession, GenerationOptions
    from xtuner_lite.hub import load_model

    session = ChatSession("smollm2-135m-instruct", options=GenerationOptions(max_new_tokens=24))
    reply = session.ask("Name a primary colour.")
    model = load_model("smollm2-135m-instruct").eval()
    ids = smol_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a primary colour."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        ref = model.generate(
            ids,
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=smol_tokenizer.convert_tokens_to_ids("<|im_end|>"),
        )
    assert reply == smol_tokenizer.decode(ref[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert len(session.history) == 2


@pytest.mark.parametrize("ref", ["./no/such/model", "/definitely/missing"])
def test_missing_model_path_is_clear(ref):
    out = xtuner("chat", ref, "--prompt", "hi")
    assert out.returncode == 1 and "does not exist" in out.stderr


def test_copy_cfg_gives_an_editable_config_that_loads(tmp_path):
    out = xtuner("copy-cfg", "smollm2_135m_alpaca_qlora", str(tmp_path / "mine" / "smollm2"))
    assert out.returncode == 0, out.stderr
    from xtuner_lite.config import load_config

    cfg = load_config(out.stdout.strip())
    assert cfg.model["method"] == "qlora"
    again = xtuner("copy-cfg", "smollm2_135m_alpaca_qlora", str(tmp_path / "mine" / "smollm2"))
    assert again.returncode == 1 and "not overwriting" in again.stderr


def test_interactive_chat_through_a_pseudo_terminal():
    """Two turns that share history, RESET, the same question without it, EXIT — as a user
    at a terminal (the prompt goes to stderr, as input() writes it there without readline)."""
    import pty
    import select
    import time

    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xtuner_lite.cli",
            "chat",
            "smollm2-135m-instruct",
            "--max-new-tokens",
            "40",
        ],
        cwd=ROOT,
        stdin=child_fd,
        stdout=child_fd,
        stderr=child_fd,
        env={**os.environ, "TERM": "dumb"},
    )
    os.close(child_fd)
    seen = ""

    def until(marker, timeout=300):
        nonlocal seen
        deadline = time.time() + timeout
        while marker not in seen:
            assert time.time() < deadline, f"timed out waiting for {marker!r}; got {seen!r}"
            if select.select([main_fd], [], [], 1)[0]:
                seen += os.read(main_fd, 4096).decode(errors="replace")
        before, _, seen = seen.partition(marker)
        return before

    def say(text):
        os.write(main_fd, (text + "\n").encode())

    try:
        until(">>> ")
        say("Hi! My name is Ada.")
        assert "Ada" in until(">>> ").split("\n", 1)[1]  # the reply, not the echoed input
        say("What is my name?")
        with_history = until(">>> ")
        say("RESET")
        assert "history cleared" in until(">>> ")
        say("What is my name?")
        fresh = until(">>> ")
        assert fresh.startswith("What is my name?") and len(fresh) > 30
        assert with_history != fresh  # greedy: only the dropped history can change the answer
        say("EXIT")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(main_fd)


def test_python_api_exposes_every_command():
    import xtuner_lite
    import xtuner_lite.commands.chat  # noqa: F401 - submodules imported first must not shadow the names
    import xtuner_lite.commands.convert  # noqa: F401
    import xtuner_lite.commands.export  # noqa: F401
    import xtuner_lite.server  # noqa: F401

    for name in (
        "train",
        "merge_adapter",
        "pth_to_hf",
        "export_gguf",
        "ChatSession",
        "InferenceEngine",
        "run_eval",
        "serve",
        "prepare_data",
    ):
        assert callable(getattr(xtuner_lite, name)), name


def test_bitsandbytes_missing_kernels_warning_is_dropped_and_only_it(caplog):
    """bitsandbytes printed "Failed to load CPU gemm_4bit_forward from kernels-community" as
    the first line of every command on AVX512-bf16 CPUs; other warnings of its logger stay."""
    import logging

    import xtuner_lite  # noqa: F401 - installs the filter

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "x")
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
    run = subprocess.run([sys.executable, "-c", "import xtuner_lite.model, bitsandbytes"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0 and "kernels-community" not in run.stderr
