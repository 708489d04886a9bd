"""The output rules every command shares: atomic writes, no silent replacement, one writer at a time."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest

from policy_runtime.artifacts import OutputLock, atomic_write_text, check_writable_dir, claim_output_dir
from policy_runtime.errors import UserError


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a.json"
    atomic_write_text(p, "old")
    atomic_write_text(p, "new")
    assert p.read_text() == "new"
    assert [x.name for x in tmp_path.iterdir()] == ["a.json"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    p = tmp_path / "a.json"
    p.write_text("old")

    class Boom:
        def encode(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write_text(p, Boom())  # type: ignore[arg-type]
    assert p.read_text() == "old"
    assert len(list(tmp_path.iterdir())) == 1


def test_claim_refuses_non_empty_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(UserError, match="not empty"):
        claim_output_dir(out)
    assert claim_output_dir(out, force=True) == out
    assert claim_output_dir(out, resume=True) == out
    assert (out / "model.safetensors").read_bytes() == b"weights"


def test_claim_refuses_output_equal_to_input_even_with_force(tmp_path):
    with pytest.raises(UserError, match="input"):
        claim_output_dir(tmp_path, force=True, inputs=(str(tmp_path) + "/.",))


def test_claim_accepts_empty_and_new_dirs(tmp_path):
    (tmp_path / "empty").mkdir()
    assert claim_output_dir(tmp_path / "empty").is_dir()
    assert claim_output_dir(tmp_path / "new" / "deeper").is_dir()


def test_check_writable_dir_names_the_problem(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_writable_dir(f)
    with pytest.raises(UserError, match="too long"):
        check_writable_dir(tmp_path / ("x" * 300))
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(UserError):
            check_writable_dir(ro / "sub")


def _hold_lock(directory, ready, release):
    with OutputLock(directory):
        ready.set()
        release.wait(60)


def test_lock_refuses_a_second_writer_and_is_released(tmp_path):
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    holder.start()
    try:
        assert ready.wait(120), "lock holder did not start"
        with pytest.raises(UserError, match=f"pid {holder.pid}"), OutputLock(tmp_path):
            pass
    finally:
        release.set()
        holder.join(60)
    with OutputLock(tmp_path):  # released when its holder ends
        pass


def test_claim_names_a_too_long_output(tmp_path):
    with pytest.raises(UserError, match="too long"):
        claim_output_dir(tmp_path / ("y" * 300))


def test_another_process_write_probe_or_lock_is_not_contents(tmp_path):
    """The other ranks of a torchrun job check the same --out at the same moment: their probes are not artifacts."""
    (tmp_path / ".write-probe-abc123").write_text("")
    (tmp_path / ".lock").write_text("123")
    assert claim_output_dir(tmp_path) == tmp_path
