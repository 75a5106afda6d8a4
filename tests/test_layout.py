"""Imports point down: entry points -> demo/study -> pipeline -> training/sampling/evaluate/analyze -> inference ->
weights -> registry/data -> diffusion/models -> config. A module that imports one of a higher layer is listed here
with the reason, so a new upward import fails this test instead of growing a cycle."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dit_moe"

# Higher number: higher layer (may import any lower one).
LAYER = {
    "cli": 9, "__main__": 9,
    "demo": 8, "study": 8,
    "pipeline": 7,
    "training": 6, "sampling": 6, "evaluate": 6, "analyze": 6, "extract": 6,
    "inference": 5,
    "weights": 4, "features": 4, "memory": 4,
    "registry": 3, "validation": 3, "data": 3,
    "diffusion": 2, "models": 2,
    "config": 1, "checks": 1,
    "errors": 0,
}

# (importing module, imported top-level name) -> why it may point up.
ALLOWED = {
    # Each command's argparse module mounts the shared flag groups and calls run_command of dit_moe/cli.py; cli.py
    # reaches the commands only through module names it imports when a command runs.
    **{(m, "cli"): "command-line module" for m in (
        "dit_moe.analyze.cli", "dit_moe.evaluate.cli", "dit_moe.sampling.cli", "dit_moe.sampling.flags",
        "dit_moe.study.cli", "dit_moe.extract", "dit_moe.demo", "dit_moe.weights.convert", "dit_moe.weights.upcycle")},
    ("dit_moe.config", "validation"): "load_config validates; validation reads config's sections (import in function)",
    ("dit_moe.weights.diffusers_moe", "inference"): "the diffusers pipeline is built from the bundle sampling uses",
    ("dit_moe.weights.diffusers_moe", "sampling"): "... and from the sampling defaults of the checkpoint",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str):
    """(line, absolute dit_moe module) of every import in the file, relative ones resolved."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                if node.module:
                    yield node.lineno, ".".join(base + [node.module])
                else:
                    yield from ((node.lineno, ".".join(base + [a.name])) for a in node.names)
            elif node.module and node.module.startswith("dit_moe"):
                yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names if a.name.startswith("dit_moe"))


def test_every_top_level_module_has_a_layer():
    names = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").is_file()) and p.name != "__init__.py"}
    assert names - set(LAYER) == set(), "give the new module a layer in LAYER"


def test_imports_point_down():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        mine = name.split(".")[1] if "." in name else None
        for line, target in _imports(path, name):
            theirs = target.split(".")[1] if "." in target else None
            if mine is None or theirs is None or theirs == mine:
                continue
            if LAYER[theirs] > LAYER[mine] and (name, theirs) not in ALLOWED:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name} imports {target}")
    assert upward == [], "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_models_never_import_training_and_routers_never_import_the_dit():
    for path in (PACKAGE / "models").rglob("*.py"):
        for line, target in _imports(path, _module_name(path)):
            assert not target.startswith(("dit_moe.training", "dit_moe.sampling")), f"{path}:{line}: {target}"
            if "routers" in path.parts:
                assert target != "dit_moe.models.dit", f"{path}:{line}"
