"""Writing an artifact directory atomically and deterministically.

Files are built in a temporary sibling directory, hashed into `manifest.json`, and renamed into
place only when everything (including verification) succeeded: a failed compile leaves nothing.
The manifest holds no timestamps or host details, so the same inputs give byte-identical files.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from optc.errors import OptcError
from optc.runtime.artifact import FORMAT_VERSION, MANIFEST_NAME, sha256_file


def check_output_dir(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise OptcError(f"{out}: output directory exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise OptcError(f"{out}: exists and is not a directory")


@contextmanager
def staging_dir(out: Path):
    """A temporary directory next to `out` (same filesystem, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(staging: Path, manifest: dict) -> dict:
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    full = {"format_version": FORMAT_VERSION, **manifest,
            "files": {p.relative_to(staging).as_posix(): sha256_file(p) for p in files}}
    (staging / MANIFEST_NAME).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
    return full


def publish(staging: Path, out: Path, force: bool) -> None:
    """Move the finished staging dir to `out`, replacing an old artifact only with --force."""
    if out.exists():
        if not force:
            raise OptcError(f"{out}: output directory appeared while compiling (use --force)")
        old = out.with_name(f".{out.name}.old")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)
