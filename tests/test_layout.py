"""The package layout: layers that import only downwards, a small top level, the plugin API in ``unetlab.__all__``,
and the 0.2.0 flat import paths still working with one deprecation warning each."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import unetlab

PACKAGE = Path(unetlab.__file__).parent
# bottom to top: a module may import its own layer or a lower one (the README's "Layout" section)
LAYERS = ["errors", "checkpoint", "plugin_api", "config", "data", "model", "training", "tracking", "analysis",
          "runs", "deploy", "cli"]


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "<relative>"))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return found


def test_every_module_belongs_to_a_layer_and_imports_only_downwards() -> None:
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[0] in ("__init__", "__main__", "_legacy"):
            continue
        assert parts[0] in rank, f"{path} is in no layer"
        for line, module in _imports(path):
            assert module != "<relative>", f"{path}:{line}: a relative import (the layout reads absolute ones)"
            names = module.split(".")
            if names[0] == "unetlab" and len(names) > 1 and rank.get(names[1], -1) > rank[parts[0]]:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} ({parts[0]}) imports {module}")
    assert not upward, "\n".join(upward)


def test_the_top_level_is_a_dozen_layers_not_a_flat_list() -> None:
    entries = sorted(p.name for p in PACKAGE.iterdir() if p.name != "__pycache__" and p.name != "py.typed")
    packages = [e for e in entries if (PACKAGE / e).is_dir()]
    assert set(packages) == set(LAYERS) - {"errors", "checkpoint"}
    assert len(entries) <= 16, entries


def test_the_plugin_api_is_what_all_exports_and_every_name_resolves() -> None:
    for name in unetlab.__all__:
        assert getattr(unetlab, name) is not None, name
    assert "PluginHost" not in unetlab.__all__ and "Registry" not in unetlab.__all__
    from unetlab.model.unet import logits_to_classes
    from unetlab.plugin_api.params import Range

    assert unetlab.Range is Range and unetlab.logits_to_classes is logits_to_classes


def test_every_020_import_path_is_the_new_module_with_one_warning() -> None:
    """In a fresh interpreter (an imported old path is cached): the same module object, one warning each."""
    code = """
import importlib, json, sys, warnings
from unetlab._legacy import OLD_MODULES
# old modules whose name is now a package: one of their names, served by the package's __getattr__
PROBES = {"model": "build_unet", "data": "build_source", "tracking": "RunTracker", "cli": "build_parser"}
warnings.simplefilter("always")
problems = []
for old, new in sorted(OLD_MODULES.items()):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if old in PROBES:
            namespace = {}
            exec(f"from unetlab.{old} import {PROBES[old]} as found", namespace)
            same = namespace["found"] is getattr(importlib.import_module("unetlab." + new), PROBES[old])
        else:
            same = importlib.import_module("unetlab." + old) is importlib.import_module("unetlab." + new)
    moved = [str(w.message) for w in caught if w.category.__name__ == "PluginDeprecationWarning"]
    if not same or len(moved) != 1 or "removed in 0.3" not in moved[0]:
        problems.append((old, same, moved))
print(json.dumps(problems))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", result.stdout


def test_an_unknown_old_name_is_still_an_attribute_error() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import unetlab.model

        with pytest.raises(AttributeError):
            unetlab.model.no_such_name  # noqa: B018


def test_the_readme_layout_section_names_every_module() -> None:
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme[readme.index("## Layout"):readme.index("## Benchmarks")]
    missing = [str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.rglob("*.py"))
               if p.name != "__init__.py" and f"`{p.name}`" not in section and p.name != "__main__.py"]
    assert not missing, f"README.md's Layout section does not name {missing}"
    for layer in LAYERS[2:]:
        assert f"`{layer}/`" in section, layer
