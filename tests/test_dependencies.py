"""Every third-party module pcamlib imports is a declared dependency.

A module that is only present in the developer's environment passes every other test
there and breaks `make test` on a fresh clone (grad-cam did exactly that).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib

from pcamlib import config

# fastai's own dependencies that pcamlib uses through fastai's API, pinned by fastai.
THROUGH_FASTAI = {"fastprogress", "fasttransform", "fastcore"}


def _declared() -> set[str]:
    project = tomllib.loads((config.REPO_ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    return {re.split(r"[<>=!~\[ ;]", spec, maxsplit=1)[0].lower() for spec in specs}


def _imported_modules() -> set[str]:
    modules = set()
    for path in (config.REPO_ROOT / "pcamlib").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m != "pcamlib"}


def test_every_imported_package_is_declared_in_pyproject():
    declared = _declared() | THROUGH_FASTAI
    owners = md.packages_distributions()
    undeclared = {}
    for module in sorted(_imported_modules()):
        dists = {d.lower() for d in owners.get(module, [module])}
        if not dists & declared:
            undeclared[module] = sorted(dists)
    assert not undeclared, f"imported by pcamlib but not in pyproject.toml: {undeclared}"
