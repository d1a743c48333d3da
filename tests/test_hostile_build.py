"""Where a build writes: an --out that cannot be written is exit 2 before any work, a full disk
leaves the previous artifact as it was, and a rebuild replaces an artifact atomically."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from llmc import artifact
from llmc.artifact import atomic_directory
from tests.test_cli_errors import assert_nothing_written, assert_user_error, invoke


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*")}


def leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("where", ["proc", "under a file", "read-only dir"])
def test_an_output_directory_that_cannot_be_written_is_exit_2(tmp_path, where):
    if where == "proc":
        out = Path("/proc/llmc-out")
    elif where == "under a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "sub" / "out"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a 0o500 directory")
        (tmp_path / "ro").mkdir(mode=0o500)
        out = tmp_path / "ro" / "out"
    result = invoke("build", "tiny:llama", "-o", out)
    assert_user_error(result, "cannot write", "choose another --out")
    assert "load tiny model" not in result.output  # refused before any work
    if where != "under a file":
        assert_nothing_written(out)


def test_a_full_disk_during_a_rebuild_leaves_the_previous_artifact_intact(
    tiny_artifact, tmp_path, monkeypatch
):
    import llmc.targets.onnx.emit as onnx_emit

    out = tmp_path / "out"
    shutil.copytree(tiny_artifact("llama"), out)
    before = snapshot(out)

    def full_disk(graph, out_dir, options):
        (Path(out_dir) / "model.onnx.data").write_bytes(b"\0" * 4096)  # half written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out_dir))

    monkeypatch.setattr(onnx_emit, "emit", full_disk)
    result = invoke("build", "tiny:llama", "-o", out, "--no-verify", "--no-cache")
    assert_user_error(result, "No space left on device", "free some space")
    assert snapshot(out) == before  # byte for byte
    assert leftovers(out) == []


def test_a_rebuild_replaces_the_artifact_atomically_and_says_so(tiny_artifact, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(tiny_artifact("llama"), out)
    (out / "stale-file").write_text("from the previous artifact")
    exchanged = []
    real = artifact._exchange
    artifact._exchange = lambda a, b: exchanged.append(real(a, b)) or exchanged[-1]
    try:
        result = invoke("build", "tiny:llama", "-o", out, "--no-verify", "--no-cache")
    finally:
        artifact._exchange = real
    assert result.exit_code == 0, result.output
    assert f"replaced the previous artifact at {out}" in " ".join(result.output.split())
    assert exchanged == [True]  # one renameat2(RENAME_EXCHANGE): never a moment without one
    assert not (out / "stale-file").exists() and (out / "llmc.json").is_file()
    assert leftovers(out) == []


@pytest.mark.parametrize("exchange", [True, False])
def test_atomic_directory_keeps_the_old_one_until_the_new_one_is_complete(
    tmp_path, monkeypatch, exchange
):
    final = tmp_path / "artifact"
    final.mkdir()
    (final / "old").write_text("old")
    if not exchange:  # a file system or libc without renameat2: two renames
        monkeypatch.setattr(artifact, "_exchange", lambda a, b: False)
    with pytest.raises(OSError), atomic_directory(final) as tmp:
        (tmp / "new").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert snapshot(final) == {"old": b"old"} and leftovers(final) == []
    with atomic_directory(final) as tmp:
        (tmp / "new").write_text("new")
    assert snapshot(final) == {"new": b"new"} and leftovers(final) == []


def test_a_failed_final_rename_puts_the_previous_artifact_back(tmp_path, monkeypatch):
    final = tmp_path / "artifact"
    final.mkdir()
    (final / "old").write_text("old")
    monkeypatch.setattr(artifact, "_exchange", lambda a, b: False)
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".artifact.tmp-"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError), atomic_directory(final) as tmp:
        (tmp / "new").write_text("new")
    assert snapshot(final) == {"old": b"old"} and leftovers(final) == []
