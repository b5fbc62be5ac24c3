"""The parameter table in docs/zoo.md matches the models (counted on the meta device)."""

from __future__ import annotations

import re
from pathlib import Path

from zoo.registry import MODELS, count_parameters

DOC = Path(__file__).resolve().parents[2] / "docs" / "zoo.md"


def test_parameter_table_matches_models():
    rows = re.findall(r"^\| ([a-z-]+) \| (\d+) \| ([\d,]+) \|$", DOC.read_text(), flags=re.M)
    assert {name for name, _, _ in rows} == set(MODELS), "every architecture has rows"
    for name in MODELS:
        assert {int(w) for n, w, _ in rows if n == name} == set(MODELS[name].widths), f"{name}: whole ladder listed"
    for name, width, n in rows:
        assert count_parameters(name, int(width)) == int(n.replace(",", "")), f"{name} at width {width}"
