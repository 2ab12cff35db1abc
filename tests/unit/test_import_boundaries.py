"""The product (``server/``, ``feature_streams/``) imports nothing from the development
tree (``bench/``, ``devstack/``, ``demo/``): not at module level, not inside a function,
not through ``importlib.import_module("...")``. The image ships without them."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("server", "feature_streams")
FORBIDDEN = frozenset({"bench", "devstack", "demo"})
_DYNAMIC = frozenset({"import_module", "__import__"})


def imported_modules(
    source: str, module: str, *, is_package: bool = False
) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source`` (the text of
    ``module``), at any depth: relative imports are resolved against ``module``."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            if node.module:
                yield node.lineno, name
            else:  # `from .. import x`: each x is a module
                for alias in node.names:
                    yield node.lineno, f"{name}.{alias.name}" if name else alias.name
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if (
                called in _DYNAMIC
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                yield node.lineno, first.value


def forbidden_imports(root: Path = ROOT) -> list[str]:
    """``path:line: module`` for every import of the development tree by the product."""
    found = []
    for package in PRODUCT:
        for path in sorted((root / package).rglob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            parts = path.relative_to(root).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            module = ".".join(parts[:-1] if is_package else parts)
            for line, name in imported_modules(path.read_text(), module, is_package=is_package):
                if name.split(".")[0] in FORBIDDEN:
                    found.append(f"{path.relative_to(root)}:{line}: {name}")
    return found


def test_product_imports_no_bench_devstack_or_demo_code() -> None:
    assert forbidden_imports() == []


def test_no_demo_module_inside_the_product() -> None:
    """Demo data and training live in the top-level ``demo`` package only."""
    inside = [
        str(path.relative_to(ROOT))
        for package in PRODUCT
        for path in (ROOT / package).rglob("demo*")
    ]
    assert inside == []


def test_the_walk_sees_function_level_relative_and_dynamic_imports() -> None:
    source = (
        "import importlib\n"
        "def f():\n"
        "    from devstack.stack import main\n"
        "    import bench.histogram as h\n"
        "    return importlib.import_module('demo.train')\n"
        "from ... import demo\n"
    )
    names = {name for _, name in imported_modules(source, "server.records.probe")}
    assert {"devstack.stack", "bench.histogram", "demo.train", "demo"} <= names


def test_the_walk_flags_todays_offenders(tmp_path: Path) -> None:
    """What the tree held before the split: replay importing bench, cli importing devstack."""
    (tmp_path / "server" / "records").mkdir(parents=True)
    (tmp_path / "feature_streams").mkdir()
    (tmp_path / "server" / "records" / "replay.py").write_text(
        "from bench.histogram import LatencyHistogram\n"
    )
    (tmp_path / "server" / "cli.py").write_text(
        "def main():\n    from devstack.stack import main as main_dev\n"
    )
    (tmp_path / "feature_streams" / "demo_batch.py").write_text("import demo.synthetic\n")
    assert forbidden_imports(tmp_path) == [
        "server/cli.py:2: devstack.stack",
        "server/records/replay.py:1: bench.histogram",
        "feature_streams/demo_batch.py:1: demo.synthetic",
    ]
