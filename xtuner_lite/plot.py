"""``xtuner plot-log``: the loss curve of a run as a PNG."""

from __future__ import annotations

import json
from pathlib import Path

from xtuner_lite.errors import XtunerError


def plot_log(work_dir: str | Path, out: str | Path | None = None, metric: str = "loss") -> Path:
    """Read ``loss.jsonl`` from a work dir and write ``<metric>.png`` (or ``out``): the loss,
    or any other logged value (``reward``, ``rewards/margin``, ...), with the learning rate."""
    import matplotlib  # only `xtuner plot-log` needs it (a slow import)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    return target
