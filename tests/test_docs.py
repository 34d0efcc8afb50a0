"""Paths under docs/ named in the README, the configs, data/ and the code all exist."""
import re

from conftest import ROOT

DOC_PATH = re.compile(r"\bdocs/[\w./-]*\w\.(?:md|png|svg|csv|json)\b")


def test_doc_paths_exist():
    sources = [ROOT / "README.md", *ROOT.glob("configs/**/*.toml"), *ROOT.glob("data/**/*.md"),
               *ROOT.glob("data/**/*.py"), *ROOT.glob("transfira/*.py"), *ROOT.glob("*.py"), *ROOT.glob("docs/*.md")]
    missing = {f"{src.relative_to(ROOT)}: {path}" for src in sources if src.is_file()
               for path in DOC_PATH.findall(src.read_text(errors="replace")) if not (ROOT / path).exists()}
    assert not missing, sorted(missing)
