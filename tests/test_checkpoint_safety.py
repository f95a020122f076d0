"""Checkpoints: never code execution on load, never all progress lost, never diverged weights
offered as the last good state, resumable wherever the work dir goes."""

import os
import shutil

import pytest
import torch

from xtuner_lite.errors import XtunerError
from xtuner_lite.training import checkpoint as ckpt

from conftest import loss_curve, tiny_train_cfg

pytestmark = pytest.mark.integration


class _Payload:
    """Unpickling this runs a shell command: what a crafted checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted(path, marker):
    torch.save({"state_dict": {}, "meta": {"iter": 1}, "payload": _Payload(marker)}, path)
    return path


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, tiny_llama, capsys):
    from xtuner_lite.cli import main
    from xtuner_lite.commands.train import train

    marker = tmp_path / "code-ran"
    evil = _crafted(tmp_path / "iter_1.pth", marker)
    config = tmp_path / "cfg.py"
    config.write_text("\n".join(f"{k} = {v!r}" for k, v in tiny_train_cfg(tiny_llama).items()))
    assert main(["convert", "pth_to_hf", str(config), str(evil), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "refusing to load" in err and "Traceback" not in err
    with pytest.raises(ckpt.CheckpointError, match="refusing to load"):
        train(tiny_train_cfg(tiny_llama), work_dir=tmp_path / "run", resume=str(evil))
    work = tmp_path / "auto"
    work.mkdir()
    _crafted(work / "iter_3.pth", marker)
    with pytest.raises(ckpt.CheckpointError, match="refusing to load"):
        train(tiny_train_cfg(tiny_llama), work_dir=work, resume=True)
    assert not marker.exists()


def test_our_checkpoints_load_with_the_weights_only_unpickler(tmp_path, tiny_llama):
    from xtuner_lite.commands.train import train

    train(tiny_train_cfg(tiny_llama, max_iters=2), work_dir=tmp_path)
    for _, path in ckpt.checkpoints(tmp_path):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
        state = ckpt.load(path)
        assert state[ckpt.STATE_DICT] and state[ckpt.RNG_STATES]


def test_a_write_cut_off_with_save_total_limit_1_keeps_the_previous_checkpoint(
    tmp_path, tiny_llama, monkeypatch
):
    """mmengine deleted the old checkpoint before writing the new one: a kill mid-write left
    nothing to resume from."""
    import mmengine.runner.runner as mm_runner

    from xtuner_lite.commands.train import train

    cfg = tiny_train_cfg(tiny_llama, max_iters=5, save_steps=1, save_total_limit=1)
    train(cfg, work_dir=tmp_path / "whole")
    reference = loss_curve(tmp_path / "whole")

    real_save, calls = mm_runner.save_checkpoint, []

    def killed_mid_write(checkpoint, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 3:
            with open(filename, "wb") as f:
                f.write(b"PK\x03\x04 half a checkpoint")
            raise KeyboardInterrupt  # the process dies here
        return real_save(checkpoint, filename, *args, **kwargs)

    monkeypatch.setattr(mm_runner, "save_checkpoint", killed_mid_write)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, work_dir=cut)
    monkeypatch.setattr(mm_runner, "save_checkpoint", real_save)
    assert [p.name for _, p in ckpt.checkpoints(cut)] == ["iter_2.pth"]
    assert ckpt.is_complete(cut / "iter_2.pth")
    train(cfg, work_dir=cut, resume=True)
    assert loss_curve(cut) == reference
    assert [p.name for _, p in ckpt.checkpoints(cut)] == ["iter_5.pth"]


def test_resume_auto_stays_inside_a_moved_or_copied_work_dir(tmp_path, tiny_llama, capsys):
    from xtuner_lite.commands.train import train

    cfg = tiny_train_cfg(tiny_llama, max_iters=4, save_steps=2)
    train(cfg, work_dir=tmp_path / "original")
    assert (tmp_path / "original" / ckpt.LAST_CHECKPOINT).read_text() == "iter_4.pth"
    shutil.copytree(tmp_path / "original", tmp_path / "copy")
    (tmp_path / "original").rename(tmp_path / "moved")  # the path the copy once pointed at
    cfg["train"]["max_iters"] = 6
    for folder in ("moved", "copy"):
        train(cfg, work_dir=tmp_path / folder, resume=True)
        assert [p.name for _, p in ckpt.checkpoints(tmp_path / folder)] == [
            "iter_4.pth",
            "iter_6.pth",
        ]
        assert len(loss_curve(tmp_path / folder)) == 6
    # the newest checkpoint cut short: resume falls back to the one before and says so
    newest = tmp_path / "copy" / "iter_6.pth"
    newest.write_bytes(newest.read_bytes()[:1000])
    capsys.readouterr()
    cfg["train"]["max_iters"] = 8
    train(cfg, work_dir=tmp_path / "copy", resume=True)
    out, err = capsys.readouterr()
    assert "iter_6.pth unreadable" in out
    assert "missing keys" not in out + err  # frozen weights are not in a checkpoint, by design
    assert len(loss_curve(tmp_path / "copy")) == 8


def test_a_nan_stop_sets_aside_the_checkpoint_that_produced_it(tmp_path, tiny_llama, monkeypatch):
    """The checkpoint saved right before a non-finite step holds the weights that gave it: it
    is set aside, and resume continues from the one before, named in the message."""
    from xtuner_lite.commands.train import train
    from xtuner_lite.objectives import sft
    from xtuner_lite.training import NonFiniteLossError

    real, calls = sft.loss_sum, []

    def nan_at_step_4(*args, **kwargs):
        total, *rest = real(*args, **kwargs)
        calls.append(1)
        return (total * float("nan") if len(calls) == 4 else total, *rest)

    monkeypatch.setattr(sft, "loss_sum", nan_at_step_4)
    cfg = tiny_train_cfg(tiny_llama, max_iters=6, save_steps=1, save_total_limit=1)
    with pytest.raises(
        NonFiniteLossError,
        match=r"at step 4; the last good checkpoint is "
        r"kept: iter_2\.pth",
    ):
        train(cfg, work_dir=tmp_path)
    assert [p.name for _, p in ckpt.checkpoints(tmp_path)] == ["iter_2.pth"]
    assert (tmp_path / "iter_3.pth.diverged").exists()
    assert (tmp_path / ckpt.LAST_CHECKPOINT).read_text() == "iter_2.pth"
    monkeypatch.setattr(sft, "loss_sum", real)
    train(cfg, work_dir=tmp_path, resume=True)
    assert len(loss_curve(tmp_path)) == 6


def test_a_collapsed_run_stops_and_keeps_no_destroyed_weights(tmp_path, tiny_llama):
    """lr=1e8 destroys the model without a NaN (loss ln V, zero gradient): it stops with a
    message, and the checkpoint holding the destroyed weights is set aside."""
    from xtuner_lite.commands.train import train
    from xtuner_lite.training import CollapsedRunError

    cfg = tiny_train_cfg(
        tiny_llama,
        method="full",
        max_iters=40,
        lr=1e8,
        max_norm=None,
        save_steps=1,
        save_total_limit=1,
    )
    with pytest.raises(
        CollapsedRunError,
        match="collapsed.*zero gradient.*at step 2; no checkpoint from before the divergence",
    ):
        train(cfg, work_dir=tmp_path)
    assert ckpt.checkpoints(tmp_path) == []
    assert (tmp_path / "iter_1.pth.diverged").exists()


def test_a_truncated_or_foreign_resume_path_is_one_clear_error(tmp_path, tiny_llama, capsys):
    from xtuner_lite.cli import main

    config = tmp_path / "cfg.py"
    config.write_text("\n".join(f"{k} = {v!r}" for k, v in tiny_train_cfg(tiny_llama).items()))
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 not all there")
    (tmp_path / "notes.txt").write_text("hello")
    for path, message in (
        ("cut.pth", "not a complete checkpoint"),
        ("notes.txt", "not a complete checkpoint"),
        ("missing.pth", "does not exist"),
    ):
        assert (
            main(
                [
                    "train",
                    str(config),
                    "--work-dir",
                    str(tmp_path / "w"),
                    "--resume",
                    str(tmp_path / path),
                ]
            )
            == 1
        )
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    with pytest.raises(XtunerError):
        ckpt.load(tmp_path / "cut.pth")


def test_pruning_never_counts_a_cut_off_checkpoint_as_kept(tmp_path):
    for step in (4, 6):
        ckpt.save({ckpt.STATE_DICT: {"w": torch.ones(2)}}, tmp_path / f"iter_{step}.pth")
    (tmp_path / "iter_8.pth").write_bytes(b"PK\x03\x04 cut off")  # from before a resume
    ckpt.prune(tmp_path, keep=1)
    assert [p.name for _, p in ckpt.checkpoints(tmp_path)] == ["iter_6.pth"]
    assert torch.equal(ckpt.load(tmp_path / "iter_6.pth")[ckpt.STATE_DICT]["w"], torch.ones(2))
