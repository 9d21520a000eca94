"""The package's imports run one way: layers <- models; models, data, eval <- train <- tasks <- apps."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mae_vit"
# A part may import parts of a lower level only (and itself). export stands beside train, bench beside tasks.
LEVEL = {"errors": 0, "files": 0, "layers": 1, "models": 2, "checkpoint": 2, "data": 2, "eval": 2, "viz": 2,
         "config": 2, "train": 3, "export": 3, "tasks": 4, "bench": 4, "apps": 5}


def imports_of(path: Path):
    """The mae_vit parts (first name after `mae_vit.`) and outside packages that a file imports anywhere in it."""
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            yield name


def part_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def test_every_part_of_the_package_has_a_level():
    parts = {part_of(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert parts == set(LEVEL)


def test_imports_run_from_lower_levels_to_higher_ones_only():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue
        here = part_of(path)
        for name in imports_of(path):
            if name.startswith("mae_vit.") and name.split(".")[1] in LEVEL:
                there = name.split(".")[1]
                if there != here and LEVEL[there] >= LEVEL[here]:
                    wrong.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert wrong == []


def test_nothing_below_the_train_layer_reads_config_objects():
    below = [p for p in PACKAGE.rglob("*.py") if part_of(p) not in ("config", "__init__") and LEVEL[part_of(p)] < 3]
    users = [str(p.relative_to(PACKAGE)) for p in below
             if any(n.split(".")[0] == "omegaconf" or n.startswith("mae_vit.config") for n in imports_of(p))]
    assert users == []
