"""The package's shape: layers import only downwards, the core knows neither Flask nor Redis,
the HTTP layer holds no Redis key and no Label Studio wire format, and modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "backend" / "lookalike"
# Lower layers first; a module may import its own layer and the ones before it.
LAYERS = ["base", "core", "service", "web", "cli"]
BASE_MODULES = {"lookalike", "lookalike.errors", "lookalike.config", "lookalike.timeouts"}
MAX_LINES = 400


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    if module in BASE_MODULES:
        return "base"
    return module.split(".")[1]


def _imports(path: Path) -> list[str]:
    """Every module imported anywhere in the file (lazy imports in functions included)."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _lookalike_imports(path: Path) -> set[str]:
    """Imported lookalike modules (a `from pkg import name` counts when name is a module)."""
    out = set()
    for name in _imports(path):
        if not name.startswith("lookalike.") and name != "lookalike":
            continue
        parts = name.split(".")
        while parts and not _exists(".".join(parts)):
            parts.pop()
        if parts:
            out.add(".".join(parts))
    return out


def _exists(module: str) -> bool:
    relative = Path(*module.split("."))
    root = PACKAGE.parent
    return (root / relative).with_suffix(".py").exists() or (
        root / relative / "__init__.py"
    ).exists()


def test_the_tree_shows_the_layers() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == {"core", "service", "web", "cli"}
    assert not (PACKAGE / "devstack.py").exists() and not (PACKAGE / "demo.py").exists()


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_imports_only_go_downwards(path: Path) -> None:
    module = _name(path)
    rank = LAYERS.index(_layer(module))
    upward = sorted(
        imported for imported in _lookalike_imports(path) if LAYERS.index(_layer(imported)) > rank
    )
    assert upward == [], f"{module} imports a higher layer"


@pytest.mark.parametrize("path", sorted((PACKAGE / "core").rglob("*.py")), ids=_name)
def test_the_core_knows_neither_flask_nor_redis(path: Path) -> None:
    third_party = {name.split(".")[0] for name in _imports(path)}
    assert not third_party & {"flask", "werkzeug", "redis", "rq", "label_studio_sdk"}


def test_the_runtime_package_does_not_import_dev_tooling_at_module_level() -> None:
    for path in _modules():
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.startswith("lookalike_dev")], _name(path)


@pytest.mark.parametrize("path", sorted((PACKAGE / "web").rglob("*.py")), ids=_name)
def test_the_http_layer_holds_no_redis_key_and_no_label_studio_wire_format(path: Path) -> None:
    text = path.read_text()
    for marker in ("lookalike:", "from_name", "to_name", "rectanglelabels", "import redis\n"):
        if marker == "import redis\n" and path.name == "app.py":
            continue  # the one place Redis errors are mapped to 503
        assert marker not in text, f"{path.name} holds {marker!r}"


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_no_module_is_over_400_lines(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= MAX_LINES
