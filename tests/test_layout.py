"""The architecture the layout promises (README, docs/methods.md#layout), kept by an AST read of every import,
function-local ones included: the package edges point one way, eval's engine never imports the commands built on
it, no module imports a circle, and no module imports another module's private name."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "purify", "distill", "robust_data", "eval")
# what each package may import besides itself: core <- purify <- distill; core <- robust_data; eval above all
ALLOWED = {"core": set(), "purify": {"core"}, "distill": {"core", "purify"}, "robust_data": {"core"},
           "eval": {"core", "purify", "distill", "robust_data"}}
# eval's layers, lowest first: a module may import its own layer's modules and those below
EVAL_LAYERS = ({"eval.stats", "eval.defended", "eval.plots"}, {"eval.attacks"}, {"eval.harness"},
               {"eval.robustness", "eval.certify", "eval.bench"}, {"eval.quickstart", "eval.__main__", "eval"})


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for pkg in PACKAGES if (root / pkg).is_dir() for p in (root / pkg).rglob("*.py")}


def imports(name: str, path: Path, known: dict) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement of one module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:  # `from pkg import name` runs pkg/__init__, and imports pkg.name where it is a module
                sub = f"{target}.{a.name}"
                out.append((target, [] if sub in known else [a.name], node.lineno))
                if sub in known:
                    out.append((sub, [], node.lineno))
    return out


def violations(root: Path = ROOT) -> list[str]:
    """Every import that breaks the layout's rules, in words."""
    known, found, graph = modules(root), [], {}
    for name, path in known.items():
        top = name.split(".")[0]
        graph[name] = set()
        for target, names, line in imports(name, path, known):
            other = target.split(".")[0]
            if other not in PACKAGES:
                continue
            where = f"{path.relative_to(root)}:{line}"
            if other != top and other not in ALLOWED[top]:
                found.append(f"{where}: {top} imports {target} (allowed: {', '.join(sorted(ALLOWED[top])) or 'none'})")
            if top == "eval" and other == "eval" and None in (_layer(name), _layer(target)):
                found.append(f"{where}: {name} or {target} lies in none of eval's layers (EVAL_LAYERS)")
            elif top == "eval" and other == "eval" and _layer(target) > _layer(name):
                found.append(f"{where}: {name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})")
            found += [f"{where}: {name} imports the private name {n} of {target}" for n in names
                      if n.startswith("_") and not n.startswith("__") and target != name]
            # importing a.b.c first runs a/__init__ and a/b/__init__: edges too, but for the importer's own packages
            chain = [".".join(target.split(".")[:i]) for i in range(1, target.count(".") + 2)]
            graph[name].update(t for t in chain if t in known and t != name and not name.startswith(t + "."))
    return found + [f"import circle: {' -> '.join(c)}" for c in _circles(graph)]


def _layer(name: str) -> int | None:
    return next((i for i, layer in enumerate(EVAL_LAYERS)
                 if name in layer or any(name.startswith(m + ".") for m in layer if m != "eval")), None)


def _circles(graph: dict) -> list[list[str]]:
    """One path round each circle of module imports that a depth-first walk meets."""
    state, stack, out = {}, [], []

    def walk(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                out.append(stack[stack.index(t):] + [t])
            elif t not in state:
                walk(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m)
    return out


def test_the_layout_keeps_its_rules():
    assert violations() == []


def test_the_check_finds_an_edge_added_the_wrong_way(tmp_path):
    """The same check on a copy of the tree with one bad edge of each kind added: each is named."""
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            (tmp_path / p.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / p.relative_to(ROOT)).write_text(p.read_text())
    assert violations(tmp_path) == []
    with (tmp_path / "distill" / "teacher.py").open("a") as f:
        f.write("\nfrom eval.harness import evaluate  # noqa\n")
    with (tmp_path / "eval" / "harness" / "budget.py").open("a") as f:
        f.write("\nfrom ..robustness.config import EvalConfig  # noqa\n")
    with (tmp_path / "eval" / "stats.py").open("a") as f:
        f.write("\nfrom eval.harness.evaluate import _dtype_of  # noqa\n")
    with (tmp_path / "eval" / "bench" / "__init__.py").open("a") as f:  # a circle through a package's __init__ only
        f.write("\nfrom ..certify import Smoothing  # noqa\n")
    found = "\n".join(violations(tmp_path))
    assert "distill imports eval.harness" in found
    assert "eval.harness.budget (layer 2) imports eval.robustness.config (layer 3)" in found
    assert "imports the private name _dtype_of of eval.harness.evaluate" in found
    assert "import circle: " in found
    assert any(c.startswith("import circle: ") and "eval.bench" in c and "eval.certify" in c for c in found.splitlines())


def test_import_eval_loads_the_harness_only():
    import subprocess
    import sys

    code = ("import sys, eval; "
            "heavy = [m for m in ('distill', 'robust_data', 'matplotlib', 'eval.quickstart') if m in sys.modules]; "
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_an_import_of_the_flat_layout_names_the_new_place():
    import pytest

    import eval  # noqa: F401

    with pytest.raises(ModuleNotFoundError, match="eval.budget moved to eval.harness.budget"):
        import eval.budget  # noqa: F401
