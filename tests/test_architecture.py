"""The folders' import rules (README, "Architecture"), read from the source: a change that makes a
stage lean on another stage, or serving lean on training code, fails here."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pocketrlhf"
STAGES = {"sft", "rm", "dpo", "ppo", "grpo"}  # online.py and loop.py are shared loops, not stages


def imports(path: Path) -> set[str]:
    """Every pocketrlhf module ``path`` imports (at the top or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pocketrlhf"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if (PACKAGE.parent / node.module.replace(".", "/") / f"{a.name}.py").is_file())
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pocketrlhf"))
    return found


def module_files(folder: str = "") -> dict[str, set[str]]:
    root = PACKAGE / folder if folder else PACKAGE
    return {str(p.relative_to(PACKAGE.parent).with_suffix("")).replace("/", "."): imports(p)
            for p in sorted(root.rglob("*.py"))}


def test_the_training_stages_are_siblings():
    for module, deps in module_files("stages").items():
        others = {f"pocketrlhf.stages.{s}" for s in STAGES} - {module}
        assert not deps & others, f"{module} imports another stage: {sorted(deps & others)}"


def test_only_the_pipeline_and_the_cli_reach_into_stages():
    allowed = {"pocketrlhf.pipeline", "pocketrlhf.cli"}
    for module, deps in module_files().items():
        if module.startswith("pocketrlhf.stages") or module in allowed:
            continue
        reached = {d for d in deps if d.startswith("pocketrlhf.stages")}
        assert not reached, f"{module} imports training code: {sorted(reached)}"


def test_lower_layers_never_import_upper_ones():
    upper = ("pocketrlhf.stages", "pocketrlhf.serve", "pocketrlhf.pipeline", "pocketrlhf.evaluate", "pocketrlhf.merge",
             "pocketrlhf.demo", "pocketrlhf.cli")
    for folder in ("algorithms", "data", "models"):
        for module, deps in module_files(folder).items():
            wrong = {d for d in deps if d.startswith(upper)}
            assert not wrong, f"{module} imports {sorted(wrong)}"
    for module, deps in module_files("algorithms").items():
        assert not {d for d in deps if not d.startswith("pocketrlhf.algorithms")}, f"{module} is not pure math"
