"""Hooks: exact resume (RNG state), tokens/s in the progress line, sample generations."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Saves and restores every RNG, so a resumed run draws the same dropout masks."""

    priority = "VERY_LOW"

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint["rng_state"] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                                   "python": random.getstate()}
        if torch.cuda.is_available():
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state_all()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._pending = checkpoint.get("rng_state")

    def before_train(self, runner) -> None:
        # after mmengine re-seeds at resume; restore what the checkpoint held
        state = getattr(self, "_pending", None)
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


@HOOKS.register_module()
class ThroughputHook(Hook):
    """Puts real (non-padding) tokens per second into the logged scalars."""

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self._start = time.perf_counter()

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        real = sum(int(b["num_tokens"]) for b in data_batch or [])
        elapsed = time.perf_counter() - self._start
        runner.message_hub.update_scalar("train/tokens_per_sec", real / max(elapsed, 1e-9))


@HOOKS.register_module()
class LossRecordHook(Hook):
    """Appends each step's loss to ``loss.jsonl`` in the work dir (for tests and plot-log).

    At start it drops records past the step training starts from: all of them for a fresh run,
    those after the checkpoint for a resumed one, so the file is always one clean curve.
    """

    def before_train(self, runner) -> None:
        path = Path(runner.work_dir) / "loss.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= runner.iter]
            path.write_text("".join(line + "\n" for line in kept))

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        record = {"step": runner.iter + 1, "loss": float(outputs["loss"]),
                  "lr": float(runner.optim_wrapper.get_lr()["lr"][0])}
        with open(Path(runner.work_dir) / "loss.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
