"""``mailappliance-admin restore DIR``: a backup (mailappliance.backup) put back where it came from.

Nothing is written before every file's size and SHA-256 match the manifest
and every path in it is absolute and normal.  Files go back to their
original paths with their owner and mode, each through a private temp file
renamed over the target (a link planted there is replaced, never written
through); below the Maildir root and the queue, which the daemon's user can
write, no directory on the way may be a symbolic link.  Queue envelopes come
last: an envelope is its entry's commit point.  slapd's configuration and
databases are loaded with slapadd, into an empty place (``--force`` moves
what is there aside, never deletes it), never while that slapd runs.
Without ``--force`` nothing that exists is overwritten.
"""

from __future__ import annotations

import argparse
import grp
import json
import os
import pwd
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mailappliance.backup import (
    CHUNK,
    FORMAT,
    MANIFEST,
    SLAPADD,
    VERSION,
    BackupError,
    DirectoryEntry,
    FileEntry,
    Manifest,
    SlapdDump,
    _run,
    _sha256,
)

if TYPE_CHECKING:  # admin.py imports this module when the command runs
    from mailappliance.admin import CommandContext


def read_manifest(source: Path) -> Manifest:
    """The manifest of a backup, its paths checked: absolute, normal, no '..'."""
    try:
        manifest: Manifest = json.loads((source / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BackupError(f"{source} has no {MANIFEST}: not a backup made by mailappliance-admin backup") from None
    except (OSError, ValueError) as e:
        raise BackupError(f"{source / MANIFEST}: cannot be read: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise BackupError(f"{source / MANIFEST}: not a {FORMAT} version {VERSION}")
    for record in manifest["files"] + manifest["directories"]:
        _check_path(record["path"])
    for name in ("mail", "queue"):
        _check_path(manifest["areas"][name])
    slapd = manifest.get("slapd")
    if slapd:
        _check_path(slapd["config_dir"])
        for db in slapd["databases"]:
            _check_path(db["directory"])
            if not re.fullmatch(r"slapd/db\d+\.ldif", db["file"]):
                raise BackupError(f"{MANIFEST}: bad slapd file name {db['file']!r}")
    return manifest


def _check_path(text: object) -> None:
    if not isinstance(text, str) or not text.startswith("/") or os.path.normpath(text) != text \
            or "/../" in text + "/" or "\0" in text or text == "/":
        raise BackupError(f"{MANIFEST}: refusing the path {text!r} (absolute, normal paths only)")


def verify(source: Path, manifest: Manifest) -> None:
    """Every file there, with its size and SHA-256: a damaged backup restores nothing."""
    records = [(source / ("files" + f["path"]), f["size"], f["sha256"]) for f in manifest["files"]]
    slapd = manifest.get("slapd")
    if slapd:
        records += [(source / r["file"], r["size"], r["sha256"]) for r in [slapd["config"], *slapd["databases"]]]
    for path, size, digest in records:
        if path.is_symlink() or not path.is_file():
            raise BackupError(f"backup damaged: {path} is missing")
        if path.stat().st_size != size or _sha256(path) != digest:
            raise BackupError(f"backup damaged: {path} differs from the manifest (size or SHA-256)")


def _id(name: str, kind: str, missing: set[str]) -> int:
    """The number of user or group ``name`` here (a number stays one); -1 and noted when unknown."""
    try:
        return pwd.getpwnam(name).pw_uid if kind == "user" else grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        missing.add(f"{kind} {name}")
        return -1


def _ids(owner: str, group: str, missing: set[str]) -> tuple[int, int]:
    return _id(owner, "user", missing), _id(group, "group", missing)


def _not_empty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def conflicts(manifest: Manifest) -> list[str]:
    """What the restore would overwrite."""
    found = [f"{f['path']} exists" for f in manifest["files"] if os.path.lexists(f["path"])]
    for name in ("mail", "queue"):
        area = Path(manifest["areas"][name])
        if _not_empty(area) and not any(c.startswith(f"{area}/") for c in found):
            found.append(f"{area} is not empty")
    slapd = manifest.get("slapd")
    if slapd:
        if _not_empty(Path(slapd["config_dir"])):
            found.append(f"{slapd['config_dir']} holds a slapd config")
        for db in slapd["databases"]:
            if (Path(db["directory"]) / "data.mdb").exists():
                found.append(f"{db['directory']} holds a slapd database")
    return found


def _safe_parent(path: Path, areas: list[Path]) -> None:
    """Inside a Maildir root or the queue (which the daemon's user can write), no
    component below the area may be a symbolic link."""
    for area in areas:
        if area in path.parents:
            current = area
            for part in path.relative_to(area).parts[:-1]:
                current = current / part
                if current.is_symlink():
                    raise BackupError(f"{current} is a symbolic link: refusing to restore through it")


def _make_directories(path: Path) -> None:
    """mkdir -p: directories the backup does not describe get root's usual 0755."""
    for parent in reversed([path, *path.parents]):
        if not parent.exists():
            parent.mkdir(mode=0o755)
            os.chmod(parent, 0o755)


def _make_directory(record: DirectoryEntry, uid: int, gid: int, areas: list[Path]) -> None:
    path = Path(record["path"])
    _safe_parent(path, areas)
    if path.is_symlink() and any(area in path.parents for area in areas):
        raise BackupError(f"{path} is a symbolic link: refusing to restore through it")
    _make_directories(path)
    os.chown(path, uid, gid)
    os.chmod(path, record["mode"])


def _put_file(stored: Path, record: FileEntry, uid: int, gid: int, areas: list[Path]) -> None:
    """Write next to the target and rename over it: a link planted at the target is
    replaced, never followed."""
    target = Path(record["path"])
    _safe_parent(target, areas)
    _make_directories(target.parent)
    staged = target.parent / f".{target.name}.restore-{os.getpid()}"
    out = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with open(stored, "rb") as source:
            while chunk := source.read(CHUNK):
                os.write(out, chunk)
        os.fchown(out, uid, gid)
        os.fchmod(out, record["mode"])
    except BaseException:
        os.close(out)
        staged.unlink(missing_ok=True)
        raise
    os.close(out)
    os.rename(staged, target)


def _slapd_running(config_dir: Path) -> int | None:
    """The pid of a slapd that runs with ``config_dir`` (its olcPidFile), if any."""
    from mailappliance.directory.ldif_format import LdifSyntaxError, parse_ldif

    try:  # slapd folds long lines: read it as LDIF, not line by line
        entries = parse_ldif((config_dir / "cn=config.ldif").read_text(encoding="utf-8", errors="replace"))
        pid_file = next((e.first("olcPidFile") for e in entries if e.first("olcPidFile")), "")
        pid = int(Path(pid_file).read_text().strip()) if pid_file else 0
    except (OSError, ValueError, LdifSyntaxError):
        return None
    return pid if pid and Path(f"/proc/{pid}").exists() else None


def _move_aside(path: Path, stamp: str) -> Path:
    aside = path.with_name(f"{path.name}.before-restore-{stamp}")
    path.rename(aside)
    return aside


def restore_slapd(source: Path, slapd: SlapdDump, force: bool, missing: set[str]) -> list[str]:
    config_dir = Path(slapd["config_dir"])
    pid = _slapd_running(config_dir)
    if pid:
        raise BackupError(f"slapd (pid {pid}) runs with {config_dir}: stop it first (systemctl stop slapd)")
    uid, gid = _ids(slapd["owner"], slapd["group"], missing)
    databases = [(db, *_ids(db["owner"], db["group"], missing)) for db in slapd["databases"]]
    if missing:
        raise BackupError(f"missing here: {', '.join(sorted(missing))} (install slapd first: apt-get install slapd)")
    done = []
    stamp = time.strftime("%Y%m%d%H%M%S")
    if _not_empty(config_dir):
        done.append(f"moved the existing slapd config to {_move_aside(config_dir, stamp)}")
    elif config_dir.exists():
        config_dir.rmdir()
    for db, _, _ in databases:  # slapadd -n0 checks that each olcDbDirectory exists
        directory = Path(db["directory"])
        data = [directory / name for name in ("data.mdb", "lock.mdb") if (directory / name).exists()]
        if data:
            aside = directory.with_name(f"{directory.name}.before-restore-{stamp}")
            aside.mkdir(mode=0o700)
            for path in data:
                path.rename(aside / path.name)
            done.append(f"moved the existing database files of {directory} to {aside}")
        _make_directories(directory.parent)
        directory.mkdir(mode=db["mode"], exist_ok=True)
    _make_directories(config_dir.parent)
    config_dir.mkdir(mode=slapd["mode"])
    _run([SLAPADD, "-F", str(config_dir), "-n", "0", "-l", str(source / slapd["config"]["file"])], "slapadd -n0")
    for db, db_uid, db_gid in databases:
        _run([SLAPADD, "-F", str(config_dir), "-n", str(db["number"]), "-l", str(source / db["file"])],
             f"slapadd -n{db['number']}")
        _chown_tree(Path(db["directory"]), db_uid, db_gid)
        done.append(f"loaded {db['suffix']} into {db['directory']}")
    _chown_tree(config_dir, uid, gid)
    done.append(f"loaded slapd's config into {config_dir}: start slapd now (systemctl start slapd)")
    return done


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for path, dirs, files in os.walk(root):
        for name in dirs + files:
            os.lchown(os.path.join(path, name), uid, gid)


def restore(source: Path, force: bool) -> list[str]:
    """Put the backup in ``source`` back; the lines to print."""
    manifest = read_manifest(source)
    verify(source, manifest)
    clashes = conflicts(manifest)
    if clashes and not force:
        shown = "; ".join(clashes[:10]) + (f"; and {len(clashes) - 10} more" if len(clashes) > 10 else "")
        raise BackupError(f"refusing to overwrite: {shown}. Restore into an empty machine, or give --force "
                          "to overwrite files and merge into the directories")
    missing: set[str] = set()
    owners = {(r["owner"], r["group"]): _ids(r["owner"], r["group"], missing)
              for r in manifest["files"] + manifest["directories"]}
    if missing:
        raise BackupError(f"missing here: {', '.join(sorted(missing))}: create them first (docs/admin.md, "
                          "section 1: adduser --system --group --home /var/lib/mailappliance mailappliance)")
    if os.geteuid() != 0 and any(uid != os.geteuid() for uid, _ in owners.values()):
        raise BackupError("the files belong to other users: run restore as root")
    areas = [Path(manifest["areas"]["mail"]), Path(manifest["areas"]["queue"])]
    lines = []
    slapd = manifest.get("slapd")
    if slapd:
        lines += restore_slapd(source, slapd, force, missing)
    for record in sorted(manifest["directories"], key=lambda r: r["path"].count("/")):
        _make_directory(record, *owners[(record["owner"], record["group"])], areas)
    # a queue entry's envelope is its commit point: every message file before any envelope
    ordered = sorted(manifest["files"], key=lambda r: r["area"] == "queue" and r["path"].endswith(".json"))
    for record in ordered:
        _put_file(source / ("files" + record["path"]), record, *owners[(record["owner"], record["group"])], areas)
    os.sync()
    lines.append(f"restored {len(manifest['files'])} files from {source} (made {manifest['created']} on "
                 f"{manifest['host']}); config: {manifest['config']}")
    return lines


def cmd_restore(ctx: CommandContext, args: argparse.Namespace) -> int:
    lines = restore(Path(args.dir).absolute(), args.force)
    if ctx.as_json:
        print(json.dumps({"ok": True, "done": lines}))
    else:
        print("\n".join(lines))
    return 0

