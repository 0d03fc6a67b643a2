"""Reading and verifying an optc artifact directory. Shared by the runtime and the compiler.

An artifact is a directory holding `manifest.json` and the files it lists with their sha256.
Loading refuses: a missing manifest or file, a hash mismatch (tampered or truncated file), a path
that leaves the directory, and a format version this runtime does not know.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath

from optc.errors import OptcError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


class ArtifactError(OptcError):
    """The artifact cannot be loaded as it is; the message names the file."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _shown(rel) -> str:
    """A listed path as a message shows it: quoted, and cut (a hand-edited name may be huge)."""
    text = repr(rel)
    return text if len(text) <= 80 else text[:77] + "..."


def shown_key(key) -> str:
    """A manifest key as an error names it: plain text as is, anything else (a newline, a control
    character, a huge name) quoted and cut, so that every message stays one line."""
    return key if isinstance(key, str) and key.isprintable() and len(key) <= 80 else _shown(key)


def resolve_inside(root: Path, rel: str) -> Path:
    """`root/rel`, refusing absolute paths, `..` and symlinks that lead outside `root`."""
    if not isinstance(rel, str) or "\x00" in rel:
        raise ArtifactError(f"{root / MANIFEST_NAME}: path {_shown(rel)} is not a file name")
    pure = PurePosixPath(rel)
    if not rel or pure.is_absolute() or "\\" in rel or any(part == ".." for part in pure.parts):
        raise ArtifactError(f"{root / MANIFEST_NAME}: path {_shown(rel)} leaves the artifact directory")
    try:
        full = (root / rel).resolve()
    except OSError as e:  # a name past the file system's limits
        raise ArtifactError(f"{root / MANIFEST_NAME}: path {_shown(rel)}: {e.strerror}") from None
    if not full.is_relative_to(root.resolve()):
        raise ArtifactError(f"{root / MANIFEST_NAME}: path {_shown(rel)} leaves the artifact directory")
    return full


# Set in the manifest a compile writes into its staging directory (the runtime needs one to
# verify the staged artifact); the published manifest never has it, and load() refuses it.
STAGING_KEY = "optc_staging"
ID_PREFIX = "sha256:"


def artifact_id_of(manifest_bytes: bytes) -> str:
    """An artifact's id: the digest of its manifest, which lists every other file's digest."""
    return ID_PREFIX + hashlib.sha256(manifest_bytes).hexdigest()


def artifact_id(root) -> str:
    """The id of the artifact directory `root` (what `optc compile` prints; pin it with
    `optc.runtime.load(root, expect=ID)`)."""
    return artifact_id_of(_manifest_bytes(Path(root)))


def _manifest_bytes(root: Path) -> bytes:
    mpath = root / MANIFEST_NAME
    if not root.is_dir():
        raise ArtifactError(f"{root}: not an artifact directory")
    if not mpath.is_file():
        raise ArtifactError(f"{mpath}: missing (not an optc artifact)")
    if mpath.is_symlink():
        raise ArtifactError(f"{mpath}: is a symbolic link (an artifact's manifest must be a file inside it)")
    return mpath.read_bytes()


def read_manifest(root: Path, *, verify_hashes: bool = True, expect: str | None = None,
                  trusted_keys=None, allow_staging: bool = False) -> dict:
    """The manifest of artifact `root`, every listed file checked against its sha256. `expect`:
    the artifact id the caller pins; `trusted_keys`: public keys one of which must have signed the
    manifest (runtime/signing.py). Both are checked on the very bytes that are parsed, before
    anything of the artifact is used."""
    root = Path(root)
    mpath = root / MANIFEST_NAME
    raw = _manifest_bytes(root)
    if expect is not None:
        if not isinstance(expect, str) or not expect.startswith(ID_PREFIX):
            raise ValueError(f"expect: an artifact id such as {ID_PREFIX}<64 hex digits>, got {expect!r}")
        got = artifact_id_of(raw)
        if got != expect:
            raise ArtifactError(f"{mpath}: artifact id {got} is not the expected {expect} "
                                f"(a different or modified artifact)")
    if trusted_keys is not None:
        from optc.runtime.signing import verify

        verify(root, raw, trusted_keys)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{mpath}: not a JSON object")
    if manifest.get(STAGING_KEY) and not allow_staging:
        raise ArtifactError(f"{mpath}: an unfinished compile's staging directory, not an artifact")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{mpath}: unsupported format_version {version!r} (this runtime reads {FORMAT_VERSION})")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{mpath}: 'files' must map file names to sha256 digests")
    for rel, digest in files.items():
        path = resolve_inside(root, rel)
        try:
            found = path.is_file()
        except OSError as e:  # e.g. a name too long for the file system
            raise ArtifactError(f"{mpath}: path {_shown(rel)}: {e.strerror}") from None
        where = root / rel if shown_key(rel) == rel else f"{root}/{shown_key(rel)}"
        if not found:
            raise ArtifactError(f"{where}: missing file listed in the manifest")
        if verify_hashes and sha256_file(path) != digest:
            raise ArtifactError(f"{where}: sha256 mismatch (file tampered with or truncated)")
    return manifest


def artifact_file(root: Path, manifest: dict, rel: str) -> Path:
    """A file the manifest lists (and therefore hash-checked), resolved inside the artifact."""
    if not isinstance(rel, str) or rel not in manifest["files"]:
        raise ArtifactError(f"{Path(root) / MANIFEST_NAME}: {_shown(rel)} is referenced but not listed in 'files'")
    return resolve_inside(Path(root), rel)
