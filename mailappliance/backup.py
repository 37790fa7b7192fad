"""``mailappliance-admin backup DIR``: the whole appliance into one private directory, no rsync.

A backup holds everything a new machine needs: the config file and every
file it names (keys, certificates, password files, screening lists, the
LDIF directory), the Maildirs, the outbound queue and, for a local slapd,
``slapcat`` of its config database (``-n0``) and of each of its databases.
Safe while the daemon runs: Maildir files never change once in new/ or cur/
(a message that moves from new/ to cur/ meanwhile is copied once, from where
it is found), queue envelopes are read under the spool's lock, slapcat reads
an MDB database consistently while slapd runs.

Layout (the directory 0700, every file 0600, whatever the umask)::

    manifest.json          format, origin, every file: original path, size, SHA-256, owner, group, mode
    files/<original path>  e.g. files/etc/mailappliance/mailappliance.toml
    slapd/config.ldif      slapcat -n0
    slapd/db<N>.ldif       slapcat -n<N>

``restore`` (mailappliance.restore) puts it back.  Where the daemon's
user can write (Maildirs, the queue), symbolic links are never followed:
that user must not be able to make root copy /etc/shadow into a mailbox.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import grp
import hashlib
import json
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import attrs

from mailappliance.config import Settings
from mailappliance.directory import DirectoryAdminError

if TYPE_CHECKING:  # admin.py imports this module when the command runs
    from mailappliance.admin import CommandContext

FORMAT, VERSION = "mailappliance-backup", 1
MANIFEST = "manifest.json"
SLAPCAT = shutil.which("slapcat") or "/usr/sbin/slapcat"
SLAPADD = shutil.which("slapadd") or "/usr/sbin/slapadd"
CHUNK = 1 << 20


class BackupError(DirectoryAdminError):
    """A backup or restore cannot go on; the message says why (exit 1)."""


# -- the manifest (manifest.json), as written here and read back by restore -------------


class FileEntry(TypedDict):
    """A copied file (:class:`FileRecord`)."""

    path: str
    size: int
    sha256: str
    mode: int
    owner: str
    group: str
    area: str


class DirectoryEntry(TypedDict):
    """A directory to make again (:class:`DirectoryRecord`)."""

    path: str
    mode: int
    owner: str
    group: str
    area: str


class StoredFile(TypedDict):
    """A file made for the backup (slapd's dumps), by its name in the backup."""

    file: str
    size: int
    sha256: str


class SlapdDatabase(StoredFile):
    number: int
    suffix: str
    directory: str
    mode: int
    owner: str
    group: str


class SlapdDump(TypedDict):
    config_dir: str
    mode: int
    owner: str
    group: str
    config: StoredFile
    databases: list[SlapdDatabase]


class Manifest(TypedDict):
    format: str
    version: int
    host: str
    created: str
    config: str
    areas: dict[str, str]  # "mail" and "queue": where they were
    files: list[FileEntry]
    directories: list[DirectoryEntry]
    slapd: SlapdDump | None
    queued: int
    skipped: list[str]
    notes: list[str]


@attrs.define
class FileRecord:
    """One file of a backup: where it came from and what it was."""

    path: str  # the original absolute path
    size: int
    sha256: str
    mode: int
    owner: str
    group: str
    area: str  # config | mail | queue

    @property
    def stored(self) -> str:
        return "files" + self.path

    def entry(self) -> FileEntry:
        return FileEntry(path=self.path, size=self.size, sha256=self.sha256, mode=self.mode, owner=self.owner,
                         group=self.group, area=self.area)


@attrs.define
class DirectoryRecord:
    path: str
    mode: int
    owner: str
    group: str
    area: str

    def entry(self) -> DirectoryEntry:
        return DirectoryEntry(path=self.path, mode=self.mode, owner=self.owner, group=self.group, area=self.area)


def _owner_names(info: os.stat_result) -> tuple[str, str]:
    try:
        owner = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        owner = str(info.st_uid)
    try:
        group = grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        group = str(info.st_gid)
    return owner, group


# -- backup -----------------------------------------------------------------------


class BackupWriter:
    """Copies files into a new backup directory, hashing as it goes."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.files: list[FileRecord] = []
        self.directories: list[DirectoryRecord] = []
        self.skipped: list[str] = []
        self._seen: set[str] = set()

    def add_directory(self, path: Path, area: str) -> None:
        if str(path) in self._seen:
            return
        info = os.lstat(path)
        owner, group = _owner_names(info)
        self.directories.append(DirectoryRecord(str(path), stat.S_IMODE(info.st_mode), owner, group, area))
        self._seen.add(str(path))

    def add_parent(self, path: Path) -> None:
        """The directory holding ``path``, if it was made for the appliance (its owner,
        group or mode differ from root:root 0755: /etc/mailappliance root:mailappliance
        0750, /var/lib/mailappliance): a restore must give it back as it was."""
        parent = path.parent
        try:
            info = os.stat(parent)
        except OSError:
            return
        if (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) != (0, 0, 0o755) and parent != Path("/"):
            self.add_directory(parent, "config")

    def add_file(self, path: Path, area: str, follow: bool = False, as_path: Path | None = None) -> bool:
        """Copy ``path`` (a regular file; a symbolic link only when ``follow``), recorded
        as ``as_path`` (default: itself); False if it vanished meanwhile."""
        recorded = str(as_path or path)
        if recorded in self._seen:
            return True
        flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
        try:
            source = os.open(path, flags)
        except FileNotFoundError:
            return False
        except OSError as e:
            if e.errno == errno.ELOOP:
                self.skipped.append(f"{path}: a symbolic link where only files belong (not copied)")
                return True
            raise BackupError(f"cannot read {path}: {e.strerror}") from None
        try:
            info = os.fstat(source)
            if not stat.S_ISREG(info.st_mode):
                self.skipped.append(f"{path}: not a regular file (not copied)")
                return True
            stored = self.target / ("files" + recorded)
            stored.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            digest, size = hashlib.sha256(), 0
            out = os.open(stored, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                while chunk := os.read(source, CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    os.write(out, chunk)
            finally:
                os.close(out)
        finally:
            os.close(source)
        owner, group = _owner_names(info)
        self.files.append(FileRecord(recorded, size, digest.hexdigest(), stat.S_IMODE(info.st_mode),
                                     owner, group, area))
        self._seen.add(recorded)
        return True

    def add_tree(self, root: Path, area: str) -> None:
        """Every directory and regular file below ``root`` (links not followed); a
        Maildir's new/ and cur/ by ``add_maildir`` rules, its tmp/ empty."""
        self.add_directory(root, area)
        try:
            entries = sorted(os.scandir(root), key=lambda e: e.name)
        except OSError as e:
            raise BackupError(f"cannot list {root}: {e.strerror}") from None
        names = {e.name for e in entries if e.is_dir(follow_symlinks=False)}
        maildir = {"new", "cur"} <= names
        if maildir:
            self.add_maildir(root, area)
        for entry in entries:
            path = Path(entry.path)
            if maildir and entry.name in ("new", "cur", "tmp"):
                if entry.name == "tmp" and entry.is_dir(follow_symlinks=False):
                    self.add_directory(path, area)  # messages being delivered are not mail yet
                continue
            if entry.is_symlink():
                self.skipped.append(f"{path}: a symbolic link where only files belong (not copied)")
            elif entry.is_dir(follow_symlinks=False):
                self.add_tree(path, area)
            elif entry.is_file(follow_symlinks=False):
                self.add_file(path, area)

    def add_maildir(self, maildir: Path, area: str) -> None:
        """new/ then cur/: a message a POP3 login moves from new/ to cur/ while we copy
        is copied once, from wherever it is found (a Maildir name keeps its unique
        part before ':' when it moves)."""
        new, cur = maildir / "new", maildir / "cur"
        self.add_directory(new, area)
        self.add_directory(cur, area)
        done: set[str] = set()
        for name in sorted(os.listdir(new)):
            unique = name.split(":", 1)[0]
            if self.add_file(new / name, area):
                done.add(unique)
                continue
            moved = [n for n in os.listdir(cur) if n.split(":", 1)[0] == unique]
            if moved and self.add_file(cur / moved[0], area):
                done.add(unique)
        for name in sorted(os.listdir(cur)):
            if name.split(":", 1)[0] not in done:
                self.add_file(cur / name, area)

    def add_queue(self, spool_dir: Path) -> int:
        """Every committed queue entry: its envelope read under the spool's lock
        (the runner rewrites envelopes under it), the message file opened then."""
        from mailappliance.queue.spool import OutboundSpool, QueueEntryGone

        spool = OutboundSpool(spool_dir)
        if not spool.queue_dir.is_dir() or spool.queue_dir.is_symlink():
            return 0
        self.add_directory(spool_dir, "queue")  # the daemon writes incoming/ there too
        self.add_directory(spool.queue_dir, "queue")
        count = 0
        for queue_id in spool.queued_ids():
            with spool._locked():
                try:
                    envelope = spool.envelope_path(queue_id)
                except QueueEntryGone:
                    continue  # delivered meanwhile
                message = spool.message_path(queue_id)
                for path in (message, envelope):  # the state directories (incoming/, deferred/<hh>/...)
                    for directory in reversed(path.relative_to(spool.queue_dir).parents[:-1]):
                        self.add_directory(spool.queue_dir / directory, "queue")
                self.add_file(message, "queue")
                self.add_file(envelope, "queue")
            count += 1
        return count

    def run_slapcat(self, config_dir: Path) -> SlapdDump:
        """slapcat -n0 (slapd's own config) and -n<N> for each database into slapd/."""
        out = self.target / "slapd"
        out.mkdir(mode=0o700)
        config_file = out / "config.ldif"
        _run([SLAPCAT, "-F", str(config_dir), "-n", "0", "-l", str(config_file)], "slapcat -n0")
        info = os.stat(config_dir)
        owner, group = _owner_names(info)
        slapd: SlapdDump = {"config_dir": str(config_dir), "mode": stat.S_IMODE(info.st_mode),
                            "owner": owner, "group": group, "config": _stored_record(config_file, "slapd/config.ldif"),
                            "databases": []}
        for number, suffix, directory in databases_in(config_file.read_text(encoding="utf-8")):
            dump = out / f"db{number}.ldif"
            _run([SLAPCAT, "-F", str(config_dir), "-n", str(number), "-l", str(dump)], f"slapcat -n{number}")
            record = _stored_record(dump, f"slapd/db{number}.ldif")
            dir_info = os.stat(directory) if directory and os.path.isdir(directory) else info
            db_owner, db_group = _owner_names(dir_info)
            slapd["databases"].append({"number": number, "suffix": suffix, "directory": directory,
                                       "mode": stat.S_IMODE(dir_info.st_mode), "owner": db_owner,
                                       "group": db_group, **record})
        return slapd


def _holds(slapd: SlapdDump, base_dn: str) -> bool:
    """One of the dumped databases is the directory's (its suffix holds base_dn)."""
    from mailappliance.directory_setup import is_within

    return any(is_within(base_dn, db["suffix"]) for db in slapd["databases"])


def _stored_record(path: Path, name: str) -> StoredFile:
    os.chmod(path, 0o600)
    return {"file": name, "size": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise BackupError(f"{what} failed ({' '.join(command)}): {result.stderr.strip() or result.stdout.strip()}")


def databases_in(config_ldif: str) -> list[tuple[int, str, str]]:
    """(number, suffix, olcDbDirectory) of each database in a ``slapcat -n0`` dump."""
    from mailappliance.directory.ldif_format import parse_ldif

    found = []
    for entry in parse_ldif(config_ldif):
        match = re.match(r"olcDatabase=\{(\d+)\}", entry.dn)
        suffix = entry.first("olcSuffix")
        if match and suffix and int(match.group(1)) > 0:
            found.append((int(match.group(1)), suffix, entry.first("olcDbDirectory")))
    return found


def config_files(settings: Settings) -> list[Path]:
    """The config file and every existing file (or key directory) it names, except
    the state it points at (Maildirs, spool, logs) and what the directory backend
    does not use."""
    state = [settings.maildir_root, settings.spool_dir]
    skip = {id(settings.json_log)}
    if settings.directory.backend != "ldif":
        skip.add(id(settings.directory.ldif_file))
    found: list[Path] = [settings.source]

    def walk(value: object) -> None:
        if id(value) in skip:
            return
        kind = type(value)
        if isinstance(value, Path):
            if not value.is_absolute() or value in found or not value.exists():
                return
            if any(value == s or s in value.parents or value in s.parents for s in state):
                return
            found.append(value)
        elif attrs.has(kind):
            for field in attrs.fields(kind):
                walk(getattr(value, field.name))
        elif isinstance(value, (tuple, list)):
            for item in value:
                walk(item)

    for field in attrs.fields(type(settings)):
        if field.name not in ("source", "maildir_root", "spool_dir", "json_log"):
            walk(getattr(settings, field.name))
    for path in _secret_files(settings.source):  # *_file keys: their paths are not all kept in Settings
        if path not in found and path.exists():
            found.append(path)
    return found


def _secret_files(config_file: Path) -> list[Path]:
    with open(config_file, "rb") as f:
        data = tomllib.load(f)
    paths = []

    def walk(table: dict[str, object]) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                walk(value)
            elif key.endswith("_file") and isinstance(value, str) and value:
                path = Path(value).expanduser()
                paths.append(path if path.is_absolute() else (config_file.parent / path).resolve())

    walk(data)
    return paths


def make_backup(settings: Settings, target: Path, slapd_config: Path) -> Manifest:
    """Write a backup of everything ``settings`` names into ``target`` (new or empty)."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BackupError(f"{target} exists and is not an empty directory: give a new one")
    old_umask = os.umask(0o077)
    try:
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(target, 0o700)
        writer = BackupWriter(target)
        notes: list[str] = []
        for path in config_files(settings):
            writer.add_parent(path)
            if path.is_dir():
                writer.add_tree(path, "config")
            else:
                writer.add_file(path, "config", follow=True)
        writer.add_parent(settings.maildir_root)
        writer.add_parent(settings.spool_dir)
        if settings.maildir_root.is_dir():
            writer.add_tree(settings.maildir_root, "mail")
        queued = writer.add_queue(settings.spool_dir)
        slapd = None
        if settings.directory.backend == "ldap":
            if os.geteuid() == 0 and slapd_config.is_dir() and os.path.exists(SLAPCAT):
                slapd = writer.run_slapcat(slapd_config)
                if not _holds(slapd, settings.directory.ldap.base_dn):
                    shutil.rmtree(target / "slapd")
                    servers = ", ".join(settings.directory.ldap.urls)
                    notes.append(f"the local slapd ({slapd_config}) does not hold {settings.directory.ldap.base_dn}: "
                                 f"not in this backup; back up the LDAP server of {servers} on its host")
                    slapd = None
            else:
                notes.append(f"the LDAP directory ({', '.join(settings.directory.ldap.urls)}) is not in this backup: "
                             f"no local slapd config at {slapd_config} (or not root); back it up on its server "
                             "(slapcat -n0 and -n1, as root, private files)")
        manifest: Manifest = {
            "format": FORMAT, "version": VERSION, "host": socket.getfqdn(),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "config": str(settings.source),
            "areas": {"mail": str(settings.maildir_root), "queue": str(settings.spool_dir / "queue")},
            "files": [f.entry() for f in writer.files],
            "directories": [d.entry() for d in writer.directories],
            "slapd": slapd, "queued": queued, "skipped": writer.skipped, "notes": notes,
        }
        staged = target / f".{MANIFEST}.tmp"
        staged.write_text(json.dumps(manifest, indent=1) + "\n")
        os.chmod(staged, 0o600)
        staged.rename(target / MANIFEST)
        os.sync()
        return manifest
    finally:
        os.umask(old_umask)


def cmd_backup(ctx: CommandContext, args: argparse.Namespace) -> int:
    manifest = make_backup(ctx.settings, Path(args.dir).absolute(), Path(args.slapd_config))
    files = manifest["files"]
    size = sum(f["size"] for f in files)
    mail = sum(1 for f in files if f["area"] == "mail" and re.search(r"/(new|cur)/[^/]+$", f["path"]))
    summary = (f"backup in {Path(args.dir).absolute()}: {len(files)} files, {size / 1048576:.1f} MiB "
               f"({sum(1 for f in files if f['area'] == 'config')} config and key files, {mail} messages in "
               f"Maildirs, {manifest['queued']} queued)"
               + (f", slapd config and {len(manifest['slapd']['databases'])} database(s)" if manifest["slapd"] else ""))
    if ctx.as_json:
        print(json.dumps({"ok": True, "dir": str(Path(args.dir).absolute()), "files": len(files), "bytes": size,
                          "messages": mail, "queued": manifest["queued"], "slapd": bool(manifest["slapd"]),
                          "skipped": manifest["skipped"], "notes": manifest["notes"]}))
    else:
        for line in manifest["skipped"] + manifest["notes"]:
            print(f"note: {line}")
        print(summary)
    return 0
