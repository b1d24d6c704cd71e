"""fsutil.fsync_together: its own sync threads (session 6) — every result in its place,
errors per descriptor and directory, a bug raised to the caller, and no call left waiting
when many callers share the threads."""
from __future__ import annotations

import os
import threading

import pytest

from mailstack import fsutil


def _files(tmp_path, n: int) -> list[int]:
    return [os.open(tmp_path / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600) for i in range(n)]


def test_each_descriptor_and_directory_gets_its_own_result(tmp_path):
    fds = _files(tmp_path, 5)
    closed = fds.pop(2)
    os.close(closed)  # a bad descriptor in the middle: its error, in its place
    try:
        errors, dir_errors = fsutil.fsync_together(fds[:2] + [closed] + fds[2:], [str(tmp_path), str(tmp_path / "gone")])
    finally:
        for fd in fds:
            os.close(fd)
    assert [e is None for e in errors] == [True, True, False, True, True]
    assert isinstance(errors[2], OSError)
    assert dir_errors[str(tmp_path)] is None
    assert isinstance(dir_errors[str(tmp_path / "gone")], FileNotFoundError)
    assert fsutil.fsync_together([], []) == ([], {})


def test_a_bug_in_a_sync_thread_is_raised_to_the_caller_and_the_threads_live_on(tmp_path, monkeypatch):
    fds = _files(tmp_path, 3)
    try:
        def broken(path):
            raise ValueError("not an OSError")
        monkeypatch.setattr(fsutil, "fsync_dir", broken)
        with pytest.raises(ValueError):
            fsutil.fsync_together(fds, [str(tmp_path)])  # the directory's sync runs in a sync thread
        monkeypatch.undo()
        errors, dir_errors = fsutil.fsync_together(fds, [str(tmp_path)])
        assert errors == [None, None, None] and dir_errors == {str(tmp_path): None}
    finally:
        for fd in fds:
            os.close(fd)


def test_many_callers_at_once_all_return_with_their_own_results(tmp_path):
    callers, per_call = 12, 6  # more jobs at once than the threads: they queue
    results: dict[int, tuple] = {}
    dirs = []
    for c in range(callers):
        d = tmp_path / f"d{c}"
        d.mkdir()
        dirs.append(d)

    def call(c: int) -> None:
        fds = _files(dirs[c], per_call)
        try:
            bad = [1_000_000] if c % 3 == 0 else []  # a descriptor never open: an error of its own
            results[c] = fsutil.fsync_together(fds + bad, [str(dirs[c])])
        finally:
            for fd in fds:
                os.close(fd)

    threads = [threading.Thread(target=call, args=(c,)) for c in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a fsync_together call was left waiting"
    for c in range(callers):
        errors, dir_errors = results[c]
        assert errors[:per_call] == [None] * per_call
        assert len(errors) == per_call + (1 if c % 3 == 0 else 0)
        if c % 3 == 0:
            assert isinstance(errors[-1], OSError)
        assert dir_errors == {str(dirs[c]): None}
    assert fsutil._sync_threads.started <= fsutil.SYNC_THREADS
