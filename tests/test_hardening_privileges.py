"""Privileges: without root, one clear line (and the commands that need no root work);
under sudo, every file pkstrace writes belongs to the invoking user, is not
world-writable, and is never created through a symlink into a place that user could
not write.

"Without root" runs the real CLI as `nobody` (setpriv). "Under sudo" runs it as root
with SUDO_UID/SUDO_GID set to nobody's ids, which is what sudo hands its command
(giving `nobody` a sudoers entry would change this machine's configuration).
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuzz.targets import FIXTURES

PY = sys.executable
FIXTURE = FIXTURES / "ftrace_cpuid_2cpu.txt"

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv to act as another user")


@pytest.fixture(scope="module")
def nobody() -> tuple[int, int]:
    try:
        pw = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user on this host")
    return pw.pw_uid, pw.pw_gid


@pytest.fixture
def user_dir(nobody: tuple[int, int]) -> Iterator[Path]:
    """A directory that belongs to nobody, outside root's private pytest tmp tree."""
    d = Path(tempfile.mkdtemp(prefix="pkstrace-priv-", dir="/tmp"))
    os.chown(d, *nobody)
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def as_nobody(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                           "env", f"HOME={cwd}", PY, "-m", "pkstrace", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


def under_sudo(args: list[str], ids: tuple[int, int],
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SUDO_UID=str(ids[0]), SUDO_GID=str(ids[1]), SUDO_USER="nobody")
    return subprocess.run([PY, "-m", "pkstrace", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def one_error_line(p: subprocess.CompletedProcess[str], command: str) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr[-800:])
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pkstrace {command}: error: "), p.stderr
    return lines[0]


# ---------------------------------------------------------------------------
# Without root
# ---------------------------------------------------------------------------

def test_record_without_root_says_what_needs_root_and_what_works(user_dir: Path) -> None:
    line = one_error_line(as_nobody(["record", "-d", "1", "-o", "t.pkstrace"], user_dir),
                          "record")
    assert "needs root" in line and "sudo pkstrace record" in line
    for works in ("replay", "report", "import", "export", "emulate"):
        assert works in line, line
    assert not (user_dir / "t.pkstrace").exists()


@pytest.mark.parametrize("argv", [["doctor", "--cleanup"], ["bench", "ipi", "-o", "ipi.json"]])
def test_other_root_commands_refuse_in_one_line(argv: list[str], user_dir: Path) -> None:
    line = one_error_line(as_nobody(argv, user_dir), argv[0])
    assert "root" in line


def test_commands_that_need_no_root_work(user_dir: Path) -> None:
    steps = [["import", str(FIXTURE), "-o", "t.pkstrace", "-q"],
             ["replay", "t.pkstrace", "--json"],
             ["report", "t.pkstrace", "-o", "t.html"],
             ["export", "t.pkstrace", "--format", "perfetto", "-o", "t.json"],
             ["export", "t.pkstrace", "--format", "csv", "-o", "tables"],
             ["emulate", "--list"],
             ["doctor"]]
    for argv in steps:
        p = as_nobody(argv, user_dir)
        ok = (0, 1) if argv[0] == "doctor" else (0,)  # doctor: 1 = no backend usable here
        assert p.returncode in ok and "Traceback" not in p.stderr, (argv, p.stderr[-800:])
    for name in ("t.pkstrace", "t.html", "t.json"):
        assert (user_dir / name).stat().st_uid != 0


# ---------------------------------------------------------------------------
# Under sudo
# ---------------------------------------------------------------------------

def _assert_users_file(p: Path, ids: tuple[int, int]) -> None:
    st = p.lstat()
    assert stat.S_ISREG(st.st_mode), p
    assert (st.st_uid, st.st_gid) == ids, (p, st.st_uid, st.st_gid)
    assert not st.st_mode & 0o002, f"{p} is world-writable ({oct(st.st_mode)})"


def test_outputs_belong_to_the_invoking_user(user_dir: Path, nobody: tuple[int, int]) -> None:
    from test_record_live import need_backend

    d = user_dir
    cmds = [["import", str(FIXTURE), "-o", f"{d}/i.pkstrace", "-q"],
            ["report", f"{d}/i.pkstrace", "-o", f"{d}/r.html"],
            ["export", f"{d}/i.pkstrace", "--format", "perfetto", "-o", f"{d}/p.json"],
            ["export", f"{d}/i.pkstrace", "--format", "parquet", "-o", f"{d}/tables"]]
    for argv in cmds:
        p = under_sudo(argv, nobody)
        assert p.returncode == 0, (argv, p.stderr[-800:])
    files = [d / "i.pkstrace", d / "r.html", d / "p.json", *sorted((d / "tables").glob("*"))]
    need_backend("tracefs")
    p = under_sudo(["record", "--backend", "tracefs", "-d", "0.5", "-q", "--no-status", "-o",
                    f"{d}/rec.pkstrace"], nobody)
    assert p.returncode == 0, p.stderr[-800:]
    files.append(d / "rec.pkstrace")
    for f in files:
        _assert_users_file(f, nobody)
    assert not list(d.glob(".*.partial"))


def test_symlinked_directory_into_roots_files_is_refused(user_dir: Path,
                                                         nobody: tuple[int, int]) -> None:
    secret = Path(tempfile.mkdtemp(prefix="pkstrace-root-only-", dir="/tmp"))
    os.chmod(secret, 0o700)
    try:
        (user_dir / "out").symlink_to(secret)
        for argv in (["import", str(FIXTURE), "-o", f"{user_dir}/out/t.pkstrace"],
                     ["report", str(FIXTURE), "-o", f"{user_dir}/out/r.html"],
                     ["export", str(FIXTURE), "--format", "perfetto", "-o",
                      f"{user_dir}/out/p.json"]):
            line = one_error_line(under_sudo(argv, nobody), argv[0])
            assert "invoking user" in line, line
        assert list(secret.iterdir()) == []
    finally:
        shutil.rmtree(secret, ignore_errors=True)


def test_planted_symlinks_are_not_followed(user_dir: Path, nobody: tuple[int, int]) -> None:
    """The user plants links where a careless writer would write as root: at the output
    name (replaced by the new file, the target untouched) and at the old predictable
    temporary names."""
    victim = Path(tempfile.mkdtemp(prefix="pkstrace-victim-", dir="/tmp")) / "precious"
    victim.write_text("root's data\n")
    os.chmod(victim, 0o600)
    try:
        for name in ("r.html", "t.pkstrace", "p.json"):
            (user_dir / f".{name}.partial").symlink_to(victim)
        (user_dir / "t.pkstrace").symlink_to(victim)
        for argv in (["import", str(FIXTURE), "-o", f"{user_dir}/t.pkstrace", "--force", "-q"],
                     ["report", str(FIXTURE), "-o", f"{user_dir}/r.html"],
                     ["export", str(FIXTURE), "--format", "perfetto", "-o",
                      f"{user_dir}/p.json"]):
            p = under_sudo(argv, nobody)
            assert p.returncode == 0, (argv, p.stderr[-800:])
        assert victim.read_text() == "root's data\n"
        assert stat.S_IMODE(victim.stat().st_mode) == 0o600 and victim.stat().st_uid == 0
        for name in ("t.pkstrace", "r.html", "p.json"):
            _assert_users_file(user_dir / name, nobody)
    finally:
        shutil.rmtree(victim.parent, ignore_errors=True)


def test_another_users_file_in_sticky_tmp_is_not_replaced(nobody: tuple[int, int]) -> None:
    fd, name = tempfile.mkstemp(prefix="pkstrace-roots-", suffix=".pkstrace", dir="/tmp")
    os.write(fd, b"root's\n")
    os.close(fd)
    try:
        assert os.stat("/tmp").st_mode & stat.S_ISVTX
        line = one_error_line(under_sudo(["import", str(FIXTURE), "-o", name, "--force"],
                                         nobody), "import")
        assert "sticky" in line, line
        assert Path(name).read_bytes() == b"root's\n"
    finally:
        os.unlink(name)
