"""The benchmark runner's plots: accuracy after each task, and accuracy matrices (matplotlib, Agg).

>>> import tempfile
>>> from pathlib import Path
>>> path = Path(tempfile.mkdtemp()) / "m.png"
>>> plot_matrix("spacenet", [[1.0, None], [0.5, 0.9]], path)
>>> path.read_bytes()[:4]
b'\\x89PNG'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """Mean accuracy on seen tasks after each task, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, e in results["strategies"].items():
        curve = e["accuracy_after_each_task_mean"]
        xs = [i + 1 for i, v in enumerate(curve) if v is not None]
        ax.plot(xs, [v for v in curve if v is not None], marker="o", label=name)
    ax.set(
        xlabel="tasks trained",
        ylabel="mean accuracy on seen tasks",
        ylim=(0, 1.02),
        title=results["settings"]["benchmark"],
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_matrix(name: str, matrix: list[list[float | None]], path: Path) -> None:
    """Heatmap of the seed-mean accuracy matrix R[after task][task]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float).reshape(
        len(matrix), -1
    )
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * max(1, data.shape[1]), 1.0 + 0.5 * max(1, data.shape[0])))
    ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis")
    if data.size <= 400:
        for (i, j), v in np.ndenumerate(data):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
    ax.set(xlabel="evaluated task", ylabel="after training task", title=f"{name}: accuracy (seed mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
