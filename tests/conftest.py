"""Shared fixtures: offline hub, the real SmolLM2 tokenizer, and ../shared/data (skip or fail)."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
EXAMPLE_DATA = ROOT / "xtuner_lite" / "examples" / "data"  # bundled with the package


def shared_file(relative: str) -> Path:
    """A file under ../shared/data; skipped on a user's clone, a failure in CI (CI=true)."""
    path = SHARED / relative
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing; CI must run with ../shared beside the checkout")
        pytest.skip(f"{path} not present (../shared/data is only beside the project in CI)")
    return path


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests skip, with the reason, where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smol_tokenizer():
    from xtuner_lite.hub import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(autouse=True)
def _isolated_dataset_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XTUNER_LITE_DATA_CACHE", str(tmp_path / "dataset-cache"))


TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def tiny_model(arch: str = "llama", seed: int = 0, **config):
    """A random tiny causal LM (``llama``, ``qwen2`` or ``mistral``) in eval mode: TINY_SHAPE
    with ``config`` on top. The one factory of the test suite's small models."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }
    config_class, model_class = classes[arch]
    torch.manual_seed(seed)
    return model_class(config_class(**{**TINY_SHAPE, **config})).eval()


def nonzero_lora_b(model, std: float) -> None:
    """Draw every LoRA B from N(0, std): B starts at zero, which leaves A's gradient zero and
    the adapter a no-op."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, std)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smol_tokenizer):
    """A random 2-layer Llama with SmolLM2's vocabulary, saved as an HF folder (fp32)."""
    model = tiny_model(vocab_size=len(smol_tokenizer), tie_word_embeddings=True, bos_token_id=1,
                       eos_token_id=2, pad_token_id=2)  # fmt: skip
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return str(path)


TINY_VISION = dict(
    model_type="siglip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=16,
    patch_size=4,
)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory, tiny_llama):
    """``tiny_llama`` composed with a random 2-layer SigLIP tower (16×16 images, 16 image
    tokens) and an MLP projector: a LLaVA folder with its processor."""
    from xtuner_lite.model.vlm import compose_llava

    return str(compose_llava(tiny_llama, TINY_VISION, tmp_path_factory.mktemp("tiny_llava")))


def tiny_vlm_folder(folder: Path, tokenizer, tokens: list[str], family: str, text: dict,
                    vision: dict, image_processor, **config) -> str:  # fmt: skip
    """A random image-text model of ``family`` with TINY_SHAPE's language model (``text``
    on top: its model type, ...) and the ``vision`` tower, SmolLM2's vocabulary with the
    family's image ``tokens`` (``config`` may name them by position in ``tokens``, as
    ``{"image_token_id": 0}``), saved with its ``image_processor``: the family's shape without
    its hub weights. The one factory of the suite's tiny image-text families (but the LLaVA
    that ``compose_llava`` writes)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    ids = tokenizer.convert_tokens_to_ids(tokens)
    text = dict(TINY_SHAPE, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2,
                pad_token_id=2, **text)  # fmt: skip
    named = {k: ids[v] if k.endswith("_token_id") else v for k, v in config.items()}
    model_config = AutoConfig.for_model(family, text_config=text, vision_config=vision, **named)
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(model_config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    return str(folder)


def tiny_qwen_vl(folder: Path, tokenizer, family: str = "qwen2_vl") -> str:
    """A random Qwen2-VL (or Qwen2.5-VL): a 2-layer vision tower in 4×4 patches, 2×2 merged (an
    image of 16×24 pixels takes 6 tokens), Qwen's three vision tokens, and its image processor
    (8×8 to 32×32 pixels)."""
    from transformers import Qwen2VLImageProcessorPil

    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    vision = dict(depth=2, num_heads=2, patch_size=4, spatial_merge_size=2, in_channels=3,
                  temporal_patch_size=2)  # fmt: skip
    if family == "qwen2_vl":
        vision.update(embed_dim=32, hidden_size=TINY_SHAPE["hidden_size"])
    else:
        vision.update(hidden_size=32, intermediate_size=64, window_size=16,
                      out_hidden_size=TINY_SHAPE["hidden_size"],
                      fullatt_block_indexes=[1])  # fmt: skip
    processor = Qwen2VLImageProcessorPil(min_pixels=8 * 8, max_pixels=32 * 32, patch_size=4,
                                         merge_size=2, temporal_patch_size=2)  # fmt: skip
    tokens = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
    return tiny_vlm_folder(folder, tokenizer, tokens, family, dict(rope_parameters=rope), vision,
                           processor, vision_start_token_id=0, image_token_id=1,
                           vision_end_token_id=2, video_token_id=3,
                           tie_word_embeddings=True)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory, smol_tokenizer):
    return tiny_qwen_vl(tmp_path_factory.mktemp("tiny_qwen2_vl"), smol_tokenizer, "qwen2_vl")


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tmp_path_factory, smol_tokenizer):
    return tiny_qwen_vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl"), smol_tokenizer, "qwen2_5_vl")


# a 2-layer tower on 16×16 tiles in 4×4 patches, pixel-shuffled to 4 tokens per tile
TILE_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_internvl(tmp_path_factory, smol_tokenizer):
    """A random InternVL (a Qwen2 language model) whose image processor crops an image into 1
    to 4 tiles plus a thumbnail."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        GotOcr2ImageProcessorPil,
    )

    processor = GotOcr2ImageProcessorPil(size={"height": 16, "width": 16}, crop_to_patches=True,
                                         min_patches=1, max_patches=4)  # fmt: skip
    vision = dict(TILE_VISION, image_size=[16, 16], patch_size=[4, 4])
    return tiny_vlm_folder(tmp_path_factory.mktemp("tiny_internvl"), smol_tokenizer,
                           ["<img>", "</img>", "<IMG_CONTEXT>"], "internvl",
                           dict(model_type="qwen2"), vision, processor, image_token_id=2,
                           image_seq_length=4, downsample_ratio=0.5)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_smolvlm(tmp_path_factory, smol_tokenizer):
    """A random SmolVLM (Idefics3's layout, a Llama language model) whose image processor
    crops an image resized to at most 32 pixels into 16-pixel tiles plus a thumbnail, each
    tile's tokens after its row and column token."""
    from transformers.models.smolvlm.image_processing_pil_smolvlm import (
        SmolVLMImageProcessorPil,
    )

    processor = SmolVLMImageProcessorPil(size={"longest_edge": 32}, do_image_splitting=True,
                                         max_image_size={"longest_edge": 16})  # fmt: skip
    tokens = ["<image>", "<fake_token_around_image>", "<global-img>"]
    tokens += [f"<row_{r}_col_{c}>" for r in range(1, 4) for c in range(1, 4)]
    return tiny_vlm_folder(tmp_path_factory.mktemp("tiny_smolvlm"), smol_tokenizer, tokens,
                           "smolvlm", dict(model_type="llama"),
                           dict(TILE_VISION, image_size=16, patch_size=4), processor,
                           image_token_id=0, scale_factor=2)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_llava_next(tmp_path_factory, smol_tokenizer):
    """A random LLaVA-NeXT (a CLIP tower on 16×16 tiles, the default feature selection) whose
    image processor picks 16×32, 32×16 or 32×32 pixels of tiles by an image's size, and a
    16-pixel base tile."""
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    pinpoints = [[16, 32], [32, 16], [32, 32]]
    processor = LlavaNextImageProcessorPil(size={"shortest_edge": 16},
                                           crop_size={"height": 16, "width": 16},
                                           image_grid_pinpoints=pinpoints)  # fmt: skip
    vision = dict(TILE_VISION, model_type="clip_vision_model", image_size=16, patch_size=4)
    return tiny_vlm_folder(tmp_path_factory.mktemp("tiny_llava_next"), smol_tokenizer,
                           ["<image>"], "llava_next", dict(model_type="llama"), vision, processor,
                           image_token_id=0, image_grid_pinpoints=pinpoints,
                           vision_feature_select_strategy="default")  # fmt: skip


def write_images(
    folder: Path, count: int, size: int = 12, seed: int = 0, shapes: list | None = None
) -> list[str]:
    """``count`` random RGB PNGs in ``folder`` (``size`` square, or (height, width) ``shapes``
    one per image); their file names."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = []
    for i in range(count):
        height, width = shapes[i] if shapes else (size, size)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        names.append(f"img{i}.png")
    return names


def train_cmd(config, work_dir, *extra: str) -> list[str]:
    """``xtuner train CONFIG --work-dir WORK_DIR ...`` as a subprocess command line."""
    return [
        sys.executable,
        "-m",
        "xtuner_lite.cli",
        "train",
        str(config),
        "--work-dir",
        str(work_dir),
        *extra,
    ]


def write_config(path: Path, cfg: dict) -> Path:
    """A config dict written as a pure-Python config file."""
    path.write_text("".join(f"{key} = {value!r}\n" for key, value in cfg.items()))
    return path


def real_step(
    model,
    micro_batches,
    lr: float = 0.0,
    dtype: str | None = None,
    optimizer=None,
    device_type: str = "cpu",
    objective=None,
) -> tuple[float, dict]:
    """One optimizer step through the real step (``engine/step.py``) with next-token loss (or
    ``objective``):
    (the step's loss, the gradients the optimizer received, by the model's parameter names).
    ``lr=0`` leaves the weights as they are; pass ``optimizer`` to keep its state across steps.
    """
    import torch

    from xtuner_lite.objectives.sft import SFTObjective
    from xtuner_lite.training import TrainModel
    from xtuner_lite.training.optim import AutocastOptimWrapper

    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = optimizer or torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
    )
    seen = {}

    def record(opt, args, kwargs):
        seen.update(
            {
                names[id(p)]: p.grad.detach().clone()
                for group in opt.param_groups
                for p in group["params"]
                if p.grad is not None
            }
        )

    handle = optimizer.register_step_pre_hook(record)
    try:
        wrapper = AutocastOptimWrapper(optimizer, dtype=dtype, device_type=device_type)
        out = TrainModel(model, objective or SFTObjective()).train_step(micro_batches, wrapper)
    finally:
        handle.remove()
    return float(out["loss"]), seen


def run_in_pty(
    cmd: list[str], timeout: float = 600, typed: str = "", **env: str
) -> tuple[int, str]:
    """Run ``cmd`` with a pseudo-terminal as stdin/stdout/stderr, as a user at a terminal
    would, ``typed`` being what they type: (exit code, everything it wrote)."""
    import pty
    import select

    main_fd, child_fd = pty.openpty()
    environ = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdin=child_fd,
        stdout=child_fd,
        stderr=child_fd,
        env={**environ, "TERM": "xterm-256color", "COLUMNS": "160", **env},
    )
    os.close(child_fd)
    if typed:
        os.write(main_fd, typed.encode())  # the terminal holds it until the program reads
    chunks, deadline = [], time.time() + timeout
    try:
        while time.time() < deadline:
            if select.select([main_fd], [], [], 1)[0]:
                try:
                    chunk = os.read(main_fd, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        proc.kill()
        os.close(main_fd)
    return code, b"".join(chunks).decode(errors="replace")


def wait_for_lines(path: Path, lines: int, proc, timeout: float = 300) -> None:
    """Poll until ``path`` has ``lines`` lines (or ``proc`` ends): the moment to kill a run."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return
        time.sleep(0.005)


ALPACA_MINI = EXAMPLE_DATA / "alpaca_mini.json"


def tiny_train_cfg(model: str, method: str = "lora", **train) -> dict:
    """A config dict that trains ``model`` for a few steps on the bundled Alpaca sample (fp32,
    so resumed runs are bitwise comparable); ``train`` overrides the train settings."""
    settings = dict(
        batch_size=1,
        accumulative_counts=1,
        max_iters=4,
        lr=1e-3,
        dtype=None,
        save_steps=2,
        save_total_limit=2,
        log_interval=1,
        warmup_ratio=0,
        tensorboard=False,
    )
    settings.update(train)
    return dict(
        model=dict(pretrained=model, method=method, lora=dict(r=4, alpha=8, dropout=0.1)),
        train_dataset=dict(
            data_files=str(ALPACA_MINI), tokenizer=model, template="smollm2", max_length=64
        ),
        train=settings,
    )


def log_records(work_dir) -> list[dict]:
    """The records of ``loss.jsonl``, one per step (a resumed run rewrites the steps it redoes:
    the last record of a step counts)."""
    by_step = {}
    for line in (Path(work_dir) / "loss.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = record
    return [by_step[k] for k in sorted(by_step)]


def loss_curve(work_dir, key: str = "loss") -> list[float]:
    """One logged value (the loss by default) by step."""
    return [record[key] for record in log_records(work_dir)]


def start_server(*args: str):
    """``xtuner serve ARGS --port 0`` as a process; returns (process, (host, port)) once it
    listens."""
    import re
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "xtuner_lite.cli", "serve", *args, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = ""
    for line in proc.stdout:  # libraries may print warnings (stderr) before the address
        seen += line
        match = re.search(r"http://([\d.]+):(\d+)", line)
        if match:
            return proc, (match.group(1), int(match.group(2)))
    pytest.fail(f"server did not start: {seen}")


@pytest.fixture(scope="module")
def smol_server():
    """``xtuner serve smollm2-135m-instruct`` for the tests of one module: (host, port)."""
    proc, address = start_server("smollm2-135m-instruct")
    yield address
    proc.terminate()
    proc.wait(timeout=30)


def needs_sandbox() -> None:
    """Tests of the OS sandbox: skipped where bubblewrap cannot run (a user's machine without
    it), a failure in CI, which installs it."""
    from xtuner_lite.toolcalling.sandbox import isolation_problem

    problem = isolation_problem()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the sandbox must run in CI: {problem}")
        pytest.skip(f"no sandbox on this machine: {problem}")


# ---------------------------------------------------------------- every objective, one shape
# the objectives the shared contract (tests/test_objective_contract.py) runs: each one's config
# keys on top of tiny_train_cfg, and the data it reads; DPO once per loss
PAIRS_MINI = EXAMPLE_DATA / "pref_mini.json"
PREFERENCE_DATA = dict(data_files=str(PAIRS_MINI), template="chatml", max_length=64)
OBJECTIVE_CASES: dict[str, tuple[dict | None, dict]] = {
    "sft": (None, dict(data_files=str(ALPACA_MINI), template="smollm2", max_length=64)),
    **{
        f"dpo-{loss}": (dict(type="dpo", beta=0.5, loss_type=loss), PREFERENCE_DATA)
        for loss in ("sigmoid", "robust", "hinge", "ipo", "kto_pair", "sppo_hard", "nca_pair")
    },
    "orpo": (dict(type="orpo", beta=0.5), PREFERENCE_DATA),
    "simpo": (dict(type="simpo", beta=2.0, gamma=0.5), PREFERENCE_DATA),
    "kto": (dict(type="kto", beta=0.5), {**PREFERENCE_DATA,
                                         "data_files": str(EXAMPLE_DATA / "kto_mini.json")}),
    "reward": (dict(type="reward"), PREFERENCE_DATA),
    "grpo": (
        # two updates per rollout batch: the second has a loss (the first is ~0 by design)
        dict(type="grpo", num_generations=3, max_new_tokens=8, micro_batch_size=4,
             num_iterations=2,
             rewards=[dict(type="numeric_answer"), dict(type="length_penalty", max_chars=40)]),
        dict(data_files=str(EXAMPLE_DATA / "arithmetic_train.jsonl"), template="smollm2",
             map_fn="question", max_prompt_length=64),
    ),
}  # fmt: skip
# one case per objective family (DPO by its default loss)
OBJECTIVE_FAMILIES = ["sft", "dpo-sigmoid", "orpo", "simpo", "kto", "reward", "grpo"]


def objective_cfg(case: str, model: str, method: str = "lora", **train) -> dict:
    """The config that trains ``model`` with the contract case's objective on its data."""
    objective, data = OBJECTIVE_CASES[case]
    cfg = tiny_train_cfg(model, method, **train)
    cfg["train_dataset"] = dict(tokenizer=model, **data)
    if objective is not None:
        cfg["objective"] = dict(objective)
    return cfg


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def process_env(nproc: int) -> dict:
    """The environment of an ``xtuner train`` subprocess on CPU, ``nproc`` gloo processes."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env.pop("NPROC_PER_NODE", None)
    if nproc > 1:
        env.update(NPROC_PER_NODE=str(nproc), PORT=_free_port())
    return env


def train_processes(config, work_dir, nproc: int, *extra) -> list[float]:
    """``xtuner train`` in ``nproc`` processes; its losses by step."""
    proc = subprocess.run(
        train_cmd(config, work_dir, *extra), capture_output=True, text=True, env=process_env(nproc)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return loss_curve(work_dir)


def trained_weights(folder) -> dict:
    """The weights of a result folder (adapter, or full model)."""
    from safetensors.torch import load_file

    name = "adapter_model" if (Path(folder) / "adapter_config.json").exists() else "model"
    return load_file(Path(folder) / f"{name}.safetensors")


# ---------------------------------------------------------------- tools with strict schemas
# (constrained decoding: tests/test_grammar.py, tests/test_serve.py)
def _tool(name: str, properties: dict, required: list[str]) -> dict:
    parameters = {"type": "object", "properties": properties, "required": required,
                  "additionalProperties": False}  # fmt: skip
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


CALCULATOR_TOOL = _tool("calculator", {"expression": {"type": "string", "maxLength": 30}},
                        ["expression"])  # fmt: skip
WEATHER_TOOL = _tool("weather", {"city": {"type": "string", "maxLength": 20},
                                 "unit": {"enum": ["C", "F"]}}, ["city", "unit"])  # fmt: skip
