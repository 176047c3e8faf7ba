"""The module layers of docs/architecture.md: imports go down (or sideways), never up, and there is no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [  # docs/architecture.md, "Module layers"; one set per layer, lowest first
    {"errors", "report", "fidelity", "model_io", "data", "graph_utils", "channel_fold", "custom_op_functions", "runtime",
     "ternary", "already_ternary", "scales", "packing", "fitting", "correction"},
    {"passes"},
    {"calibration", "segments", "blockwise", "layerwise", "evaluate"},
    {"stages"}, {"mixed"}, {"pipeline"},  # conversion: strictly stages -> mixed -> pipeline
    {"compare", "sweep", "view", "reference"},
    {"cli", "console", "__init__"},
]


def _module_files() -> dict[str, Path]:
    files = {path.stem: path for path in (ROOT / "fgq_onnx").glob("*.py")}
    files.update({f"passes.{path.stem}": path for path in (ROOT / "passes").glob("*.py")})
    return files


def _imports(path: Path) -> set[str]:
    """fgq_onnx modules `path` imports, anywhere in the file (function-local imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "fgq_onnx":
            found |= {alias.name for alias in node.names if alias.name != "__version__"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fgq_onnx."):
            found.add(node.module.removeprefix("fgq_onnx."))
        elif isinstance(node, ast.Import):
            found |= {alias.name.removeprefix("fgq_onnx.") for alias in node.names if alias.name.startswith("fgq_onnx.")}
    return found


def _layer(module: str) -> int:
    key = "passes" if module.startswith("passes.") else module
    matches = [index for index, layer in enumerate(LAYERS) if key in layer]
    assert matches, f"{module} is in no layer of docs/architecture.md"
    return matches[0]


def test_every_import_goes_down_or_sideways():
    upward = []
    for module, path in _module_files().items():
        for imported in _imports(path):
            if _layer(imported) > _layer(module):
                upward.append(f"{module} (layer {_layer(module)}) imports {imported} (layer {_layer(imported)})")
    assert not upward, upward


def test_no_import_cycle():
    graph = {module: _imports(path) & set(_module_files()) for module, path in _module_files().items()}
    visiting, done = set(), set()

    def visit(module: str, trail: list[str]) -> None:
        assert module not in visiting, " -> ".join([*trail, module])
        if module in done:
            return
        visiting.add(module)
        for imported in sorted(graph[module]):
            visit(imported, [*trail, module])
        visiting.discard(module)
        done.add(module)

    for module in graph:
        visit(module, [])
