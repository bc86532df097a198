"""The report ``opd compare`` writes: ``report.md`` (per claim: its verdict, the test's table, accuracy before/after;
then every run), a PNG per claim (held-out accuracy against generated tokens and against training seconds, mean
± std bands over seeds) and ``runs.jsonl`` (each run's own ``summary.json`` with its arm and seed). Everything is
read back from the run directories, so a report can be rewritten without running anything.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shutil
import statistics
import textwrap
from pathlib import Path

from .claims import Curve, accuracy_rows, judge, read_curve

DOCS_BEGIN = "<!-- opd compare: begin (generated; do not edit by hand) -->"
DOCS_END = "<!-- opd compare: end -->"


def _table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def plot_claim(title: str, curves: dict[str, list[Curve]], path: Path) -> Path:
    """Accuracy against generated tokens (left) and training seconds (right): per arm the mean over seeds at each
    evaluation step, with a ±1 std band (x is the seeds' mean at that step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, runs in curves.items():
        steps = sorted(set.intersection(*(set(c.steps_E) for c in runs)))
        if not steps:
            continue
        for ax, attr in zip(axes, ("tokens_E", "seconds_E")):
            x, mean, std = [], [], []
            for k in steps:
                at = [(getattr(c, attr)[c.steps_E.index(k)], c.accuracy_E[c.steps_E.index(k)]) for c in runs]
                x.append(statistics.fmean(a for a, _ in at))
                accs = [b for _, b in at]
                mean.append(statistics.fmean(accs))
                std.append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
            (line,) = ax.plot(x, mean, marker=".", label=f"{label} ({len(runs)} seeds)")
            ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=line.get_color(), alpha=0.2)
    axes[0].set(xlabel="student-generated tokens", ylabel="held-out accuracy (greedy)", title="against generated tokens")
    axes[1].set(xlabel="training seconds (evaluations excluded)", title="against training time")
    for ax in axes:
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(textwrap.fill(title, 130), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import torch

    return f"{platform.processor() or platform.machine()}, {cores} cores, Python {platform.python_version()}, torch {torch.__version__}"


def write_report(plan, out: Path, command: str = "", docs: Path | None = None) -> Path:
    """Write ``out/report.md``, ``out/<claim>.png`` and ``out/runs.jsonl`` from the plan's finished runs; with
    ``docs``, also put the report between the markers of that file (appending them if absent) and its plots in
    ``docs/claims/``."""
    out.mkdir(parents=True, exist_ok=True)
    curves_of, raw = {}, []
    for arm in plan.arms:
        for seed in plan.seeds:
            run_dir = arm.run_dir(out, seed)
            if not (run_dir / "summary.json").is_file():
                continue
            curves_of[(arm.key, seed)] = read_curve(run_dir, arm.label, seed)
            summary = json.loads((run_dir / "summary.json").read_text())
            raw.append({"arm": arm.label, "labels": arm.labels, "config": str(arm.config), "seed": seed, "run_dir": str(run_dir), "summary": summary})
    with open(out / "runs.jsonl", "w") as f:
        for row in raw:
            f.write(json.dumps(row) + "\n")
    sections, plots = [], []
    for claim in plan.claims:
        curves = {}
        for label in claim.arms:
            arm = plan.arm_of[(claim.name, label)]
            runs = [curves_of[(arm.key, s)] for s in plan.seeds if (arm.key, s) in curves_of]
            curves[label] = [dataclasses.replace(c, label=label) for c in runs]  # the claim's own name for the arm
        verdict = judge(claim, curves)
        png = None
        if any(curves.values()):
            png = plot_claim(claim.claim, {k: v for k, v in curves.items() if v}, out / f"{claim.name}.png")
            plots.append(png)
        status = {True: "holds", False: "does not hold", None: "undecided"}[verdict.holds]
        body = [
            f"## {claim.name}: {status}", "", f"**Claim.** {claim.claim}" + (f" ({claim.source})" if claim.source else ""), "",
            f"**Found.** {verdict.words}.", "", _table(verdict.table), "", _table(accuracy_rows({k: v for k, v in curves.items() if v})), "",
        ]
        if claim.test.get("note"):
            body += [f"*How it was run.* {str(claim.test['note']).strip()}", ""]
        if png:
            body += [f"![{claim.name}]({png.name})", ""]
        sections.append("\n".join(body))
    plain = [label for claim_name, label in plan.arm_of if claim_name == ""]
    if plain:  # configs named on the command line outside any claim set: their curves and accuracy, no verdict
        curves = {label: [curves_of[(plan.arm_of[("", label)].key, s)] for s in plan.seeds if (plan.arm_of[("", label)].key, s) in curves_of]
                  for label in plain}
        body = ["## Configs", "", _table(accuracy_rows({k: v for k, v in curves.items() if v})), ""]
        if any(curves.values()):
            plots.append(plot_claim("configs", {k: v for k, v in curves.items() if v}, out / "configs.png"))
            body += ["![configs](configs.png)", ""]
        sections.append("\n".join(body))
    runs_rows = [["arm", "seed", "before", "after", "generated tokens", "train s", "run"]]
    for row in raw:
        s = row["summary"]
        fmt = lambda v: "—" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        runs_rows.append([row["arm"], str(row["seed"]), fmt(s.get("student_accuracy_before")), fmt(s.get("student_accuracy_after")),
                          f"{s.get('generated_tokens', 0):,.0f}", f"{s.get('train_seconds', 0):.0f}", os.path.relpath(row["run_dir"], out)])
    missing = len(plan.arms) * len(plan.seeds) - len(raw)
    head = [
        "# opd compare: the papers' claims, tested", "",
        f"Command: `{command}`" if command else "", f"Seeds: {', '.join(map(str, plan.seeds))}; {len(raw)} finished runs"
        + (f", {missing} missing" if missing else "") + f". Written {datetime.date.today().isoformat()} on {_machine()}.",
        "Mean ± sample standard deviation over seeds; training seconds were measured with runs sharing the machine's cores.", "",
    ]
    text = "\n".join(head) + "\n" + "\n".join(sections) + "\n## Every run\n\n" + _table(runs_rows) + "\n"
    report = out / "report.md"
    report.write_text(text)
    if docs is not None:
        put_in_docs(docs, text, plots)
    return report


def put_in_docs(docs: Path, text: str, plots: list[Path]) -> None:
    """Replace what lies between the markers of ``docs`` with ``text`` (without its title, headings one level down,
    plots from ``claims/``, without the table of run directories); copy the plots to ``docs.parent/claims/``."""
    target = docs.parent / "claims"
    target.mkdir(parents=True, exist_ok=True)
    for png in plots:
        shutil.copyfile(png, target / png.name)
    body = text.split("\n", 1)[1].lstrip("\n").replace("\n## ", "\n### ")  # the file has its own heading
    for png in plots:
        body = body.replace(f"]({png.name})", f"](claims/{png.name})")
    body = body.split("\n### Every run\n")[0].rstrip("\n")  # the run directories mean nothing in the docs
    old = docs.read_text() if docs.is_file() else ""
    block = f"{DOCS_BEGIN}\n{body}\n{DOCS_END}"
    if DOCS_BEGIN in old and DOCS_END in old:
        start, end = old.index(DOCS_BEGIN), old.index(DOCS_END) + len(DOCS_END)
        new = old[:start] + block + old[end:]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    docs.write_text(new)
