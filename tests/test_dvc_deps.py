"""dvc.yaml's code deps are exactly the code each stage runs, so `dvc repro` reruns a stage
when, and only when, code it runs changed.

The rule, read statically from the source (an AST walk, nothing imported), for the stage
``S`` that ``opensig S`` runs:

1. ``src/opensig/cli.py`` and ``src/opensig/stages.py`` count for every stage.
2. Of cli.py: its module-level imports (they run whenever ``opensig`` starts), and what the
   functions ``opensig S`` goes through use (the command ``S`` and ``_run_stage``), read as
   in rule 3.
3. Of stages.py, which imports every stage's library at module level: only what the stage
   function ``S`` uses: the modules of the names it takes from a module-level import, its
   own (lazy) imports, and the same for the functions, classes and constants of stages.py it
   names (``Layout``, ``init_source``...). A module a stage imports but never calls cannot
   change its outputs, and a change to stages.py itself reruns every stage anyway.
4. Every other opensig module reached counts with all its imports, at module level and
   inside functions (a lazy import runs when its function does), followed to the end.
   Imports under ``if TYPE_CHECKING:`` never run and are left out.
5. Importing ``opensig.data.scan`` runs ``opensig/__init__.py`` and
   ``opensig/data/__init__.py`` first: package files count too.
6. A file a module names beside itself (or a folder up) to have it run,
   ``Path(__file__).with_name("x.py")`` (tracking/packaging.py hands pyfunc_model.py to
   MLflow, which runs it while logging the model), counts like an import. Files only copied
   (register copies the package as the model's code) do not.

The other deps (data, artifacts) are not checked here.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = "opensig"
ENTRY_MODULES = ("opensig.cli", "opensig.stages")  # entered only through the stage's code


def module_file(name: str) -> Path | None:
    """The file of an opensig module or package, None for anything else."""
    if name != PACKAGE and not name.startswith(f"{PACKAGE}."):
        return None
    base = SRC.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@cache
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def with_packages(name: str) -> set[str]:
    """``name`` and the packages Python imports on the way to it."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def imported(node: ast.Import | ast.ImportFrom, importer: str) -> dict[str, str]:
    """Local name -> opensig module, for every opensig module an import statement loads."""
    found: dict[str, str] = {}
    if isinstance(node, ast.Import):
        for alias in node.names:
            if module_file(alias.name):
                found[alias.asname or alias.name.split(".")[0]] = alias.name
        return found
    assert not node.level, f"{importer}: a relative import; opensig imports absolutely"
    base = node.module or ""
    if not module_file(base):
        return found
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        found[alias.asname or alias.name] = sub if module_file(sub) else base
    return found


def type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """The import statements under ``if TYPE_CHECKING:``, which never run."""
    skipped: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(n for stmt in node.body for n in ast.walk(stmt))
    return skipped


def run_beside(name: str, node: ast.AST) -> str | None:
    """The module that ``Path(__file__).with_name("x.py")`` in module ``name`` names, or
    ``Path(__file__).parent.with_name("x.py")`` one folder up (rule 6)."""
    if not (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "with_name"
        and any(isinstance(n, ast.Name) and n.id == "__file__" for n in ast.walk(node.func))
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and str(node.args[0].value).endswith(".py")
    ):
        return None
    folder, path = name.split(".")[:-1], node.func.value
    while isinstance(path, ast.Attribute) and path.attr == "parent":
        folder, path = folder[:-1], path.value
    return ".".join([*folder, node.args[0].value.removesuffix(".py")])


def all_imports(name: str) -> set[str]:
    """Every opensig module ``name`` imports, at module level or inside a function (rule 4),
    and the files beside it that it hands over to be run (rule 6)."""
    tree = parse(module_file(name))
    skipped = type_checking_only(tree)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom) and node not in skipped:
            found.update(imported(node, name).values())
        elif beside := run_beside(name, node):
            found.add(beside)
    return found


def named_modules(name: str, entries: list[str]) -> set[str]:
    """The opensig modules that the top-level definitions ``entries`` of module ``name`` use
    (rule 3): names imported at module level, their own imports, and the same for every
    definition of that module they name."""
    tree = parse(module_file(name))
    defined: dict[str, ast.AST] = {}
    module_level: dict[str, str] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Import | ast.ImportFrom):
            module_level.update(imported(stmt, name))
        elif isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defined[stmt.name] = stmt
        elif isinstance(stmt, ast.Assign | ast.AnnAssign):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            defined.update({t.id: stmt for t in targets if isinstance(t, ast.Name)})
    missing = [entry for entry in entries if entry not in defined]
    assert not missing, f"{module_file(name)}: no top-level {missing}"
    found: set[str] = set()
    todo, seen = [defined[entry] for entry in entries], set()
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import | ast.ImportFrom):
                found.update(imported(sub, name).values())
            elif isinstance(sub, ast.Name) and sub.id in module_level:
                found.add(module_level[sub.id])
            elif isinstance(sub, ast.Name) and sub.id in defined:
                todo.append(defined[sub.id])
    return found


def stage_closure(stage: str) -> set[str]:
    """The files under src/ that ``opensig <stage>`` runs, by the rule of this module."""
    cli, stages = ENTRY_MODULES
    tree = parse(module_file(cli))
    start = {
        module
        for stmt in tree.body
        if isinstance(stmt, ast.Import | ast.ImportFrom)
        for module in imported(stmt, cli).values()
    }
    start |= named_modules(cli, [stage, "_run_stage"])
    start |= named_modules(stages, [STAGES[stage]])
    reached = {cli, stages}
    todo = [m for m in start if m not in ENTRY_MODULES]
    while todo:
        name = todo.pop()
        for module in with_packages(name) - reached:
            reached.add(module)
            if module not in ENTRY_MODULES:
                todo.extend(all_imports(module))
    return {module_file(m).relative_to(REPO).as_posix() for m in reached}


def stage_functions() -> dict[str, str]:
    """stages.STAGES, read from the source: stage name -> its function in stages.py."""
    for stmt in parse(module_file("opensig.stages")).body:
        if isinstance(stmt, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "STAGES" for t in stmt.targets
        ):
            return {k.value: v.id for k, v in zip(stmt.value.keys, stmt.value.values, strict=True)}
    raise AssertionError("src/opensig/stages.py: no STAGES")


STAGES = stage_functions()


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_every_command_stage_is_a_dvc_stage() -> None:
    declared = dvc_stages()
    assert sorted(declared) == sorted(STAGES)
    for name, stage in declared.items():
        assert stage["cmd"] == f"opensig {name}", f"dvc.yaml: stage {name} runs {stage['cmd']}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_code_deps_are_what_the_stage_runs(stage: str) -> None:
    deps = dvc_stages()[stage]["deps"]
    listed = {d for d in deps if d.startswith("src/")}
    runs = stage_closure(stage)
    problems = [f"{path} is missing (the stage runs it)" for path in sorted(runs - listed)]
    problems += [f"{path} is extra (the stage never runs it)" for path in sorted(listed - runs)]
    should_be = "\n".join(f"      - {path}" for path in sorted(runs))
    assert not problems, (
        f"dvc.yaml, stage {stage}: {'; '.join(problems)}. Its code deps:\n{should_be}"
    )


def test_the_walk_sees_lazy_imports_and_skips_type_checking() -> None:
    """The walk's own edge cases, on modules that have them today."""
    assert "opensig.monitoring.plots" in all_imports("opensig.monitoring.monitor")  # lazy
    assert "opensig.evaluation" not in all_imports("opensig.plots")  # TYPE_CHECKING only
    assert "src/opensig/train.py" in stage_closure("train")  # a lazy import in stages.train
    assert "src/opensig/train.py" not in stage_closure("evaluate")
    assert "src/opensig/data/__init__.py" in stage_closure("ingest")  # a package on the way
    assert "opensig.pyfunc_model" in all_imports("opensig.tracking.packaging")  # run by MLflow


# What only register runs: registering and judging, packaging, the served model, the
# prediction log. Training and tuning a model must not rerun when one of them changes.
REGISTER_ONLY = (
    "src/opensig/tracking/promotion.py",
    "src/opensig/tracking/packaging.py",
    "src/opensig/pyfunc_model.py",
    "src/opensig/monitoring/__init__.py",
    "src/opensig/monitoring/log.py",
    "src/opensig/predict.py",
    "src/opensig/decision.py",
)


@pytest.mark.parametrize("stage", ["train"])
def test_training_does_not_depend_on_registration_packaging_serving_or_monitoring(
    stage: str,
) -> None:
    deps = set(dvc_stages()[stage]["deps"])
    assert not deps & set(REGISTER_ONLY), (
        f"{stage} reruns when these change: {deps & set(REGISTER_ONLY)}"
    )
    assert set(REGISTER_ONLY) <= set(dvc_stages()["register"]["deps"])


def test_tuning_does_not_depend_on_registration_packaging_or_monitoring() -> None:
    deps = set(dvc_stages()["tune"]["deps"])
    assert not deps & set(REGISTER_ONLY[:5]), deps & set(REGISTER_ONLY[:5])
    assert "src/opensig/tracking/store.py" not in deps  # tune never talks to MLflow
