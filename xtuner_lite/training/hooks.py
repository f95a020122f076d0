"""Hooks: checkpoints kept safely, exact resume (RNG state), tokens/s, sample generations."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook, Hook

from xtuner_lite.data.templates import stop_token_ids
from xtuner_lite.training import checkpoint as ckpt
from xtuner_lite.training.distributed import gather_rng_states, global_sum, restore_rank_rng
from xtuner_lite.training.progress import say
from xtuner_lite.workdir import FILENAME


class RNGStateHook(Hook):
    """Saves and restores every RNG, so a resumed run draws the same dropout masks (one
    process; the multi-process strategies gather every rank's state themselves)."""

    priority = "VERY_LOW"

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint[ckpt.RNG_STATES] = gather_rng_states()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._pending = checkpoint.get(ckpt.RNG_STATES)

    def before_train(self, runner) -> None:
        # after mmengine re-seeds at resume; restore what the checkpoint held
        restore_rank_rng(getattr(self, "_pending", None))


class PlainCheckpointHook(Hook):
    """Last before a checkpoint is written: mmengine's numpy values and HistoryBuffers become
    tensors and tagged dicts, so the file loads without unpickling arbitrary objects."""

    priority = "LOWEST"

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint.update(ckpt.to_plain(checkpoint))


class SafeCheckpointHook(CheckpointHook):
    """mmengine's CheckpointHook with nothing trained put at risk:

    - older checkpoints are deleted only once a newer one is complete and the step after it
      gave a finite loss (mmengine deletes the oldest before writing the next one, so a kill
      mid-write with ``max_keep_ckpts=1`` left nothing);
    - weights that are not finite are never saved;
    - ``last_checkpoint`` names the file relative to the work dir.
    """

    def __init__(self, interval: int, keep: int):
        super().__init__(interval=interval, by_epoch=False, max_keep_ckpts=-1, save_last=True)
        self.keep = keep
        self._unconfirmed = False

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self._unconfirmed:  # this step's loss was finite: the newest checkpoint is good
            self._prune()
        super().after_train_iter(runner, batch_idx, data_batch, outputs)

    def after_train(self, runner) -> None:
        super().after_train(runner)
        self._prune()

    def _prune(self) -> None:
        self._unconfirmed = False
        if is_main_process():
            ckpt.prune(self.out_dir, self.keep)

    def _save_checkpoint_with_step(self, runner, step: int, meta: dict) -> None:
        if global_sum(0.0 if ckpt.all_finite(runner.model) else 1.0)[0]:
            runner.logger.warning(
                f"step {step}: trained weights are not finite; no checkpoint saved"
            )
            return
        filename = FILENAME.format(step)
        self.last_ckpt = os.path.join(self.out_dir, filename)
        runner.message_hub.update_info("last_ckpt", self.last_ckpt)
        runner.save_checkpoint(
            self.out_dir,
            filename,
            self.file_client_args,
            save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler,
            meta=meta,
            by_epoch=False,
            backend_args=self.backend_args,
            **self.args,
        )
        if is_main_process():
            ckpt.record_latest(runner.work_dir, self.last_ckpt)
        self._unconfirmed = True


class ThroughputHook(Hook):
    """Puts real (non-padding) tokens per second into the logged scalars."""

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self._start = time.perf_counter()

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        real = float(outputs["tokens"])
        elapsed = time.perf_counter() - self._start
        runner.message_hub.update_scalar("train/tokens_per_sec", real / max(elapsed, 1e-9))


class LossRecordHook(Hook):
    """Appends each step's loss to ``loss.jsonl`` in the work dir (for tests and plot-log).

    At start it drops records past the step training starts from: all of them for a fresh run,
    those after the checkpoint for a resumed one, so the file is always one clean curve.
    """

    def before_train(self, runner) -> None:
        if runner.rank != 0:  # the logged loss is already the global one
            return
        path = Path(runner.work_dir) / "loss.jsonl"
        if path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line and json.loads(line)["step"] <= runner.iter
            ]
            path.write_text("".join(line + "\n" for line in kept))

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if runner.rank != 0:
            return
        record = {
            "step": runner.iter + 1,
            "loss": float(outputs["loss"]),
            "lr": float(runner.optim_wrapper.get_lr()["lr"][0]),
            "tokens": int(outputs["tokens"]),
            **{k: float(v) for k, v in outputs.items() if k not in ("loss", "tokens")},
        }
        with open(Path(runner.work_dir) / "loss.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


class PeriodicHook(Hook):
    """Runs ``_run(runner, when)`` before training, every ``every`` steps and at the end."""

    priority = "LOW"
    every: int | None = None

    def _run(self, runner, when: str) -> None:
        raise NotImplementedError

    def before_train(self, runner) -> None:
        if runner.iter == 0:
            self._run(runner, "before training")

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if (
            self.every
            and (runner.iter + 1) % self.every == 0
            and runner.iter + 1 < runner.max_iters
        ):
            self._run(runner, f"step {runner.iter + 1}")

    def after_train(self, runner) -> None:
        self._run(runner, "after training")


class EvaluateChatHook(PeriodicHook):
    """XTuner's EvaluateChatHook: greedy answers to fixed prompts before, during and after training.

    Printed to the log and appended to ``samples.jsonl`` so progress is visible as text.
    Greedy decoding draws no random numbers, so it does not disturb an exact resume.
    """

    def __init__(
        self,
        tokenizer,
        template,
        prompts: list[str],
        every: int | None = None,
        max_new_tokens: int = 64,
    ):
        self.tokenizer, self.template, self.prompts = tokenizer, template, list(prompts)
        self.every, self.max_new_tokens = every, max_new_tokens

    @torch.no_grad()
    def _run(self, runner, when: str) -> None:
        llm = runner.model.llm
        was_training = llm.training
        llm.eval()
        stop_ids = stop_token_ids(self.template, self.tokenizer)
        device = next(llm.parameters()).device
        records = []
        for prompt in self.prompts:
            text = self.template.render_prompt(
                [{"role": "user", "content": prompt}], self.tokenizer
            )
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            ids = ids.to(device)
            with runner.optim_wrapper.optim_context(runner.model):  # training's autocast
                out = llm.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    eos_token_id=stop_ids,
                    pad_token_id=stop_ids[0],
                    use_cache=True,
                )
            answer = self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            line = f"[sample {when}] {prompt!r} -> {answer.strip()!r}"
            runner.logger.info(line)
            say(line)
            records.append(
                {"step": runner.iter, "when": when, "prompt": prompt, "answer": answer.strip()}
            )
        with open(Path(runner.work_dir) / "samples.jsonl", "a") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        llm.train(was_training)
