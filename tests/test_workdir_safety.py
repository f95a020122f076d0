"""Work dirs: one training at a time, no silent replacement of a finished run, no output that
swallows trained work."""

import shutil

import pytest

from xtuner_lite import workdir
from xtuner_lite.errors import XtunerError

from conftest import loss_curve, tiny_train_cfg

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_llama):
    from xtuner_lite.commands.train import train

    work = tmp_path_factory.mktemp("finished")
    train(tiny_train_cfg(tiny_llama, max_iters=2), work_dir=work)
    return work


def _snapshot(folder):
    return {
        p.relative_to(folder): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != workdir.LOCK
    }


def test_a_second_training_in_a_busy_work_dir_fails_at_once(tmp_path, tiny_llama):
    from xtuner_lite.commands.train import train

    with workdir.locked(tmp_path):  # another training holds it
        with pytest.raises(workdir.WorkDirError, match="in use by another training"):
            train(tiny_train_cfg(tiny_llama), work_dir=tmp_path)
    assert not (tmp_path / "loss.jsonl").exists()


def test_rerunning_a_finished_work_dir_needs_resume_or_overwrite(
    tmp_path, finished_run, tiny_llama
):
    from xtuner_lite.commands.train import train

    work = tmp_path / "run"
    shutil.copytree(finished_run, work)
    before = _snapshot(work)
    with pytest.raises(
        workdir.WorkDirError, match="holds a previous run.*--resume auto.*--overwrite"
    ):
        train(tiny_train_cfg(tiny_llama, max_iters=2), work_dir=work)
    assert _snapshot(work) == before  # adapter, curve and checkpoints untouched
    train(tiny_train_cfg(tiny_llama, max_iters=3, save_steps=3), work_dir=work, overwrite=True)
    assert len(loss_curve(work)) == 3
    assert [p.name for _, p in workdir.checkpoints(work)] == ["iter_3.pth"]


@pytest.mark.parametrize("target", ["work_dir", "adapter", "parent"])
def test_merge_refuses_an_output_that_would_delete_its_input(tmp_path, finished_run, target):
    from xtuner_lite.commands.merge import merge_adapter

    work = tmp_path / "run"
    shutil.copytree(finished_run, work)
    before = _snapshot(tmp_path)
    out = {"work_dir": work, "adapter": work / "adapter", "parent": tmp_path}[target]
    with pytest.raises(XtunerError, match="choose another output folder"):
        merge_adapter(None, work / "adapter", out, force=True)
    assert _snapshot(tmp_path) == before


def test_a_work_dir_that_cannot_be_one_is_a_clear_error(tmp_path, tiny_llama):
    from xtuner_lite.commands.train import train

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(workdir.WorkDirError, match="is a file, not a folder"):
        train(tiny_train_cfg(tiny_llama), work_dir=blocker)
    with pytest.raises(workdir.WorkDirError, match="cannot create work dir"):
        train(tiny_train_cfg(tiny_llama), work_dir=blocker / "inside")


def test_a_read_only_work_dir_is_a_clear_error(tmp_path, monkeypatch):
    # root may write anywhere, so the permission answer is what the OS would tell a user
    monkeypatch.setattr(workdir.os, "access", lambda path, mode: False)
    with pytest.raises(workdir.WorkDirError, match="is not writable"):
        workdir.check_writable(tmp_path)
