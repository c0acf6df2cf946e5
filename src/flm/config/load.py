"""TOML -> typed dataclasses, with one-line errors for unknown keys, wrong types and bad values."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from flm.config.presets import PRESETS
from flm.config.schema import Config, ModelConfig, SourceConfig, StageConfig
from flm.errors import FlmError

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _check_value(where: str, value: Any, tp: Any) -> Any:
    """Return `value` coerced to `tp` (int -> float only), or raise a one-line FlmError."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _check_value(where, value, args[0])
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise FlmError(f"config error: {where} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        if dataclasses.is_dataclass(item):
            return [_build(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return [_check_value(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and ok and not math.isfinite(value):  # TOML has inf and nan; no setting means either
        raise FlmError(f"config error: {where} must be a finite number, got {value!r}")
    if not ok:
        raise FlmError(f"config error: {where} must be {_TYPE_NAMES.get(tp, tp)}, got {value!r}")
    return value


def _build(cls: type, table: dict[str, Any], prefix: str) -> Any:
    if not isinstance(table, dict):
        raise FlmError(f"config error: [{prefix}] must be a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in table.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise FlmError(f"config error: unknown key '{prefix}.{key}'{hint}")
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value, f"{prefix}.{key}" if prefix else key)
        else:
            kwargs[key] = _check_value(f"{prefix}.{key}" if prefix else key, value, hints[key])
    return cls(**kwargs)


def model_config_from_dict(table: dict[str, Any], prefix: str = "model") -> ModelConfig:
    """Build a ModelConfig, expanding `preset = "name"` first so explicit keys override it."""
    table = dict(table)
    preset = table.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise FlmError(f"config error: unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        table = {**PRESETS[preset], **table}
    cfg = _build(ModelConfig, table, prefix)
    cfg.validate()
    return cfg


def config_from_dict(raw: dict[str, Any]) -> Config:
    raw = dict(raw)
    sections = [f.name for f in dataclasses.fields(Config)]
    unknown = set(raw) - set(sections)
    if unknown:
        raise FlmError(f"config error: unknown section '{sorted(unknown)[0]}' (sections: {', '.join(sections)})")
    model = model_config_from_dict(raw.pop("model", {}))
    cfg = _build(Config, raw, "")
    cfg.model = model
    cfg.validate()
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=1e-3' -> (['train', 'lr'], 0.001); 'stages.2.d_model=192' -> (['stages', '2', 'd_model'], 192).
    Values are TOML; bare words are strings."""
    if "=" not in text:
        raise FlmError(f"bad override {text!r}: expected section.key=value")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise FlmError(f"bad override {text!r}: the key must be section.key, e.g. train.lr=1e-3 or stages.0.tokens=1e6")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return parts, parsed


def apply_override(raw: dict[str, Any], text: str) -> None:
    """Set one `--set` value in the raw TOML tables, at any depth: tables by key, arrays of tables
    ([[stages]], [[data.sources]]) by index."""
    path, value = parse_override(text)
    node: Any = raw
    for i, part in enumerate(path[:-1]):
        where = ".".join(path[:i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise FlmError(f"bad override {text!r}: {'.'.join(path[:i])} has {len(node)} entries "
                               f"(indices 0..{len(node) - 1}), not {part!r}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise FlmError(f"bad override {text!r}: '{where}' is a value, not a table")
    if isinstance(node, list):
        raise FlmError(f"bad override {text!r}: '{'.'.join(path[:-1])}' is a list; name an entry by its index")
    node[path[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a TOML file (or start from defaults when `path` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FlmError(f"config file not found: {path}")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise FlmError(f"config error: {path}: {e}") from None
    for text in overrides:
        apply_override(raw, text)
    return config_from_dict(raw)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> TOML/JSON-friendly dict (None values dropped: TOML has no null)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = config_to_dict(value)
        elif isinstance(value, list):
            out[f.name] = [config_to_dict(v) if dataclasses.is_dataclass(v) else v for v in value]
        elif value is not None:
            out[f.name] = value
    return out


def config_toml(cfg: Config, header: list[str]) -> str:
    """`cfg` as a TOML file that load_config reads back to an equal Config: `header` as comments, every [model]
    value, and elsewhere only what differs from the defaults (tables, [[data.sources]] and [[stages]] entries)."""
    defaults = config_to_dict(Config())
    doc = config_to_dict(cfg)
    lines = [f"# {line}" if line else "#" for line in header]

    def table(name: str, values: dict[str, Any], default: dict[str, Any], every: bool = False) -> None:
        keep = [(k, v) for k, v in values.items() if not isinstance(v, list) or not v or not isinstance(v[0], dict)]
        keep = [(k, v) for k, v in keep if every or v != default.get(k)]
        if keep or every or name.startswith("["):  # an array's entry stands even at its defaults
            lines.extend(["", f"[{name}]", *(f"{k} = {_toml_value(v)}" for k, v in keep)])

    for section in ("model", "data", "train", "plan", "mup", "parallel"):
        table(section, doc[section], defaults[section], every=section == "model")
        if section == "data":
            for source in doc["data"]["sources"]:
                table("[data.sources]", source, config_to_dict(SourceConfig()))
    for stage in doc["stages"]:
        table("[stages]", stage, config_to_dict(StageConfig()))
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    """A flat TOML value: JSON spells strings (ASCII, the rest escaped), integers, the finite floats a validated
    config holds, booleans and arrays as TOML does."""
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    return json.dumps(value)
