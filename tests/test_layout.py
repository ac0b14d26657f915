"""The package's shape: layers import only the layers below them, no import cycles, and the commands that
do not evaluate with the harness run without lm-eval installed."""

import ast
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from a3lm.cli import app
from a3lm.model.debug import tiny_base_model
from a3lm.tokenizer import word_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src" / "a3lm"

# Each sub-package (or top-level module) and its layer: an import may only go to the same or a lower layer.
LAYERS = {
    "groups": 0,
    "tokenizer": 0,
    "files": 0,
    "quiet": 0,
    "model": 1,
    "decoding": 2,
    "data": 2,
    "evaluation": 3,
    "training": 3,
    "demo": 4,
    "serving": 4,
    "cli": 5,
    "__init__": 5,
    "__main__": 5,
}
FORBIDDEN = {("evaluation", "training")}  # side by side, but evaluation must not need the training stack


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_modules(path: Path, known: dict[str, Path]) -> set[str]:
    """a3lm modules `path` imports anywhere (functions included), except under `if TYPE_CHECKING:`."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "a3lm")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base.split(".")[0] == "a3lm":
                for alias in node.names:  # `from a3lm.model import debug` imports the module a3lm.model.debug
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found - {module_name(path), "a3lm"}


def layer_of(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported_modules(path, known) for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], path[len(path) :] = 1, [node]
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_the_modules():
    graph = {m: {d for d in deps if layer_of(m) != "__init__"} for m, deps in import_graph().items()}
    assert (cycle := find_cycle(graph)) is None, " -> ".join(cycle)


def test_every_layer_imports_only_the_layers_below_it():
    bad = []
    for module, deps in import_graph().items():
        for dep in deps:
            src, dst = layer_of(module), layer_of(dep)
            assert src in LAYERS and dst in LAYERS, (
                f"{module} or {dep}: a new sub-package needs its layer in LAYERS"
            )
            if LAYERS[dst] > LAYERS[src] or (src, dst) in FORBIDDEN:
                bad.append(f"{module} -> {dep}")
    assert not bad, "upward imports: " + ", ".join(sorted(bad))


def test_the_top_level_stays_small_and_sub_packages_show_the_layers():
    top = [p.name for p in SRC.glob("*.py")]
    packages = [p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()]
    assert len(top) <= 10, top
    assert {"model", "decoding", "data", "training", "evaluation", "demo"} <= set(packages)


BLOCK_LM_EVAL = "import sys; sys.modules['lm_eval'] = None; sys.modules['rouge_score'] = None; "


def run_cli_without_lm_eval(*args: str) -> subprocess.CompletedProcess:
    code = BLOCK_LM_EVAL + "from a3lm.cli import app; app()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_nll_runs_and_eval_names_the_extra_without_lm_eval(tmp_path):
    tok = word_tokenizer(["the", "cat", "sat", "on", "mat", "."])
    tiny_base_model("llama", seed=1, vocab_size=len(tok)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    assert CliRunner().invoke(app, ["convert", str(tmp_path / "base"), str(tmp_path / "a3")]).exit_code == 0
    (tmp_path / "held.txt").write_text("the cat sat on the mat .\n" * 8)
    out = tmp_path / "nll.json"
    nll = run_cli_without_lm_eval(
        "nll",
        "--model",
        str(tmp_path / "a3"),
        "--text",
        str(tmp_path / "held.txt"),
        "--seq-len",
        "8",
        "--rows",
        "2",
        "--output",
        str(out),
        "--no-progress",
    )
    assert nll.returncode == 0, nll.stderr[-2000:]
    assert out.is_file()
    evaluation = run_cli_without_lm_eval("eval", "--model", str(tmp_path / "a3"), "--tasks", "piqa")
    assert evaluation.returncode != 0
    assert evaluation.stderr.strip().splitlines()[-1] == (
        "error: a3lm eval needs lm-eval and rouge-score: pip install 'a3lm[eval]'"
    )
