"""Who may read what on the cr-proxy host: cr-proxy, nginx's workers, others.

cr-proxy (serve: the fetcher, the front) and nginx's master run as the user
that starts serve. nginx's workers, which parse every client's bytes, run as
`nginx.user` when that is root (`auto`: www-data, else nobody); otherwise
as cr-proxy's own user, since only root can switch. Other local users get
nothing:

- cache_dir, run_dir, certs_dir and certs_dir/hosts are directories of the
  workers' group, 2750: setgid, so what is made in them joins the group;
  serve's umask (027) makes files 0640 and directories 0750. A tree from an
  older cr-proxy (0644 files) is brought to that once, at start.
- The CA key stays 0600: workers of another user never read it (leaf
  keys, 0640, they read when a handshake picks a leaf by SNI). Workers of
  serve's own user (serve not root: nginx cannot switch) can: the
  trade-off docs/operations.md states.
- The fetcher's socket is 0660 (the workers connect to it), the front's
  plain-HTTP socket 0600; both are in run_dir, which others cannot enter.
- nginx's TLS listener for the front is loopback TCP (splice moves TCP
  pages by reference; docs/design.md), which any local process can reach.
  The front's PROXY line carries a destination address and a source port
  only this start knows (FrontStamp, in a 0600 file of run_dir), and nginx
  answers nothing to a connection without them: a local process that writes
  its own PROXY line cannot pass for a client the front would have let in
  or refused.
"""

from __future__ import annotations

import contextlib
import grp
import itertools
import logging
import os
import pwd
import stat
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cr_proxy.config import Config
from cr_proxy.edge.signing import KEY_FILE
from cr_proxy.errors import CrProxyError

log = logging.getLogger("cr_proxy.privsep")

UMASK = 0o027  # files 0640, directories 0750: nothing for other users
DIR_MODE = 0o2750  # setgid: files and directories made inside join the group
FILE_MODE = 0o640
SECRET_MODE = 0o600  # the CA key, the front's stamp, the URL-signing key
AUTO = "auto"
AUTO_USERS = ("www-data", "nobody")  # Debian's web server user, else the classic
STAMP_FILE = "front-stamp.conf"
SECRETS = ("ca.key", STAMP_FILE, KEY_FILE)  # files kept 0600 wherever a tree is opened to the group
REACH_TIMEOUT = 10.0  # seconds for the reachability probe


class PrivilegeError(CrProxyError):
    code = "PRIVILEGES"


@dataclass(frozen=True, slots=True)
class Workers:
    """The user nginx's workers run as, when it is not cr-proxy's own."""

    user: str
    group: str  # the user's primary group: nginx would look for one named like the user
    uid: int
    gid: int
    groups: tuple[int, ...]  # with the supplementary ones, as nginx's initgroups() sets them

    @classmethod
    def lookup(cls, name: str) -> Workers:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise PrivilegeError(message=f"nginx.user: no user {name!r} on this host") from None
        group = grp.getgrgid(entry.pw_gid).gr_name
        groups = tuple(os.getgrouplist(name, entry.pw_gid))
        return cls(name, group, entry.pw_uid, entry.pw_gid, groups)

    @classmethod
    def current(cls) -> Workers:
        """cr-proxy's own user."""
        return cls.lookup(pwd.getpwuid(os.geteuid()).pw_name)

    def nginx_directive(self) -> str:
        return f"user {self.user} {self.group};"

    def blocked(self, dirs: Iterable[Path]) -> Path | None:
        """The first directory on the way to `dirs` these workers cannot
        enter, asked of the kernel by a shell running as them (so ACLs and
        group memberships count); None when every one can be entered. Paths
        not made yet are skipped: their parent answers for them."""
        chain = list(dict.fromkeys(p for d in dirs for p in ancestors(d)))
        script = 'for d; do [ ! -e "$d" ] || [ -x "$d" ] || { printf %s "$d"; exit 1; }; done'
        result = subprocess.run(
            ["/bin/sh", "-c", script, "sh", *map(str, chain)],
            user=self.uid, group=self.gid, extra_groups=list(self.groups),
            capture_output=True, text=True, timeout=REACH_TIMEOUT, check=False, cwd="/",
        )
        return Path(result.stdout) if result.returncode else None


def ancestors(path: Path) -> list[Path]:
    """/, then each directory down to and including `path`."""
    path = path.absolute()
    return [*reversed(path.parents), path]


def workers_user(setting: str) -> str | None:
    """The user name nginx.user stands for on this host; None: the workers
    run as cr-proxy's user (not root, so nginx cannot switch; or "")."""
    if os.geteuid() != 0 or setting == "":
        return None
    if setting != AUTO:
        return setting
    for name in AUTO_USERS:
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise PrivilegeError(message=f"nginx.user: auto found none of {', '.join(AUTO_USERS)}: "
                         "name a user")


def roots(config: Config) -> list[Path]:
    """The trees nginx's workers read from or write to (certs_dir: the
    leaves in hosts/)."""
    return [config.cache_dir, config.run_dir, config.certs_dir]


def pick_workers(config: Config) -> Workers | None:
    """The workers' user for this start. Their way to cache_dir, run_dir and
    certs_dir must be open (the directories themselves serve opens to their
    group). A named user who cannot get there stops start-up; `auto` falls
    back to cr-proxy's own user, saying why (`make serve` as root in /root)."""
    name = workers_user(config.nginx.user)
    if name is None:
        return None
    workers = Workers.lookup(name)
    blocked = workers.blocked(d.parent for d in roots(config))
    if blocked is None:
        return workers
    why = (f"nginx workers as {name} cannot enter {blocked} (on the way to cache_dir, "
           "run_dir or certs_dir)")
    if config.nginx.user != AUTO:
        raise PrivilegeError(message=f"{why}: let {name} enter it, move those directories, "
                             'or set nginx.user ("" keeps them root)')
    log.warning("%s: they run as %s instead. Move those directories where %s may enter, "
                'or set nginx.user ("" to keep this without the warning)',
                why, pwd.getpwuid(os.geteuid()).pw_name, name)
    return None


# --- modes ------------------------------------------------------------------------------------


def group_of(workers: Workers | None) -> int:
    return workers.gid if workers else os.getegid()


def restrict(config: Config, workers: Workers | None) -> None:
    """Close cache_dir, run_dir and certs_dir to other users and open them
    to the workers' group. A tree whose root already has the right group and
    mode is taken as done (files made since followed the umask and setgid);
    otherwise (first start, another nginx.user) every entry is set, once."""
    gid = group_of(workers)
    for root in roots(config):
        if not _is_shared(root, gid):
            changed = share_tree(root, gid)
            if changed:
                log.info("%s: %d entries closed to other users (group %d)", root, changed, gid)
        # Made again at each start (temp/, nginx-tmp/, hosts/), maybe under
        # another umask: the roots' children are cheap to check every time.
        for entry in os.scandir(root):
            with contextlib.suppress(PermissionError):  # share_tree said so
                _share(Path(entry.path), entry.stat(follow_symlinks=False), gid)


def _is_shared(root: Path, gid: int) -> bool:
    st = root.stat()
    return st.st_gid == gid and stat.S_IMODE(st.st_mode) == DIR_MODE


def share_tree(root: Path, gid: int) -> int:
    """Set group and mode of every directory and regular file under root
    (the secrets: 0600); the number changed. Symbolic links and sockets are
    left alone. The root is done last: it marks the tree as done."""
    changed, refused, first = 0, 0, None
    for path, st in itertools.chain(_walk(root), [(root, root.stat())]):
        try:
            changed += _share(path, st, gid)
        except PermissionError:  # another user's file (we are not root)
            refused, first = refused + 1, first or path
    if refused:
        log.warning("%d entries under %s belong to another user and stay as they are "
                    "(the first: %s)", refused, root, first)
    return changed


def _walk(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                yield path, path.lstat()


def _share(path: Path, st: os.stat_result, gid: int) -> int:
    """1 if the entry's group or mode had to change, else 0."""
    if stat.S_ISDIR(st.st_mode):
        mode = DIR_MODE
    elif stat.S_ISREG(st.st_mode):
        mode = SECRET_MODE if path.name in SECRETS else FILE_MODE
    else:
        return 0
    if st.st_gid == gid and stat.S_IMODE(st.st_mode) == mode:
        return 0
    if st.st_gid != gid:
        os.chown(path, -1, gid, follow_symlinks=False)
    os.chmod(path, mode)  # after chown, which may clear the setgid bit
    return 1


def share_socket(path: Path, workers: Workers | None) -> None:
    """A unix socket the workers connect to (the fetcher's): 0660 in their
    group; 0600 when they are cr-proxy's own user."""
    if workers is None:
        os.chmod(path, 0o600)
        return
    os.chown(path, -1, workers.gid)
    os.chmod(path, 0o660)


def write_secret(path: Path, text: str) -> None:
    """A file only cr-proxy's user may read, made so before the text is in it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, SECRET_MODE)
    with os.fdopen(fd, "w") as out:
        os.fchmod(fd, SECRET_MODE)  # an older file keeps its mode through O_CREAT
        out.write(text)
