"""Tables and plots of a run directory's metrics."""

from __future__ import annotations

from pathlib import Path

from .metrics import read_metrics


def plot_run(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """PNG with held-out accuracy (left) and the teacher–student KL estimate (right) per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in rows if r["kind"] == "eval"]
    train = [r for r in rows if r["kind"] == "train"]
    teacher = [r for r in rows if r["kind"] == "teacher_eval"]
    fig, (ax_acc, ax_kl) = plt.subplots(1, 2, figsize=(10, 4))
    graded = [r for r in evals if r.get("accuracy") is not None]  # prompt-only evaluation data has no accuracy
    ax_acc.plot([r["step"] for r in graded], [r["accuracy"] for r in graded], marker="o", label="student")
    if teacher and teacher[0].get("accuracy") is not None:
        ax_acc.axhline(teacher[0]["accuracy"], color="gray", linestyle="--", label="teacher")
    ax_acc.set(xlabel="step", ylabel="held-out accuracy (greedy)", ylim=(0, 1.02), title="accuracy")
    ax_acc.legend(loc="lower right")
    kl = [(r["step"], r["kl"]) for r in train if "kl" in r]
    if kl:
        ax_kl.plot(*zip(*kl), linewidth=1)
    ax_kl.set(xlabel="step", ylabel="mean per-token log π_S − log π_T", title="teacher–student KL (sampled)")
    fig.tight_layout()
    out = Path(path) if path else run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def format_table(rows: list[tuple[str, float | None]]) -> str:
    """Two-column text table of model → accuracy."""
    width = max(len(name) for name, _ in rows)
    lines = [f"{'model':<{width}}  accuracy", f"{'-' * width}  --------"]
    for name, value in rows:
        shown = "   n/a" if value is None else f"{100 * value:6.1f}%"
        lines.append(f"{name:<{width}}  {shown}")
    return "\n".join(lines)
