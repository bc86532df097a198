"""The ``opd`` command: demo | train | eval | world | compare | inspect."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from .parallel.failure import PEER_FAILED_EXIT, PeerFailed
from .training.stopping import PREEMPTED_EXIT, Preempted

CONFIG_DIR = Path(__file__).parent / "configs"


def _user_errors() -> tuple[type[Exception], ...]:
    from .training.errors import user_errors

    return user_errors()


def launched_rank() -> int:
    """This process's rank when a launcher (torchrun, accelerate launch) started several; 0 otherwise."""
    from .parallel.launchers import launched_world

    return launched_world()[0]


def cmd_train(args) -> int:
    from .config.loading import load_config
    from .training.loop import train

    overrides = list(args.overrides) + (["run.resume=true"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    summary = train(cfg)
    if launched_rank() == 0:  # one table per job, not one per rank (the whole summary is in summary.json)
        print_result(summary, cfg.run.output_dir, SCORED.get(cfg.task.name, ""))
    return 0


def print_result(summary: dict, output_dir: str, measure: str = "") -> None:
    """The end of ``opd train`` and ``opd demo``: teacher / before / after accuracy (``measure``: what it is, where the
    task names it: exact match, pass@1), the user's reward where a reward function graded the run, the wall time and
    where the run is."""
    from .training.curves import format_table

    scored = f" ({measure})" if measure else ""
    after = f"student after {summary['steps']} {summary['method'].upper()} steps"
    rows = [(f"teacher{scored}", summary["teacher_accuracy"]), (f"student before{scored}", summary["student_accuracy_before"]),
            (f"{after}{scored}", summary["student_accuracy_after"])]
    print()
    print(format_table(rows))
    if "student_reward_after" in summary:  # task.reward_function: the mean reward, which need not be an accuracy
        shown = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"mean reward (task.reward_function): teacher {shown(summary['teacher_reward'])}, student before "
              f"{shown(summary['student_reward_before'])}, after {shown(summary['student_reward_after'])}")
    calls = lambda key: (summary.get(key) or {}).get("episode_tool_calls")  # noqa: E731
    shown = ", ".join(f"{name} {calls(key):.2f}" for name, key in (("teacher", "eval_teacher"), ("student before", "eval_before"), ("after", "eval_after")) if calls(key) is not None)
    if shown:
        print(f"search calls per episode: {shown}")
    print(f"\nwall time {summary['wall_seconds']:.0f} s; summary.json, metrics and curves in {output_dir}/")


def cmd_compare(args) -> int:
    from .config.sections import ConfigError
    from .evidence.compare import compare

    paths = [x for x in args.items if "=" not in x]
    overrides = [x for x in args.items if "=" in x] + list(args.overrides)
    if not paths:
        raise ConfigError("opd compare: name at least one claim set directory (e.g. configs/claims/*) or config file")
    command = " ".join(["opd", "compare", *sys.argv[2:]]) if sys.argv[1:2] == ["compare"] else "opd compare " + " ".join(paths)
    report, failures = compare(paths, args.seeds, args.out, overrides, args.jobs, args.threads, args.docs, command)
    print(f"report: {report}")
    for line in failures:
        print(f"failed: {line}", file=sys.stderr)
    return 1 if failures else 0


def cmd_inspect(args) -> int:
    from .evidence.inspection import inspect_run

    print(inspect_run(args.run, args.step, args.rows, args.out, list(args.overrides)))
    return 0


def cmd_demo(args) -> int:
    from .config.loading import load_config
    from .training.loop import train

    config, default_dir = DEMOS[args.world]
    overrides = [f"run.output_dir={args.output_dir or default_dir}", "run.overwrite=true"] + list(args.overrides)
    cfg = load_config(CONFIG_DIR / config, overrides)
    summary = train(cfg)
    print_result(summary, cfg.run.output_dir, SCORED.get(cfg.task.name, ""))
    return 0


DEMOS = {"arithmetic": ("demo.yaml", "runs/demo"), "search": ("search_qa/demo.yaml", "runs/demo_search"), "code": ("code/demo.yaml", "runs/demo_code")}
SCORED = {"search_qa": "exact match", "code": "pass@1"}  # what a task's accuracy is, where it has a name of its own


def cmd_eval(args) -> int:
    from .api import evaluate

    summary = evaluate(args.model, args.data, args.task, args.k, args.overrides)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_world(args) -> int:
    """``opd world build | verify | path [--world arithmetic | search | code]``: the embedded worlds, one command for all."""
    from .worlds.locate import WORLDS, cache_dir, world_dir

    world = WORLDS[args.world]
    directory = world_dir(world.name)
    if args.action == "path":
        print(directory if (directory / "world.json").is_file() else f"{directory} (not built yet: run `{world.build_command}`)")
        return 0
    from .worlds.build import build, verify
    from .worlds.build.common import built_elsewhere

    if args.action == "verify":
        differing = verify(world.name, directory)
        if differing:
            print(f"rebuilt {world.label.removeprefix('the embedded ')} differs from {directory} in: {', '.join(differing)}")
            print(built_elsewhere(directory, differing))
            return 1
        print(f"rebuilt {world.label.removeprefix('the embedded ')} is byte-identical to {directory}")
        return 0
    target = Path(args.output) if args.output else cache_dir(world.name)
    if args.force or not (target / "world.json").is_file():
        build(world.name, target, reuse=Path(args.reuse) if args.reuse else None)
    print(target)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .tasks import TASK_REGISTRY
    from .worlds.locate import WORLDS

    parser = argparse.ArgumentParser(prog="opd", description="On-policy distillation of language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library warnings and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="distil the embedded teacher into the embedded student with OPD")
    demo.add_argument("--world", choices=sorted(WORLDS), default="arithmetic", help="search: the tool-using search-QA world; code: Python functions run in the sandbox")
    demo.add_argument("--output-dir", help="default: runs/demo (runs/demo_search, runs/demo_code for the other worlds)")
    demo.add_argument("overrides", nargs="*", help="key.path=value overrides of configs/demo.yaml")
    demo.set_defaults(func=cmd_demo)

    tr = sub.add_parser("train", help="train from a YAML config")
    tr.add_argument("config")
    tr.add_argument("overrides", nargs="*", help="key.path=value overrides")
    tr.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run.output_dir")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="held-out accuracy of a model")
    ev.add_argument("model", help="a HF checkpoint directory, a run directory (its final model on its own task), or world:student")
    ev.add_argument("--task", choices=sorted(TASK_REGISTRY), help="default: math with --data; a world: model's own arithmetic")
    ev.add_argument("--data", help="evaluate every row of this data (JSONL / JSON / Parquet / saved dataset; task math)")
    ev.add_argument("--k", type=int, default=1, help="samples per prompt for avg@k / pass@k")
    ev.add_argument("overrides", nargs="*", help="key.path=value overrides (task.*, eval.*, sampling.*)")
    ev.set_defaults(func=cmd_eval)

    world = sub.add_parser("world", help="build, verify or locate the embedded teacher and student")
    world.add_argument("action", choices=["build", "verify", "path"])
    world.add_argument("--output", help="build into this directory (default: $OPD_WORLD_DIR or ~/.cache/opd)")
    world.add_argument("--force", action="store_true", help="rebuild even if already built there")
    world.add_argument("--reuse", help="copy the roles whose build inputs are unchanged from this earlier world instead of training them")
    world.add_argument("--world", choices=sorted(WORLDS), default="arithmetic", help="search: the embedded search-QA world; code: the code world")
    world.set_defaults(func=cmd_world)

    cmp = sub.add_parser("compare", help="run claim sets over several seeds and write the evidence report")
    cmp.add_argument("items", nargs="+", help="claim set directories (configs/claims/NAME), config files, and key.path=value overrides for every run")
    cmp.add_argument("--seeds", type=int, default=3, help="seeds per arm: run.seed = 0 … N-1 (default 3)")
    cmp.add_argument("--out", default="runs/compare", help="report and run directories (default runs/compare); finished runs there are reused")
    cmp.add_argument("--jobs", type=int, help="runs at a time (default: cores ÷ --threads)")
    cmp.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    cmp.add_argument("--docs", help="also write the report into this Markdown file between its opd-compare markers (e.g. docs/methods.md)")
    cmp.set_defaults(func=cmd_compare, overrides=[])

    ins = sub.add_parser("inspect", help="HTML page colouring each sampled token by what the loss said about it at a step of a run")
    ins.add_argument("run", help="a run directory (run.output_dir)")
    ins.add_argument("--step", type=int, help="the student after this many steps: 0, a kept checkpoint, or the last (default)")
    ins.add_argument("--rows", type=int, default=4, help="completions to show (default 4)")
    ins.add_argument("--out", help="default: RUN/inspect-stepN.html")
    ins.add_argument("overrides", nargs="*", help="key.path=value overrides of the run's config (e.g. train.device=cpu)")
    ins.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [x for x in extra if x.startswith("-") or "=" not in x]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + extra  # key=value overrides given after options
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per request to a served teacher, judge or retriever
        warnings.filterwarnings("ignore", module="transformers")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except _user_errors() as err:
        rank = launched_rank()
        if getattr(err, "reported", False):  # printed by the rank as its failure stopped the others
            pass
        elif rank == 0:
            print(f"opd: error: {err}", file=sys.stderr)
        elif type(err).__name__ != "ConfigError" and not getattr(err, "reported_by_rank0", False):  # else rank 0 has said it
            print(f"opd: error (rank {rank}): {err}", file=sys.stderr)
        return 2
    except Preempted as stopped:
        if launched_rank() == 0:
            print(f"opd: {stopped}", file=sys.stderr)
        return PREEMPTED_EXIT
    except PeerFailed as stopped:
        if launched_rank() == 0:
            print(f"opd: {stopped}", file=sys.stderr)
        return PEER_FAILED_EXIT
    except Exception as err:
        if getattr(err, "reported", False):  # its traceback is printed already
            return 1
        raise
    except KeyboardInterrupt:
        print("opd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
