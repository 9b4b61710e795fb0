"""Progress where nobody watches a terminal (issue 24, item 7): plain lines in a log while a job runs, not only at
its end; nothing when hidden."""

from __future__ import annotations

from cellmorph import progress as progress_module
from cellmorph.progress import PlainProgress, make_progress, progress_shown


def test_plain_lines_when_the_console_is_not_a_terminal(capsys, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setenv("CELLMORPH_PROGRESS_SECONDS", "10")
    with make_progress() as bar:  # pytest's stderr is not a terminal
        assert isinstance(bar, PlainProgress)
        task = bar.add_task("logo folds", total=60)
        for i in range(60):
            clock[0] += 1.0  # a fold a second: a line every 10 s, not one per fold
            bar.update(task, description=f"fold {i + 1}/60: Metadata_Patient={i}")
            bar.advance(task)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "progress: logo folds  0/60 (0%), 0:00:00 elapsed"  # at once: the log shows the job started
    assert lines[1] == "progress: fold 10/60: Metadata_Patient=9  9/60 (15%), 0:00:10 elapsed, about 0:00:57 left"
    assert lines[-1] == "progress: fold 60/60: Metadata_Patient=59  60/60 (100%), 0:01:00 elapsed"  # and when done
    assert 6 <= len(lines) <= 8


def test_hidden_progress_prints_nothing(capsys):
    with progress_shown(False), make_progress() as bar:
        bar.advance(bar.add_task("features", total=3), 3)
    assert capsys.readouterr().err == ""
