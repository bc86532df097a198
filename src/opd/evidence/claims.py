"""A paper's claim as something a set of runs can confirm or refute: the claim file, the per-run curves it reads, and
the test that turns several seeds of each arm into numbers and a verdict in words.

A claim set is a directory holding ``claim.yaml`` and the arms' configs::

    claim: OPD reaches a target accuracy with several times fewer generated tokens than GRPO
    source: Thinking Machines, "On-Policy Distillation" (2025)
    test: {kind: tokens_to_target, baseline: [grpo], targets: [0.8, 0.9], min_ratio: 2.0}
    arms: {grpo: grpo.yaml, opd: opd.yaml}

The kinds of test (``TESTS``): ``tokens_to_target`` (baseline tokens ÷ arm tokens to the first evaluation at each
target, paired by seed; several baseline arms are a tuning sweep and the best one per target is the baseline; arms
under ``shown`` are tabulated and plotted, not judged),
``final_at_least`` (arm ``better`` ends at least as accurate as arm ``than`` — or as high on another measure of the last
evaluation, ``metric`` — paired by seed), ``collapse`` (the
arms in ``collapses`` fall more than ``drop`` below their best accuracy so far at some evaluation, those in
``stable`` do not) and ``lower``
(arm ``lower`` has a smaller mean per-step ``metric`` than arm ``than``, e.g. ``peak_memory_mb``).
Pure: reading files and computing; running the arms is ``compare.py``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config.sections import ConfigError
from ..training.metrics import read_metrics

CLAIM_FILE = "claim.yaml"


@dataclass(frozen=True)
class Claim:
    name: str  # the claim set's directory name
    claim: str  # the paper's claim, in words
    source: str
    test: dict
    arms: dict[str, Path]  # label -> config file


@dataclass
class Curve:
    """One finished run, as the tests read it: evaluations against generated tokens and training seconds."""

    label: str
    seed: int
    steps_E: list[int]
    accuracy_E: list[float]
    tokens_E: list[float]  # student-generated tokens before the evaluation at steps_E[i]
    seconds_E: list[float]  # training seconds (steps only, evaluations excluded) before it
    teacher_accuracy: float | None = None
    step_means: dict[str, float] = field(default_factory=dict)  # mean over steps of each numeric train metric
    final_eval: dict[str, float] = field(default_factory=dict)  # the last evaluation's numeric measures

    def final(self, metric: str = "accuracy") -> float:
        """The last evaluation's ``metric`` (a measure the task reports beside accuracy: pass@1_numbers, f1, ...)."""
        if metric == "accuracy":
            return self.after
        if metric not in self.final_eval:
            raise ValueError(f"{self.label} (seed {self.seed}): its last evaluation has no '{metric}' (it has {', '.join(sorted(self.final_eval))})")
        return self.final_eval[metric]

    @property
    def before(self) -> float:
        return self.accuracy_E[0]

    @property
    def after(self) -> float:
        return self.accuracy_E[-1]


TESTS = {
    "tokens_to_target": ("baseline", "targets"),
    "final_at_least": ("better", "than"),
    "collapse": ("collapses", "stable"),
    "lower": ("lower", "than", "metric"),
}


def load_claim(directory: str | Path) -> Claim:
    """The claim set in ``directory``, checked: a known test kind with its keys, arms whose configs exist, and every
    arm the test names among them (``ConfigError`` naming the file and key otherwise)."""
    directory = Path(directory)
    path = directory / CLAIM_FILE
    if not path.is_file():
        raise ConfigError(f"{directory}: not a claim set (no {CLAIM_FILE})")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping")
    for key in ("claim", "test", "arms"):
        if key not in raw:
            raise ConfigError(f"{path}: missing key '{key}'")
    test, arms = raw["test"], raw["arms"]
    if not isinstance(arms, dict) or not arms:
        raise ConfigError(f"{path}: 'arms' must map labels to config files")
    files = {}
    for label, file in arms.items():
        files[str(label)] = (directory / str(file)).resolve()
        if not files[str(label)].is_file():
            raise ConfigError(f"{path}: arms.{label}: no config file {directory / str(file)}")
    kind = test.get("kind") if isinstance(test, dict) else None
    if kind not in TESTS:
        raise ConfigError(f"{path}: test.kind must be one of {sorted(TESTS)}, got {kind!r}")
    for key in TESTS[kind]:
        if key not in test:
            raise ConfigError(f"{path}: test.{key} is required for a {kind} test")
    named = [a for key in (*TESTS[kind], "shown") if key in test and key not in ("targets", "metric") for a in _as_list(test[key])]
    for label in named:
        if label not in files:
            raise ConfigError(f"{path}: test names arm '{label}', which is not under arms ({', '.join(files)})")
    return Claim(directory.name, str(raw["claim"]).strip(), str(raw.get("source", "")).strip(), dict(test), files)


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def read_curve(run_dir: str | Path, label: str, seed: int) -> Curve:
    """The curve of the finished run in ``run_dir`` (its ``metrics.jsonl``)."""
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    train = {r["step"]: r for r in rows if r["kind"] == "train"}
    seconds, total = {0: 0.0}, 0.0
    for step in sorted(train):
        total += train[step].get("step_seconds", 0.0)
        seconds[step] = total
    evals = {r["step"]: r for r in rows if r["kind"] == "eval" and r.get("accuracy") is not None}  # a resume rewrites
    steps = sorted(evals)
    if not steps:
        raise ValueError(f"{run_dir}: no graded evaluation (prompt-only evaluation data has no accuracy to compare)")
    teacher = [r for r in rows if r["kind"] == "teacher_eval"]
    numeric = {}
    for r in train.values():
        for key, value in r.items():
            if key not in ("kind", "step") and isinstance(value, (int, float)) and math.isfinite(value):
                numeric.setdefault(key, []).append(float(value))
    return Curve(
        label, seed, steps, [evals[k]["accuracy"] for k in steps],
        [train[k]["generated_tokens"] if k in train else 0.0 for k in steps],
        [seconds.get(k, total) for k in steps],
        teacher[0].get("accuracy") if teacher else None,
        {key: statistics.fmean(values) for key, values in numeric.items()},
        {k: float(v) for k, v in evals[steps[-1]].items() if k not in ("kind", "step") and isinstance(v, (int, float)) and math.isfinite(v)},
    )


def tokens_to(curve: Curve, target: float) -> float | None:
    """Generated tokens before the first evaluation at or above ``target`` (None: never reached)."""
    for accuracy, tokens in zip(curve.accuracy_E, curve.tokens_E):
        if accuracy >= target:
            return tokens
    return None


@dataclass(frozen=True)
class Spread:
    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def __str__(self) -> str:
        return f"{self.mean:.3g} ± {self.std:.2g}"


@dataclass
class Verdict:
    holds: bool | None  # None: not decidable (a target not reached, no runs)
    words: str  # one sentence: what was found
    table: list[list[str]]  # rows of the claim's table, the first one its header


def judge(claim: Claim, curves: dict[str, list[Curve]]) -> Verdict:
    """Apply ``claim``'s test to the curves of its arms (label -> one curve per seed)."""
    missing = [label for label in claim.arms if not curves.get(label)]
    if missing:
        return Verdict(None, f"no finished runs of {', '.join(missing)}", [["arm"], *[[m] for m in missing]])
    return {"tokens_to_target": _tokens_to_target, "final_at_least": _final_at_least, "collapse": _collapse, "lower": _lower}[
        claim.test["kind"]
    ](claim.test, curves)


def _pct(spread: Spread) -> str:
    return f"{100 * spread.mean:.1f} ± {100 * spread.std:.1f}%"


def _by_seed(curves: list[Curve]) -> dict[int, Curve]:
    return {c.seed: c for c in curves}


def accuracy_rows(curves: dict[str, list[Curve]]) -> list[list[str]]:
    """Per arm: seeds, accuracy before and after (mean ± std), best accuracy and the teacher's."""
    rows = [["arm", "seeds", "before", "after", "best", "teacher"]]
    for label, runs in curves.items():
        teacher = [c.teacher_accuracy for c in runs if c.teacher_accuracy is not None]
        rows.append([
            label, str(len(runs)), _pct(Spread(tuple(c.before for c in runs))), _pct(Spread(tuple(c.after for c in runs))),
            _pct(Spread(tuple(max(c.accuracy_E) for c in runs))), _pct(Spread(tuple(teacher))) if teacher else "—",
        ])
    return rows


def _ratio_cell(kind: str, ratio: Spread | None, bound: float | None, unreached: int) -> str:
    if kind == "both_start":
        return "both start at the target"
    if kind == "arm_starts":
        return "∞ (the arm starts at the target)"
    if kind == "no_baseline":
        return f"> {bound:.3g}× (no baseline reached it on every seed; bound from the baseline's total tokens)" if bound else "no baseline reached it on every seed"
    if ratio is None:
        return f"— (the arm missed it on {unreached} seeds)"
    return f"{ratio}×" + (f" ({unreached} seeds not reached)" if unreached else "")


def _tokens_to_target(test: dict, curves: dict[str, list[Curve]]) -> Verdict:
    """Per judged arm and target: baseline tokens ÷ arm tokens to the target, paired by seed. The baseline for a
    target is the baseline arm with the fewest mean tokens among those reaching it on every seed. If none does but
    the arm does on every seed, the ratio is bounded below by the best baseline's total tokens ÷ the arm's."""
    baselines = _as_list(test["baseline"])
    shown = set(_as_list(test.get("shown", [])))  # arms plotted and tabulated but not judged
    targets = [float(t) for t in _as_list(test["targets"])]
    min_ratio = float(test.get("min_ratio", 2.0))
    arms = [label for label in curves if label not in baselines and label not in shown]
    header = ["arm", *[f"tokens to {100 * t:g}%" for t in targets], *[f"baseline ÷ arm at {100 * t:g}%" for t in targets]]
    rows = [header]
    best = {}
    for t in targets:
        reached = {b: [tokens_to(c, t) for c in curves[b]] for b in baselines}
        full = {b: v for b, v in reached.items() if None not in v}
        best[t] = min(full, key=lambda b: statistics.fmean(full[b])) if full else None
    outcome = {}  # (arm, target) -> (kind, ratio Spread | None, lower bound | None, unreached seeds)
    for label in arms:
        arm_by_seed = _by_seed(curves[label])
        for t in targets:
            arm_tokens = {k: tokens_to(c, t) for k, c in arm_by_seed.items()}
            unreached = sum(v is None for v in arm_tokens.values())
            base = best[t]
            if base is None:
                bound = None
                if not unreached and all(v > 0 for v in arm_tokens.values()):
                    most = min(statistics.fmean(c.tokens_E[-1] for c in curves[b]) for b in baselines)
                    bound = most / statistics.fmean(arm_tokens.values())
                outcome[(label, t)] = ("no_baseline", None, bound, unreached)
                continue
            base_by_seed = _by_seed(curves[base])
            pairs = [(tokens_to(base_by_seed[k], t), v) for k, v in arm_tokens.items() if k in base_by_seed and v is not None]
            if pairs and all(b == 0 for b, _ in pairs):
                outcome[(label, t)] = ("both_start", None, None, unreached)
            elif pairs and all(a == 0 for _, a in pairs):
                outcome[(label, t)] = ("arm_starts", None, None, unreached)
            else:
                ratios = [b / a for b, a in pairs if a > 0]
                outcome[(label, t)] = ("ratio", Spread(tuple(ratios)) if ratios else None, None, unreached)
    for label in [*baselines, *[a for a in curves if a in shown], *arms]:
        cells = []
        for t in targets:
            tokens = [tokens_to(c, t) for c in curves[label]]
            got = [x for x in tokens if x is not None]
            cells.append(f"{Spread(tuple(got)).mean:,.0f} ± {Spread(tuple(got)).std:,.0f} ({len(got)}/{len(tokens)})" if got else f"not reached (0/{len(tokens)})")
        if label in baselines:
            ratio_cells = ["(baseline, the best)" if best[t] == label else "(baseline)" for t in targets]
        elif label in shown:
            ratio_cells = ["(shown, not judged)"] * len(targets)
        else:
            ratio_cells = [_ratio_cell(*outcome[(label, t)]) for t in targets]
        rows.append([label, *cells, *ratio_cells])
    words, verdicts = [], []
    for label in arms:
        ratios, bounds, failing, undecided = [], [], [], []
        for t in targets:
            kind, ratio, bound, unreached = outcome[(label, t)]
            if kind == "arm_starts":
                continue
            if kind == "ratio" and ratio is not None and not unreached:
                ratios.append(ratio.mean)
                if ratio.mean < min_ratio:
                    failing.append(t)
            elif kind == "no_baseline" and bound is not None and bound >= min_ratio:
                bounds.append(bound)  # a lower bound: enough to say "holds" at this target, never "does not"
            elif kind == "no_baseline":
                undecided.append(f"{100 * t:g}%: no baseline reached it on every seed" + (f" (ratio > {bound:.3g}× only)" if bound else ""))
            elif kind == "both_start":
                undecided.append(f"{100 * t:g}%: both start at it")
            else:
                undecided.append(f"{100 * t:g}%: the arm missed it on {unreached} seed(s)")
        span = ""
        if ratios:
            low, high = min(ratios), max(ratios)
            span = f"baseline ÷ arm tokens {low:.3g}×" if math.isclose(low, high, rel_tol=0.005) else f"baseline ÷ arm tokens {low:.3g}–{high:.3g}×"
            span += " (below 1: the arm needs more tokens)" if low < 1 else ""
        if bounds:
            span += (", " if span else "") + ", ".join(f"> {b:.3g}×" for b in bounds) + " where no baseline got there on every seed"
        need = f"the claim needs ≥ {min_ratio:g}× at every target"
        if failing:
            verdicts.append(False)
            words.append(f"{label}: does not hold ({span}; {need})")
        elif undecided:
            verdicts.append(None)
            words.append(f"{label}: undecided ({'; '.join(undecided)}" + (f"; elsewhere {span}" if span else "") + ")")
        else:
            verdicts.append(True)
            words.append(f"{label}: holds ({span or 'it starts at every target'}; {need})")
    holds = None if not verdicts or None in verdicts else all(verdicts)
    return Verdict(holds, "; ".join(words), rows)


def _paired(a: list[Curve], b: list[Curve]) -> list[tuple[Curve, Curve]]:
    first, second = _by_seed(a), _by_seed(b)
    return [(first[k], second[k]) for k in sorted(first) if k in second]


def _standard_error(spread: Spread) -> float:
    return spread.std / math.sqrt(len(spread.values)) if len(spread.values) > 1 else 0.0


def _final_at_least(test: dict, curves: dict[str, list[Curve]]) -> Verdict:
    """Holds if the mean over seeds of (final ``metric`` — accuracy unless the test names another measure of the
    last evaluation — of ``better`` − that of ``than``) is ≥ 0; does not hold if it is below 0 by more than two
    standard errors of that mean; otherwise undecided (within the seeds' noise)."""
    better, than, metric = test["better"], test["than"], test.get("metric", "accuracy")
    pairs = _paired(curves[better], curves[than])
    if not pairs:
        return Verdict(None, f"no seed has finished runs of both {better} and {than}", [["comparison"], [f"{better} − {than}"]])
    diffs = Spread(tuple(a.final(metric) - b.final(metric) for a, b in pairs))
    wins = sum(a.final(metric) >= b.final(metric) for a, b in pairs)
    se = _standard_error(diffs)
    holds = True if diffs.mean >= 0 else (False if diffs.mean + 2 * se < 0 else None)
    what = "accuracy" if metric == "accuracy" else metric
    rows = [["comparison", f"final {what} difference (mean ± std)", "standard error", f"seeds with {better} ≥ {than}"],
            [f"{better} − {than}", f"{100 * diffs.mean:+.1f} ± {100 * diffs.std:.1f} points", f"{100 * se:.1f} points", f"{wins}/{len(pairs)}"]]
    status = {True: "holds", False: "does not hold", None: "undecided (behind by less than two standard errors)"}[holds]
    words = (f"{status}: {better} ends {100 * diffs.mean:+.1f} ± {100 * diffs.std:.1f} points of {what} against {than} "
             f"(at least as high on {wins} of {len(pairs)} seeds)")
    return Verdict(holds, words, rows)


def drawdown(curve: Curve) -> float:
    """The largest fall of held-out accuracy below the best it had reached before (its start included), at any
    evaluation — a run that crashes and recovers has one too."""
    best, worst = -math.inf, 0.0
    for accuracy in curve.accuracy_E:
        best = max(best, accuracy)
        worst = max(worst, best - accuracy)
    return worst


def collapsed(curve: Curve, drop: float) -> bool:
    """At some evaluation the run fell more than ``drop`` below the best accuracy it had reached so far."""
    return drawdown(curve) > drop


def _collapse(test: dict, curves: dict[str, list[Curve]]) -> Verdict:
    drop = float(test.get("drop", 0.1))
    expect = {**{a: True for a in _as_list(test["collapses"])}, **{a: False for a in _as_list(test["stable"])}}
    rows = [["arm", "expected", "collapsed seeds", "after", "largest fall below its best so far", "lowest"]]
    words, ok, tie = [], True, False
    for label, should in expect.items():
        runs = curves[label]
        n = sum(collapsed(c, drop) for c in runs)
        fell = Spread(tuple(drawdown(c) for c in runs))
        rows.append([label, "collapses" if should else "stable", f"{n}/{len(runs)}", _pct(Spread(tuple(c.after for c in runs))),
                     f"{100 * fell.mean:.1f} ± {100 * fell.std:.1f} points", _pct(Spread(tuple(min(c.accuracy_E) for c in runs)))])
        if n * 2 == len(runs):  # as many seeds each way
            tie = True
            words.append(f"{label} collapsed on {n} of {len(runs)} seeds (a tie)")
            continue
        as_expected = (n * 2 > len(runs)) == should
        ok &= as_expected
        words.append(f"{label} {'collapsed' if n * 2 > len(runs) else 'stayed stable'} (collapsed on {n}/{len(runs)} seeds{'' if as_expected else ', against the claim'})")
    holds = False if not ok else (None if tie else True)
    status = {True: "holds", False: "does not hold", None: "undecided"}[holds]
    return Verdict(holds, f"{status}: " + "; ".join(words) + f" (collapse: falling more than {100 * drop:g} points below the run's best so far at some evaluation, on most seeds)", rows)


def _lower(test: dict, curves: dict[str, list[Curve]]) -> Verdict:
    """Holds if ``lower``'s per-step ``metric`` (mean over steps, then over seeds) is smaller than ``than``'s by more
    than two standard errors of the difference; does not hold if it is not smaller; otherwise undecided."""
    lower, than, metric = test["lower"], test["than"], test["metric"]
    values = {}
    for label in (lower, than):
        got = [c.step_means[metric] for c in curves[label] if metric in c.step_means]
        if not got:
            return Verdict(None, f"the runs of {label} logged no '{metric}'", [["arm"], [label]])
        values[label] = Spread(tuple(got))
    a, b = values[lower], values[than]
    gap_se = math.sqrt(_standard_error(a) ** 2 + _standard_error(b) ** 2)
    holds = False if a.mean >= b.mean else (True if b.mean - a.mean > 2 * gap_se else None)
    ratio = f"{a.mean / b.mean:.3f}×" if b.mean else "—"
    rows = [["arm", f"mean per-step {metric}", "seeds"], *[[label, str(v), str(len(v.values))] for label, v in values.items()], [f"{lower} ÷ {than}", ratio, ""]]
    status = {True: "holds", False: "does not hold", None: "undecided (within two standard errors)"}[holds]
    return Verdict(holds, f"{status}: {lower}'s mean per-step {metric} is {ratio} {than}'s ({a} against {b})", rows)
