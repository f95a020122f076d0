"""``xtuner train`` as a function: config in, trained adapter (or model) folder out."""

from __future__ import annotations

import dataclasses
import os
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import torch

from xtuner_lite import workdir
from xtuner_lite.config import check_kwargs, load_config, resolve_data_files
from xtuner_lite.data.pipeline import resolve_template, resolve_tokenizer
from xtuner_lite.errors import UsageError, XtunerError
from xtuner_lite.evaluation.hook import EvaluateTasksHook
from xtuner_lite.model import build_model, skip_adapter_input_casts
from xtuner_lite.model.attention import check_sequence_parallel_attention
from xtuner_lite.model.build import LoraSettings
from xtuner_lite.model.offload import offload_activations
from xtuner_lite.model.precision import cuda_capability
from xtuner_lite.model.sequence_parallel import new_sequence_parallel, set_sequence_parallel
from xtuner_lite.objectives import Objective, RunContext, build_objective
from xtuner_lite.objectives.reference import Reference
from xtuner_lite.training import build_runner
from xtuner_lite.training import checkpoint as ckpt
from xtuner_lite.training.distributed import (
    init_process_group,
    main_process_first,
    seed_everything,
    world,
)
from xtuner_lite.training.hooks import EvaluateChatHook
from xtuner_lite.training.memory import cap_mmap_threshold
from xtuner_lite.training.progress import ProgressHook
from xtuner_lite.training.result import save_result
from xtuner_lite.training.runner import (
    TrainSettings,
    check_engine_choice,
    cpu_precision,
    gpu_precision,
    renamed_settings,
    resolve_device,
)
from xtuner_lite.training.step import TrainingStoppedError
from xtuner_lite.training.strategies import ZERO_PRESETS, zero_stage
from xtuner_lite.values import CfgOptions, Flag

DEEPSPEED_CHOICES = "|".join([*ZERO_PRESETS, "JSON"])


def _stopped(exc: TrainingStoppedError, work_dir: Path, failed_step: int) -> XtunerError:
    """Set aside the checkpoint whose weights gave the bad step (it was saved right before it)
    and say which checkpoint a resume will continue from."""
    if world()[0] == 0:
        ckpt.set_aside(work_dir, from_step=failed_step - 1)
    good = ckpt.latest(work_dir, warn=lambda _: None)
    if good is None:
        where = (
            "no checkpoint from before the divergence exists; start again (--overwrite) "
            "with a lower train.lr"
        )
    else:
        where = (
            f"the last good checkpoint is kept: {good.name}; continue from it with "
            "--resume auto, e.g. with a lower train.lr"
        )
    return type(exc)(f"{exc} at step {failed_step}; {where}")


def train(
    config: str | dict,
    work_dir: str | None = None,
    resume: Annotated[bool | str, Flag(metavar="auto|PATH")] = False,
    seed: int | None = None,
    cfg_options: CfgOptions | dict = None,
    deepspeed: Annotated[str | dict | None, Flag(metavar=DEEPSPEED_CHOICES)] = None,
    fsdp: bool = False,
    overwrite: bool = False,
    verbose: bool = False,
) -> Path:
    """Fine-tune from a config (full, LoRA or QLoRA; SFT, preference or RL objectives).

    Train with mmengine from a pure-Python config file or name (or an already loaded config);
    return the folder of the result. One training at a time holds a work dir.

    Args:
        config: config file or name (see `xtuner list-cfg`)
        work_dir: where checkpoints, logs and the result go (default work_dirs/CONFIG_NAME)
        resume: auto (True): the newest complete checkpoint in the work dir; or a checkpoint
            path
        seed: override the config's seed
        cfg_options: override config keys
        deepspeed: train with DeepSpeed ZeRO, a preset or a JSON file (launch with
            NPROC_PER_NODE=N)
        fsdp: train with torch FSDP2 (launch with NPROC_PER_NODE=N)
        overwrite: start over in a work dir that holds a previous run (its checkpoints and loss
            curve are deleted; without this such a work dir is refused)
        verbose: also print mmengine's environment, config and per-step log (always written
            to the work dir's log file)
    """
    if deepspeed and fsdp:
        raise UsageError("choose one engine: --deepspeed or --fsdp, not both")
    resume = True if resume == "auto" else resume
    cfg = load_config(config, cfg_options) if isinstance(config, str) else config
    run = _checked_settings(cfg, deepspeed, fsdp)  # every setting, before any work
    seed = cfg.get("seed", 0) if seed is None else seed
    name = Path(config).stem if isinstance(config, str) else "run"
    work_dir = Path(work_dir or cfg.get("work_dir") or Path("work_dirs") / name)
    workdir.check_writable(work_dir)
    if run.settings.device == "cpu":
        run = _on_cpu(run)
    else:
        run = _on_gpu(run)
    distributed = init_process_group(run.settings.device, run.settings.dist_timeout)
    rank, world_size = world()
    check_engine_choice(run.settings, world_size)  # before any work
    if run.settings.sequence_parallel_size > 1:  # checks that it divides the processes
        set_sequence_parallel(new_sequence_parallel(run.settings.sequence_parallel_size))
    with workdir.locked(work_dir) if rank == 0 else nullcontext():
        if rank == 0:
            workdir.check_start(work_dir, resume, overwrite)
        start = ckpt.resume_point(work_dir, resume, warn=print if rank == 0 else lambda _: None)
        if overwrite and not resume and rank == 0:
            workdir.clear_previous_run(work_dir)
        out = _train(run, seed, work_dir, start, distributed, verbose)
    if rank == 0:
        print(f"saved: {out}")
    return out


@dataclasses.dataclass
class Run:
    """A training's checked settings: the config, its model, data and train dicts, the
    objective."""

    cfg: Any
    model: dict
    data: dict
    settings: TrainSettings
    objective: Objective


def _checked_settings(cfg: Any, deepspeed: Any, fsdp: bool) -> Run:
    for key in ("model", "train_dataset", "train"):
        if key not in cfg:
            raise XtunerError(f"config has no {key!r} dict")
    model_cfg = dict(cfg["model"])
    data_cfg = {k: v for k, v in dict(cfg["train_dataset"]).items() if k != "type"}
    data_cfg["data_files"] = resolve_data_files(data_cfg.get("data_files"))
    train_cfg = {**renamed_settings(dict(cfg["train"])),
                 **({"deepspeed": deepspeed} if deepspeed else {}),
                 **({"fsdp": True} if fsdp else {})}  # fmt: skip
    check_kwargs(build_model, model_cfg, "model")
    check_kwargs(TrainSettings, train_cfg, "train")
    settings = TrainSettings(**train_cfg)
    objective = build_objective(cfg.get("objective"), settings.chunk_size)
    data_cfg = objective.data_settings(data_cfg)
    model_cfg.update(objective.model_settings())
    problem = objective.engine_problem(
        settings.deepspeed, settings.fsdp, settings.sequence_parallel_size
    )
    if problem:
        raise XtunerError(problem)
    settings = dataclasses.replace(settings, device=resolve_device(settings))  # once, here
    if settings.offload_activations and not model_cfg.get("gradient_checkpointing"):
        raise XtunerError(
            "train.offload_activations=True moves the inputs of checkpointed layers to host "
            "memory: set model.gradient_checkpointing too"
        )
    if model_cfg.get("method", "lora") != "full":
        LoraSettings.from_config(model_cfg.get("lora"))
    if model_cfg.get("method") == "qlora" and "quant_storage" not in model_cfg:
        if _shards_weights(settings):
            # ZeRO-3 / FSDP shard weights of one float dtype; packed 4-bit bytes stored as
            # uint8 cannot join them, stored as the model's dtype they can
            model_cfg["quant_storage"] = model_cfg.get("dtype", "fp32")
    return Run(cfg, model_cfg, data_cfg, settings, objective)


def _on_cpu(run: Run) -> Run:
    """fp32 where this CPU has no native bf16; freed activation buffers go back to the OS."""
    cap_mmap_threshold()
    model_cfg, settings, changed = cpu_precision(run.model, run.settings)
    if changed:
        print(
            "this CPU has no native bf16 matrix multiply (AVX512/AMX), where bf16 runs "
            f"several times slower than fp32; training in fp32: {', '.join(changed)}",
            flush=True,
        )
    return dataclasses.replace(run, model=model_cfg, settings=settings)


def _on_gpu(run: Run) -> Run:
    """fp16 with loss scaling where the GPU has no bf16 (the 20 series, T4, V100)."""
    device = int(run.settings.device.partition(":")[2] or os.environ.get("LOCAL_RANK", 0))
    capability = cuda_capability(device)
    model_cfg, settings, changed = gpu_precision(run.model, run.settings, capability)
    if changed:
        print(
            f"this GPU (compute capability {capability[0]}.{capability[1]}) has no bf16; "
            f"training in fp16 with dynamic loss scaling: {', '.join(changed)}",
            flush=True,
        )
    return dataclasses.replace(run, model=model_cfg, settings=settings)


def _train(
    run: Run, seed: int, work_dir: Path, start: Path | None, distributed: bool, verbose: bool
) -> Path:
    """Data, model, runner, the loop and the result, in a work dir held by this training."""
    rank, _ = world()
    settings, objective = run.settings, run.objective
    tokenizer = resolve_tokenizer(run.data["tokenizer"])
    template = resolve_template(run.data.get("template"), tokenizer, run.data["tokenizer"])
    with main_process_first(settings.dist_timeout):  # rank 0 processes and caches the data
        dataset = objective.load_dataset(run.data, tokenizer, template)
    if rank == 0:
        objective.report_data(dataset, work_dir)
    seed_everything(seed)  # LoRA weights are initialized randomly: same seed, same start
    llm = build_model(**run.model, device=_load_device(settings, distributed))
    if settings.offload_activations:
        _offload(llm, settings.device)
    if settings.sequence_parallel_size > 1:  # before any work, not at the first step
        check_sequence_parallel_attention(getattr(llm.config, "_attn_implementation", None))
    if settings.dtype is not None:  # every forward runs under autocast
        skip_adapter_input_casts(llm)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    objective.set_up(
        RunContext(
            llm, dataset, tokenizer, template, seed, rank, work_dir, pad,
            make_reference=lambda: _reference_model(run.model, settings, distributed),
            rank_zero_first=lambda: main_process_first(settings.dist_timeout),
            device=settings.device,
            autocast={"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.dtype),
            batch_size=settings.batch_size,
            cache_key=(run.model, settings.dtype),
        )
    )  # fmt: skip
    hooks = _hooks(settings, tokenizer, template, seed, distributed)
    runner = build_runner(llm, dataset, pad, settings, work_dir, seed=seed, resume=start,
                          hooks=hooks, objective=objective, verbose=verbose)  # fmt: skip
    _loop(runner, work_dir)
    out = work_dir / ("adapter" if run.model.get("method", "lora") != "full" else "model")
    if not distributed:
        save_result(llm, tokenizer, template, run.cfg, out, seed=seed)
        return out
    # the trained weights gathered from every rank's shards (collective), written by rank 0
    state = runner.strategy.consolidated_state_dict()
    if rank == 0:
        save_result(llm, tokenizer, template, run.cfg, out, seed=seed, state_dict=state)
    torch.distributed.barrier()
    return out


def _offload(llm: torch.nn.Module, device: str) -> None:
    """Checkpointed layers' inputs to pinned host memory — on a GPU; on CPU they are there."""
    if device.startswith("cuda"):
        offload_activations(llm)
    else:
        print("train.offload_activations: on CPU activations are in host memory already; "
              "nothing to offload", flush=True)  # fmt: skip


def _hooks(settings: TrainSettings, tokenizer, template, seed: int, distributed: bool) -> list:
    """Sample generations and evaluation tasks during training (one process only)."""
    if distributed and (settings.sample_prompts or settings.eval_tasks):
        warnings.warn(
            "sample generations and eval_tasks run in single-process training only; "
            "run `xtuner chat` / `xtuner eval` on the result",
            stacklevel=3,
        )
        return []
    hooks: list = []
    if settings.sample_prompts:
        hooks.append(EvaluateChatHook(tokenizer, template, settings.sample_prompts,
                                      settings.sample_freq,
                                      settings.sample_max_new_tokens))  # fmt: skip
    if settings.eval_tasks:
        hooks.append(EvaluateTasksHook(tokenizer, template, settings.eval_tasks,
                                       settings.eval_freq, settings.eval_data_root,
                                       settings.eval_limit, seed))  # fmt: skip
    return hooks


def _loop(runner, work_dir: Path) -> None:
    try:
        runner.train()
    except TrainingStoppedError as exc:
        raise _stopped(exc, work_dir, runner.iter + 1) from None
    finally:  # a live progress bar gives the terminal back, also after an error
        for hook in runner.hooks:
            if isinstance(hook, ProgressHook):
                hook.close()


def _reference_model(model_cfg: dict, settings, distributed: bool) -> Reference:
    """The adapter-disabled model itself (LoRA, QLoRA), or a frozen copy (full fine-tuning)."""
    if model_cfg.get("method", "lora") != "full":
        return Reference(chunk_size=settings.chunk_size)
    copy = build_model(
        **{**model_cfg, "gradient_checkpointing": False},
        device=_load_device(settings, distributed),
    )
    return Reference(copy, settings.chunk_size)


def _load_device(settings, distributed: bool) -> str | None:
    """Where the weights are loaded: straight onto this process's GPU (no host copy of the whole
    model; NF4 quantized there) — except under DeepSpeed / FSDP2, which shard from host memory."""
    if settings.device != "cuda" or settings.deepspeed or settings.fsdp:
        return None
    return f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if distributed else "cuda"


def _shards_weights(settings) -> bool:
    if settings.fsdp:
        return True
    if not settings.deepspeed:
        return False
    return zero_stage(settings.deepspeed) == 3
