"""Training on mmengine's Runner, with its known problems fixed here and nowhere else.

- Resume: mmengine 0.10.7's checkpoints hold numpy objects and its HistoryBuffer, which torch's
  ``weights_only`` loader refuses; ours are written as tensors and plain data and read without
  arbitrary unpickling (``engine/checkpoint.py``), and ``--resume auto`` looks only inside the
  work dir.
- Checkpoints are written to a temporary name and renamed, so a kill mid-write leaves the previous
  checkpoint as the newest complete one; older ones are deleted only after that; only trainable
  weights are stored.
- Mixed precision on any device: :class:`AutocastOptimWrapper` (bf16) and
  :class:`ScaledOptimWrapper` (fp16 with loss scaling; ``AmpOptimWrapper`` is CUDA-only).
- No 2-second sleep when the data runs out: an infinite sampler never runs out.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from mmengine.dataset import InfiniteSampler
from mmengine.hooks import DistSamplerSeedHook, IterTimerHook, LoggerHook, ParamSchedulerHook
from mmengine.optim import CosineAnnealingLR, LinearLR
from mmengine.runner import FlexibleRunner, Runner
from mmengine.visualization import LocalVisBackend, TensorboardVisBackend, Visualizer

from xtuner_lite.atomic import atomic_path
from xtuner_lite.config import is_int, is_number
from xtuner_lite.data.dataset import collate_packed
from xtuner_lite.errors import XtunerError
from xtuner_lite.model.build import build_model
from xtuner_lite.model.precision import BF16_CAPABILITY, cpu_has_fast_bf16
from xtuner_lite.objectives import Objective, build_objective
from xtuner_lite.training import checkpoint as ckpt
from xtuner_lite.training import strategies
from xtuner_lite.training.distributed import world
from xtuner_lite.training.hooks import (
    LossRecordHook,
    PlainCheckpointHook,
    RNGStateHook,
    SafeCheckpointHook,
    ThroughputHook,
)
from xtuner_lite.training.optim import AutocastOptimWrapper, ScaledOptimWrapper
from xtuner_lite.training.progress import ProgressHook, quiet_console
from xtuner_lite.training.train_model import TrainModel

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
DTYPES = ("bf16", "fp16", None)


_RUNS = itertools.count()  # numbers the runs of this process (see build_runner)
# what build_model takes when the model config leaves a key out (QLoRA's compute dtype: bf16)
BUILD_DEFAULTS = {
    name: parameter.default for name, parameter in inspect.signature(build_model).parameters.items()
}


@dataclass
class TrainSettings:
    """The ``train`` dict of a config: batch, schedule, precision, checkpoints, logging."""

    batch_size: int = 1  # rows per micro-batch
    accumulative_counts: int = 1  # micro-batches per optimizer step
    max_iters: int | None = None  # optimizer steps; or give epochs
    epochs: float | None = None  # passes over the data (when max_iters is None)
    lr: float = 2e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw_8bit (bitsandbytes, GPU)
    warmup_ratio: float = 0.03  # share of the steps warming up linearly, then cosine
    min_lr_ratio: float = 0.0  # the cosine ends at this share of lr
    max_norm: float | None = 1.0  # gradient clipping norm; None: no clipping
    dtype: str | None = "bf16"  # autocast dtype: bf16 | fp16 (GPU) | None for fp32
    chunk_size: int = 1024  # tokens per loss chunk
    pad_to_multiple_of: int = 32  # row width rounded up: a few shapes, a few cached kernels
    save_steps: int = 100  # a checkpoint every N steps (and at the end)
    save_total_limit: int = 2  # checkpoints kept (-1: all)
    log_interval: int = 1  # a progress line every N steps when output is not a terminal
    device: str = "auto"  # auto | cpu | cuda
    sample_prompts: list[str] = field(default_factory=list)  # sampled greedily (evaluation_inputs)
    sample_freq: int | None = None  # every N steps, and before and after (evaluation_freq)
    sample_max_new_tokens: int = 64  # length of those samples
    eval_tasks: list[Any] = field(default_factory=list)  # `xtuner eval` tasks scored in training
    eval_freq: int | None = None  # every N steps (and always before and after training)
    eval_limit: int | None = 100  # seeded subset per task
    eval_data_root: str | None = None  # where bundled tasks' files are
    tensorboard: bool = True  # scalars for TensorBoard in the work dir
    extra_hooks: list[dict[str, Any]] = field(default_factory=list)  # mmengine hook dicts
    # multi-process (NPROC_PER_NODE=N): DDP by default, or one of these engines
    deepspeed: str | dict | None = None  # zero1|zero2|zero2_offload|zero3|zero3_offload|x.json
    fsdp: bool = False  # torch FSDP2 fully_shard per decoder layer
    sequence_parallel_size: int = 1  # ranks sharing each row's tokens (Ulysses sequence parallel)
    offload_activations: bool = False  # checkpointed layers' inputs in pinned host memory (GPU)
    dist_timeout: int = 1800  # seconds ranks wait for each other (e.g. for rank 0's data)

    def __post_init__(self) -> None:
        problems = [
            f"train.{name} must be {accepted}, got {getattr(self, name)!r}"
            for name, ok, accepted in _RULES
            if not ok(getattr(self, name))
        ]
        if _positive_int(self.sequence_parallel_size) and _positive_int(self.pad_to_multiple_of):
            if self.pad_to_multiple_of % self.sequence_parallel_size:
                problems.append(
                    f"train.pad_to_multiple_of={self.pad_to_multiple_of} must be a multiple of "
                    f"train.sequence_parallel_size={self.sequence_parallel_size} (every row is "
                    "split evenly over the group)"
                )
        if self.device not in ("auto", "cpu") and not _cuda_device_ok(self.device):
            problems.append(
                f"train.device={self.device!r} but this machine has no such CUDA "
                "device; use 'auto' or 'cpu'"
            )
        if problems:
            raise XtunerError(
                "; ".join(problems)
                if len(problems) == 1
                else "invalid train settings:\n  " + "\n  ".join(problems)
            )


# XTuner 0.x's names for the chat samples during training, read as ours (``eval_*`` are the
# evaluation tasks', a different feature)
XTUNER_NAMES = {
    "evaluation_inputs": "sample_prompts",
    "evaluation_freq": "sample_freq",
    "evaluation_max_new_tokens": "sample_max_new_tokens",
}


def renamed_settings(train_cfg: dict[str, Any]) -> dict[str, Any]:
    """``train`` with XTuner's names for the chat samples read as ours (both given: an error)."""
    out = dict(train_cfg)
    for old, new in XTUNER_NAMES.items():
        if old in out:
            if new in out:
                raise XtunerError(f"train.{old} (XTuner's name) and train.{new} are both set")
            out[new] = out.pop(old)
    return out


def _positive_int(value: Any) -> bool:
    return is_int(value) and value >= 1


def _optional(check):
    return lambda value: value is None or check(value)


def _fraction(value: Any) -> bool:
    return is_number(value) and 0 <= value <= 1


_RULES = [  # (key, check, what is accepted): every train setting with a range
    *[
        (name, _positive_int, "a positive integer")
        for name in (
            "batch_size",
            "accumulative_counts",
            "chunk_size",
            "pad_to_multiple_of",
            "save_steps",
            "log_interval",
            "sample_max_new_tokens",
            "sequence_parallel_size",
            "dist_timeout",
        )
    ],
    *[
        (name, _optional(_positive_int), "a positive integer or None")
        for name in ("max_iters", "sample_freq", "eval_freq", "eval_limit")
    ],
    (
        "save_total_limit",
        lambda v: is_int(v) and (v >= 1 or v == -1),
        "a positive integer (or -1 to keep every checkpoint)",
    ),
    ("epochs", _optional(lambda v: is_number(v) and v > 0), "a number > 0 or None"),
    ("lr", lambda v: is_number(v) and v > 0, "a number > 0"),
    ("weight_decay", lambda v: is_number(v) and v >= 0, "a number >= 0"),
    (
        "betas",
        lambda v: (
            isinstance(v, (list, tuple))
            and len(v) == 2
            and all(is_number(b) and 0 <= b < 1 for b in v)
        ),
        "two numbers in [0, 1)",
    ),
    ("warmup_ratio", _fraction, "a number in [0, 1]"),
    ("min_lr_ratio", _fraction, "a number in [0, 1]"),
    (
        "max_norm",
        _optional(lambda v: is_number(v) and v > 0),
        "a number > 0 (or None: no clipping)",
    ),
    ("optimizer", lambda v: v in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
    ("dtype", lambda v: v in DTYPES, "'bf16', 'fp16' or None (fp32)"),
    ("offload_activations", lambda v: isinstance(v, bool), "True or False"),
    (
        "device",
        lambda v: (
            isinstance(v, str)
            and (v in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", v) is not None)
        ),
        "'auto', 'cpu', 'cuda' or 'cuda:N'",
    ),
]


def _cuda_device_ok(device: Any) -> bool:
    """Whether a well-formed ``cuda[:N]`` names a GPU this machine has (malformed values are
    reported by the rules)."""
    if not isinstance(device, str) or not re.fullmatch(r"cuda(:\d+)?", device):
        return True
    index = int(device.split(":")[1]) if ":" in device else 0
    return torch.cuda.is_available() and index < torch.cuda.device_count()


class GlobalBatchCollator:
    """Splits a loader batch of ``batch_size * accumulative_counts`` rows into micro-batches."""

    def __init__(
        self,
        batch_size: int,
        pad_token_id: int,
        pad_to_multiple_of: int = 1,
        collate: Callable[..., dict[str, torch.Tensor]] = collate_packed,
    ):
        self.batch_size, self.pad_token_id = batch_size, pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.collate = collate

    def __call__(self, rows: list[dict]) -> list[dict[str, torch.Tensor]]:
        return [
            self.collate(rows[i : i + self.batch_size], self.pad_token_id, self.pad_to_multiple_of)
            for i in range(0, len(rows), self.batch_size)
        ]


class QuietConsole:
    """mmengine's log to the work dir's log file; its console shows warnings only, unless
    ``verbose`` (the progress hook shows the run)."""

    def __init__(self, *args, verbose: bool = False, **kwargs):
        self._verbose = verbose  # read by build_logger, which runs inside Runner.__init__
        super().__init__(*args, **kwargs)

    def build_logger(self, *args, **kwargs):
        logger = super().build_logger(*args, **kwargs)
        quiet_console(logger, self._verbose)
        return logger


class XtunerFlexibleRunner(QuietConsole, FlexibleRunner):
    """mmengine's FlexibleRunner (DDP, DeepSpeed, FSDP2 strategies) with a quiet console."""


class XtunerRunner(QuietConsole, Runner):
    """mmengine's Runner with atomic, trainable-only checkpoints and a working resume."""

    def save_checkpoint(self, out_dir: str, filename: str, *args, **kwargs) -> None:
        with atomic_path(Path(out_dir) / filename) as tmp:
            super().save_checkpoint(out_dir, tmp.name, *args, **kwargs)

    def load_checkpoint(
        self,
        filename: str,
        map_location: Any = "cpu",
        strict: bool = False,
        revise_keys: list | None = None,
    ):
        checkpoint = ckpt.load(filename, map_location=map_location)
        self.call_hook("after_load_checkpoint", checkpoint=checkpoint)
        ckpt.load_trained_weights(self.model, checkpoint[ckpt.STATE_DICT], filename)
        self._has_loaded = True
        self.logger.info(f"Load checkpoint from {filename}")
        return checkpoint


def _optimizer_cfg(settings: TrainSettings) -> dict[str, Any]:
    kw = dict(lr=settings.lr, weight_decay=settings.weight_decay, betas=tuple(settings.betas))
    if settings.optimizer == "adamw":
        return dict(type=torch.optim.AdamW, **kw)
    import bitsandbytes as bnb  # only for its 8-bit optimizers (a slow import)

    classes = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}
    return dict(type=classes[settings.optimizer], **kw)


def total_steps(settings: TrainSettings, num_rows: int, data_parallel: int = 1) -> int:
    """``max_iters``, or the steps of ``epochs`` passes: each step takes ``batch_size`` ×
    ``accumulative_counts`` rows on every one of ``data_parallel`` groups (the ranks of a
    sequence-parallel group share their rows)."""
    if settings.max_iters:
        return settings.max_iters
    rows_per_step = settings.batch_size * settings.accumulative_counts * data_parallel
    return max(1, math.ceil((settings.epochs or 1) * num_rows / rows_per_step))


def lr_schedule(settings: TrainSettings, max_iters: int) -> list[dict[str, Any]]:
    """Linear warmup from 1e-3 × lr, then cosine down to ``min_lr_ratio`` × lr.

    mmengine's LinearLR reaches the full lr one step before its ``end`` and, over a single step
    (end=1), never leaves its start factor: the whole run would train at lr/1000. So a warmup
    rounds up to two steps (one at the start factor, then the full lr)."""
    warmup = int(settings.warmup_ratio * max_iters)
    if warmup == 1:
        warmup = 2
    schedulers = []
    if warmup > 0:
        schedulers.append(
            dict(type=LinearLR, start_factor=1e-3, by_epoch=False, begin=0, end=warmup)
        )
    schedulers.append(
        dict(
            type=CosineAnnealingLR,
            eta_min=settings.lr * settings.min_lr_ratio,
            by_epoch=False,
            begin=warmup,
            end=max_iters,
        )
    )
    return schedulers


def build_runner(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    pad_token_id: int,
    settings: TrainSettings,
    work_dir: str | Path,
    seed: int = 0,
    resume: str | Path | None = None,
    hooks: list | None = None,
    objective: Objective | None = None,
    verbose: bool = False,
) -> XtunerRunner:
    """Assemble the Runner: infinite seeded sampler, warmup + cosine, clipping, autocast.
    ``resume``: the checkpoint to continue from (found by ``checkpoint.latest`` for auto);
    ``objective``: what is trained (next-token SFT by default); ``verbose``: mmengine's
    environment dump, config and per-step lines on the console too, not only in the log file.
    """
    device = resolve_device(settings)
    _, world_size = world()
    max_iters = total_steps(settings, len(dataset), world_size // settings.sequence_parallel_size)
    strategy = None
    if world_size > 1 or settings.deepspeed or settings.fsdp:
        strategy = _strategy(settings, world_size)
    objective = objective or build_objective(None, settings.chunk_size)  # SFT
    common = dict(
        model=TrainModel(model, objective).to(device),
        work_dir=str(work_dir),
        train_dataloader=_loader(dataset, pad_token_id, settings, seed),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        optim_wrapper=_optim_wrapper(settings, device, fsdp=strategy is not None and settings.fsdp),
        param_scheduler=lr_schedule(settings, max_iters),
        default_hooks=dict(
            timer=IterTimerHook(),
            logger=LoggerHook(interval=settings.log_interval, log_metric_by_epoch=False),
            param_scheduler=ParamSchedulerHook(),
            checkpoint=SafeCheckpointHook(settings.save_steps, settings.save_total_limit),
            sampler_seed=DistSamplerSeedHook(),
        ),
        custom_hooks=_custom_hooks(settings, device, one_process=strategy is None, more=hooks),
        randomness=dict(seed=seed),
        resume=resume is not None,
        load_from=None if resume is None else str(resume),
        log_processor=dict(by_epoch=False, window_size=1),
        default_scope="mmengine",
        visualizer=_visualizer(settings),
        cfg=dict(train=asdict(settings), seed=seed),
        verbose=verbose,
        # mmengine names a run's logger, visualizer and message hub by its start second: a run
        # started in the same second as an earlier one in this process (a resume right after a
        # short run) would get the earlier run's, writing into that run's work dir
        experiment_name=f"xtuner_run{next(_RUNS)}",
        env_cfg=dict(dist_cfg=dict(backend="nccl" if device == "cuda" else "gloo")),
    )
    if strategy is None:
        return XtunerRunner(**common)
    return XtunerFlexibleRunner(**common, strategy=strategy, launcher="pytorch")


def _custom_hooks(settings: TrainSettings, device: str, one_process: bool, more: list | None):
    """Ours: RNG state (one process; several: the strategy saves every rank's), throughput,
    the loss record, the progress display, then the config's and the caller's."""
    rng = [RNGStateHook(), PlainCheckpointHook()] if one_process else []
    return [*rng, ThroughputHook(), LossRecordHook(), ProgressHook(settings.log_interval, device),
            *settings.extra_hooks, *(more or [])]  # fmt: skip


def _loader(
    dataset: torch.utils.data.Dataset, pad_token_id: int, settings: TrainSettings, seed: int
) -> torch.utils.data.DataLoader:
    """An item is one optimizer step's rows (``batch_size`` × ``accumulative_counts``), drawn by
    an infinite seeded sampler and split into micro-batches by the collator."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=settings.batch_size * settings.accumulative_counts,
        sampler=GroupSampler(dataset, seed, settings.sequence_parallel_size),
        collate_fn=GlobalBatchCollator(
            settings.batch_size,
            pad_token_id,
            settings.pad_to_multiple_of,
            getattr(dataset, "collate", collate_packed),  # preference data brings its own
        ),
        num_workers=0,
    )


class GroupSampler(InfiniteSampler):
    """mmengine's infinite seeded sampler over groups of ``group_size`` consecutive ranks: the
    ranks of a sequence-parallel group draw the same rows, each group its own."""

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int, group_size: int = 1):
        super().__init__(dataset, shuffle=True, seed=seed)
        self.rank //= group_size
        self.world_size //= group_size
        self.indices = self._indices_of_rank()


def _optim_wrapper(settings: TrainSettings, device: str, fsdp: bool) -> dict[str, Any]:
    """Who steps, clips and casts: DeepSpeed itself, mmengine's AMP wrapper (fp16 needs loss
    scaling), or ours under autocast (FSDP2 casts through its MixedPrecisionPolicy instead)."""
    if settings.dtype == "fp16" and device != "cuda":
        raise XtunerError("train.dtype='fp16' needs a CUDA GPU; use 'bf16' (or None) on CPU")
    optimizer = _optimizer_cfg(settings)
    clip = dict(max_norm=settings.max_norm) if settings.max_norm else None
    if settings.deepspeed:  # DeepSpeed clips (its config's gradient_clipping) and steps itself
        return dict(type=strategies.DeepSpeedStepOptimWrapper, optimizer=optimizer,
                    dtype=settings.dtype, device_type=device)  # fmt: skip
    if settings.dtype == "fp16":
        return dict(type=ScaledOptimWrapper, optimizer=optimizer, device_type=device,
                    sharded=fsdp, clip_grad=clip)  # fmt: skip
    dtype = None if fsdp else settings.dtype
    return dict(type=AutocastOptimWrapper, optimizer=optimizer, dtype=dtype, device_type=device,
                clip_grad=clip)  # fmt: skip


def _visualizer(settings: TrainSettings) -> dict[str, Any]:
    backends = [dict(type=LocalVisBackend)]
    if settings.tensorboard:
        backends.append(dict(type=TensorboardVisBackend))
    return dict(type=Visualizer, vis_backends=backends)


def resolve_device(settings: TrainSettings) -> str:
    """``train.device``, with ``auto`` meaning CUDA when there is a GPU."""
    if settings.device != "auto":
        return settings.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_precision(
    model_cfg: dict[str, Any], settings: TrainSettings
) -> tuple[dict[str, Any], TrainSettings, list[str]]:
    """On a CPU without native bf16 matmuls, bf16 (autocast, frozen base weights, QLoRA's
    compute dtype) would run every matmul in those reference loops: use fp32 there instead.
    Returns the configs to train with and what was changed (empty when nothing was)."""
    if resolve_device(settings) != "cpu" or cpu_has_fast_bf16():
        return model_cfg, settings, []
    changed = []
    if settings.dtype == "bf16":
        settings = dataclasses.replace(settings, dtype=None)
        changed.append("train.dtype bf16 -> None (fp32)")
    model_cfg, more = _model_dtypes(model_cfg, {"dtype": "fp32", "compute_dtype": "fp32"})
    return model_cfg, settings, changed + more


def gpu_precision(
    model_cfg: dict[str, Any], settings: TrainSettings, capability: tuple[int, int]
) -> tuple[dict[str, Any], TrainSettings, list[str]]:
    """On a GPU of compute ``capability`` without bf16, :func:`fp16_fallback`; returns the
    configs to train with and what was changed (empty when nothing was)."""
    if capability >= BF16_CAPABILITY:
        return model_cfg, settings, []
    model_cfg, dtype, changed = fp16_fallback(model_cfg, settings.dtype)
    return model_cfg, dataclasses.replace(settings, dtype=dtype), changed


def fp16_fallback(
    model_cfg: dict[str, Any], dtype: str | None
) -> tuple[dict[str, Any], str | None, list[str]]:
    """For a GPU without bf16 (compute capability below ``BF16_CAPABILITY``): bf16 autocast
    becomes fp16 with dynamic loss scaling (:class:`ScaledOptimWrapper`), the frozen weights and
    QLoRA's compute dtype fp16, and what is trained fp32 master weights (loss scaling unscales
    fp32 gradients only; a full fine-tune's weights are all trained). Returns the model config,
    the autocast dtype and what was changed."""
    changed = []
    if dtype == "bf16":
        dtype = "fp16"
        changed.append("train.dtype bf16 -> fp16")
    full = model_cfg.get("method", "lora") == "full"
    model_cfg, more = _model_dtypes(model_cfg, {"dtype": "fp32" if full else "fp16",
                                                "compute_dtype": "fp16", "quant_storage": "fp16",
                                                "lora_dtype": "fp32"})  # fmt: skip
    if model_cfg.get("lora_dtype") in ("fp16", "float16"):
        model_cfg["lora_dtype"] = "fp32"
        more.append("model.lora_dtype fp16 -> fp32")
    return model_cfg, dtype, changed + more


def _model_dtypes(model_cfg: dict[str, Any], to: dict[str, str]) -> tuple[dict, list[str]]:
    """``model_cfg`` with each of ``to``'s keys that is bf16 (given, or build_model's default)
    set to its new dtype, and what changed."""
    model_cfg, changed = dict(model_cfg), []
    for key, new in to.items():
        if model_cfg.get(key, BUILD_DEFAULTS[key]) in ("bf16", "bfloat16"):
            model_cfg[key] = new
            changed.append(f"model.{key} bf16 -> {new}")
    return model_cfg, changed


def check_engine_choice(settings: TrainSettings, world_size: int) -> None:
    """DeepSpeed and FSDP2 shard over processes: refuse them in a single process."""
    if (settings.deepspeed or settings.fsdp) and world_size < 2:
        raise XtunerError(
            "train.deepspeed / train.fsdp need several processes: launch with "
            "NPROC_PER_NODE=N xtuner train ... (N >= 2)"
        )
    if settings.deepspeed and settings.fsdp:
        raise XtunerError("choose one of --deepspeed and --fsdp")


def _strategy(settings: TrainSettings, world_size: int) -> dict[str, Any]:
    """The mmengine strategy for a multi-process run: DeepSpeed, FSDP2 or DDP (the choice was
    checked by ``check_engine_choice`` before any work)."""
    if settings.deepspeed:
        strategies.require_deepspeed()
        config = strategies.deepspeed_config(
            settings.deepspeed,
            settings.batch_size,
            settings.accumulative_counts,
            settings.max_norm,
            world_size,
        )
        return dict(
            type=strategies.DeepSpeedStepStrategy, config=config, exclude_frozen_parameters=True
        )
    if settings.fsdp:
        return dict(type=strategies.FSDP2Strategy, dtype=settings.dtype)
    return dict(type=strategies.DDPStepStrategy)


__all__ = ["GlobalBatchCollator", "GroupSampler", "TrainSettings", "XtunerRunner", "build_runner"]
