"""Multi-process training on existing engines: DDP, DeepSpeed ZeRO and torch FSDP2.

Each is an mmengine strategy for its ``FlexibleRunner`` (DeepSpeed through mmengine's own
``DeepSpeedStrategy``, as XTuner does). What we add, and why:

- Every engine runs the one step of ``engine/step.py`` (mmengine's wrappers assume one
  micro-batch per step and a mean loss); each passes only its :class:`Accumulation`.
- Checkpoints are written under a temporary name and renamed once every rank has finished
  (a kill mid-write leaves the previous checkpoint), and hold every rank's RNG state (each rank
  draws its own dropout masks), so a resumed run repeats the same steps.
- Checkpoints are written and read by ``engine/checkpoint.py`` (plain data, no arbitrary
  unpickling), as in one process.
- The final adapter (or model) is gathered from ZeRO-3 / FSDP2 shards to rank 0.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import mmengine
import torch
import torch.distributed as dist
from mmengine._strategy import DDPStrategy
from mmengine.registry import MODEL_WRAPPERS
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from xtuner_lite.atomic import partial_path, publish
from xtuner_lite.errors import XtunerError
from xtuner_lite.model.build import decoder_layers
from xtuner_lite.training import checkpoint as ckpt
from xtuner_lite.training.distributed import gather_rng_states, restore_rank_rng, world
from xtuner_lite.training.step import Accumulation, train_step

ZERO_PRESETS: dict[str, dict[str, Any]] = {
    "zero1": {"stage": 1},
    "zero2": {"stage": 2},
    "zero2_offload": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
    "zero3": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
    "zero3_offload": {
        "stage": 3,
        "stage3_gather_16bit_weights_on_model_save": True,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True},
    },
}


def _base_config(choice: str | dict) -> dict[str, Any]:
    """The DeepSpeed config a preset name, a json path or a dict stands for."""
    if isinstance(choice, dict):
        config = copy.deepcopy(choice)
    elif choice in ZERO_PRESETS:
        config = {"zero_optimization": copy.deepcopy(ZERO_PRESETS[choice])}
    elif str(choice).endswith(".json"):
        path = Path(choice)
        if not path.is_file():
            raise XtunerError(f"--deepspeed {choice}: no such file")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise XtunerError(
                f"--deepspeed {choice}: not valid JSON (line {e.lineno}: {e.msg})"
            ) from None
    else:
        raise XtunerError(
            f"--deepspeed: unknown {choice!r}; use one of "
            f"{', '.join(ZERO_PRESETS)} or a path to a DeepSpeed .json"
        )
    return config


def zero_stage(choice: str | dict) -> int:
    """The ZeRO stage a ``--deepspeed`` choice asks for (0 when it names none)."""
    return int(_base_config(choice).get("zero_optimization", {}).get("stage", 0))


def deepspeed_config(
    choice: str | dict,
    batch_size: int,
    accumulative_counts: int,
    max_norm: float | None,
    world_size: int,
) -> dict[str, Any]:
    """A DeepSpeed config from a preset name or a json file/dict; the training config's micro
    batch, accumulation and clipping win over the json's, with a warning naming each change."""
    config = _base_config(choice)
    ours = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": accumulative_counts,
        "train_batch_size": batch_size * accumulative_counts * world_size,
        "gradient_clipping": max_norm or 0.0,
    }
    changed = [
        f"{key}: {config[key]} -> {value}"
        for key, value in ours.items()
        if key in config and config[key] not in (value, "auto")
    ]
    if changed:
        warnings.warn(
            "the training config overrides the DeepSpeed json: " + "; ".join(changed), stacklevel=2
        )
    config.update(ours)
    # our optimizer (torch AdamW or bitsandbytes') also with ZeRO-Offload
    config.setdefault("zero_allow_untested_optimizer", True)
    config.setdefault("zero_force_ds_cpu_optimizer", False)
    for precision in ("fp16", "bf16"):  # we autocast; DeepSpeed's own casting stays off
        if config.get(precision, {}).get("enabled") == "auto":
            config[precision]["enabled"] = False
    return config


def _trainable_only(
    state: dict[str, torch.Tensor], model: torch.nn.Module, prefix: str = ""
) -> OrderedDict:
    names = {prefix + n for n, p in model.named_parameters() if p.requires_grad}
    return OrderedDict((k, v) for k, v in state.items() if k in names)


def _strip(state: dict[str, torch.Tensor], prefix: str) -> OrderedDict:
    return OrderedDict(
        (k[len(prefix) :] if k.startswith(prefix) else k, v) for k, v in state.items()
    )


def _barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def _publish(tmp: str, final: str) -> None:
    """Rank 0 renames a finished checkpoint into place once all ranks have written theirs."""
    _barrier()
    if world()[0] == 0:
        publish(tmp, final)
    _barrier()


# ------------------------------------------------------------------------------ DDP and FSDP2


def _step(model: torch.nn.Module, data, optim_wrapper, acc: Accumulation) -> dict:
    return train_step(model, model.objective, data, optim_wrapper, acc)


class StepDataParallel(torch.nn.parallel.DistributedDataParallel):
    """DDP running the step through itself, all-reducing once per optimizer step."""

    def train_step(self, data, optim_wrapper):
        skip = lambda skip: self.no_sync() if skip else nullcontext()  # noqa: E731
        return _step(self.module, data, optim_wrapper, Accumulation(self, skip))


class FSDP2StepModel(torch.nn.Module):
    """Holds an FSDP2-sharded ``TrainModel`` (FSDP2 works in place)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    @contextmanager
    def _no_backward_sync(self, skip: bool):
        # gradients of skipped micro-batches stay unsharded; reduce-scatter once at the last
        self.module.set_requires_gradient_sync(not skip)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)

    def train_step(self, data, optim_wrapper):
        return _step(
            self.module, data, optim_wrapper, Accumulation(self.module, self._no_backward_sync)
        )


class DDPStepStrategy(DDPStrategy):
    """DDP on CPU (gloo) or GPU (nccl), with atomic checkpoints that keep every rank's RNG."""

    def _wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return StepDataParallel(model, device_ids=ids, broadcast_buffers=False)

    def _inner(self) -> torch.nn.Module:
        return self.model.module

    def model_state_dict(self) -> dict:
        return {k: v.detach().cpu() for k, v in self._inner().state_dict().items()}

    def save_checkpoint(
        self,
        filename: str,
        *,
        save_optimizer: bool = True,
        save_param_scheduler: bool = True,
        extra_ckpt: dict | None = None,
        callback=None,
    ) -> None:
        # every rank: the state may be sharded (FSDP2) and every rank's RNG is gathered
        extra = dict(extra_ckpt or {})
        extra[ckpt.RNG_STATES] = gather_rng_states()
        state = {ckpt.STATE_DICT: self.model_state_dict()}
        if save_optimizer:
            state[ckpt.OPTIMIZER] = self.optim_state_dict()
        if world()[0] == 0:
            if save_param_scheduler and hasattr(self, "param_schedulers"):
                state[ckpt.PARAM_SCHEDULERS] = self.scheduler_state_dict()
            extra.setdefault(ckpt.META, {}).update(
                seed=self.seed, time=time.strftime("%Y%m%d_%H%M%S"), mmengine=mmengine.__version__
            )
            state.update(extra)
            if callback is not None:
                callback(state)
            ckpt.save(state, filename)
        _barrier()

    def load_checkpoint(
        self,
        filename: str,
        *,
        map_location: Any = "cpu",
        strict: bool = False,
        revise_keys: list | None = None,
        callback=None,
    ) -> dict:
        self.logger.info(f"Load checkpoint from {filename}")
        checkpoint = ckpt.load(filename)
        if callback is not None:
            callback(checkpoint)
        self.load_model_state_dict(
            checkpoint.pop(ckpt.STATE_DICT),
            strict=strict,
            revise_keys=revise_keys or [(r"^module.", "")],
        )
        return checkpoint

    def load_model_state_dict(
        self, state_dict: dict, *, strict: bool = False, revise_keys: list | None = None
    ) -> None:
        ckpt.load_trained_weights(self._inner(), state_dict, "the checkpoint")

    def resume(self, filename: str, **kwargs) -> dict:
        checkpoint = super().resume(filename, **kwargs)
        restore_rank_rng(checkpoint.get(ckpt.RNG_STATES))
        return checkpoint

    def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The trained weights in the LLM's own names, full tensors, on rank 0 (else None)."""
        inner = self._inner()
        state = _strip(_trainable_only(inner.state_dict(), inner), "llm.")
        return state if world()[0] == 0 else None


class FSDP2Strategy(DDPStepStrategy):
    """torch FSDP2: ``fully_shard`` per decoder layer, then the root (embeddings, norm, head).

    Parameters, gradients and optimizer state are sharded over the ranks; with ``dtype`` set,
    compute runs in that dtype (``MixedPrecisionPolicy``) and gradients reduce in fp32.
    """

    def __init__(self, *, dtype: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.dtype = dtype
        # mmengine tells a wrapper from a model only by its registry (idempotent)
        MODEL_WRAPPERS.register_module(module=FSDP2StepModel, force=True)

    def _wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        policy = MixedPrecisionPolicy()
        if self.dtype is not None:
            compute = {"bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]
            policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        for layer in decoder_layers(model.llm):
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return FSDP2StepModel(model)

    def model_state_dict(self) -> dict:
        inner = self._inner()
        full = get_model_state_dict(
            inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return _trainable_only(full, inner)

    def optim_state_dict(self) -> dict:
        return get_optimizer_state_dict(
            self._inner(),
            self.optim_wrapper.optimizer,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )

    def load_model_state_dict(
        self, state_dict: dict, *, strict: bool = False, revise_keys: list | None = None
    ) -> None:
        set_model_state_dict(
            self._inner(), state_dict, options=StateDictOptions(full_state_dict=True, strict=False)
        )

    def load_optim_state_dict(self, state_dict: dict) -> None:
        set_optimizer_state_dict(
            self._inner(),
            self.optim_wrapper.optimizer,
            state_dict,
            options=StateDictOptions(full_state_dict=True),
        )

    def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
        state = _strip(self.model_state_dict(), "llm.")  # collective: every rank gathers
        return state if world()[0] == 0 else None


# ------------------------------------------------------------------------------ DeepSpeed


def _deepspeed_strategy_base():
    try:
        import deepspeed  # noqa: F401
        from mmengine._strategy.deepspeed import (
            DeepSpeedOptimWrapper,
            DeepSpeedStrategy,
            MMDeepSpeedEngineWrapper,
        )
    except ImportError:
        return None, None, None
    return DeepSpeedOptimWrapper, DeepSpeedStrategy, MMDeepSpeedEngineWrapper


# DeepSpeed is an optional extra: its classes exist only when it is installed
_DSOptimWrapper, _DSStrategy, _DSEngineWrapper = _deepspeed_strategy_base()


def require_deepspeed() -> None:
    if _DSStrategy is None:
        raise XtunerError(
            "--deepspeed needs DeepSpeed: pip install -c "
            "requirements/constraints.txt -e '.[deepspeed]'"
        )


if _DSStrategy is not None:

    class DeepSpeedStepOptimWrapper(_DSOptimWrapper):
        """Autocast forwards; the engine counts micro-batches and steps at the boundary, and
        the loss is already normalized by the global token count (no 1/accumulation scale)."""

        def __init__(self, optimizer, dtype: str | None = None, device_type: str = "cpu"):
            super().__init__(optimizer)
            self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[dtype]
            self.device_type = device_type

        @contextmanager
        def optim_context(self, model: torch.nn.Module):
            if self.autocast_dtype is None:
                yield
            else:
                with torch.autocast(self.device_type, dtype=self.autocast_dtype):
                    yield

        def backward(self, loss: torch.Tensor, **kwargs) -> None:
            self.model.backward(loss, scale_wrt_gas=False)

        def zero_grad(self, **kwargs) -> None:
            """The engine zeroes gradients itself after each optimizer step."""

    class DeepSpeedStepEngine(_DSEngineWrapper):
        """The DeepSpeed engine running the step; it steps itself at the accumulation
        boundary, so its ``step()`` is called after every micro-batch."""

        def train_step(self, data, optim_wrapper):
            return _step(
                self.model.module, data, optim_wrapper, Accumulation(self.model, engine_steps=True)
            )

    class DeepSpeedStepStrategy(_DSStrategy):
        """mmengine's DeepSpeedStrategy with our train step, atomic checkpoints, every rank's
        RNG in the checkpoint, and a process group that we created (gloo works on CPU)."""

        def _setup_distributed(self, launcher=None, backend: str = "nccl", **kwargs) -> None:
            import deepspeed

            deepspeed.init_distributed(
                dist_backend=dist.get_backend() if dist.is_initialized() else backend
            )

        def _wrap_model(self, model: torch.nn.Module):
            wrapper = super()._wrap_model(model)
            return DeepSpeedStepEngine(model=wrapper.model, inputs_to_half=self._inputs_to_half)

        def save_checkpoint(
            self,
            filename: str,
            *,
            save_optimizer: bool = True,
            save_param_scheduler: bool = True,
            extra_ckpt: dict | None = None,
            callback=None,
        ) -> None:
            extra = dict(extra_ckpt or {})
            extra[ckpt.RNG_STATES] = gather_rng_states()
            tmp = str(partial_path(filename))
            super().save_checkpoint(
                tmp,
                save_optimizer=True,
                save_param_scheduler=save_param_scheduler,
                extra_ckpt=extra,
            )
            _publish(tmp, filename)

        def resume(self, filename: str, **kwargs) -> dict:
            checkpoint = super().resume(filename, **kwargs)
            restore_rank_rng(checkpoint.get(ckpt.RNG_STATES))
            return checkpoint

        def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
            engine = self.model.model
            inner = engine.module
            if engine.zero_optimization_partition_weights():  # ZeRO-3: gather (collective)
                state = engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
            else:
                state = _trainable_only(inner.state_dict(), inner)
            if world()[0] != 0:
                return None
            return _strip({k: v.detach().cpu() for k, v in state.items()}, "llm.")


__all__ = [
    "FSDP2Strategy",
    "DDPStepStrategy",
    "ZERO_PRESETS",
    "deepspeed_config",
    "require_deepspeed",
]
