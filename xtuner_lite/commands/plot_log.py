"""``xtuner plot-log``: the loss curve of a run as a PNG."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; set before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402

from xtuner_lite.errors import XtunerError  # noqa: E402


def plot_log(work_dir: str, out: str | None = None, metric: str = "loss") -> Path:
    """Write the loss curve of a training run as a PNG.

    Read loss.jsonl from a work dir and write <metric>.png (or OUT): the loss, or any other
    logged value (reward, rewards/margin, ...), with the learning rate; print its path.

    Args:
        work_dir: the work dir of an `xtuner train` run
        out: PNG path (default WORK_DIR/<metric>.png)
        metric: a logged value: loss, reward, kl, ...
    """
    log = Path(work_dir) / "loss.jsonl"
    if not log.exists():
        raise XtunerError(f"{log} not found: is {work_dir} the work dir of an `xtuner train` run?")
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if not records:
        raise XtunerError(f"{log} is empty: training has not finished a step yet")
    records = [r for r in records if metric in r]
    if not records:
        raise XtunerError(f"{log} has no {metric!r} values (logged: the loss and the objective's)")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["step"] for r in records], [r[metric] for r in records], lw=1.5)
    ax.set(xlabel="step", ylabel=metric, title=f"training {metric} — {Path(work_dir).name}")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(
        [r["step"] for r in records], [r["lr"] for r in records], color="grey", lw=0.8, ls="--"
    )
    lr_ax.set_ylabel("learning rate", color="grey")
    target = Path(out) if out else Path(work_dir) / f"{metric.replace('/', '_')}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(target)
    plt.close(fig)
    print(target)
    return target
