"""The decision log: rotation loses no line, old segments go to verified Parquet, then away."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import duckdb
import pytest
from support.archive import REPO, archived, committed_archives, days_ago, run_crashing

from emparchive.files import ensure_log
from gateway.archive.decisions import archive_decision_log
from gateway.pipeline import Decision
from gateway.policy.decisionlog import DecisionLog, read_log, rotate_file, segments


def line(n: int, when) -> str:
    event = {"decision_id": f"d-{n:05d}", "timestamp": when.isoformat(), "result": {"n": n},
             "input": {"note": 'é, "quoted"\\tab', "empty": ""}}  # fmt: skip
    return json.dumps(event, separators=(",", ":"))


def write_segment(log_path, lines: list[str]):
    """A closed segment as a rotation leaves it (named by the time of the rotation)."""
    log_path.write_text("".join(text + "\n" for text in lines))
    segment = rotate_file(log_path)
    assert segment is not None
    time.sleep(0.001)  # the next rotation gets another name
    return segment


def run(db, log_path, root, *, observe=lambda _t, _s: None, run_id="run000000001", days=90):
    with duckdb.connect(str(db)) as connection:
        return archive_decision_log(
            connection.cursor(), log_path=log_path, root=root, run_id=run_id,
            cutoff=days_ago(days), observe=observe,
        )  # fmt: skip


def all_lines(log_path) -> list[str]:
    """Every line of the log: its segments, then the current file."""
    found = []
    for path in [*segments(log_path), log_path]:
        if path.exists():
            found.extend(path.read_text().splitlines())
    return found


def test_records_written_during_rotations_are_all_kept(tmp_path):
    """Decisions recorded from threads while the log rotates: each event once, whole."""
    log_path = tmp_path / "decisions.jsonl"
    writer = DecisionLog(log_path)
    decision = Decision(allow=True, reasons=(), revision="r", eval_us=1.0)

    def write(worker: int) -> None:
        for n in range(1000):
            writer.record(decision_id=f"{worker}-{n}", document={"n": n}, decision=decision,
                          wall_time=time.time(), route="r", dry_run=False)  # fmt: skip

    threads = [threading.Thread(target=write, args=(w,)) for w in range(3)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        writer.rotate()
        time.sleep(0.001)
    writer.close()
    ids = [event["decision_id"] for event in read_log(log_path)]
    assert sorted(ids) == sorted(f"{w}-{n}" for w in range(3) for n in range(1000))
    assert len(segments(log_path)) > 1


WRITER = """
import sys, time
from pathlib import Path
from gateway.policy.decisionlog import DecisionLog
from gateway.pipeline import Decision
log = DecisionLog(Path(sys.argv[1]))
decision = Decision(allow=True, reasons=(), revision="r", eval_us=1.0)
for n in range(int(sys.argv[2])):
    log.record(decision_id=f"other-{n}", document={}, decision=decision, wall_time=time.time(),
               route="r", dry_run=False)
    time.sleep(0.002)
log.close()
"""


def test_a_writer_in_another_process_follows_the_rotation(tmp_path):
    """Another worker's writer reopens the new file within a second; no line is lost."""
    log_path = tmp_path / "decisions.jsonl"
    log_path.touch()
    other = subprocess.Popen([sys.executable, "-c", WRITER, str(log_path), "1200"], cwd=REPO)
    try:
        while other.poll() is None:
            time.sleep(0.3)
            rotate_file(log_path)
    finally:
        other.wait(timeout=60)
    ids = [json.loads(text)["decision_id"] for text in all_lines(log_path)]
    assert sorted(ids) == sorted(f"other-{n}" for n in range(1200))
    assert len(segments(log_path)) >= 2  # it followed at least one rotation


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "audit.duckdb"
    with duckdb.connect(str(path)) as connection:
        ensure_log(connection)
    return path


def test_old_segments_are_archived_whole_and_young_ones_kept(tmp_path, db):
    """A segment whose newest line is past the window goes; the text round-trips exactly."""
    log_path, root = tmp_path / "decisions.jsonl", tmp_path / "archive"
    old_lines = [line(n, days_ago(120 - n)) for n in range(5)]
    old = write_segment(log_path, old_lines)
    old_bytes = old.read_bytes()
    straddling = write_segment(log_path, [line(10, days_ago(100)), line(11, days_ago(50))])
    current = line(20, days_ago(0)) + "\n"
    log_path.write_text(current)  # the file a writer would have open: never touched
    result = run(db, log_path, root)
    assert (result.status, result.rows) == ("archived", 5)
    assert not old.exists()
    assert straddling.exists()
    assert log_path.read_text() == current
    lines = archived(root, "decision_log", "line", "line_no")
    assert "".join(text + "\n" for (text,) in lines).encode() == old_bytes
    assert archived(root, "decision_log", "decision_id", "line_no")[0] == ("d-00000",)


def test_replay_reads_segments_and_the_current_file_in_order(tmp_path):
    """`policy replay` sees rotated segments too, oldest first."""
    log_path = tmp_path / "decisions.jsonl"
    write_segment(log_path, [line(1, days_ago(3))])
    write_segment(log_path, [line(2, days_ago(2))])
    log_path.write_text(line(3, days_ago(1)) + "\n")
    assert [e["decision_id"] for e in read_log(log_path)] == ["d-00001", "d-00002", "d-00003"]


def test_a_torn_last_line_is_archived_as_text(tmp_path, db):
    """A line cut short by a crash is kept verbatim; the segment's age decides by the others."""
    log_path, root = tmp_path / "decisions.jsonl", tmp_path / "archive"
    segment = write_segment(log_path, [line(1, days_ago(200))])
    with segment.open("a") as handle:
        handle.write('{"decision_id":"torn","timest')
    original = segment.read_bytes()
    result = run(db, log_path, root)
    assert result.status == "archived", result.error
    lines = archived(root, "decision_log", "line", "line_no")
    assert "\n".join(text for (text,) in lines).encode() == original


def test_a_tampered_archive_keeps_the_segment(tmp_path, db):
    """An archive that does not read back as the segment fails, and the segment stays."""
    log_path, root = tmp_path / "decisions.jsonl", tmp_path / "archive"
    segment = write_segment(log_path, [line(n, days_ago(200)) for n in range(3)])

    def tamper(table, step):
        if step == "exported":
            [parquet] = (root / table).glob("*.parquet")
            with duckdb.connect() as connection:
                connection.execute(
                    f"COPY (SELECT * FROM read_parquet('{parquet}') WHERE line_no > 1) "  # noqa: S608
                    f"TO '{parquet}.short' (FORMAT parquet)"
                )
            parquet.with_name(parquet.name + ".short").replace(parquet)

    result = run(db, log_path, root, observe=tamper)
    assert result.status == "failed"
    assert "did not verify" in result.error
    assert segment.exists()
    assert committed_archives(root, "decision_log") == []


CRASH = """
import os, sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
import duckdb
from gateway.archive.decisions import archive_decision_log
db, log_path, root, stop_at = sys.argv[1:]

def observe(table, step):
    if step == stop_at:
        os._exit(3)

connection = duckdb.connect(db)
archive_decision_log(connection.cursor(), log_path=Path(log_path), root=Path(root),
                     run_id="crashed00001", cutoff=datetime.now(UTC) - timedelta(days=90),
                     observe=observe)
os._exit(0)
"""


@pytest.mark.parametrize("step", ["exported", "verified", "deleted", "committed"])
def test_a_run_killed_at_any_step_loses_no_line(tmp_path, db, step):
    """Killed mid-run: each line is in its segment or in one committed archive, never both."""
    log_path, root = tmp_path / "decisions.jsonl", tmp_path / "archive"
    written = [line(n, days_ago(200)) for n in range(50)]
    write_segment(log_path, written[:25])
    write_segment(log_path, written[25:])
    run_crashing(CRASH, str(db), str(log_path), str(root), step)
    result = run(db, log_path, root, run_id="rerun0000001")
    assert result.status in {"archived", "nothing"}, result.error
    kept = all_lines(log_path)
    moved = [text for (text,) in archived(root, "decision_log", "line")]
    assert sorted(kept + moved) == sorted(written)
    assert segments(log_path) == []
    assert len(committed_archives(root, "decision_log")) == 2
