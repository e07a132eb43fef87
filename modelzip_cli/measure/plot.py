"""`distill --plot`: training curves as a PNG (matplotlib is an optional extra: modelzip[plot])."""

from __future__ import annotations

from pathlib import Path

from modelzip_cli.errors import UsageError
from modelzip_cli.files import Outputs


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib", hint="pip install 'modelzip[plot]'") from None


def plot_history(step_after: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from modelzip_cli.checkpoint.io import atomic_write

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for label, key in (("distilled", "history"), ("baseline", "baseline_history")):
        rows = step_after.get(key) or []
        if not rows:
            continue
        epochs = [r["epoch"] for r in rows]
        ax_loss.plot(epochs, [r["loss"] for r in rows], label=f"{label} train loss")
        ax_acc.plot(epochs, [r["train_accuracy"] for r in rows], label=f"{label} train")
        if "val_accuracy" in rows[0]:
            ax_loss.plot(epochs, [r["val_loss"] for r in rows], "--", label=f"{label} val loss")
            ax_acc.plot(epochs, [r["val_accuracy"] for r in rows], "--", label=f"{label} val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def plot_sensitivity(rows: list[dict], path: Path, outputs: Outputs | None = None) -> None:
    """`analyze --plot`: layers × candidates, coloured by the loss of compressing that layer alone (log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    from modelzip_cli.files import atomic_write

    layers = list(dict.fromkeys(r["name"] for r in rows))
    cands = list(dict.fromkeys(r["candidate"] for r in rows))
    grid = np.full((len(layers), len(cands)), np.nan)
    for r in rows:
        if r["applies"]:
            grid[layers.index(r["name"]), cands.index(r["candidate"])] = max(r["loss"], 1e-7)
    fig, ax = plt.subplots(figsize=(2 + 1.2 * len(cands), 1.5 + 0.28 * len(layers)))
    finite = grid[np.isfinite(grid)]
    norm = LogNorm(vmin=max(finite.min(), 1e-7), vmax=max(finite.max(), 2e-7)) if finite.size else None
    im = ax.imshow(grid, aspect="auto", cmap="viridis", norm=norm)
    ax.set_xticks(range(len(cands)), cands)
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    for i in range(len(layers)):
        for j in range(len(cands)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1e}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=ax, label="loss of that layer alone (log)")
    ax.set_title("per-layer sensitivity")
    fig.tight_layout()
    if outputs is not None:  # staged with the run's other files
        outputs.write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    else:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
