"""The layout CONTRIBUTING.md describes: every library module and job is listed there, a job imports
the library and never another job, the library never imports a job, the top-level scripts are thin."""
import ast
import re

from conftest import ROOT

PACKAGE = ROOT / "transfira"
JOBS = ("generate", "train", "test", "evaluate", "calibrate", "explain", "score", "ijb")
SCRIPTS = ("generate.py", "train.py", "test.py", "evaluate.py", "calibrate.py", "explain.py", "score.py",
           "export_onnx.py")


def imported_modules(path) -> set[str]:
    """Absolute names of the transfira modules ``path`` imports (relative imports resolved)."""
    package = ["transfira"] + list(path.relative_to(PACKAGE).parent.parts) if path.is_relative_to(PACKAGE) else []
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out |= {module} if node.module else {f"{module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.startswith("transfira")}


def test_every_module_is_in_contributing():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    listed = set(re.findall(r"\b(\w+)\.py\b", text))
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules <= listed, sorted(modules - listed)
    assert set(JOBS) == {p.stem for p in (PACKAGE / "jobs").glob("*.py")} - {"__init__"}
    assert all(job in text for job in JOBS)


def test_every_job_has_run_and_schema():
    """The same two names in every job: ``run`` and (but calibrate, which takes flags) ``SCHEMA``."""
    for job in JOBS:
        names = {n.name for n in ast.parse((PACKAGE / "jobs" / f"{job}.py").read_text()).body
                 if isinstance(n, ast.FunctionDef)}
        names |= {t.id for n in ast.parse((PACKAGE / "jobs" / f"{job}.py").read_text()).body
                  if isinstance(n, (ast.Assign, ast.AnnAssign))
                  for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
        assert "run" in names and (job == "calibrate" or "SCHEMA" in names), f"transfira/jobs/{job}.py: {sorted(names)}"


def test_jobs_import_the_library_only():
    for job in JOBS:
        others = {m for m in imported_modules(PACKAGE / "jobs" / f"{job}.py") if m.startswith("transfira.jobs")}
        assert not others, f"transfira/jobs/{job}.py imports {sorted(others)}"
    for path in PACKAGE.glob("*.py"):
        jobs = {m for m in imported_modules(path) if m.startswith("transfira.jobs")}
        assert not jobs, f"{path.name} (library) imports {sorted(jobs)}"


def test_scripts_are_thin():
    """A script parses arguments, loads the config and calls its job: no function of its own but main."""
    for script in SCRIPTS:
        tree = ast.parse((ROOT / script).read_text())
        functions = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert functions == ["main"], f"{script}: {functions}"
        assert len((ROOT / script).read_text().splitlines()) <= 60, f"{script} is longer than 60 lines"
