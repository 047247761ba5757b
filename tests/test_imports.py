"""The PyTorch core runs alone: importing it must not pull in Ray, Optuna or MLflow."""

import subprocess
import sys


def test_core_imports_no_ray_optuna_mlflow() -> None:
    code = (
        "import sys\n"
        "import ancra_tune, ancra_tune.config, ancra_tune.data, ancra_tune.models, ancra_tune.attacks\n"
        "import ancra_tune.losses, ancra_tune.negatives, ancra_tune.trainer, ancra_tune.checkpoint\n"
        "import ancra_tune.validation, ancra_tune.robustness, ancra_tune.metric_names\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'optuna', 'mlflow'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core imported: {out.stdout.strip()}"


def test_the_core_never_imports_the_outer_layer() -> None:
    """Data flows one way: no module of ancra_tune imports trainables (the Ray/MLflow layer), not even
    inside a function; the command line lives in the outer layer (trainables.cli)."""
    import ast
    from pathlib import Path

    core = Path(__file__).resolve().parents[1] / "ancra_tune"
    offenders = []
    for f in sorted(core.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{f.relative_to(core.parent)}:{node.lineno}: {n}" for n in names
                          if n.split(".")[0] == "trainables"]
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("trainables."):
                offenders.append(f"{f.relative_to(core.parent)}:{node.lineno}: {node.value!r}")  # sys.modules lookups
    assert not offenders, offenders


def test_every_import_of_the_projects_own_modules_resolves() -> None:
    """Imports inside functions run only when their code path does (an MLflow backlog, a report, a
    sharded evaluation): after code moves between rooms, a stale one fails there, late. Each import of
    ancra_tune or trainables, at any depth, relative or absolute, must name a module and its names."""
    import ast
    import importlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    bad = []
    for package in ("ancra_tune", "trainables"):
        for f in sorted((root / package).rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            pkg = list(parts if f.name == "__init__.py" else parts[:-1])
            if f.name == "__init__.py":
                pkg = pkg[:-1] if pkg[-1] == "__init__" else pkg
            for node in ast.walk(ast.parse(f.read_text())):
                if not isinstance(node, ast.ImportFrom):
                    continue
                if node.level:
                    base = pkg[:len(pkg) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                elif node.module and node.module.split(".")[0] in ("ancra_tune", "trainables"):
                    target = node.module
                else:
                    continue
                try:
                    module = importlib.import_module(target)
                except ImportError as e:
                    bad.append(f"{f.relative_to(root)}:{node.lineno}: {e}")
                    continue
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{target}.{alias.name}")
                        except ImportError:
                            bad.append(f"{f.relative_to(root)}:{node.lineno}: {target} has no {alias.name}")
    assert not bad, bad
