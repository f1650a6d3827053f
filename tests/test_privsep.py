"""privsep.py: the workers' user, the modes that close the trees to other
users, the front's PROXY stamp. End to end: test_e2e_trust_local.py."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cr_proxy import nginx, privsep
from cr_proxy.front.stamp import FrontStamp
from cr_proxy.privsep import PrivilegeError, Workers


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# --- the workers' user ----------------------------------------------------------------------------


def test_not_root_or_empty_keeps_the_workers_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    assert privsep.workers_user("") is None
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert privsep.workers_user("auto") is None
    assert privsep.workers_user("www-data") is None


def test_auto_is_www_data_else_nobody(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert privsep.workers_user("auto") == "www-data"
    assert privsep.workers_user("someone") == "someone"
    real = pwd.getpwnam

    def without(*names: str):
        def lookup(name: str) -> pwd.struct_passwd:
            if name in names:
                raise KeyError(name)
            return real(name)
        return lookup

    monkeypatch.setattr(pwd, "getpwnam", without("www-data"))
    assert privsep.workers_user("auto") == "nobody"
    monkeypatch.setattr(pwd, "getpwnam", without("www-data", "nobody"))
    with pytest.raises(PrivilegeError, match=r"nginx\.user"):
        privsep.workers_user("auto")


def test_lookup_names_the_primary_group_for_nginx() -> None:
    # nginx would look for a group named like the user: there is no "nobody"
    # group on Debian, its group is nogroup.
    workers = Workers.lookup("nobody")
    assert workers.nginx_directive() == f"user nobody {workers.group};"
    assert workers.gid in workers.groups
    with pytest.raises(PrivilegeError, match="no user 'no-such-user'"):
        Workers.lookup("no-such-user")


def test_user_line_names_root_rather_than_leave_nginx_its_default() -> None:
    assert nginx.user_line(Workers.lookup("www-data")) == "user www-data www-data;"
    if os.geteuid() == 0:
        assert nginx.user_line(None) == "user root root;"


def test_ancestors_run_from_the_root_down() -> None:
    assert privsep.ancestors(Path("/a/b/c")) == [Path("/"), Path("/a"), Path("/a/b"),
                                                 Path("/a/b/c")]


@pytest.fixture
def crossable() -> Iterator[Path]:
    """A directory outside pytest's 0700 tree that others may cross."""
    path = Path(tempfile.mkdtemp(prefix="cr-proxy-privsep-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_blocked_names_the_first_directory_the_workers_cannot_enter(crossable: Path) -> None:
    # The suite runs as root (make test), which may switch users.
    (crossable / "open" / "closed" / "deep").mkdir(parents=True)
    (crossable / "open").chmod(0o711)
    (crossable / "open" / "closed").chmod(0o700)
    workers = Workers.lookup("nobody")
    assert workers.blocked([crossable / "open"]) is None
    assert workers.blocked([crossable / "open" / "missing" / "x"]) is None
    closed = crossable / "open" / "closed"
    assert workers.blocked([crossable, closed / "deep"]) == closed


# --- modes ----------------------------------------------------------------------------------


def test_share_tree_closes_everything_to_others_and_keeps_secrets_0600(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "blob").write_bytes(b"x")
    (root / "a" / "b" / "blob").chmod(0o644)
    (root / "ca.key").write_text("k")
    (root / "ca.key").chmod(0o644)
    (root / "front-stamp.conf").write_text("s")
    (root / "link").symlink_to("a")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "s.sock"))
        os.chmod(root / "s.sock", 0o666)
        gid = os.getegid()
        changed = privsep.share_tree(root, gid)
        assert changed == 6  # root, a, b, blob, ca.key, front-stamp.conf
        assert mode(root / "s.sock") == 0o666  # sockets are serve's to set
    assert mode(root) == mode(root / "a") == mode(root / "a" / "b") == 0o2750
    assert mode(root / "a" / "b" / "blob") == 0o640
    assert mode(root / "ca.key") == mode(root / "front-stamp.conf") == 0o600
    assert (root / "link").is_symlink()
    assert privsep.share_tree(root, gid) == 0  # done once


def test_a_setgid_tree_under_the_umask_makes_new_entries_right(tmp_path: Path) -> None:
    """What serve relies on instead of walking the tree at every start."""
    root = tmp_path / "tree"
    root.mkdir()
    privsep.share_tree(root, os.getegid())
    old = os.umask(privsep.UMASK)
    try:
        (root / "new" / "dir").mkdir(parents=True)
        (root / "new" / "dir" / "file").write_text("x")
    finally:
        os.umask(old)
    assert mode(root / "new" / "dir") == 0o2750
    assert mode(root / "new" / "dir" / "file") == 0o640


def test_share_socket_modes(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        path = tmp_path / "f.sock"
        sock.bind(str(path))
        privsep.share_socket(path, None)
        assert mode(path) == 0o600
        if os.geteuid() == 0:
            workers = Workers.lookup("www-data")
            privsep.share_socket(path, workers)
            assert mode(path) == 0o660 and path.stat().st_gid == workers.gid


def test_write_secret_makes_an_old_file_0600_too(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("old")
    path.chmod(0o644)
    privsep.write_secret(path, "new")
    assert path.read_text() == "new" and mode(path) == 0o600


# --- the front's stamp ---------------------------------------------------------------------------


def test_stamp_is_new_at_each_start_and_follows_the_client_family() -> None:
    a, b = FrontStamp.new(), FrontStamp.new()
    assert a != b
    assert 1 <= a.port <= 65535
    # The destination port stays the one the client asked for (the fetcher
    # enforces it: X-CR-Port); the client's own port goes, nginx never used it.
    assert a.line("10.1.2.3", 443) == f"PROXY TCP4 10.1.2.3 {a.v4} {a.port} 443\r\n".encode()
    assert a.line("2001:db8::1", 80) == (
        f"PROXY TCP6 2001:db8::1 {a.v6} {a.port} 80\r\n".encode())


def test_the_front_line_carries_what_the_nginx_map_accepts() -> None:
    stamp = FrontStamp.new()
    for client in ("10.1.2.3", "2001:db8::1"):
        _, _, src, dst, sport, dport = stamp.line(client, 443).decode().split()
        assert src == client and dport == "443"
        assert f'"{dst} {sport}" 1;' in stamp.nginx_map()
    # What a local process would write (the old line) is not in it.
    assert '"127.0.0.1 ' not in stamp.nginx_map()
