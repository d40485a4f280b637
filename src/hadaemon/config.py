"""The configuration's records and its grammar.

Owns the frozen records a Config is made of (DaemonSettings, Group, Check, Section,
ClusterSettings, HttpAddress) and the reading of a line: ini sections and
``key = value`` settings, shell-like words, scopes (``[local]``, ``[ssh:...]``),
commands resolved to checks/ or actions/ or the PATH.  No file is read whole
here: configfiles does that.

Uses: base, cron.
"""

import dataclasses
import ipaddress
import os
import re
import shutil
import socket
import typing

from .base import CLUSTER_TTL, DAEMON_DEFAULTS
from .cron import CronSpec


@dataclasses.dataclass(frozen=True)
class Scope:
    """Where a group's checks run: ``local`` or ``ssh:[USER@]HOST[:PORT]``."""
    name: str
    kind: str = "local"
    user: typing.Optional[str] = None
    host: typing.Optional[str] = None
    port: typing.Optional[int] = None


@dataclasses.dataclass(frozen=True)
class HttpAddress:
    """Where the HTTP server listens (docs/http.md): an IP address and a port."""
    host: str           # normalised: 127.0.0.1, ::1, 0.0.0.0, ::
    port: int
    text: str           # as written in checks.conf, for messages

    @property
    def family(self):
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def loopback(self):
        return ipaddress.ip_address(self.host).is_loopback

    def url(self, tls=False):
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s://%s:%d/" % ("https" if tls else "http", host, self.port)


@dataclasses.dataclass
class DaemonSettings:
    interval: float = DAEMON_DEFAULTS["interval"]
    timeout: float = DAEMON_DEFAULTS["timeout"]
    confirm: int = DAEMON_DEFAULTS["confirm"]
    recheck: typing.Optional[float] = DAEMON_DEFAULTS["recheck"]
    confirm_of: typing.Optional[int] = None     # confirm = N of M: M (None: N of N)
    workers: int = DAEMON_DEFAULTS["workers"]
    action_timeout: float = DAEMON_DEFAULTS["action_timeout"]
    log: typing.Optional[str] = None
    history: int = DAEMON_DEFAULTS["history"]
    ssh_identity: typing.Optional[str] = None
    ssh_options: tuple = ()
    connect_timeout: float = DAEMON_DEFAULTS["connect_timeout"]
    http: typing.Optional[HttpAddress] = None
    # The token itself, read from the file the setting names; kept out of every repr.
    http_token: typing.Optional[str] = dataclasses.field(default=None, repr=False)
    http_cert: typing.Optional[str] = None      # absolute path of the PEM (certificate and key)
    notify: typing.Optional[tuple] = None       # argv, argv[0] resolved as an action command's
    notify_timeout: float = DAEMON_DEFAULTS["notify_timeout"]
    switchover_role: str = DAEMON_DEFAULTS["switchover_role"]
    switchover_candidate: str = DAEMON_DEFAULTS["switchover_candidate"]
    switchover_settle: float = DAEMON_DEFAULTS["switchover_settle"]
    stop_timeout: typing.Optional[float] = None  # the supervisor's stop budget: -t warns past it


@dataclasses.dataclass
class Group:
    scope: Scope
    where: str
    interval: float
    cron: typing.Optional[CronSpec]
    timeout: float
    confirm: int
    host: typing.Optional[str]
    ssh_identity: typing.Optional[str] = None
    ssh_options: tuple = ()
    connect_timeout: float = 5.0
    recheck: typing.Optional[float] = None      # interval groups only (configfiles)
    confirm_of: typing.Optional[int] = None     # confirm = N of M: M (None: N of N)

    @property
    def window(self):
        """The M of ``confirm = N of M``: how many of the last reports count (N of N: N)."""
        return self.confirm_of or self.confirm


@dataclasses.dataclass
class Check:
    key: str            # "scope|host|name": unique, stable across reloads
    name: str           # the line, whitespace-normalised
    argv: tuple         # argv[0] resolved to a path
    host: str           # the host a report is about unless it says otherwise
    group: Group
    where: str          # FILE:LINE


@dataclasses.dataclass
class Command:
    argv: tuple         # words as written, argv[0] resolved; variables expanded at run time
    ignore: bool        # a leading "-": its failure does not stop the sequence
    where: str


@dataclasses.dataclass
class Section:
    host: typing.Optional[str]
    from_state: str
    to_state: str
    commands: list
    timeout: float
    where: str

    @property
    def name(self):
        return section_name(self.host, self.from_state, self.to_state)


SWITCHOVER = "switchover"       # [switchover] / [TO: switchover]: from_state None, to_state this


def section_name(host, from_state, to_state):
    """``FROM_to_TO`` or ``HOST: FROM_to_TO`` (``switchover``, ``HOST: switchover``), as the
    section is written (without brackets)."""
    tr = to_state if from_state is None else "%s_to_%s" % (from_state, to_state)
    return "%s: %s" % (host, tr) if host else tr


@dataclasses.dataclass(frozen=True)
class ClusterSettings:
    """The [cluster] section of docs/cluster.md: this daemon is one member of NAME on etcd."""
    etcd: tuple             # endpoint URLs, scheme://host:port
    name: str
    node: str
    ttl: int = CLUSTER_TTL
    quorum: int = 1
    etcd_ca: typing.Optional[str] = None        # absolute paths
    etcd_cert: typing.Optional[str] = None
    etcd_key: typing.Optional[str] = None
    where: str = ""

    @property
    def prefix(self):
        """Where the cluster's keys live in etcd."""
        return "/hadaemon/%s/" % self.name


@dataclasses.dataclass
class Config:
    config_dir: str
    daemon: DaemonSettings
    groups: list
    checks: list
    sections: dict      # (host or None, from, to) -> Section
    cluster: typing.Optional[ClusterSettings] = None

    @staticmethod
    def precedence(host, from_state, to_state):
        """The eight section keys actions.conf's precedence tries for HOST going FROM -> TO, first first."""
        return [(h, f, t) for h in (host, None)
                for f, t in ((from_state, to_state), ("any", to_state),
                             (from_state, "any"), ("any", "any"))]

    def section_named(self, name):
        """The section written ``[NAME]`` (as ``Section.name`` gives it), or None."""
        for section in self.sections.values():
            if section.name == name:
                return section
        return None

    def switchover_section(self, to):
        """The section a switchover to host ``to`` runs: [TO: switchover], else [switchover]."""
        return self.sections.get((to, None, SWITCHOVER)) or self.sections.get((None, None, SWITCHOVER))

    def section_for(self, host, from_state, to_state):
        """The one section actions.conf's precedence runs for HOST going FROM -> TO, or None."""
        for key in self.precedence(host, from_state, to_state):
            section = self.sections.get(key)
            if section is not None:
                return section
        return None


_SHELL_SPECIAL_RE = re.compile(r"[\"'\\#;]")


def split_words(text):
    """Split a line as a shell would (quotes and backslashes honoured, nothing run).

    Returns (words, end) where ``end`` is where a trailing comment starts: a ``#``
    or ``;`` at the start of a word, outside quotes.  Raises ValueError on an
    unterminated quote.
    """
    if not _SHELL_SPECIAL_RE.search(text):
        return text.split(), len(text)          # most lines: nothing to interpret
    words, word, i, n = [], None, 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\r\n\f\v":
            if word is not None:
                words.append(word)
                word = None
            i += 1
            continue
        if word is None and c in "#;":
            return words, i
        word = word or ""
        if c == "'":
            j = text.find("'", i + 1)
            if j < 0:
                raise ValueError("unterminated ' quote")
            word += text[i + 1:j]
            i = j + 1
        elif c == '"':
            i += 1
            while True:
                if i >= n:
                    raise ValueError('unterminated " quote')
                c = text[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\" and i + 1 < n and text[i + 1] in '"\\$`':
                    c = text[i + 1]
                    i += 1
                word += c
                i += 1
        elif c == "\\":
            word += text[i + 1:i + 2]
            i += 2
        else:
            word += c
            i += 1
    if word is not None:
        words.append(word)
    return words, n


_SETTING_RE = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=(.*)\Z")
_SECTION_RE = re.compile(r"\s*\[(.*?)\]\s*(?:\s[#;].*)?\Z")    # [NAME], maybe a comment after


def read_ini(path, errors):
    """Yield (where, kind, name_or_key, words, text) for each meaningful line of a file.

    kind is ``section`` (name), ``setting`` (key, value words) or ``line`` (words,
    text without its comment).  Lexical errors go to ``errors``.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        errors.append("%s: cannot read: %s" % (path, exc.strerror))
        return
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        lineno = raw[:exc.start].count(b"\n") + 1
        errors.append("%s:%d: not UTF-8 text" % (path, lineno))
        return
    del raw
    for lineno, line in enumerate(lines, 1):
        lines[lineno - 1] = None        # let go as read: a daemon reads between its other work
        where = "%s:%d" % (path, lineno)
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        m = _SECTION_RE.match(line)
        if m:
            yield where, "section", m.group(1).strip(), None, stripped
            continue
        if stripped[0] == "[" and "]" not in stripped:
            errors.append("%s: a section header needs a closing ]: %s" % (where, stripped))
            continue
        m = _SETTING_RE.match(line)
        try:
            if m:
                words, _ = split_words(m.group(2))
                yield where, "setting", m.group(1), words, stripped
            else:
                words, end = split_words(line)
                yield where, "line", None, words, " ".join(line[:end].split())
        except ValueError as exc:
            errors.append("%s: %s" % (where, exc))


def parse_scope(name):
    """``local`` or ``ssh:[USER@]HOST[:PORT]`` -> Scope; ValueError otherwise."""
    if name == "local":
        return Scope(name)
    if name.startswith("ssh:"):
        m = re.match(r"(?:([A-Za-z0-9_.][A-Za-z0-9_.-]*)@)?"
                     r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9_.-]*)(?::(\d{1,5}))?\Z", name[4:])
        if m and (m.group(3) is None or 0 < int(m.group(3)) < 65536):
            return Scope(name, "ssh", m.group(1), m.group(2).strip("[]"),
                         int(m.group(3)) if m.group(3) else None)
        raise ValueError("bad ssh scope %r: write ssh:[USER@]HOST[:PORT]" % name)
    raise ValueError("unknown scope [%s]: a group is [local] or [ssh:[USER@]HOST[:PORT]]" % name)


def resolve_command(word, subdir, config_dir, seen=None):
    """SUBDIR/word, then a path relative to the config dir (or absolute), then PATH.

    ``seen``: a dict of the answers so far in this reading of the config (ten
    thousand checks are mostly a few scripts with different arguments).
    """
    if seen is not None:
        if (word, subdir) not in seen:
            seen[word, subdir] = resolve_command(word, subdir, config_dir)
        return seen[word, subdir]
    candidates = []
    if "/" not in word:
        candidates.append(os.path.join(config_dir, subdir, word))
    candidates.append(os.path.join(config_dir, word))
    for path in candidates:
        if os.path.isfile(path):
            if os.access(path, os.X_OK):
                return os.path.abspath(path), None
            return None, "%s is not executable (chmod +x %s)" % (path, path)
    if "/" not in word:
        found = shutil.which(word)
        if found:
            return os.path.abspath(found), None
    return None, "command not found: %s (looked in %s/, the config dir and PATH)" % (word, subdir)
