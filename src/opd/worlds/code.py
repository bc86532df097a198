"""The embedded code world: small Python functions specified by a docstring and two examples, a teacher that writes
them, a weaker student, and two experts that each write one family of them well.

Everything here is generated from a seed (``CodeWorldSpec``), so a rebuild gives the same files:

    train.jsonl   function rows for ``task.name: code``: the stub to complete (``prompt``), the reference program
                  (``completion``), hidden tests (``test``: assert statements), the function's name (``entry_point``)
                  and its ``family``
    eval.jsonl    held-out rows: each a (template, constants, function name) combination no training row has

Two families of ``TEMPLATES``: ``numbers`` (arithmetic on an integer ``x``: "Return x times 3 plus 2.") and ``text``
(strings and lists: "Return s with 'a' replaced by 'c'.", "Return each item of xs times 4."). A row's prompt is

    def f(x):
        \"\"\"Return x times 3 plus 2.
        f(4) == 14
        f(0) == 2
        \"\"\"

and its reference completion the same function written out in a code block (``def f(x):`` / ``return x * 3 + 2``).
The examples' values and the tests' are computed by running the reference, here, on inputs drawn from the seed.

The tokenizer is the arithmetic world's character tokenizer (every printable character, newline included).
This module trains nothing; ``worlds.build.code`` does, with opd's own SFT, and ``worlds.locate`` finds the world.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass

from .arithmetic import ModelShape

CODE_WORLD_VERSION = 1
NAMES = ("f", "g", "h", "fn", "calc", "step")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
FAMILIES = ("numbers", "text")


@dataclass(frozen=True)
class Template:
    family: str
    argument: str  # x (an integer), s (a string) or xs (a list of integers)
    doc: str  # the docstring's first line, with {a}, {b}, {c}, {d}, {w}
    body: str  # the returned expression, with the same fields
    fields: tuple[str, ...] = ()


TEMPLATES = (  # a: a number from 2 to 49 (n: from 2 to 9, where it indexes a short string), c, d: letters, w: a word
    Template("numbers", "x", "Return x plus {a}.", "x + {a}", ("a",)),
    Template("numbers", "x", "Return x minus {a}.", "x - {a}", ("a",)),
    Template("numbers", "x", "Return x times {a}.", "x * {a}", ("a",)),
    Template("numbers", "x", "Return x times {a} plus {b}.", "x * {a} + {b}", ("a", "b")),
    Template("numbers", "x", "Return x modulo {a}.", "x % {a}", ("a",)),
    Template("numbers", "x", "Return x divided by {a}, rounded down.", "x // {a}", ("a",)),
    Template("numbers", "x", "Return the larger of x and {a}.", "max(x, {a})", ("a",)),
    Template("numbers", "x", "Return the smaller of x and {a}.", "min(x, {a})", ("a",)),
    Template("numbers", "x", "Return x squared minus {a}.", "x * x - {a}", ("a",)),
    Template("numbers", "x", "Return the distance between x and {a}.", "abs(x - {a})", ("a",)),
    Template("text", "s", "Return s reversed.", "s[::-1]"),
    Template("text", "s", "Return s in upper case.", "s.upper()"),
    Template("text", "s", "Return s repeated {n} times.", "s * {n}", ("n",)),
    Template("text", "s", "Return the first {n} characters of s.", "s[:{n}]", ("n",)),
    Template("text", "s", "Return s without its first {n} characters.", "s[{n}:]", ("n",)),
    Template("text", "s", "Return how many times '{c}' occurs in s.", "s.count('{c}')", ("c",)),
    Template("text", "s", "Return s with '{c}' replaced by '{d}'.", "s.replace('{c}', '{d}')", ("c", "d")),
    Template("text", "s", "Return s followed by '{w}'.", "s + '{w}'", ("w",)),
    Template("text", "xs", "Return the sum of xs plus {a}.", "sum(xs) + {a}", ("a",)),
    Template("text", "xs", "Return each item of xs times {a}.", "[v * {a} for v in xs]", ("a",)),
)
# every two-letter word: so many constants that a model cannot remember each combination and must copy it from the docstring
WORDS = tuple(a + b for a in LETTERS for b in LETTERS)


def field_values(name: str) -> list:
    return {"a": list(range(2, 50)), "b": list(range(2, 50)), "n": list(range(2, 10)), "c": list(LETTERS), "d": list(LETTERS),
            "w": list(WORDS)}[name]


@dataclass(frozen=True)
class CodeWorldSpec:
    train_rows: int = 8000
    eval_rows: int = 256
    held_out: float = 0.1  # the share of (template, constants, name) combinations only evaluation rows have
    examples: int = 2  # input/output examples in each docstring
    tests: int = 4  # hidden asserts per row, on other inputs
    max_positions: int = 288
    teacher_shape: ModelShape = ModelShape(192, 6, 512, 6)
    student_shape: ModelShape = ModelShape(128, 4, 384, 4)
    teacher_steps: int = 1200
    student_steps: int = 300
    expert_steps: int = 300  # each expert: the student's SFT continued on its own family's rows alone
    batch_size: int = 64
    lr: float = 1.5e-3
    expert_lr: float = 7.5e-4
    warmup_steps: int = 20
    seed: int = 0
    threads: int | None = 2  # fixed so the build is reproducible bit for bit on one machine

    def fingerprint(self) -> str:
        return _digest({"version": CODE_WORLD_VERSION, **asdict(self)})

    def role_fingerprint(self, role: str) -> str:
        """What one role's build depends on: the data and that role's own settings (an expert also the student's, whose
        weights it starts from)."""
        own = _ROLE_FIELDS["expert" if role.startswith("expert_") else role]
        fields = {k: v for k, v in asdict(self).items() if k not in _ROLE_OWN or k in own}
        return _digest({"version": CODE_WORLD_VERSION, "role": role, **fields})


def _digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


_ROLE_FIELDS = {
    "teacher": ("teacher_shape", "teacher_steps"),
    "student": ("student_shape", "student_steps"),
    "expert": ("student_shape", "student_steps", "expert_steps", "expert_lr"),
}
_ROLE_OWN = {name for fields in _ROLE_FIELDS.values() for name in fields}

DEFAULT_CODE_SPEC = CodeWorldSpec()
CODE_MODELS = ("teacher", "student", "expert_numbers", "expert_text")
CODE_WORLD_FILES = ("tokenizer", *CODE_MODELS, "train.jsonl", "eval.jsonl")


def an_input(argument: str, rng: random.Random, constants: dict):
    """An argument for a function: an integer, a list of digits, or a short string whose letters include the one the
    function counts or replaces (so that a wrong letter gives a wrong answer)."""
    if argument == "x":
        return rng.randint(-9, 20)
    if argument == "xs":
        return [rng.randint(0, 9) for _ in range(rng.randint(2, 4))]
    alphabet = rng.sample(LETTERS, 3) + [constants["c"]] * 2 if "c" in constants else rng.sample(LETTERS, 5)
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 6)))


def combinations() -> list[tuple[int, dict, str]]:
    """Every (template index, constants, function name) the world's rows are drawn from."""
    combos = []
    for index, template in enumerate(TEMPLATES):
        constant_sets = [{}]
        for name in template.fields:
            constant_sets = [{**c, name: v} for c in constant_sets for v in field_values(name) if not (name == "d" and v == c.get("c"))]
        combos += [(index, constants, fn) for constants in constant_sets for fn in NAMES]
    return combos


def is_held_out(combo: tuple[int, dict, str], spec: CodeWorldSpec) -> bool:
    """Whether a combination belongs to evaluation only (a seeded hash of it, ``held_out`` of them)."""
    key = json.dumps([spec.seed, combo[0], sorted(combo[1].items()), combo[2]])
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < spec.held_out


def make_row(combo: tuple[int, dict, str], spec: CodeWorldSpec, rng: random.Random) -> dict:
    """A row of one combination: its prompt, reference completion, tests (on inputs other than the examples')."""
    index, constants, name = combo
    template = TEMPLATES[index]
    body = template.body.format(**constants)
    scope: dict = {}
    exec(f"def {name}({template.argument}):\n    return {body}\n", scope)  # the world's own reference, not a model's
    function = scope[name]
    inputs: list = []
    while len(inputs) < spec.examples + spec.tests:
        value = an_input(template.argument, rng, constants)
        if value not in inputs:
            inputs.append(value)
    shown = "".join(f"    {name}({v!r}) == {function(v)!r}\n" for v in inputs[: spec.examples])
    prompt = f'def {name}({template.argument}):\n    """{template.doc.format(**constants)}\n{shown}    """'
    completion = f"```python\ndef {name}({template.argument}):\n    return {body}\n```"
    tests = [f"assert {name}({v!r}) == {function(v)!r}" for v in inputs[spec.examples :]]
    return {"prompt": prompt, "completion": completion, "test": tests, "entry_point": name, "family": template.family}


def code_rows(spec: CodeWorldSpec = DEFAULT_CODE_SPEC) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows: training rows drawn from the combinations not held out (a template, then one of its
    combinations), evaluation rows from the rest (each held-out combination at most once, both families alike)."""
    rng = random.Random(f"opd-code-world-{spec.seed}")
    combos = combinations()
    held_out = [[c for c in combos if c[0] == index and is_held_out(c, spec)] for index in range(len(TEMPLATES))]
    trained = [[c for c in combos if c[0] == index and not is_held_out(c, spec)] for index in range(len(TEMPLATES))]
    eval_rows = []
    for family in FAMILIES:  # each family half of them, its templates taken in turn, no combination twice
        pools = [rng.sample(pool, len(pool)) for index, pool in enumerate(held_out) if TEMPLATES[index].family == family]
        picked = [pool.pop() for turn in range(10 * spec.eval_rows) for pool in [pools[turn % len(pools)]] if pool]
        if len(picked) < spec.eval_rows // len(FAMILIES):
            raise ValueError(f"too few held-out combinations for {spec.eval_rows} evaluation rows (raise held_out)")
        eval_rows += [make_row(c, spec, rng) for c in picked[: spec.eval_rows // len(FAMILIES)]]
    # every template equally often (one with many constants is not drawn more often): each family half the rows
    train_rows = [make_row(rng.choice(rng.choice(trained)), spec, rng) for _ in range(spec.train_rows)]
    return train_rows, eval_rows
