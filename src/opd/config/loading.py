"""Reading a run's configuration: YAML files (with ``base:`` inheritance), dotted command-line overrides, every key
and type checked against the dataclasses of ``config.schema``.

``load_config(path, overrides)`` reads YAML, applies ``key.path=value`` overrides (values parsed as
YAML scalars), builds the ``Config`` and validates it (``config.validation``); a mistake is a
``ConfigError`` with one line naming the offending key (with the closest valid key suggested for a
typo, the task that owns a key of another task, or the new name of a renamed key).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ..tasks.base import TASK_REGISTRY, TaskConfig
from .history import RENAMED_KEYS, migrate_saved
from .schema import DEFAULT_TASK, Config
from .sections import ConfigError
from .trl_names import trl_hint
from .validation import validate

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- building


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply overrides, validate; warn once about keys this run ignores."""
    return warn_ignored_keys(build_config(read_yaml(Path(path)) if path is not None else {}, overrides))


def warn_ignored_keys(config: Config) -> Config:
    """One warning naming the keys a user's config sets that this run never reads (``ignored_keys``)."""
    ignored = ignored_keys(config)
    if ignored:
        log.warning("this run ignores %s", "; ".join(ignored))
    return config


def ignored_keys(config: Config) -> list[str]:
    """Per unused subsection holding keys set away from their defaults — ``method.<other>``, ``sampling.<other
    engine>`` — one phrase naming them and the setting that would read them."""
    found = []
    for section, picker in (("method", "name"), ("sampling", "engine")):
        node = getattr(config, section)
        chosen = getattr(node, picker)
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if f.name == chosen or not dataclasses.is_dataclass(value):
                continue
            set_keys = [k for k, v in _flat(dataclasses.asdict(value)).items() if v != _flat(dataclasses.asdict(type(value)())).get(k)]
            if set_keys:
                found.append(f"{', '.join(f'{section}.{f.name}.{k}' for k in set_keys)}, read only with {section}.{picker}={f.name} (this run's is {chosen})")
    return found


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def load_saved_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A run's saved ``config.yaml`` (keys renamed or added since read as the run meant them: ``config.history``), with
    overrides, validated."""
    return build_config(migrate_saved(read_yaml(Path(path))), overrides)


def build_config(raw: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The validated ``Config`` of a config tree with ``key.path=value`` overrides applied. An override that names
    another task (``task.name=environment`` on a search_qa config) keeps only the file's task keys that the new
    task has: the rest belonged to the old task (they are named in a log line)."""
    file_task = raw.get("task") if isinstance(raw.get("task"), dict) else {}
    file_keys, file_name = set(file_task), file_task.get("name", DEFAULT_TASK)
    overridden = set()
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
        overridden.add(key)
    task = raw.get("task")
    if "task.name" in overridden and isinstance(task, dict) and task.get("name") != file_name and task.get("name") in TASK_REGISTRY:
        keeps = {f.name for f in dataclasses.fields(TASK_REGISTRY[task["name"]].config_class)}
        dropped = sorted(k for k in file_keys if k not in keeps and f"task.{k}" not in overridden)
        for k in dropped:
            del task[k]
        if dropped:
            log.info("task.name=%s: the config's task.%s belonged to task.name=%s and are dropped", task["name"], ", task.".join(dropped), file_name)
    config = from_dict(Config, raw, prefix="")
    validate(config)
    return config


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file as a dict; a top-level ``base: other.yaml`` (relative to this file) is read first and overlaid."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = (path.parent / str(base)).resolve()
    if base_path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to {base_path}")
    return deep_merge(read_yaml(base_path, seen + (path.resolve(),)), raw)


class UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def deep_merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"'{'.'.join(parts[: i + 1])}' is a value, not a section (in override {key})")
        node = child
    node[parts[-1]] = value


def _section_classes(tp: Any) -> list[type]:
    """The dataclasses a section of type ``tp`` can be: every registered task's for ``task``, else ``tp`` itself."""
    return [spec.config_class for spec in TASK_REGISTRY.values()] if tp is TaskConfig else [tp]


def _all_keys(cls: type, prefix: str) -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        full = f"{prefix}{f.name}"
        keys.append(full)
        if dataclasses.is_dataclass(hints[f.name]):
            for section in _section_classes(hints[f.name]):
                keys.extend(k for k in _all_keys(section, full + ".") if k not in keys)
    return keys


def _unknown_key_error(cls: type, prefix: str, name: str) -> ConfigError:
    full = f"{prefix}{name}"
    if full in RENAMED_KEYS:  # a user's config with a key's old spelling (a run's saved one is migrated instead)
        new, unit, _ = RENAMED_KEYS[full]
        return ConfigError(f"config key '{full}' is now '{new}'{unit}")
    if isinstance(cls, type) and issubclass(cls, TaskConfig):
        owners = [n for n, spec in TASK_REGISTRY.items() if name in {f.name for f in dataclasses.fields(spec.config_class)}]
        if owners:
            this = next(n for n, spec in TASK_REGISTRY.items() if spec.config_class is cls)
            return ConfigError(
                f"config key '{full}' belongs to task.name={' or '.join(owners)}, not task.name={this} "
                f"(remove it, or set {full}=null to drop it from a base config)"
            )
    trl = trl_hint(full)
    if trl is not None:
        return ConfigError(f"unknown config key '{full}' (did you mean {trl}?)")
    candidates = _all_keys(Config, "")
    close = difflib.get_close_matches(full, candidates, n=1, cutoff=0.6)
    if not close:
        local = [f.name for f in dataclasses.fields(cls)]
        close = [f"{prefix}{c}" for c in difflib.get_close_matches(name, local, n=1, cutoff=0.5)]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{full}'{hint}")


def _task_section(raw: Any) -> TaskConfig:
    """The ``task`` section as the config class of the task it names."""
    name = raw.get("name", DEFAULT_TASK) if isinstance(raw, dict) else DEFAULT_TASK
    return from_dict(TASK_REGISTRY.named(name).config_class, raw, "task.")


def from_dict(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and value types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"'{prefix.rstrip('.')}' must be a section (a mapping), got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    raw = {name: value for name, value in raw.items() if name in names or value is not None}  # key=null drops a key
    for name in raw:
        if name not in names:
            raise _unknown_key_error(cls, prefix, str(name))
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is TaskConfig:
        return _task_section(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except ConfigError as err:
                errors.append(err)
        names = " or ".join(_type_name(o) for o in options if o is not type(None))
        raise ConfigError(f"config key '{key}' must be {names}" + (" or null" if type(None) in options else "") + f", got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(f"config key '{key}' must be one of {choices}, got {value!r}")
        return value
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return {_coerce(key_type, k, f"{key}.{k}"): _coerce(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if tp is dict:  # free-form mapping (e.g. chat-template arguments), passed on as given
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{key}' must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    raise ConfigError(f"config key '{key}' has an unsupported type {tp}")


