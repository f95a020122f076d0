"""Multi-process basics: torchrun launch, process group, rank-0-first work, global sums, RNG.

Launch follows XTuner's convention: ``NPROC_PER_NODE=N xtuner train ...`` re-runs the command
under ``torchrun`` (``NNODES``, ``NODE_RANK``, ``ADDR``, ``PORT`` for several nodes). We create
the process group ourselves (gloo on CPU, nccl on GPU) because mmengine's ``init_dist`` calls
``torch.cuda.set_device`` unconditionally and so cannot start a CPU run.
"""

from __future__ import annotations

import datetime
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

from xtuner_lite.errors import XtunerError


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_command(argv: list[str]) -> list[str] | None:
    """The torchrun command line for ``NPROC_PER_NODE`` (None when it is unset, 1 on one node,
    or we already run under torchrun)."""
    nproc = os.environ.get("NPROC_PER_NODE")
    if not nproc or launched_by_torchrun():
        return None
    if not nproc.isdigit() or int(nproc) < 1:
        raise XtunerError(f"NPROC_PER_NODE must be a positive integer, got {nproc!r}")
    nnodes = os.environ.get("NNODES", "1")
    if int(nproc) == 1 and nnodes == "1":
        return None
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--nnodes={nnodes}",
        f"--node_rank={os.environ.get('NODE_RANK', '0')}",
        f"--master_addr={os.environ.get('ADDR', '127.0.0.1')}",
        f"--master_port={os.environ.get('PORT', '29500')}",
        "-m",
        "xtuner_lite.cli",
        *argv,
    ]


def relaunch_with_torchrun(argv: list[str]) -> int | None:
    """Run ``xtuner ARGV`` under torchrun when ``NPROC_PER_NODE`` asks for it; its exit code."""
    command = torchrun_command(argv)
    if command is None:
        return None
    return subprocess.run(command).returncode


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when no process group exists."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_process_group(device: str, timeout_s: int) -> bool:
    """Create the default process group under torchrun; False when running as one process."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) < 2:
        return False
    if dist.is_initialized():
        return True
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


@contextmanager
def main_process_first(timeout_s: int) -> Iterator[None]:
    """Rank 0 runs the body first (e.g. processes and caches the dataset); the others wait for
    it, up to ``timeout_s``, then run the body themselves (reading the cache)."""
    rank, size = world()
    if size == 1:
        yield
        return
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    if rank != 0:
        _barrier(group, timeout_s)
    yield
    if rank == 0:
        _barrier(group, timeout_s)


def _barrier(group, timeout_s: int) -> None:
    try:
        dist.monitored_barrier(group, timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as e:
        raise XtunerError(
            f"rank {dist.get_rank()} waited {timeout_s} s for rank 0 to process "
            f"the dataset; raise train.dist_timeout for large datasets ({e})"
        ) from None


def global_sum(*values: float) -> list[float]:
    """Sum numbers over all processes (the values themselves in a single process)."""
    if world()[1] == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's (CPU and every GPU) generators from ``seed``, as mmengine's
    ``set_random_seed`` does."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every CUDA device too


def rng_state() -> dict:
    """Every RNG's state as tensors and plain numbers (a checkpoint must load without
    unpickling numpy objects)."""
    numpy = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)),
            "pos": int(numpy["state"]["pos"]),
            "has_gauss": int(numpy["has_gauss"]),
            "gauss": float(numpy["gauss"]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
            "has_gauss": numpy["has_gauss"],
            "gauss": numpy["gauss"],
        }
    )
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states() -> list[dict]:
    """Every rank's RNG state (collective): dropout masks differ per rank, so each needs its own
    state back for a resumed run to draw the same masks."""
    rank, size = world()
    if size == 1:
        return [rng_state()]
    states: list = [None] * size
    dist.all_gather_object(states, rng_state())
    return states


def restore_rank_rng(states: list[dict] | None) -> None:
    """Set this rank's RNG from the states of a run with the same world size."""
    rank, size = world()
    if states and len(states) == size:
        set_rng_state(states[rank])
