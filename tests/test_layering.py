"""The structure of docs/architecture.md, enforced: a ground floor every stage shares, stages side
by side (none imports another), the pipeline layer above them, entrances on top."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tinymim"
GROUND = {"config", "presets", "devices", "distributed", "data", "models", "checkpoints", "attention", "evaluation",
          "engine", "stats", "reports"}
STAGES = {"mae": "mae", "distill": "pretrain", "pretrain": "pretrain", "finetune": "finetune",
          "segmentation": "segmentation", "robustness": "robustness", "viz": "viz"}  # module -> stage
LAYER = {**{m: 0 for m in GROUND}, **{m: 1 for m in STAGES}, "stages": 2, "pipeline": 2, "launch": 2, "cluster": 2, "doctor": 2,
         "explore": 2, "bench": 2, "bench_report": 0, "runner": 3, "study": 3, "__main__": 4}


def _imports(path: Path, package: Path = PACKAGE) -> set[str]:
    """Top-level tinymim modules that `path` imports (relative or absolute, anywhere in it)."""
    depth = len(path.relative_to(package).parts) - 1  # 0 for tinymim/x.py, 1 for tinymim/data/x.py
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 < depth:  # inside the same sub-package
                    continue
                parts = (node.module or "").split(".")
                if node.module:
                    out.add(parts[0])
                else:
                    out.update(alias.name for alias in node.names)
            elif node.module and node.module.split(".")[0] == "tinymim":
                parts = node.module.split(".")
                out.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("tinymim."))
    return out - {"resources"}


def _graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        name = path.relative_to(package).parts[0].removesuffix(".py")
        if name in ("__init__", "resources"):
            continue
        graph.setdefault(name, set()).update(_imports(path, package) - {name})
    return graph


def _violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, imports in graph.items():
        for dep in imports:
            if LAYER[dep] > LAYER[module]:
                problems.append(f"{module} (layer {LAYER[module]}) imports {dep} (layer {LAYER[dep]})")
            elif LAYER[dep] == LAYER[module] == 1 and STAGES[dep] != STAGES[module]:
                problems.append(f"stage module {module} imports stage module {dep}")
    return problems


def test_every_module_has_a_layer():
    assert set(_graph()) == set(LAYER), "add new modules to the layer map of this test (and docs/architecture.md)"


def test_imports_only_point_down_and_stages_stand_side_by_side():
    problems = _violations(_graph())
    assert not problems, "\n".join(problems)


def test_config_is_the_bottom():
    assert _graph()["config"] == set()


def test_the_checker_sees_violations(tmp_path):
    pkg = tmp_path / "tinymim"
    (pkg / "data").mkdir(parents=True)
    (pkg / "robustness.py").write_text("def f():\n    from .finetune import predict\n")
    (pkg / "engine.py").write_text("from tinymim import pipeline\n")
    (pkg / "data" / "x.py").write_text("from ..models import build_model\nfrom .folders import y\n")
    graph = _graph(pkg)
    assert graph == {"robustness": {"finetune"}, "engine": {"pipeline"}, "data": {"models"}}
    assert len(_violations(graph)) == 2  # a stage importing a stage; the ground floor importing the pipeline


def test_only_the_registry_names_a_stage_and_nothing_imports_by_string():
    """The stage registry (stages.py) is the one list of stages: no module builds a stage's
    module name as a string (importlib) or keeps a table of stage names of its own."""
    names = {"mae", "pretrain", "finetune", "segmentation"}
    problems = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "__import__"):
                problems.append(f"{path.name}: imports by string")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("tinymim."):
                if node.value.split(".")[1] in STAGES:
                    problems.append(f"{path.name}: names {node.value!r}")
            if isinstance(node, ast.Dict) and path.name != "stages.py":
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                if len(keys & names) >= 3:  # a table keyed by stage names: a second registry
                    problems.append(f"{path.name}: a table of stages {sorted(keys & names)}")
    assert not problems, problems
