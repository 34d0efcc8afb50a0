"""transfira.config's TOML writer: what it writes reads back (with tomllib) as the same config."""
from __future__ import annotations

import pytest

from transfira.config import read_toml, toml_text
from transfira.errors import TransfiraError


def test_toml_text_reads_back(tmp_path):
    config = {"name": 'a "quoted" \\ path\twith tab', "flag": True, "off": False, "n": -3, "x": 1e-9, "y": 0.1,
              "big": 2 ** 40, "empty": [], "list": ["a", 1, 2.5, False],
              "table": {"k": "v", "nested": {"deep": [1, 2]}, "after": 1}, "last": {"z": 0}}
    path = tmp_path / "c.toml"
    path.write_text(toml_text(config))
    assert read_toml(path) == config
    # scalar keys of a table come before its sub-tables (else TOML would put them in the sub-table)
    text = toml_text(config)
    assert text.index("after = 1") < text.index("[table.nested]")


def test_toml_text_names_the_key_it_cannot_write():
    with pytest.raises(TransfiraError, match=r"config key 'table.bad': cannot write a NoneType"):
        toml_text({"table": {"ok": 1, "bad": None}})
