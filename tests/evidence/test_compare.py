"""opd compare: the claim tests on hand-made curves, claim-file errors, and (slow) a real two-config × two-seed
comparison whose report is checked against the runs' own summaries."""

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from opd.config.sections import ConfigError
from opd.evidence.claims import Claim, Curve, judge, load_claim, read_curve, tokens_to

ROOT = Path(__file__).resolve().parents[2]


def curve(label, seed, accuracy, tokens_per_eval=1000.0):
    n = len(accuracy)
    return Curve(label, seed, list(range(0, 25 * n, 25)), list(accuracy), [tokens_per_eval * i for i in range(n)], [2.0 * i for i in range(n)])


def claim(test, *arms):
    return Claim("c", "a claim", "", test, {a: Path(f"{a}.yaml") for a in arms})


def test_tokens_to_target_is_the_first_evaluation_at_or_above_it():
    c = curve("x", 0, [0.5, 0.79, 0.8, 0.7, 0.95])
    assert tokens_to(c, 0.8) == 2000.0 and tokens_to(c, 0.9) == 4000.0 and tokens_to(c, 0.96) is None and tokens_to(c, 0.5) == 0.0


def test_tokens_to_target_ratio_is_paired_by_seed_against_the_best_baseline():
    curves = {
        "grpo_a": [curve("grpo_a", 0, [0.5, 0.6, 0.7, 0.8]), curve("grpo_a", 1, [0.5, 0.6, 0.8, 0.9])],  # 3000, 2000 to 80%
        "grpo_b": [curve("grpo_b", 0, [0.5, 0.5, 0.5, 0.5]), curve("grpo_b", 1, [0.5, 0.8, 0.8, 0.8])],  # never on seed 0
        "opd": [curve("opd", 0, [0.5, 0.8, 0.9, 0.9], 500.0), curve("opd", 1, [0.5, 0.6, 0.85, 0.9], 500.0)],  # 500, 1000
    }
    v = judge(claim({"kind": "tokens_to_target", "baseline": ["grpo_a", "grpo_b"], "targets": [0.8], "min_ratio": 2.0}, *curves), curves)
    ratios = [3000 / 500, 2000 / 1000]  # grpo_a is the only baseline reaching 80% on every seed
    row = next(r for r in v.table if r[0] == "opd")
    assert f"{statistics.fmean(ratios):.3g} ± {statistics.stdev(ratios):.2g}×" in row[-1]
    assert v.holds is True and "holds" in v.words
    v = judge(claim({"kind": "tokens_to_target", "baseline": ["grpo_a"], "targets": [0.8], "min_ratio": 5.0}, "grpo_a", "opd"),
              {k: curves[k] for k in ("grpo_a", "opd")})
    assert v.holds is False and "does not hold" in v.words


def test_tokens_to_target_is_undecided_when_an_arm_misses_the_target():
    curves = {"grpo": [curve("grpo", 0, [0.5, 0.9])], "opd": [curve("opd", 0, [0.5, 0.6])]}
    v = judge(claim({"kind": "tokens_to_target", "baseline": "grpo", "targets": [0.9]}, *curves), curves)
    assert v.holds is None and "undecided" in v.words and "missed it on 1 seed" in v.words


def test_tokens_to_target_never_drops_a_target_the_baseline_missed():
    curves = {"grpo": [curve("grpo", s, [0.5, 0.6, 0.8, 0.8, 0.8]) for s in range(2)],  # 4,000 tokens in all, never 90%
              "opd": [curve("opd", s, [0.5, 0.8, 0.9, 0.9, 0.9], 500.0) for s in range(2)]}  # 80% at 500, 90% at 1,000
    test = {"kind": "tokens_to_target", "baseline": "grpo", "targets": [0.8, 0.9], "min_ratio": 2.0}
    v = judge(claim(test, *curves), curves)
    row = next(r for r in v.table if r[0] == "opd")
    assert row[-1].startswith("> 4×")  # at least 4,000 / 1,000: the bound from the baseline's total tokens
    assert v.holds is True and "> 4× where no baseline got there" in v.words
    test["min_ratio"] = 5.0  # 4x at 80% fails; the bound at 90% cannot rescue it
    assert judge(claim(test, *curves), curves).holds is False
    curves["opd"] = [curve("opd", s, [0.5, 0.6, 0.7, 0.9, 0.9], 900.0) for s in range(2)]  # 90% at 2,700: bound 1.48x
    v = judge(claim({**test, "min_ratio": 1.2, "targets": [0.9]}, *curves), curves)
    assert v.holds is True
    v = judge(claim({**test, "min_ratio": 2.0, "targets": [0.9]}, *curves), curves)
    assert v.holds is None and "no baseline reached it" in v.words  # > 1.48x says neither yes nor no to 2x


def test_an_arm_starting_at_the_target_needs_no_tokens():
    curves = {"grpo": [curve("grpo", 0, [0.5, 0.9])], "opd": [curve("opd", 0, [0.9, 0.9])]}
    v = judge(claim({"kind": "tokens_to_target", "baseline": "grpo", "targets": [0.9]}, *curves), curves)
    assert "∞" in v.table[-1][-1] and v.holds is True


def test_final_at_least_pairs_seeds():
    curves = {"exopd": [curve("exopd", 0, [0.5, 0.9]), curve("exopd", 1, [0.5, 0.8])],
              "opd": [curve("opd", 0, [0.5, 0.85]), curve("opd", 1, [0.5, 0.82])]}
    v = judge(claim({"kind": "final_at_least", "better": "exopd", "than": "opd"}, *curves), curves)
    diffs = [0.9 - 0.85, 0.8 - 0.82]
    assert v.holds is (statistics.fmean(diffs) >= 0)
    assert f"{100 * statistics.fmean(diffs):+.1f} ± {100 * statistics.stdev(diffs):.1f} points" in v.table[1][1]
    assert v.table[1][3] == "1/2"
    se = statistics.stdev(diffs) / 2 ** 0.5
    assert f"{100 * se:.1f} points" == v.table[1][2]
    behind = {"exopd": [curve("exopd", s, [0.5, a]) for s, a in enumerate([0.80, 0.84, 0.90])],
              "opd": [curve("opd", s, [0.5, a]) for s, a in enumerate([0.82, 0.85, 0.88])]}
    v = judge(claim({"kind": "final_at_least", "better": "exopd", "than": "opd"}, *behind), behind)
    assert v.holds is None and "undecided" in v.words  # -0.33 points, standard error 1.2: within the noise
    far = {"exopd": [curve("exopd", s, [0.5, 0.6 + 0.01 * s]) for s in range(3)], "opd": [curve("opd", s, [0.5, 0.9]) for s in range(3)]}
    assert judge(claim({"kind": "final_at_least", "better": "exopd", "than": "opd"}, *far), far).holds is False


def test_final_at_least_on_another_measure_of_the_last_evaluation():
    """A merged student against an expert on the expert's own family: ``metric`` names the measure compared."""
    def with_family(label, seed, accuracy, family_pass):
        c = curve(label, seed, [0.3, accuracy])
        c.final_eval = {"accuracy": accuracy, "pass@1_numbers": family_pass}
        return c

    curves = {"merged": [with_family("merged", s, 0.9, 0.95) for s in range(2)],
              "expert": [with_family("expert", s, 0.6, 0.97) for s in range(2)]}
    test = {"kind": "final_at_least", "better": "merged", "than": "expert"}
    assert judge(claim(test, *curves), curves).holds is True  # overall accuracy: far ahead
    v = judge(claim({**test, "metric": "pass@1_numbers"}, *curves), curves)
    assert v.holds is False and "-2.0 ± 0.0 points of pass@1_numbers" in v.words  # on the expert's family: behind
    with pytest.raises(ValueError, match="has no 'pass@1_text'"):
        judge(claim({**test, "metric": "pass@1_text"}, *curves), curves)


def test_collapse_compares_the_end_with_the_best_so_far():
    curves = {"standard": [curve("standard", s, [0.5, 0.8, 0.0]) for s in range(3)],
              "plus": [curve("plus", s, [0.5, 0.9, 0.85]) for s in range(3)]}
    v = judge(claim({"kind": "collapse", "collapses": ["standard"], "stable": ["plus"], "drop": 0.1}, *curves), curves)
    assert v.holds is True and v.table[1][2] == "3/3" and v.table[2][2] == "0/3"
    v = judge(claim({"kind": "collapse", "collapses": ["plus"], "stable": ["standard"], "drop": 0.1}, *curves), curves)
    assert v.holds is False and "against the claim" in v.words
    recovered = {"standard": curves["standard"], "plus": [curve("plus", s, [0.5, 0.05, 0.6, 0.9]) for s in range(3)]}
    v = judge(claim({"kind": "collapse", "collapses": ["standard"], "stable": ["plus"], "drop": 0.1}, *recovered), recovered)
    assert v.holds is False and v.table[2][2] == "3/3"  # it crashed to 5% and recovered: a collapse all the same
    split = {"standard": [curve("standard", 0, [0.5, 0.8, 0.0]), curve("standard", 1, [0.5, 0.9])], "plus": curves["plus"]}
    v = judge(claim({"kind": "collapse", "collapses": ["standard"], "stable": ["plus"]}, *split), split)
    assert v.holds is None and "a tie" in v.words


def test_lower_reads_the_mean_of_a_per_step_metric():
    a, b = curve("ovd", 0, [0.5, 0.6]), curve("opd", 0, [0.5, 0.6])
    a.step_means["peak_memory_mb"], b.step_means["peak_memory_mb"] = 300.0, 400.0
    v = judge(claim({"kind": "lower", "lower": "ovd", "than": "opd", "metric": "peak_memory_mb"}, "ovd", "opd"), {"ovd": [a], "opd": [b]})
    assert v.holds is True and "0.750×" in v.words
    noisy = [curve("ovd", s, [0.5]) for s in range(3)]
    for c, value in zip(noisy, (300.0, 420.0, 390.0)):  # mean 370 ± 62 against 400: within two standard errors
        c.step_means["peak_memory_mb"] = value
    v = judge(claim({"kind": "lower", "lower": "ovd", "than": "opd", "metric": "peak_memory_mb"}, "ovd", "opd"), {"ovd": noisy, "opd": [b]})
    assert v.holds is None and "undecided" in v.words


def test_claim_files_name_what_is_wrong(tmp_path):
    (tmp_path / "claim.yaml").write_text("claim: x\ntest: {kind: tokens_to_target, baseline: grpo}\narms: {opd: opd.yaml}\n")
    with pytest.raises(ConfigError, match="no config file"):
        load_claim(tmp_path)
    (tmp_path / "opd.yaml").write_text("base: x\n")
    with pytest.raises(ConfigError, match=r"test\.targets is required"):
        load_claim(tmp_path)
    (tmp_path / "claim.yaml").write_text("claim: x\ntest: {kind: tokens_to_target, baseline: grpo, targets: [0.8]}\narms: {opd: opd.yaml}\n")
    with pytest.raises(ConfigError, match="names arm 'grpo'"):
        load_claim(tmp_path)
    (tmp_path / "claim.yaml").write_text("claim: x\ntest: {kind: bigger}\narms: {opd: opd.yaml}\n")
    with pytest.raises(ConfigError, match="test.kind must be one of"):
        load_claim(tmp_path)


def test_every_shipped_claim_set_loads_and_its_arms_validate():
    from opd.evidence.compare import make_plan

    import importlib.util
    import sys

    sets = sorted(p for p in (ROOT / "configs" / "claims").iterdir() if p.is_dir())
    assert len(sets) >= 6
    # the lag claim's arms start a vLLM server: validated with a Python that would have vllm, where this one has not
    with_vllm = [] if importlib.util.find_spec("vllm") else [f"sampling.vllm_server.python={sys.executable}"]
    plan = make_plan([str(p) for p in sets], 3, with_vllm)
    assert len(plan.claims) == len(sets)
    opd = [a for a in plan.arms if "opd" in a.labels]
    assert len(opd) == 1 and len([c for c in plan.claims if "opd" in c.arms]) >= 3  # one arm, whichever claims name it
    opsd = next(a for a in plan.arms if "opsd" in a.labels)
    assert "opsd_full" in opsd.labels  # two files, one configuration: one arm
    grpo_16x4 = next(a for a in plan.arms if "grpo_16x4" in a.labels)
    assert grpo_16x4.key != next(a for a in plan.arms if "grpo" in a.labels).key


@pytest.mark.slow
def test_compare_two_configs_two_seeds_report_matches_the_runs(tmp_path):
    claim_dir = tmp_path / "claim"
    claim_dir.mkdir()
    for name, base in (("opd", "opd.yaml"), ("grpo", "grpo.yaml")):
        (claim_dir / f"{name}.yaml").write_text(f"base: {ROOT / 'configs' / 'arithmetic' / base}\n")
    (claim_dir / "claim.yaml").write_text(
        "claim: OPD needs fewer tokens than GRPO\ntest: {kind: tokens_to_target, baseline: grpo, targets: [0.5], min_ratio: 1.0}\n"
        "arms: {grpo: grpo.yaml, opd: opd.yaml}\n"
    )
    out = tmp_path / "out"
    tiny = ["train.steps=2", "eval.every=1", "eval.num_prompts=8", "sampling.max_new_tokens=24", "train.prompts_per_step=4"]
    cmd = [sys.executable, "-m", "opd", "compare", str(claim_dir), "--seeds", "2", "--out", str(out), *tiny]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert sorted((r["arm"], r["seed"]) for r in rows) == [("grpo", 0), ("grpo", 1), ("opd", 0), ("opd", 1)]
    report = (out / "report.md").read_text()
    assert (out / "claim.png").stat().st_size > 1000 and "![claim](claim.png)" in report
    for r in rows:  # each run's own summary, in the report's table of runs
        s = r["summary"]
        assert s["steps"] == 2 and Path(r["run_dir"], "summary.json").is_file()
        line = f"| {r['arm']} | {r['seed']} | {100 * s['student_accuracy_before']:.1f}% | {100 * s['student_accuracy_after']:.1f}% | {s['generated_tokens']:,.0f} |"
        assert line in report
    for arm in ("opd", "grpo"):  # mean ± std of the final accuracy over the two seeds
        after = [r["summary"]["student_accuracy_after"] for r in rows if r["arm"] == arm]
        assert f"| {arm} | 2 | " in report and f"{100 * statistics.fmean(after):.1f} ± {100 * statistics.stdev(after):.1f}%" in report
    grpo_runs = sorted((r for r in rows if r["arm"] == "grpo"), key=lambda r: r["seed"])
    curves = [read_curve(r["run_dir"], "grpo", r["seed"]) for r in grpo_runs]
    assert [c.after for c in curves] == [r["summary"]["student_accuracy_after"] for r in grpo_runs]
    assert re.search(r"^## claim: (holds|does not hold|undecided)$", report, re.M)
    # a second call finds every run finished and reruns nothing
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert again.returncode == 0 and "4 finished already, 0 to run" in again.stdout


def _saved_run(tmp_path, name, overrides):
    """A run directory holding only the run's config.yaml: inspect shows its step 0 (the config's own student)."""
    from opd.config.loading import load_config
    from opd.config.saving import save_config

    run = tmp_path / name
    run.mkdir()
    cfg = load_config(ROOT / "configs" / "arithmetic" / f"{name}.yaml", [f"run.output_dir={run}", "train.threads=1", *overrides])
    save_config(cfg, run / "config.yaml")
    return run


def _tokens(page: str):
    """(struck through, numbers) of every trained-or-skipped token span on an inspect page."""
    found = []
    for m in re.finditer(r"<span( class='skip')? style='[^']*' title='([^']*)'>", page):
        numbers = dict((k.strip(), float(v)) for k, v in (part.rsplit(" ", 1) for part in m.group(2).split(", ")))
        found.append((bool(m.group(1)), numbers))
    return found


def test_inspect_colours_opd_tokens_by_the_reverse_kl_advantage(tmp_path):
    from opd.evidence.inspection import inspect_run

    run = _saved_run(tmp_path, "opd", [])
    page = inspect_run(run, 0, rows=3).read_text()
    assert page.count("<pre>") == 3 and "method <b>opd</b>" in page
    tokens = _tokens(page)
    assert len(tokens) > 20 and not any(skip for skip, _ in tokens)
    for _, n in tokens:  # OPD (coef 1, no discount): A_t = ℓ^T_t − ℓ^S_t
        assert abs(n["advantage"] - (n["ℓT"] - n["ℓS"])) < 2e-3
    assert any(n["advantage"] < -1 for _, n in tokens)  # the teacher disagrees somewhere at step 0
    with pytest.raises(ConfigError, match=r"--step 5: .* at steps 0 only"):
        inspect_run(run, 5)


def test_inspect_shows_reopold_filtered_tokens_and_ovd_row_sources(tmp_path):
    from opd.evidence.inspection import inspect_run

    page = inspect_run(_saved_run(tmp_path, "reopold", []), 0, rows=4).read_text()
    tokens = _tokens(page)
    kept = [n for skip, n in tokens if not skip]
    assert kept and len(kept) < len(tokens)  # the entropy filter trains a fraction of the tokens
    floor = min(n["advantage"] for n in kept)
    for n in kept:  # R̂ = max(ℓ^T − ℓ^S, floor)
        assert abs(n["advantage"] - max(n["ℓT"] - n["ℓS"], floor)) < 2e-3
    page = inspect_run(_saved_run(tmp_path, "ovd", ["method.ovd.threshold=9"]), 0, rows=5).read_text()
    assert re.search(r"<h3>row \d+ — score [\d.]+: (accepted|replaced by the teacher)", page)


def test_docs_block_is_replaced_between_its_markers_and_nothing_else_changes(tmp_path):
    from opd.evidence.report import DOCS_BEGIN, DOCS_END, put_in_docs

    png = tmp_path / "out" / "c.png"
    png.parent.mkdir()
    png.write_bytes(b"png")
    docs = tmp_path / "docs" / "methods.md"
    docs.parent.mkdir()
    docs.write_text(f"# Methods\n\nbefore\n\n{DOCS_BEGIN}\nold numbers\n{DOCS_END}\n\nafter\n")
    report = "# opd compare: title\n\nCommand: x\n\n## c: holds\n\n![c](c.png)\n\n## Every run\n\n| a | run |\n"
    put_in_docs(docs, report, [png])
    text = docs.read_text()
    assert text.startswith("# Methods\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert "old numbers" not in text and "### c: holds" in text and "](claims/c.png)" in text
    assert "title" not in text and "Every run" not in text and (docs.parent / "claims" / "c.png").read_bytes() == b"png"
    put_in_docs(docs, report, [png])
    assert docs.read_text() == text  # rewriting it gives the same file


def test_inspect_a_later_step_loads_the_checkpoint_into_the_runs_own_session(tmp_path):
    """ExOPD's reference is the initial student: inspecting step 1 must load the step-1 student and keep that reference."""
    import torch
    from safetensors.torch import load_file

    from opd.config.loading import load_config
    from opd.evidence.inspection import available_steps, inspect_run, load_student_at
    from opd.training.assembly import build_session
    from opd.training.loop import train

    run = tmp_path / "run"
    cfg = load_config(ROOT / "configs" / "arithmetic" / "exopd.yaml", [
        f"run.output_dir={run}", "train.steps=2", "checkpoint.every=1", "eval.every=0", "eval.num_prompts=4",
        "train.prompts_per_step=4", "train.threads=1", "log.progress_bar=false", "log.plot=false", "train.lr=1e-3",
    ])
    train(cfg)
    steps = available_steps(run, 2)
    assert sorted(steps) == [0, 1, 2] and steps[1].name == "step-000001"
    s = build_session(load_config(run / "config.yaml"))
    initial = {n: p.detach().clone() for n, p in s.student.named_parameters()}
    load_student_at(s, steps[1], run)
    saved = load_file(steps[1] / "trainable.safetensors")
    for name, p in s.student.named_parameters():
        assert torch.equal(p.detach(), saved[name])
    assert any(not torch.equal(initial[n], saved[n]) for n in saved)  # the step moved the student
    for name, p in s.reference.model.named_parameters():  # π_ref stays the initial student
        assert torch.equal(p.detach(), initial[name])
    pages = [inspect_run(run, k, rows=2).read_text() for k in (0, 1)]
    assert pages[0] != pages[1] and "step 1" in pages[1]


def test_a_broken_config_among_several_is_named_by_its_file(tmp_path):
    from opd.evidence.compare import make_plan

    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    models = "student:\n  path: world:student\nteacher:\n  path: world:teacher\n"
    good.write_text(models)
    bad.write_text(models + "train:\n  lrr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad.resolve()))}: unknown config key 'train\.lrr' \(did you mean 'train\.lr'\?\)$"):
        make_plan([str(good), str(bad)], 1, [])
