"""No module imports a private name (``_x``) from another package of megatron_rcpa: what is shared is public."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatron_rcpa")


def _modules():
    for dirpath, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                yield os.path.relpath(os.path.join(dirpath, name), ROOT)


@pytest.mark.parametrize("rel", sorted(_modules()))
def test_no_private_names_across_packages(rel):
    package = rel.split(os.sep)[0] if os.sep in rel else ""
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_rcpa."):
            other = node.module.split(".")[1]
            if other != package and other != "testing":
                bad += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad, f"{rel} imports private names from other packages: {bad}"
