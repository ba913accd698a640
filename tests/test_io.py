"""No lost work: atomic writes, and the resumable partial-results file."""

import json
import os

import pytest

from difflm.errors import ConfigError
from difflm.io import PartialResults, atomic_write_json, atomic_write_text, write_alpaca_eval_json


def test_atomic_write_creates_parents_and_replaces(tmp_path):
    p = tmp_path / "a" / "b" / "out.json"
    atomic_write_json(p, {"x": "é"})
    assert json.loads(p.read_text(encoding="utf-8")) == {"x": "é"}
    assert "é" in p.read_text(encoding="utf-8")  # not \u00e9
    atomic_write_text(p, "new")
    assert p.read_text() == "new"
    assert os.listdir(p.parent) == ["out.json"]  # no temp files left


def test_crash_midway_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "out.json"
    atomic_write_json(p, [1, 2, 3])

    # the process dies while the new content is being written
    import difflm.io as io_mod

    real_fsync = os.fsync

    def boom(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(io_mod.os, "fsync", boom)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_json(p, list(range(1000)))
    monkeypatch.setattr(io_mod.os, "fsync", real_fsync)
    assert json.loads(p.read_text()) == [1, 2, 3]
    assert os.listdir(tmp_path) == ["out.json"]

    # an unserialisable object fails before anything is written
    with pytest.raises(TypeError):
        atomic_write_json(p, {"x": object()})
    assert json.loads(p.read_text()) == [1, 2, 3]


def test_write_alpaca_eval_json(tmp_path):
    recs = [{"instruction": "Say hi", "output": "héllo", "generator": "m", "dataset": "d", "id": "a-0"}]
    p = tmp_path / "outputs.json"
    write_alpaca_eval_json(p, recs)
    text = p.read_text(encoding="utf-8")
    assert json.loads(text) == recs and "héllo" in text and text.startswith('[\n  {\n    "instruction"')


def test_partial_results_resume(tmp_path):
    part = PartialResults(tmp_path / "out.json.partial.jsonl")
    assert part.load() == [] and part.done_ids() == set()
    part.append([{"id": "a", "output": "1"}, {"id": "b", "output": "2"}])
    part.append([])
    part.append([{"id": 3, "output": "ü"}])
    again = PartialResults(tmp_path / "out.json.partial.jsonl")  # a new run
    assert [r["id"] for r in again.load()] == ["a", "b", 3]
    assert again.done_ids() == {"a", "b", "3"}
    again.remove()
    assert not again.path.exists() and again.load() == []
    again.remove()  # removing twice is fine


def test_partial_results_truncated_last_line(tmp_path):
    path = tmp_path / "p.jsonl"
    part = PartialResults(path)
    part.append([{"id": "a", "output": "x"}, {"id": "b", "output": "y"}])
    good = path.read_bytes()
    with open(path, "ab") as f:  # kill -9 in the middle of a write
        f.write(b'{"id": "c", "outp')
    assert [r["id"] for r in part.load()] == ["a", "b"]
    assert path.read_bytes() == good  # truncated to the last good line
    part.append([{"id": "c", "output": "z"}])
    assert part.done_ids() == {"a", "b", "c"}


def test_partial_results_complete_line_without_newline(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}')
    part = PartialResults(path)
    assert part.done_ids() == {"a", "b"}
    part.append([{"id": "c"}])
    assert [r["id"] for r in part.load()] == ["a", "b", "c"]


def test_partial_results_corrupt_middle_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a"}\n{"id": \n{"id": "c"}\n')
    with pytest.raises(ConfigError, match="corrupt record"):
        PartialResults(path).load()
    assert path.read_text() == '{"id": "a"}\n{"id": \n{"id": "c"}\n'  # left for the user to inspect


def test_atomic_write_uses_the_umask_permissions(tmp_path):
    import stat

    from difflm.io import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644


# -- atomic_directory / replace_directory ----------------------------------------------------------------
def _build(target, files):
    from difflm.io import atomic_directory

    with atomic_directory(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(f".{target.name}.") and not any(tmp.iterdir())
        for name, text in files.items():
            (tmp / name).write_text(text)
    return target


def test_atomic_directory_creates_then_replaces_leaving_nothing_else(tmp_path):
    target = tmp_path / "out"
    _build(target, {"a.txt": "1"})
    assert sorted(os.listdir(tmp_path)) == ["out"] and (target / "a.txt").read_text() == "1"
    assert (target.stat().st_mode & 0o777) == 0o777 & ~_umask()  # not mkdtemp's 0700
    _build(target, {"b.txt": "2"})
    assert sorted(os.listdir(tmp_path)) == ["out"] and sorted(os.listdir(target)) == ["b.txt"]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_directory_failure_keeps_the_old_folder(tmp_path):
    from difflm.io import atomic_directory

    target = _build(tmp_path / "out", {"SENTINEL": "old"})
    with pytest.raises(OSError, match="No space left"):
        with atomic_directory(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 10)
            raise OSError(28, "No space left on device")
    assert sorted(os.listdir(tmp_path)) == ["out"] and sorted(os.listdir(target)) == ["SENTINEL"]


def test_replace_directory_puts_the_old_folder_back_when_the_swap_fails(tmp_path, monkeypatch):
    import difflm.io as io_mod

    target = _build(tmp_path / "out", {"SENTINEL": "old"})
    real_rename = os.rename

    def rename(src, dst):
        if os.fspath(dst) == os.fspath(target) and os.path.basename(src).endswith(".tmp"):
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(io_mod.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        _build(target, {"new": "x"})
    assert sorted(os.listdir(tmp_path)) == ["out"] and (target / "SENTINEL").read_text() == "old"


def test_a_crash_between_the_two_renames_loses_neither_folder(tmp_path):
    """kill -9 right after the old folder was moved aside: the old and the new one are both on disk."""
    import subprocess
    import sys
    import textwrap

    target = _build(tmp_path / "out", {"SENTINEL": "old"})
    script = textwrap.dedent(f"""
        import os
        import difflm.io as io_mod
        real = os.rename
        def rename(src, dst):
            real(src, dst)
            if str(dst).endswith(".old"):
                os._exit(9)  # dies like kill -9: no cleanup runs
        io_mod.os.rename = rename
        with io_mod.atomic_directory({str(target)!r}) as tmp:
            (tmp / "NEW").write_text("new")
    """)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": repo})
    assert proc.returncode == 9
    left = sorted(os.listdir(tmp_path))
    assert "out" not in left and len(left) == 2, left
    old = [n for n in left if n.endswith(".old")]
    new = [n for n in left if n.endswith(".tmp")]
    assert old and new and (tmp_path / old[0] / "SENTINEL").read_text() == "old"
    assert (tmp_path / new[0] / "NEW").read_text() == "new"


def test_replace_directory_refuses_to_replace_a_file(tmp_path):
    from difflm.io import atomic_directory

    (tmp_path / "out").write_text("a file")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "x").write_text("x")
    assert sorted(os.listdir(tmp_path)) == ["out"] and (tmp_path / "out").read_text() == "a file"


def test_usual_permissions_adds_the_bits_the_umask_allows(tmp_path):
    import stat

    from difflm.io import usual_permissions

    (tmp_path / "d" / "sub").mkdir(parents=True)
    os.chmod(tmp_path / "d" / "sub", 0o700)
    for name, mode in (("d/w.bin", 0o600), ("d/sub/x.bin", 0o600), ("d/run.sh", 0o700)):
        (tmp_path / name).write_bytes(b"x")
        os.chmod(tmp_path / name, mode)
    old = os.umask(0o022)
    try:
        usual_permissions(tmp_path / "d")
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "d").rglob("*")}
    assert modes == {"d/sub": 0o755, "d/w.bin": 0o644, "d/sub/x.bin": 0o644, "d/run.sh": 0o755}  # bits only added


def test_atomic_directory_gives_owner_only_files_the_usual_permissions(tmp_path):
    """safetensors >= 0.8 creates its files 0600 whatever the umask; the published folder has 0644."""
    import stat

    from difflm.io import atomic_directory

    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            os.close(os.open(tmp / "model.safetensors", os.O_WRONLY | os.O_CREAT, 0o600))
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out" / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "out" / "config.json").stat().st_mode) == 0o644


def test_save_native_writes_the_weights_with_the_usual_permissions(tiny_native_llada_dir, tmp_path):
    import stat

    from difflm.models import load_model, save_native

    model = load_model(str(tiny_native_llada_dir), dtype="float32", device="cpu")
    old = os.umask(0o022)
    try:
        out = save_native(model, tmp_path / "saved")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in modes and "config.json" in modes
    assert set(modes.values()) == {0o644}, modes


def test_atomic_directory_shared_by_several_processes(tmp_path):
    """Two ranks (threads here) write one folder: one owner, a shared barrier, a fixed temporary name; a
    temporary folder and a `.old` left by a killed run are cleared, and the old folder stays on failure."""
    import threading

    from difflm.io import atomic_directory

    target = _build(tmp_path / "step-1", {"SENTINEL": "old"})
    (tmp_path / ".step-1.tmp").mkdir()  # a killed run's half-written folder ...
    (tmp_path / ".step-1.tmp" / "stale").write_text("x")
    (tmp_path / ".step-1.old").mkdir()  # ... and the left-over of an interrupted swap
    barrier = threading.Barrier(2, timeout=30)
    seen, errors = {}, []

    def rank(r: int, fail: bool = False) -> None:
        try:
            with atomic_directory(target, sync=barrier.wait, owner=r == 0) as tmp:
                seen[r] = (tmp, sorted(os.listdir(tmp)))
                (tmp / f"rank{r}").write_text(str(r))
                if fail:
                    raise OSError(28, "No space left on device")
        except (OSError, threading.BrokenBarrierError) as e:
            errors.append(e)
            barrier.abort()  # as a dying rank takes the job down

    def run(fail_rank=None):
        threads = [threading.Thread(target=rank, args=(r, r == fail_rank)) for r in (0, 1)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)

    run()
    assert not errors, errors
    assert seen[0][0] == seen[1][0] == tmp_path / ".step-1.tmp"  # both ranks wrote into one folder
    assert "stale" not in seen[0][1] + seen[1][1]  # a fresh folder
    assert sorted(os.listdir(tmp_path)) == ["step-1"] and sorted(os.listdir(target)) == ["rank0", "rank1"]
    # a rank fails after writing: the published folder stays as it was
    barrier.reset()
    run(fail_rank=1)  # the owner then meets a broken barrier and cleans up
    assert any(isinstance(e, OSError) and e.errno == 28 for e in errors), errors
    assert sorted(os.listdir(tmp_path)) == ["step-1"] and sorted(os.listdir(target)) == ["rank0", "rank1"]
    with pytest.raises(ValueError, match="sync"):
        with atomic_directory(target, owner=False):
            pass
