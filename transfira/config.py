"""TOML configuration: read a file, check its keys against a schema, fill in defaults.

A schema is a dict mapping each allowed key to its default value; ``REQUIRED`` marks a
key without default; a nested dict is a sub-table; the special key ``"*"`` gives the
schema of any further table (e.g. the dataset tables of ``generate.py``).
Unknown keys are errors that name the file and suggest the closest known key.
"""
from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from .errors import TransfiraError

REQUIRED = object()
ANY_TABLE = "*"
ANY_VALUE = "**"  # a schema key: the table takes any key whose value is not a table (e.g. column -> bin edges)


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise TransfiraError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise TransfiraError(f"{path}: invalid TOML: {err}") from None


def _toml_value(value: Any, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v, key) for v in value) + "]"
    raise TransfiraError(f"config key '{key}': cannot write a {type(value).__name__} to TOML")


def toml_text(config: dict[str, Any]) -> str:
    """TOML text of a config: scalar keys on top, then (possibly nested) tables; ``read_toml`` reads it back."""
    def table(prefix: str, data: dict[str, Any]) -> list[str]:
        lines = [f"{k} = {_toml_value(v, f'{prefix}.{k}' if prefix else k)}" for k, v in data.items()
                 if not isinstance(v, dict)]
        for k, v in data.items():
            if isinstance(v, dict):
                name = f"{prefix}.{k}" if prefix else k
                lines += ["", f"[{name}]"] + table(name, v)
        return lines
    return "\n".join(table("", config)) + "\n"


def load_config(path: str | Path, schema: dict[str, Any]) -> dict[str, Any]:
    """Read ``path`` and validate it against ``schema`` (see module docstring)."""
    return apply_schema(read_toml(path), schema, source=str(path))


def apply_schema(raw: dict[str, Any], schema: dict[str, Any], source: str, table: str = "") -> dict[str, Any]:
    """Return ``raw`` with defaults filled in; raise on unknown or missing keys."""
    where = f"[{table}]" if table else "top level"
    any_table = schema.get(ANY_TABLE)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        sub = f"{table}.{key}" if table else key
        if key in schema and key != ANY_TABLE:
            spec = schema[key]
            if isinstance(spec, dict):
                if not isinstance(value, dict):
                    raise TransfiraError(f"{source}: '{sub}' must be a table ([{sub}])")
                out[key] = apply_schema(value, spec, source, sub)
            else:
                if isinstance(value, dict):
                    raise TransfiraError(f"{source}: '{sub}' must be a value, not a table")
                out[key] = value
        elif any_table is not None and isinstance(value, dict):
            out[key] = apply_schema(value, any_table, source, sub)
        elif ANY_VALUE in schema and not isinstance(value, dict):
            out[key] = value
        else:
            known = [k for k in schema if k not in (ANY_TABLE, ANY_VALUE)]
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(known)})"
            raise TransfiraError(f"{source}: unknown key '{key}' in {where}{hint}")
    for key, spec in schema.items():
        if key in (ANY_TABLE, ANY_VALUE) or key in out:
            continue
        sub = f"{table}.{key}" if table else key
        if spec is REQUIRED:
            raise TransfiraError(f"{source}: missing required key '{key}' in {where}")
        if isinstance(spec, dict):
            out[key] = apply_schema({}, spec, source, sub)
        else:
            out[key] = copy.deepcopy(spec)
    return out

