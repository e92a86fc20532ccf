"""Which of the project's packages imports which (module-level and function-level imports
alike), read from the source with `ast`; an edge in both directions is a cycle.

    python benchmarks/import_graph.py [ROOT]

ROOT: a checkout (default: this one). Packages: `sharding`, a top-level `convert` and
`nnxtools` where a checkout has them, and each subpackage or top module of `jaxfusion`
(`jaxfusion.models`, `jaxfusion.cli`, ...; `jaxfusion` itself for its `__init__`).
"""

import ast
import sys
from collections import defaultdict
from pathlib import Path


def package_of(module: str) -> str | None:
    """The package a dotted module name belongs to, or None outside the project."""
    parts = module.split(".")
    if parts[0] in ("sharding", "convert", "nnxtools"):
        return parts[0]
    if parts[0] == "jaxfusion":
        return ".".join(parts[:2])
    return None


def module_name(root: Path, file: Path) -> str:
    parts = list(file.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(file: Path, module: str, modules: set[str]) -> set[str]:
    """The modules `file` (module `module`) imports; `from package import submodule` counts
    as an import of the submodule only (`modules`: every module of the checkout)."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level or None]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            names = {f"{name}.{alias.name}" for alias in node.names}
            found |= names & modules if names <= modules else names | {name}
    return found


def graph(root: Path) -> dict[str, set[str]]:
    files = [
        file
        for top in ("nnxtools", "sharding", "convert", "jaxfusion")
        if (root / top).is_dir()
        for file in sorted((root / top).rglob("*.py"))
    ]
    modules = {module_name(root, file) for file in files}
    edges: dict[str, set[str]] = defaultdict(set)
    for file in files:
        module = module_name(root, file)
        source = package_of(module)
        for name in imported_modules(file, module, modules):
            target = package_of(name)
            if target and target != source:
                edges[source].add(target)
    return edges


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)
    edges = graph(root)
    for source in sorted(edges):
        print(f"{source} -> {', '.join(sorted(edges[source]))}")
    cycles = sorted(
        {tuple(sorted((a, b))) for a in edges for b in edges[a] if a in edges.get(b, ())}
    )
    print("cycles (two packages importing each other):", cycles or "none")


if __name__ == "__main__":
    main()
