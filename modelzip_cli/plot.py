"""`distill --plot`: training curves as a PNG (matplotlib is an optional extra: modelzip[plot])."""

from __future__ import annotations

from pathlib import Path

from modelzip_cli.errors import UsageError


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib", hint="pip install 'modelzip[plot]'") from None


def plot_history(step_after: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from modelzip_cli.checkpoint import atomic_write

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
