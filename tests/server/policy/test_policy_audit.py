"""The audit log on real files: every event written on a clean close, the chain continued
through restarts and rotation, and any edited, deleted or reordered line found by verify."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from logitcache.client.errors import FailedPrecondition, Unavailable
from logitcache.server.policy.audit import HEAD_FILE, AuditEvent, AuditLog, verify


def event(i: int) -> AuditEvent:
    return AuditEvent(
        who="alice",
        action="ReadThrough",
        target="teacher-a",
        positions=10 * i,
        decision="allow",
        status="OK",
        detail={"i": i},
    )


def write(directory: Path, n: int, **options: object) -> None:
    with AuditLog(directory, **options) as log:  # type: ignore[arg-type]
        for i in range(n):
            log.record(event(i))


def files(directory: Path) -> list[Path]:
    return sorted(directory.glob("audit-*.jsonl"))


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def test_every_event_from_many_threads_is_written_on_a_clean_close(tmp_path) -> None:
    log = AuditLog(tmp_path)

    def producer(k: int) -> None:
        for i in range(250):
            log.record(event(k * 1000 + i))

    threads = [threading.Thread(target=producer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    records = [json.loads(line) for line in lines(files(tmp_path)[0])]
    assert records[0]["kind"] == "head" and len(records) == 1 + 1000
    assert sorted(r["detail"]["i"] for r in records[1:]) == sorted(
        k * 1000 + i for k in range(4) for i in range(250)
    )
    first = records[1]
    assert {"who", "action", "target", "positions", "decision", "status", "time"} <= set(first)
    report = verify(tmp_path)
    assert report.ok and report.lines == 1001
    with pytest.raises(Unavailable, match="closed"):
        log.record(event(0))


def test_a_restart_continues_the_chain(tmp_path) -> None:
    write(tmp_path, 3)
    write(tmp_path, 2)
    assert verify(tmp_path).ok
    seqs = [json.loads(line)["seq"] for line in lines(files(tmp_path)[0])]
    assert seqs == list(range(6))


def edit(path: Path, index: int, change) -> None:
    content = lines(path)
    content[index] = change(content[index])
    path.write_text("".join(content), encoding="utf-8")


def test_verify_names_an_edited_line(tmp_path) -> None:
    write(tmp_path, 5)
    path = files(tmp_path)[0]
    edit(path, 3, lambda line: line.replace('"positions":20', '"positions":2'))
    report = verify(tmp_path)
    assert not report.ok and report.problem is not None
    assert report.problem.line == 4 and "edited" in report.problem.reason
    assert str(report.problem).startswith(f"{path}:4:")


def test_verify_finds_a_line_edited_with_a_fresh_hash(tmp_path) -> None:
    """Recomputing an edited line's own hash does not help: the next line's prev differs."""
    from logitcache.server.policy.audit import _hash  # the one hash the log uses

    write(tmp_path, 5)
    path = files(tmp_path)[0]

    def forge(line: str) -> str:
        record = json.loads(line)
        record["positions"] = 0
        record["hash"] = _hash(record)
        return json.dumps(record) + "\n"

    edit(path, 2, forge)
    report = verify(tmp_path)
    assert report.problem is not None and report.problem.line == 4
    assert "prev" in report.problem.reason


def test_verify_names_a_deleted_line(tmp_path) -> None:
    write(tmp_path, 5)
    path = files(tmp_path)[0]
    content = lines(path)
    del content[2]
    path.write_text("".join(content), encoding="utf-8")
    report = verify(tmp_path)
    assert report.problem is not None and report.problem.line == 3
    assert "deleted" in report.problem.reason


def test_verify_names_reordered_lines(tmp_path) -> None:
    write(tmp_path, 5)
    path = files(tmp_path)[0]
    content = lines(path)
    content[2], content[3] = content[3], content[2]
    path.write_text("".join(content), encoding="utf-8")
    report = verify(tmp_path)
    assert report.problem is not None and report.problem.line == 3
    assert "reordered" in report.problem.reason


def test_verify_finds_lines_cut_from_the_end(tmp_path) -> None:
    write(tmp_path, 5)
    path = files(tmp_path)[0]
    path.write_text("".join(lines(path)[:-2]), encoding="utf-8")
    assert verify(path).ok  # the file alone is a consistent prefix ...
    report = verify(tmp_path)  # ... the directory's head knows it was longer
    assert report.problem is not None and "deleted" in report.problem.reason


def test_rotation_keeps_one_chain_across_files(tmp_path) -> None:
    write(tmp_path, 200, max_bytes=4096)
    paths = files(tmp_path)
    assert len(paths) > 3
    for path in paths:
        head = json.loads(lines(path)[0])
        assert head["kind"] == "head"
    second = json.loads(lines(paths[1])[0])
    assert second["previous_file"] == paths[0].name
    assert second["prev"] == json.loads(lines(paths[0])[-1])["hash"]
    report = verify(tmp_path)
    assert report.ok and report.files == len(paths)
    assert json.loads((tmp_path / HEAD_FILE).read_text())["file"] == paths[-1].name


def test_a_deleted_file_or_file_head_breaks_the_chain(tmp_path) -> None:
    write(tmp_path, 200, max_bytes=4096)
    paths = files(tmp_path)
    first_lines = lines(paths[2])
    paths[2].write_text("".join(first_lines[1:]), encoding="utf-8")
    report = verify(tmp_path)
    assert report.problem is not None and report.problem.file == str(paths[2])
    assert report.problem.line == 1
    paths[2].unlink()
    report = verify(tmp_path)
    assert report.problem is not None and report.problem.file == str(paths[3])


def test_retention_deletes_old_rotated_files_and_the_rest_still_verifies(tmp_path) -> None:
    write(tmp_path, 60, max_bytes=4096)
    old = files(tmp_path)
    long_ago = time.time() - 10 * 86400
    for path in old:
        os.utime(path, (long_ago, long_ago))
    write(tmp_path, 200, max_bytes=4096, retention_days=1)
    kept = files(tmp_path)
    assert not set(old[:-1]) & set(kept)  # the old rotated files are gone
    assert verify(tmp_path).ok


def test_a_partial_last_line_from_a_crash_is_cut_and_the_chain_goes_on(tmp_path) -> None:
    write(tmp_path, 3)
    path = files(tmp_path)[0]
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"seq": 4, "kind": "ev')
    write(tmp_path, 1)
    assert verify(tmp_path).ok
    assert len(lines(path)) == 1 + 3 + 1


def test_a_damaged_last_line_stops_the_log_from_appending(tmp_path) -> None:
    write(tmp_path, 3)
    path = files(tmp_path)[0]
    edit(path, -1, lambda line: "garbage\n")
    with pytest.raises(FailedPrecondition, match="audit verify"):
        AuditLog(tmp_path)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_single_edit_deletion_or_swap_is_found(tmp_path_factory, data) -> None:
    directory = tmp_path_factory.mktemp("audit")
    write(directory, 6, max_bytes=700)  # a few rotated files
    paths = files(directory)
    path = data.draw(st.sampled_from(paths))
    content = lines(path)
    index = data.draw(st.integers(0, len(content) - 1))
    how = data.draw(st.sampled_from(["edit", "delete", "swap"]))
    if how == "edit":
        record = json.loads(content[index])
        key = data.draw(st.sampled_from(sorted(record)))
        record[key] = data.draw(st.one_of(st.integers(), st.text(max_size=5), st.none()))
        assume(json.dumps(record) != json.dumps(json.loads(content[index])))
        content[index] = json.dumps(record) + "\n"
    elif how == "delete":
        del content[index]
    else:
        other = data.draw(st.integers(0, len(content) - 1).filter(lambda j: j != index))
        assume(content[index] != content[other])
        content[index], content[other] = content[other], content[index]
    path.write_text("".join(content), encoding="utf-8")
    assert not verify(directory).ok
