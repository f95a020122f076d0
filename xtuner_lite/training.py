"""``xtuner train`` as a function: config in, trained adapter (or model) folder out."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from xtuner_lite import workdir
from xtuner_lite.adapters import architecture_of
from xtuner_lite.alignment.objectives import PreferenceObjective
from xtuner_lite.alignment.reference import (
    Reference,
    cache_path,
    cached_reference,
    check_reference,
    compute_reference,
    save_reference,
)
from xtuner_lite.atomic import atomic_path
from xtuner_lite.config import check_kwargs, load_config, resolve_data_files
from xtuner_lite.data.dataset import PreferenceDataset, SFTDataset
from xtuner_lite.data.pipeline import process_dataset, resolve_template, resolve_tokenizer
from xtuner_lite.data.preference import process_preference_dataset
from xtuner_lite.data.report import report_skips, write_report
from xtuner_lite.engine import build_runner
from xtuner_lite.engine import checkpoint as ckpt
from xtuner_lite.engine.distributed import (
    init_process_group,
    main_process_first,
    seed_everything,
    world,
)
from xtuner_lite.engine.hooks import EvaluateChatHook
from xtuner_lite.engine.memory import cap_mmap_threshold
from xtuner_lite.engine.progress import ProgressHook
from xtuner_lite.engine.runner import (
    TrainSettings,
    check_engine_choice,
    cpu_precision,
    resolve_device,
)
from xtuner_lite.engine.step import TrainingStoppedError
from xtuner_lite.engine.strategies import zero_stage
from xtuner_lite.errors import XtunerError
from xtuner_lite.evaluation.hook import EvaluateTasksHook
from xtuner_lite.model import build_model, skip_adapter_input_casts
from xtuner_lite.model.build import LoraSettings, model_head
from xtuner_lite.objectives import build_objective
from xtuner_lite.rl.data import PromptDataset, process_prompt_dataset
from xtuner_lite.rl.objective import GRPOObjective


def _final_save(llm, tokenizer, out: Path, state_dict: dict | None, meta: dict[str, Any]) -> None:
    """A standard peft adapter (or HF model) folder, plus the tokenizer and how it was trained.
    ``state_dict`` holds the weights when the model itself is sharded (ZeRO-3, FSDP2)."""
    with atomic_path(out) as tmp:
        llm.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
        tokenizer.save_pretrained(tmp)
        (tmp / "xtuner_lite.json").write_text(json.dumps(meta, indent=1, default=str))


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
    work_dir: str | Path | None = None,
    resume: bool | str = False,
    seed: int | None = None,
    cfg_options: list[str] | dict | None = None,
    deepspeed: str | dict | None = None,
    fsdp: bool = False,
    overwrite: bool = False,
    verbose: bool = False,
) -> Path:
    """Train from a config file/name (or an already loaded config); return the final folder.

    ``resume=True`` (``--resume auto``) continues from the newest complete checkpoint in
    ``work_dir``; a path resumes from that checkpoint. A work dir holding a previous run is
    refused unless resuming or ``overwrite``; one training at a time holds a work dir.
    ``deepspeed`` (a ZeRO preset or json) and ``fsdp`` pick the engine of a multi-process run
    (``NPROC_PER_NODE=N`` / torchrun). ``verbose`` also prints mmengine's environment dump,
    config and per-step lines (always in the work dir's log file).
    """
    cfg = load_config(config, cfg_options) if isinstance(config, str) else config
    for key in ("model", "train_dataset", "train"):
        if key not in cfg:
            raise XtunerError(f"config has no {key!r} dict")
    model_cfg = dict(cfg["model"])
    data_cfg = {k: v for k, v in dict(cfg["train_dataset"]).items() if k != "type"}
    data_cfg["data_files"] = resolve_data_files(data_cfg.get("data_files"))
    train_cfg = dict(cfg["train"])
    if deepspeed:
        train_cfg["deepspeed"] = deepspeed
    if fsdp:
        train_cfg["fsdp"] = True
    check_kwargs(build_model, model_cfg, "model")
    check_kwargs(TrainSettings, train_cfg, "train")
    settings = TrainSettings(**train_cfg)
    objective = build_objective(cfg.get("objective"), settings.chunk_size)  # before any work
    if isinstance(objective, PreferenceObjective):
        data_cfg = _preference_data_cfg(data_cfg, objective)
        if objective.head != "lm":
            model_cfg["head"] = objective.head  # a reward model: the scalar head, trained too
    elif isinstance(objective, GRPOObjective):
        check_kwargs(process_prompt_dataset, data_cfg, "train_dataset")
        if train_cfg.get("deepspeed") or train_cfg.get("fsdp"):
            raise XtunerError(
                "objective grpo samples from the model it trains: it runs on one process or "
                "DDP, not on DeepSpeed or FSDP2 (whose sharded weights the sampler cannot read)"
            )
    else:
        check_kwargs(process_dataset, data_cfg, "train_dataset")
    settings = dataclasses.replace(settings, device=resolve_device(settings))  # once, here
    if model_cfg.get("method", "lora") != "full":
        LoraSettings.from_config(model_cfg.get("lora"))  # before any work
    if (
        model_cfg.get("method") == "qlora"
        and "quant_storage" not in model_cfg
        and _shards_weights(settings)
    ):
        # ZeRO-3 / FSDP shard weights of one float dtype; packed 4-bit bytes stored as uint8
        # cannot join them, stored as the model's dtype they can
        model_cfg["quant_storage"] = model_cfg.get("dtype", "fp32")
    seed = cfg.get("seed", 0) if seed is None else seed
    name = Path(config).stem if isinstance(config, str) else "run"
    work_dir = Path(work_dir or cfg.get("work_dir") or Path("work_dirs") / name)
    workdir.check_writable(work_dir)

    if settings.device == "cpu":
        cap_mmap_threshold()  # large activation buffers go back to the OS on free
        model_cfg, settings, changed = cpu_precision(model_cfg, settings)
        if changed:
            print(
                "this CPU has no native bf16 matrix multiply (AVX512/AMX), where bf16 runs "
                f"several times slower than fp32; training in fp32: {', '.join(changed)}",
                flush=True,
            )
    distributed = init_process_group(settings.device, settings.dist_timeout)
    rank, world_size = world()
    check_engine_choice(settings, world_size)  # before any work
    with workdir.locked(work_dir) if rank == 0 else nullcontext():
        if rank == 0:
            workdir.check_start(work_dir, resume, overwrite)
        start = ckpt.resume_point(work_dir, resume, warn=print if rank == 0 else lambda _: None)
        if overwrite and not resume and rank == 0:
            workdir.clear_previous_run(work_dir)
        return _train(
            cfg,
            model_cfg,
            data_cfg,
            settings,
            seed,
            work_dir,
            start,
            distributed,
            verbose,
            objective,
        )


def _preference_data_cfg(data_cfg: dict, objective: PreferenceObjective) -> dict:
    """The dataset settings of a preference run: its data kind follows the objective."""
    kind = data_cfg.get("kind", objective.kind)
    if kind != objective.kind:
        raise XtunerError(
            f"train_dataset.kind={kind!r} but objective {objective.name!r} trains on "
            f"{objective.kind!r} data"
        )
    data_cfg = {**data_cfg, "kind": kind}
    check_kwargs(process_preference_dataset, data_cfg, "train_dataset")
    return data_cfg


def _train(
    cfg,
    model_cfg: dict,
    data_cfg: dict,
    settings,
    seed: int,
    work_dir: Path,
    start: Path | None,
    distributed: bool,
    verbose: bool = False,
    objective=None,
) -> Path:
    """Data, model, runner, the loop and the result, in a work dir held by this training."""
    rank, _ = world()
    preference = isinstance(objective, PreferenceObjective)

    tokenizer = resolve_tokenizer(data_cfg["tokenizer"])
    template = resolve_template(data_cfg.get("template"), tokenizer, data_cfg["tokenizer"])
    if isinstance(objective, GRPOObjective):
        dataset = _prompt_dataset(data_cfg, tokenizer, template, rank)
        objective.bind(tokenizer, template, seed, rank, work_dir)
    else:
        dataset = _dataset(data_cfg, tokenizer, template, settings, preference, rank, work_dir)
    seed_everything(seed)  # LoRA weights are initialized randomly: same seed, same start
    llm = build_model(**model_cfg, device=_load_device(settings, distributed))
    if settings.dtype is not None:  # every forward runs under autocast
        skip_adapter_input_casts(llm)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if preference and objective.needs_reference:
        _set_up_reference(objective, llm, dataset, model_cfg, settings, pad, distributed)
    if isinstance(objective, GRPOObjective) and objective.beta:
        objective.reference = _reference_model(model_cfg, settings, distributed)
    hooks = []
    if distributed and (settings.evaluation_inputs or settings.eval_tasks):
        warnings.warn(
            "sample generations and eval_tasks run in single-process training only; "
            "run `xtuner chat` / `xtuner eval` on the result",
            stacklevel=2,
        )
    elif settings.evaluation_inputs:
        hooks.append(
            EvaluateChatHook(
                tokenizer,
                template,
                settings.evaluation_inputs,
                settings.evaluation_freq,
                settings.evaluation_max_new_tokens,
            )
        )
    if settings.eval_tasks:
        hooks.append(
            EvaluateTasksHook(
                tokenizer,
                template,
                settings.eval_tasks,
                settings.eval_freq,
                settings.eval_data_root,
                settings.eval_limit,
                seed,
            )
        )
    runner = build_runner(
        llm,
        dataset,
        pad,
        settings,
        work_dir,
        seed=seed,
        resume=start,
        hooks=hooks,
        objective=objective,
        verbose=verbose,
    )
    try:
        runner.train()
    except TrainingStoppedError as exc:
        raise _stopped(exc, work_dir, runner.iter + 1) from None
    finally:  # a live progress bar gives the terminal back, also after an error
        for hook in runner.hooks:
            if isinstance(hook, ProgressHook):
                hook.close()
    out = work_dir / ("adapter" if model_cfg.get("method", "lora") != "full" else "model")
    if not distributed:
        save_result(llm, tokenizer, template, cfg, out, seed=seed)
        return out
    # the trained weights gathered from every rank's shards (collective), written by rank 0
    state = runner.strategy.consolidated_state_dict()
    if rank == 0:
        save_result(llm, tokenizer, template, cfg, out, seed=seed, state_dict=state)
    torch.distributed.barrier()
    return out


def _dataset(data_cfg, tokenizer, template, settings, preference: bool, rank: int, work_dir):
    """SFT or preference data, rendered with exactly the template recorded with the result;
    rank 0 processes and caches it, the other ranks then read the cache."""
    process = process_preference_dataset if preference else process_dataset
    with main_process_first(settings.dist_timeout):
        processed = process(**{**data_cfg, "tokenizer": tokenizer, "template": template})
    if rank == 0:  # what was skipped or truncated, as check-dataset counts it
        report_skips(processed.stats, Console(), examples=3)
        write_report(processed.stats, work_dir / workdir.DATA_REPORT)
    return (PreferenceDataset if preference else SFTDataset)(processed.data, processed.stats)


def _prompt_dataset(data_cfg, tokenizer, template, rank: int) -> PromptDataset:
    prompts, stats = process_prompt_dataset(
        **{**data_cfg, "tokenizer": tokenizer, "template": template}
    )
    if rank == 0:
        skipped = ", ".join(f"{n} {why}" for why, n in stats.skipped.items())
        print(f"{stats.prompts} prompts of {stats.rows} rows" + (f"; skipped: {skipped}" if
              skipped else ""), flush=True)  # fmt: skip
    return PromptDataset(prompts, stats)


def _reference_model(model_cfg: dict, settings, distributed: bool) -> Reference:
    """The adapter-disabled model itself (LoRA, QLoRA), or a frozen copy (full fine-tuning)."""
    if model_cfg.get("method", "lora") != "full":
        return Reference(chunk_size=settings.chunk_size)
    copy = build_model(
        **{**model_cfg, "gradient_checkpointing": False},
        device=_load_device(settings, distributed),
    )
    return Reference(copy, settings.chunk_size)


def _set_up_reference(
    objective: PreferenceObjective,
    llm,
    dataset: PreferenceDataset,
    model_cfg: dict,
    settings,
    pad: int,
    distributed: bool,
) -> None:
    """The reference: the adapter-disabled model (LoRA, QLoRA) or a frozen copy (full); with
    ``objective.precompute_reference`` its log-probabilities computed once (or read from the
    cache) so that training runs no reference forward."""
    rank, _ = world()
    objective.reference = _reference_model(model_cfg, settings, distributed)
    if not objective.precompute_reference:
        return
    path = cache_path(dataset.data, model_cfg, settings.dtype)
    with main_process_first(settings.dist_timeout):
        totals = cached_reference(path, len(dataset.data.sample_lengths))
        if totals is None:
            if rank == 0:
                print(f"computing reference log-probabilities once (cached in {path})", flush=True)
            device = settings.device if settings.device != "cuda" else next(llm.parameters()).device
            autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.dtype)
            totals = compute_reference(
                llm.to(device), objective.reference, dataset, pad, settings.batch_size,
                str(device), autocast, lambda batch: objective.prepare(llm, [batch], 0)[0],
            )  # fmt: skip
            check_reference(totals, len(totals), "the reference model's log-probabilities")
            if rank == 0:
                save_reference(path, totals)
    dataset.reference = totals
    objective.reference = Reference(chunk_size=settings.chunk_size)  # no copy kept in memory


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


def save_result(
    llm,
    tokenizer,
    template,
    cfg: dict,
    out: Path,
    seed: int | None = None,
    state_dict: dict | None = None,
) -> None:
    """Write the trained adapter (or full model) with what ``xtuner merge``/``chat`` need:
    base model name, architecture, template, stop words and the training settings."""
    model_cfg, data_cfg = dict(cfg["model"]), dict(cfg["train_dataset"])
    _final_save(
        llm,
        tokenizer,
        out,
        state_dict,
        {
            "base_model": str(model_cfg["pretrained"]),
            "method": model_cfg.get("method", "lora"),
            "architecture": architecture_of(llm.config),
            "template": template.name,
            "stop_words": template.stop_words(tokenizer),
            "max_length": data_cfg.get("max_length"),
            "train": dict(cfg["train"]),
            "objective": dict(cfg.get("objective") or {"type": "sft"}),
            "head": model_head(llm),
            "seed": cfg.get("seed", 0) if seed is None else seed,
        },
    )
