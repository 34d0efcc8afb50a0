"""Progress output: plain lines in a log file, bars on a terminal, silence on ranks > 0."""
import os
import subprocess
import sys
import textwrap

import pytest

from transfira import progress as pg


def test_lines_every_ten_percent_and_a_last_line(monkeypatch, capsys):
    monkeypatch.setenv("TRANSFIRA_PROGRESS", "lines")
    monkeypatch.setattr(pg, "LINE_SECONDS", 1e9)
    monkeypatch.setattr(pg, "MIN_SECONDS", 0.0)  # as if each 10 % took longer than MIN_SECONDS
    for _ in pg.progress(range(1000), desc="images", unit="img"):
        pass
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 10  # 10 %, 20 %, ... 90 %, then the closing line at 100 %
    assert lines[0].startswith("images: 100/1000 img (10%)")
    assert lines[-1].startswith("images: 1000/1000 img (100%)") and lines[-1].endswith("done")
    assert "\r" not in "".join(lines)


def test_short_loops_print_one_line_or_none(monkeypatch, capsys):
    """A loop done within MIN_SECONDS: its closing line only, and nothing at all for an inner
    (leave=False) loop such as one short epoch; a long inner loop still closes its lines."""
    monkeypatch.setenv("TRANSFIRA_PROGRESS", "lines")
    for _ in pg.progress(range(1000), desc="images"):
        pass
    for _ in range(5):
        for _ in pg.progress(range(3), desc="epoch", leave=False):
            pass
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("images: 1000/1000 it (100%)")
    monkeypatch.setattr(pg, "MIN_SECONDS", 0.0)
    for _ in pg.progress(range(20), desc="long epoch", leave=False):
        pass
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 10 and lines[-1].endswith("done")


def test_lines_by_time_without_total(monkeypatch, capsys):
    monkeypatch.setenv("TRANSFIRA_PROGRESS", "lines")
    monkeypatch.setattr(pg, "LINE_SECONDS", 0.0)  # every update is due
    with pg.progress(desc="blocks", unit="block") as bar:
        bar.update(3)
        bar.set_postfix(loss="0.5")
        bar.update(2)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("blocks: 3 block")
    assert "loss=0.5" in lines[1] and lines[-1].startswith("blocks: 5 block") and lines[-1].endswith("done")


def test_other_ranks_and_off_are_silent(monkeypatch, capsys):
    monkeypatch.setenv("TRANSFIRA_PROGRESS", "lines")
    monkeypatch.setenv("RANK", "1")
    assert list(pg.progress(range(50), desc="x")) == list(range(50))
    pg.log("hello")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TRANSFIRA_PROGRESS", "off")
    assert list(pg.progress(range(5))) == list(range(5))
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""


def test_bad_mode_is_named(monkeypatch):
    monkeypatch.setenv("TRANSFIRA_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="TRANSFIRA_PROGRESS"):
        pg.mode()


def test_log_file_gets_lines_not_carriage_returns(tmp_path):
    """stderr redirected to a file (a batch job's log): auto mode writes a handful of plain lines."""
    script = textwrap.dedent("""
        from transfira.progress import progress
        bar = progress(total=200, desc="extract", unit="img")
        for _ in range(200):
            bar.update(1)
        bar.close()
    """)
    log = tmp_path / "job.log"
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFIRA_PROGRESS", "RANK")}
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-c", script], stderr=f, check=True, env=env)
    text = log.read_text()
    assert "\r" not in text and 1 <= len(text.splitlines()) <= 11
