"""Writing an artifact directory atomically, deterministically and without harming anything else.

Files are built in a staging directory next to the output, hashed into `manifest.json`, and
renamed into place only when everything (including verification) succeeded: a failed compile
leaves nothing. The manifest holds no timestamps or host details, so the same inputs give
byte-identical files.

`--force` replaces only what optc wrote: a directory that is an optc artifact (a manifest that
reads, and no file it does not list), never one that holds the input model, the config or the
current directory. Everything is checked before any work starts.

A staging directory is named `.<output>.optc-staging-<pid>-<random>`; its manifest is marked as
unfinished (the runtime refuses to load it). A compile killed midway leaves one behind; the next
compile into the same output removes those whose process is gone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from optc.errors import OptcError
from optc.runtime.artifact import FORMAT_VERSION, MANIFEST_NAME, STAGING_KEY, ArtifactError, read_manifest, sha256_file
from optc.runtime.signing import SIGNATURE_NAME

STAGING_MARK = ".optc-staging-"


def _not_artifact_reason(out: Path) -> str | None:
    """Why `out` is not an optc artifact that --force may replace (None: it is one)."""
    if out.is_symlink():
        return "is a symbolic link"
    try:
        manifest = read_manifest(out, verify_hashes=False, allow_staging=False)
    except ArtifactError as e:
        why = str(e).split(": ", 1)[-1]
        return "is not an optc artifact (it has no manifest.json)" if why.startswith("missing") else \
            f"is not an optc artifact ({why})"
    listed = set(manifest["files"]) | {MANIFEST_NAME, SIGNATURE_NAME}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_symlink() or (p.is_file() and rel not in listed):
            return f"holds {rel!r}, which its manifest does not list"
        if p.is_dir() and not any(x == rel or x.startswith(rel + "/") for x in listed):
            return f"holds the directory {rel!r}, which its manifest does not list"
    return None


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(out: Path, force: bool, protected: dict[str, Path] | None = None) -> None:
    """Refuse, before any work, an output that would harm something: a directory holding (or
    being) a protected path (the input, the config, the current directory), an existing
    directory without --force, one that --force may not replace, or a parent we cannot write."""
    out = Path(out)
    target = out.absolute().resolve() if not out.is_symlink() else out.absolute()
    for what, path in (protected or {}).items():
        p = Path(path).absolute().resolve()
        if p == target or target in p.parents:
            raise OptcError(f"{out}: {'is' if p == target else 'contains'} {what} ({p}); "
                            f"write the artifact somewhere else")
    if out.is_symlink():
        raise OptcError(f"{out}: is a symbolic link; give the directory itself")
    if out.exists():
        if not out.is_dir():
            raise OptcError(f"{out}: exists and is not a directory")
        empty = not any(out.iterdir())  # `mkdir out` first: it holds nothing to lose
        if not empty and not force:
            raise OptcError(f"{out}: output directory exists (use --force to replace an optc artifact)")
        why = None if empty else _not_artifact_reason(out)
        if why:
            raise OptcError(f"{out}: --force replaces only an optc artifact, and this directory {why} "
                            f"(nothing was deleted)")
    parent = _nearest_existing(target.parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OptcError(f"{out}: cannot write into {parent} (permission denied)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(out: Path) -> list[Path]:
    """Staging directories of earlier compiles into `out` whose process is gone."""
    removed = []
    prefix = f".{out.name}{STAGING_MARK}"
    if not out.parent.is_dir():
        return removed
    for d in out.parent.iterdir():
        if not d.name.startswith(prefix) or not d.is_dir() or d.is_symlink():
            continue
        pid = d.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


@contextmanager
def staging_dir(out: Path):
    """A staging directory next to `out` (same filesystem, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING_MARK}{os.getpid()}-", dir=out.parent))
    # mkdtemp makes it 0700; the published artifact gets the user's ordinary permissions
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(root: Path, manifest: dict, *, staging: bool = False) -> dict:
    """Hash every file of `root` into its manifest.json. `staging=True` marks the manifest
    unfinished: the runtime loads it only for the compiler's own verification."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name not in (MANIFEST_NAME, SIGNATURE_NAME))
    full = {"format_version": FORMAT_VERSION, **manifest,
            "files": {p.relative_to(root).as_posix(): sha256_file(p) for p in files}}
    if staging:
        full[STAGING_KEY] = True
    (root / MANIFEST_NAME).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
    return full


def publish(staging: Path, out: Path, force: bool) -> None:
    """Move the finished staging dir to `out`, replacing an old artifact only with --force."""
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        try:
            out.rmdir()  # empty when checked before the compile and still empty now
        except OSError:
            raise OptcError(f"{out}: output directory changed while compiling (nothing was deleted)") from None
    if out.exists() or out.is_symlink():
        if not force:
            raise OptcError(f"{out}: output directory appeared while compiling (use --force)")
        why = _not_artifact_reason(out)
        if why:  # it changed while we compiled
            raise OptcError(f"{out}: --force replaces only an optc artifact, and this directory {why} "
                            f"(nothing was deleted)")
        # a fresh name: an existing `.<out>.old` may be anybody's
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)
