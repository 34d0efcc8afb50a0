"""Paths under docs/ named in the README, the configs, data/ and the code all exist; every relative
link of the README and the docs pages resolves; user-facing text names no issue numbers."""
import re

from conftest import ROOT

DOC_PATH = re.compile(r"\bdocs/[\w./-]*\w\.(?:md|png|svg|csv|json)\b")
MD_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
ISSUE = re.compile(r"\b[Ii]ssues? ?#?\d+")
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *ROOT.glob("docs/*.md"), *ROOT.glob("data/**/README.md"),
         *ROOT.glob("pretrained_weights/*.md")]


def test_doc_paths_exist():
    sources = [ROOT / "README.md", *ROOT.glob("configs/**/*.toml"), *ROOT.glob("data/**/*.md"),
               *ROOT.glob("data/**/*.py"), *ROOT.glob("transfira/**/*.py"), *ROOT.glob("*.py"),
               *ROOT.glob("docs/*.md")]
    missing = {f"{src.relative_to(ROOT)}: {path}" for src in sources if src.is_file()
               for path in DOC_PATH.findall(src.read_text(errors="replace")) if not (ROOT / path).exists()}
    assert not missing, sorted(missing)


def test_markdown_links_resolve():
    broken = {f"{page.relative_to(ROOT)}: {target}" for page in PAGES if page.is_file()
              for target in MD_LINK.findall(page.read_text())
              if not target.startswith(("http://", "https://", "mailto:")) and not (page.parent / target).exists()}
    assert not broken, sorted(broken)


def test_no_issue_numbers_in_user_facing_text():
    sources = [*PAGES, *ROOT.glob("configs/**/*.toml"), *ROOT.glob("transfira/**/*.py"), *ROOT.glob("*.py"),
               *ROOT.glob("data/**/*.py"), ROOT / "benchmarks" / "RESULTS.md"]
    found = {f"{src.relative_to(ROOT)}: {m}" for src in sources if src.is_file()
             for m in ISSUE.findall(src.read_text(errors="replace"))}
    assert not found, sorted(found)
