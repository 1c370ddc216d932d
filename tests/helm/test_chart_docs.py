"""The chart's README documents every value there is and no value that is not, and links every
worked example (each of which test_chart.py renders and validates)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import charts
import yaml

KIND = "unit"

README = charts.CHART / "README.md"
# Values whose content is a Kubernetes object or a free map: documented as one row.
OPAQUE = {"resources", "securityContext", "podSecurityContext", "labels", "annotations", "restoreResources",
          "config", "affinity", "nodeSelector"}  # fmt: skip
# Required, so deliberately absent from values.yaml (a default would hide a missing value).
REQUIRED = {"storage.url", "trainer.image.repository"}


def value_paths(d: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in OPAQUE:
            yield from value_paths(v, f"{prefix}{k}.")
        else:
            yield prefix + k


def schema_paths(schema: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for k, sub in schema.get("properties", {}).items():
        if "properties" in sub and k not in OPAQUE:
            yield from schema_paths(sub, f"{prefix}{k}.")
        else:
            yield prefix + k


def documented() -> list[str]:
    table = README.read_text().split("\n## Values\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", table, flags=re.M)


def test_every_value_is_in_the_values_table_once() -> None:
    values = set(value_paths(yaml.safe_load((charts.CHART / "values.yaml").read_text()))) | REQUIRED
    rows = documented()
    assert len(rows) == len(set(rows)), [r for r in rows if rows.count(r) > 1]
    assert sorted(values - set(rows)) == [], "values missing from README.md's table"
    assert sorted(set(rows) - values) == [], "README.md documents values that do not exist"


def test_schema_and_values_name_the_same_values() -> None:
    schema = json.loads((charts.CHART / "values.schema.json").read_text())
    values = set(value_paths(yaml.safe_load((charts.CHART / "values.yaml").read_text()))) | REQUIRED
    assert set(schema_paths(schema)) - {"global"} == values


def test_every_example_is_linked() -> None:
    text = README.read_text()
    assert charts.EXAMPLES
    for example in charts.EXAMPLES:
        assert f"(examples/{example.name})" in text, example.name
