"""The project's layout: imports point one way, ``utils/`` is packages, ``--help`` is grouped.

The import graph is read from the sources (every ``import`` statement, deferred ones inside
functions included), so a cycle hidden behind a lazy import fails here too.
"""
import argparse
import ast
import subprocess
import sys

from conftest import REPO

PACKAGES = ("data", "models", "losses", "utils")
UTILS_PACKAGES = ("checkpoints", "retrieval", "training", "cli", "comparison")


def project_modules() -> dict[str, object]:
    modules = {}
    for top in PACKAGES:
        for path in (REPO / top).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imported(name: str, path, node: ast.AST, modules: dict) -> set[str]:
    """The project modules one import statement of module ``name`` (file ``path``) loads."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            package = package[:len(package) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
    found = set()
    for target in targets:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[name] = set().union(*(imported(name, path, node, modules) for node in ast.walk(tree)
                                    if isinstance(node, (ast.Import, ast.ImportFrom))))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_project():
    graph = import_graph()
    assert len(graph) > 60
    assert find_cycle(graph) is None


def test_model_data_and_losses_import_nothing_from_utils():
    for name, targets in import_graph().items():
        if name.split(".")[0] in ("data", "models", "losses"):
            assert not [t for t in targets if t.split(".")[0] == "utils"], name


def test_utils_packages_import_one_way():
    """cli -> training -> retrieval -> checkpoints, and comparison on top: no arrow back."""
    order = ["checkpoints", "retrieval", "training", "cli", "comparison"]
    for name, targets in import_graph().items():
        parts = name.split(".")
        if parts[0] != "utils" or len(parts) < 2 or parts[1] not in order:
            continue
        for target in targets:
            tparts = target.split(".")
            if tparts[0] == "utils" and len(tparts) > 1 and tparts[1] in order:
                assert order.index(tparts[1]) <= order.index(parts[1]), (name, target)


def test_utils_is_packages_and_a_few_shared_modules():
    top_modules = [p.name for p in (REPO / "utils").glob("*.py") if p.name != "__init__.py"]
    assert len(top_modules) <= 6, top_modules
    for package in UTILS_PACKAGES:
        assert (REPO / "utils" / package / "__init__.py").is_file(), package


def test_help_shows_argument_groups():
    out = subprocess.run([sys.executable, str(REPO / "opqn_main.py"), "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    titles = [line[:-1] for line in out.stdout.splitlines()
              if line.endswith(":") and not line.startswith(" ")]
    for title in ("what to run", "model and code", "training", "evaluation", "search",
                  "methods", "data", "runtime"):
        assert any(t.startswith(title) for t in titles), (title, titles)
    options = out.stdout.split("\noptions:", 1)[1]  # the groups, after the usage line
    assert options.index("--evaluate") < options.index("--len") < options.index("--epochs")


def test_settings_take_the_flags_and_keep_not_given_as_none():
    import opqn_main
    from utils.cli.settings import RunSettings
    from models.methods import get_method

    args = opqn_main.build_parser().parse_args(
        ["--dataset", "synthface", "--len", "12", "--bs", "8", "--method", "gpq", "--gpq-beta",
         "2", "--no-progress", "--query", "a.jpg", "b.jpg", "--load", "m.tar", "--workers", "0"])
    run = RunSettings.from_args(args)
    assert run.data.dataset == "synthface" and run.data.loader_workers() == 0
    assert run.data.progress is False and run.output.progress is False
    assert run.training.batch_size == 8 and run.evaluation.inference_batch == 8
    assert run.training.epochs is None and run.model.width is None
    assert run.model.method == "gpq" and run.model.method_fields["gpq_beta"] == 2.0
    assert set(run.model.method_fields) == set(get_method("gpq").param_names())
    assert run.search.load == "m.tar" and run.search.query == ("a.jpg", "b.jpg")
    default = RunSettings.from_args(argparse.Namespace())
    assert default.model.method is None and default.model.method_name == "opqn"
    assert default.evaluation.inference_batch == 256


def test_no_file_cites_a_document_the_repository_lacks():
    """The project explains itself: nothing points at an outside "SPEC"."""
    import re

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    offenders = []
    for name in tracked:
        text_file = name.endswith((".py", ".md", ".txt", ".toml", ".cfg"))
        if not text_file or name == "tests/test_layout.py":
            continue
        text = (REPO / name).read_text(encoding="utf-8", errors="replace")
        offenders += [f"{name}:{i}" for i, line in enumerate(text.splitlines(), 1)
                      if re.search(r"\bSPEC\b", line)]
    assert offenders == []


def test_no_script_patches_sys_path():
    """Scripts run as modules from the repository root (``python -m bench.bench_ivf``,
    ``python -m utils.comparison``); pytest finds the packages through pytest.ini."""
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    patched = [name for name in tracked if name != "tests/test_layout.py" and any(
        f"sys.path.{verb}" in (REPO / name).read_text(encoding="utf-8")
        for verb in ("insert", "append"))]
    assert patched == []
