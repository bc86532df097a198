"""The seams hold: the tree is the pipeline (sub-packages in a declared order, imports only running down it, no
import circle, every module importing on its own), registered things are found by name only through their
registries (nothing outside a method's or an engine's module tests its name), capabilities are declared rather than
probed (no hasattr / getattr on a task, sampler, teacher or judge), and the docs the code cites exist."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import opd
from opd.config.loading import load_config
from opd.config.sections import ConfigError
from opd.engines import ENGINE_REGISTRY
from opd.methods import METHOD_REGISTRY
from opd.tasks import TASK_REGISTRY

SRC = Path(opd.__file__).parent
REPO = SRC.parents[1]

# The layers, lowest first: a module may import its own layer and the layers before it, never one after it. A module
# belongs to the longest entry that prefixes its name, so the three low parts of higher packages come first.
LAYERS = [
    "opd.objectives",  # pure tensor functions: nothing of opd
    "opd.config.sections",  # the sections every run has, ConfigError, require: nothing of opd
    "opd.config.objects",  # Python objects a config names (import paths, the Python API's objects)
    "opd.services",  # the HTTP client
    "opd.sandbox",  # running programs a model wrote: isolation, limits, tests
    "opd.parallel",  # launchers, ranks, sharding
    "opd.worlds",  # the embedded worlds' specs, tokenizer and where they are (not their builds)
    "opd.models",  # loading, pairing, prompts, Rollouts, scoring
    "opd.engines",  # the Sampler protocol, the engine registry, hf, vllm, served sampling
    "opd.episodes",  # environments, the driver, tool calls, search
    "opd.tasks",  # the Task protocol, judges' protocols, the task registry and the tasks
    "opd.teachers",  # the Teacher protocol and the teachers; verbal judges
    "opd.methods",  # the Method base, the Session, the registry and the methods
    "opd.config",  # the Config assembled from the task, engine and method registries; loading, validation, saving
    "opd.training",  # assembly, pre-flight, the loop, evaluation, checkpoints, resume, run directory, metrics
    "opd.worlds.build",  # the worlds trained with opd's own SFT
    "opd.evidence",  # claims, compare, reports, inspect
    "opd",  # cli, __main__
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every import in every module (function-level and TYPE_CHECKING ones included), as module → opd modules."""
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            graph[name].update(c for c in candidates if c in modules and c != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer(module: str) -> int:
    """The index in ``LAYERS`` of the longest entry that is ``module`` or a package above it."""
    owners = [i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + ".")]
    return max(owners, key=lambda i: len(LAYERS[i]))


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} ({LAYERS[layer(module)]}) imports {target} ({LAYERS[layer(target)]})"
        for module, targets in sorted(graph.items()) for target in sorted(targets) if layer(target) > layer(module)
    ]


def test_the_import_graph_is_acyclic():
    graph = import_graph()
    assert len(graph) > 60 and "opd.methods.opd" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_imports_only_run_down_the_layers():
    assert layering_violations(import_graph()) == []


def test_the_layering_check_catches_an_import_that_runs_up():
    """The check itself: a task importing a method, and an engine importing the loop, are reported."""
    graph = {"opd.tasks.math": {"opd.methods.base", "opd.episodes.driver"}, "opd.engines.hf": {"opd.training.loop"},
             "opd.objectives.opd": {"opd.objectives.common"}, "opd.config.sections": set()}
    assert layering_violations(graph) == [
        "opd.engines.hf (opd.engines) imports opd.training.loop (opd.training)",
        "opd.tasks.math (opd.tasks) imports opd.methods.base (opd.methods)",
    ]
    assert layer("opd.worlds.build.search") > layer("opd.training") > layer("opd.worlds.locate")
    assert layer("opd.config.sections") < layer("opd.models.loading") < layer("opd.config.loading")


def test_objectives_import_nothing_of_opd_and_every_module_has_a_layer():
    graph = import_graph()
    outside = {m: sorted(t for t in ts if not t.startswith("opd.objectives")) for m, ts in graph.items() if m.startswith("opd.objectives")}
    assert not any(outside.values()), outside
    assert all(layer(m) >= 0 for m in graph)


def test_only_the_entry_points_lie_at_the_top_of_the_package():
    """The command line and the Python API (``opd.train``, ``opd.evaluate``, ``opd.load_config``)."""
    assert sorted(p.name for p in SRC.glob("*.py")) == ["__init__.py", "__main__.py", "api.py", "cli.py"]
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    assert packages == {layer_name.split(".")[1] for layer_name in LAYERS if layer_name.count(".") == 1}


def test_tests_mirror_the_package():
    """Each test directory is named after a sub-package (tests of the whole, and of the command line, at the top)."""
    tests = REPO / "tests"
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    directories = {p.name for p in tests.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert directories and directories <= packages, directories - packages


@pytest.mark.slow  # about 5 s: every module re-imported from scratch
def test_every_module_imports_on_its_own():
    """Each module imported first, in a fresh set of opd modules (one interpreter, torch imported once)."""
    names = sorted(n for n in import_graph() if n != "opd.__main__")  # __main__ runs the command line
    script = (
        "import importlib, sys, torch, transformers\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'opd' or m.startswith('opd.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
        "print('imported', len(" + repr(names) + "))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"imported {len(names)}" in result.stdout


def test_finding_a_world_model_does_not_import_the_trainer():
    graph = import_graph()
    reached, todo = set(), ["opd.worlds.locate", "opd.models.loading"]
    while todo:
        node = todo.pop()
        if node not in reached:
            reached.add(node)
            todo.extend(graph[node])
    assert not [m for m in reached if m.startswith(("opd.training", "opd.worlds.build", "opd.methods"))], sorted(reached)


def test_registries_hold_every_method_task_and_engine():
    assert {"opd", "gkd", "opsd", "gopd", "opd_plus", "reopold", "ovd", "grpo", "sft"} <= set(METHOD_REGISTRY)
    assert {"arithmetic", "math", "search_qa", "environment"} <= set(TASK_REGISTRY)
    assert {"hf", "vllm"} <= set(ENGINE_REGISTRY)
    for name, cls in METHOD_REGISTRY.items():
        assert cls.name == name and cls.__module__ == f"opd.methods.{name}"
    for name, cls in ENGINE_REGISTRY.items():
        assert cls.name == name and cls.__module__ == f"opd.engines.{name}"
        assert isinstance(cls.takes_stop_strings, bool) and isinstance(cls.holds_weights, bool) and cls.logprobs in ("trainer", "engine")


def name_tests(names: set[str], own_module) -> list[str]:
    """Comparisons and membership tests against one of ``names`` anywhere but in the module that owns that name."""
    offenders = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            for side in [node.left, *node.comparators]:
                values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                for value in values:
                    if isinstance(value, ast.Constant) and value.value in names and module_name(path) != own_module(value.value):
                        offenders.append(f"{path.relative_to(SRC)}:{node.lineno} tests {value.value!r}")
    return offenders


def test_no_module_outside_a_method_tests_its_name():
    assert name_tests(set(METHOD_REGISTRY), lambda name: f"opd.methods.{name}") == []


def test_no_module_outside_an_engine_tests_its_name():
    """``sampling.engine`` is compared with an engine's name nowhere: what an engine can do is declared on it."""
    assert name_tests(set(ENGINE_REGISTRY), lambda name: f"opd.engines.{name}") == []


PROBED = re.compile(r"(^|_)(task|sampler|teacher|judge|engine|env|environment)$|^then$")


def capability_probes(tree: ast.AST, where: str) -> list[str]:
    """``hasattr`` / ``getattr`` calls whose object is named like a task, sampler, teacher, judge or engine (the last
    name of the expression: ``task``, ``s.sampler``, ``self.cfg.task``, ``teacher_sampler``, ``self.then``)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr") and node.args:
            target = node.args[0]
            last = target.attr if isinstance(target, ast.Attribute) else target.id if isinstance(target, ast.Name) else ""
            if PROBED.search(last):
                found.append(f"{where}:{node.lineno} {node.func.id}({ast.unparse(target)}, …)")
    return found


def test_no_capability_is_probed_on_a_task_sampler_teacher_or_judge():
    offenders = [p for path in SRC.rglob("*.py") for p in capability_probes(ast.parse(path.read_text()), str(path.relative_to(SRC)))]
    assert offenders == []


def test_the_probe_check_finds_probes():
    code = "hasattr(task, 'f1')\ngetattr(s.sampler, 'eos_ids', None)\ngetattr(self.cfg.task, 'max_tokens', None)\ngetattr(model, 'config')\n"
    assert [line.split(" ", 1)[0] for line in capability_probes(ast.parse(code), "x")] == ["x:1", "x:2", "x:3"]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces as ``-``."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_the_docs_the_code_cites_exist():
    """Every ``docs/NAME.md#anchor`` in the package's docstrings and configs names a heading of that page (and never the
    specification the package's users do not have)."""
    cited = set()
    for path in list(SRC.rglob("*.py")) + list(SRC.rglob("*.yaml")):
        text = path.read_text()
        assert "METHODS" not in text, f"{path.relative_to(SRC)} mentions METHODS"
        cited.update(re.findall(r"docs/([\w]+\.md)(?:#([\w\-]+))?", text))
    assert ("methods.md", "opd") in cited and len(cited) > 10
    for page, anchor in cited:
        doc = REPO / "docs" / page
        assert doc.is_file(), f"docs/{page} is cited but does not exist"
        if anchor:
            anchors = {github_anchor(line.lstrip("#")) for line in doc.read_text().splitlines() if line.startswith("#")}
            assert anchor in anchors, f"docs/{page}#{anchor} is cited but is not a heading there"


def test_an_unknown_task_is_a_config_error():
    with pytest.raises(ConfigError, match="config key 'task.name' must be one of 'arithmetic', 'math', 'code', 'environment', 'search_qa', got 'poetry'"):
        load_config(None, ["student.path=s", "task.name=poetry"])


def test_a_key_of_another_task_names_its_task():
    with pytest.raises(ConfigError, match="config key 'task.path' belongs to task.name=math or code, not task.name=arithmetic"):
        load_config(None, ["student.path=s", "teacher.path=t", "task.path=data.jsonl"])
    with pytest.raises(ConfigError, match="config key 'task.min_digits' belongs to task.name=arithmetic, not task.name=math"):
        load_config(None, ["student.path=s", "teacher.path=t", "task.name=math", "task.path=d.jsonl", "task.min_digits=2"])


def test_a_typo_in_a_task_key_is_suggested():
    with pytest.raises(ConfigError, match="unknown config key 'task.max_digit' \\(did you mean 'task.max_digits'\\?\\)"):
        load_config(None, ["student.path=s", "teacher.path=t", "task.max_digit=2"])


def test_a_method_that_needs_reference_solutions_says_so_at_load_time():
    with pytest.raises(ConfigError, match="config key 'task.solution_field' must name the reference-solution field: sft trains"):
        load_config(None, ["student.path=s", "task.name=math", "task.path=d.jsonl", "task.format=problem", "task.solution_field=null", "method.name=sft"])
    # (with task.format=auto, rows of other shapes may still carry solutions: the pre-flight pass checks each row)
    # GKD needs them only for its off-policy batches
    load_config(None, ["student.path=s", "teacher.path=t", "task.name=math", "task.path=d.jsonl", "task.solution_field=null",
                       "method.name=gkd", "method.gkd.lambda_onpolicy=1.0"])
