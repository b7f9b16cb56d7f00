"""The package's shape holds: imports point one way between concerns, no module cycles, no torch at import.

``docs/architecture`` in CONTRIBUTING.md draws the layers; these tests keep the code to the drawing, so a
convenient import that turns the picture into a tangle fails here rather than in a review.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lora_deploy

PKG = Path(lora_deploy.__file__).parent
# highest first: a module may import its own package and any package below it, never one above
LAYERS = ("cli", "examples", "k8s", "plan", "serve", "merge", "model")
BASE = ("errors", "_files", "hub", "objstore", "output", "prompts")  # the bottom: files, errors, output, hub references


def _modules() -> dict[str, Path]:
    found = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every lora_deploy module ``name`` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora_deploy"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("lora_deploy"))
    out.discard(name)
    return out


def _layer(module: str) -> int:
    """The rank of a module's package: the base modules lowest, ``cli`` (and ``__main__``) highest."""
    parts = module.split(".")
    if parts[-1] == "__main__":
        return len(LAYERS)
    if len(parts) == 1 or parts[1] in BASE:
        return 0
    return len(LAYERS) - LAYERS.index(parts[1])


def _upward(modules: dict[str, Path]) -> list[str]:
    """``A imports B`` for every import from one package into a higher one."""
    return sorted(
        f"{name} imports {target}"
        for name, path in modules.items()
        for target in _imports(name, path, modules)
        if _layer(target) > _layer(name) and target.split(".")[:2] != name.split(".")[:2]
    )


def test_imports_point_down_the_layers():
    upward = _upward(_modules())
    assert not upward, "imports that point up the layers " + str(LAYERS) + ":\n" + "\n".join(upward)


def _cycles(modules: dict[str, Path]) -> list[str]:
    """Import cycles between modules (package ``__init__`` re-exports left out: they only gather names)."""
    graph = {
        name: {t for t in _imports(name, path, modules) if t in modules and modules[t].name != "__init__.py"}
        for name, path in modules.items()
    }
    cycles: list[str] = []
    state: dict[str, str] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                path = stack + [node]
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    return cycles


def test_no_import_cycles_between_modules():
    cycles = _cycles(_modules())
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    """Both checks can fail: a model module that imports the merge engine is reported as upward, and two merge
    modules that import each other as a cycle."""
    modules = _modules()
    fake = tmp_path / "adapter.py"
    fake.write_text("from lora_deploy.merge.plan import plan_merge\n")
    assert _upward({**modules, "lora_deploy.model.adapter": fake}) == [
        "lora_deploy.model.adapter imports lora_deploy.merge.plan"
    ]
    back = tmp_path / "compute.py"
    back.write_text("def f():\n    from lora_deploy.merge.values import compute_value\n")
    assert any(
        "lora_deploy.merge.compute" in c and "lora_deploy.merge.values" in c
        for c in _cycles({**modules, "lora_deploy.merge.compute": back})
    )


def test_every_library_module_imports_without_torch():
    """Importing the library (everything but the examples, which build models) loads no torch, transformers or
    vLLM: `lora-deploy --help`, the smoke Job and pre-flight stay fast, and model/ is readable anywhere."""
    names = sorted(n for n in _modules() if ".examples" not in n and not n.endswith("__main__"))
    code = (
        "import importlib, sys\n"
        f"for n in {names!r}: importlib.import_module(n)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'vllm') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"importing the library loaded {done.stdout.strip()}"


def test_every_name_imported_from_the_package_exists():
    """Imports inside functions run only when their command does: a name moved or renamed would fail one user's
    command at run time. Every ``from lora_deploy... import NAME`` in the package names something that exists."""
    import importlib

    missing = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora_deploy"):
                module = importlib.import_module(node.module)
                missing += [
                    f"{name}: from {node.module} import {a.name}"
                    for a in node.names
                    if not hasattr(module, a.name) and f"{node.module}.{a.name}" not in _modules()
                ]
    assert not missing, "imports of names that do not exist:\n" + "\n".join(missing)


def test_one_error_class_per_exit_code_and_no_hand_picked_codes():
    """Errors carry their kind, and the kind carries the code: every exit code of the table that an error can
    mean has exactly one class, and no library call passes ``exit_code=`` (the old hand-picked integers)."""
    from lora_deploy import errors

    codes = {n: v for n, v in vars(errors).items() if n.startswith("EXIT_")}
    kinds = {
        c.exit_code: c
        for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, errors.LoraDeployError) and c is not errors.HttpError
    }
    raised = set(codes.values()) - {errors.EXIT_OK, errors.EXIT_USAGE, errors.EXIT_INTERRUPTED}
    assert set(kinds) == raised, (sorted(kinds), sorted(raised))
    assert errors.HttpError("x", status=404, detail="y").exit_code == errors.EXIT_SMOKE
    passing = [
        f"{path.relative_to(PKG)}:{node.lineno}"
        for path in PKG.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.keyword) and node.arg in ("exit_code", "failure_exit")
    ]
    assert passing == [], passing


def test_no_test_module_imports_another_or_the_conftest():
    """Tests import helpers by name from helpers.py (and k8s_cases.py, fleet_harness.py...); a test module or
    conftest.py imported elsewhere runs its tests or hooks twice and hides what is shared."""
    tests = Path(__file__).parent
    found = [
        f"{path.name}:{node.lineno} imports {node.module}"
        for path in sorted(tests.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0].startswith(("test_", "conftest"))
    ]
    assert found == [], found


def test_wide_records_and_functions_are_keyword_only():
    """A record of more than 4 fields is kw_only, and no library function takes more than 5 arguments by position:
    a new field or parameter can then never shift the values of a positional call (typer commands, whose
    parameters are options, are exempt)."""
    import ast

    wide = []
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text())
        where = path.relative_to(PKG)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for deco in node.decorator_list:
                    call = deco if isinstance(deco, ast.Call) else None
                    name = getattr(call.func if call else deco, "id", getattr(call.func if call else deco, "attr", ""))
                    if name != "dataclass":
                        continue
                    fields = [s for s in node.body if isinstance(s, ast.AnnAssign)]
                    kw_only = any(
                        k.arg == "kw_only" and getattr(k.value, "value", False) for k in (call.keywords if call else [])
                    )
                    if len(fields) > 4 and not kw_only:
                        wide.append(
                            f"{where}:{node.lineno} dataclass {node.name} ({len(fields)} fields) is not kw_only"
                        )
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "cli" not in where.parts:
                positional = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
                if len(positional) > 5:
                    wide.append(f"{where}:{node.lineno} {node.name}() takes {len(positional)} arguments by position")
    assert not wide, "\n".join(wide)
