"""The seams hold: no import circle among opd's modules, every module imports on its own, methods and tasks are
found by name only through their registries, and nothing outside a method's module tests the method's name."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import opd
from opd.config import load_config
from opd.methods import METHODS
from opd.sections import ConfigError
from opd.tasks import TASKS

SRC = Path(opd.__file__).parent


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


def test_the_import_graph_is_acyclic():
    graph = import_graph()
    assert len(graph) > 30 and "opd.methods.opd" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


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
    reached, todo = set(), ["opd.world", "opd.models"]
    while todo:
        node = todo.pop()
        if node not in reached:
            reached.add(node)
            todo.extend(graph[node])
    assert not reached & {"opd.train", "opd.world_build", "opd.methods"}, sorted(reached)


def test_registries_hold_every_method_and_task():
    assert {"opd", "gkd", "opsd", "gopd", "opd_plus", "reopold", "ovd", "grpo", "sft"} <= set(METHODS)
    assert {"arithmetic", "math"} <= set(TASKS)
    for name, cls in METHODS.items():
        assert cls.name == name and cls.__module__ == f"opd.methods.{name}"


def test_no_module_outside_a_method_tests_its_name():
    """No comparison or membership test against a method's name anywhere but in that method's own module."""
    offenders = []
    for path in SRC.rglob("*.py"):
        own = module_name(path).removeprefix("opd.methods.")
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            for side in [node.left, *node.comparators]:
                values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                for value in values:
                    if isinstance(value, ast.Constant) and value.value in METHODS and value.value != own:
                        offenders.append(f"{path.relative_to(SRC)}:{node.lineno} tests {value.value!r}")
    assert not offenders, offenders


def test_an_unknown_task_is_a_config_error():
    with pytest.raises(ConfigError, match="config key 'task.name' must be one of 'arithmetic', 'environment', 'math', 'search_qa', got 'poetry'"):
        load_config(None, ["student.path=s", "task.name=poetry"])


def test_a_key_of_another_task_names_its_task():
    with pytest.raises(ConfigError, match="config key 'task.path' belongs to task.name=math, not task.name=arithmetic"):
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
