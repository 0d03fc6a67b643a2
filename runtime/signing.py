"""Ed25519 signatures of an artifact's manifest (which lists every file's sha256).

    optc keygen release.key                  # release.key (private, 0600) + release.key.pub
    optc sign build/artifact --key release.key
    optc.runtime.load("build/artifact", trusted_keys=["release.key.pub"])

The signature is `manifest.sig` beside the manifest: JSON with the algorithm, the signer's public
key and the signature over the manifest's exact bytes. Loading with `trusted_keys` verifies it
before anything of the artifact is used (the manifest is parsed from the bytes that were
verified). Uses the `cryptography` package (`pip install 'optc[sign]'`), imported only here.
"""

from __future__ import annotations

import json
from pathlib import Path

from optc.runtime.artifact import ArtifactError

SIGNATURE_NAME = "manifest.sig"
ALGORITHM = "ed25519"


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ArtifactError("signatures need the cryptography package: pip install 'optc[sign]'") from None
    return serialization, ed25519


def public_key_hex(key) -> str:
    """A trusted key as 64 hex digits: from a PEM public key (text, bytes or a file path) or hex."""
    serialization, ed25519 = _crypto()
    if isinstance(key, Path) or (isinstance(key, str) and not key.lstrip().startswith("-----") and Path(key).is_file()):
        key = Path(key).read_bytes()
    if isinstance(key, str):
        text = key.strip()
        if len(text) == 64 and all(c in "0123456789abcdef" for c in text.lower()):
            return text.lower()
        key = text.encode()
    if isinstance(key, bytes):
        try:
            pub = serialization.load_pem_public_key(key)
        except ValueError:
            raise ArtifactError("trusted key: not a PEM public key, a key file or 64 hex digits") from None
        if not isinstance(pub, ed25519.Ed25519PublicKey):
            raise ArtifactError("trusted key: not an Ed25519 public key")
        return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    raise ArtifactError(f"trusted key: unsupported type {type(key).__name__}")


def verify(root: Path, manifest_bytes: bytes, trusted_keys) -> str:
    """Check `manifest.sig` of `root` against the trusted keys; returns the signer's key (hex)."""
    serialization, ed25519 = _crypto()
    trusted = {public_key_hex(k) for k in trusted_keys}
    if not trusted:
        raise ArtifactError("trusted_keys: empty (give at least one public key)")
    sig_path = Path(root) / SIGNATURE_NAME
    if not sig_path.is_file() or sig_path.is_symlink():
        raise ArtifactError(f"{sig_path}: missing (the artifact is not signed; optc sign signs it)")
    try:
        sig = json.loads(sig_path.read_text(encoding="utf-8"))
        algorithm, signer, signature = sig["algorithm"], sig["public_key"], bytes.fromhex(sig["signature"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ArtifactError(f"{sig_path}: not an optc signature file") from None
    if algorithm != ALGORITHM:
        raise ArtifactError(f"{sig_path}: unsupported algorithm {algorithm!r}")
    if signer not in trusted:
        raise ArtifactError(f"{sig_path}: signed by {signer[:16]}..., which is not a trusted key")
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(signer)).verify(signature, manifest_bytes)
    except Exception:  # cryptography's InvalidSignature (and malformed keys)
        raise ArtifactError(f"{sig_path}: the signature does not match manifest.json (modified after signing)") \
            from None
    return signer


def generate_key(path: Path) -> Path:
    """Write a new private key (PEM, mode 0600) to `path` and its public key to `path`.pub."""
    serialization, ed25519 = _crypto()
    path = Path(path)
    if path.exists():
        raise ArtifactError(f"{path}: exists (refusing to overwrite a key)")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.touch(mode=0o600)
    path.write_bytes(pem)
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    pub_path = path.with_name(path.name + ".pub")
    pub_path.write_bytes(pub)
    return pub_path


def sign(root: Path, key_path: Path) -> str:
    """Sign the manifest of artifact `root` with the private key at `key_path`; returns the
    signer's public key (hex)."""
    serialization, ed25519 = _crypto()
    from optc.runtime.artifact import read_manifest

    root = Path(root)
    read_manifest(root)  # only a complete, intact artifact is signed
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ArtifactError(f"{key_path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ArtifactError(f"{key_path}: not an Ed25519 private key")
    manifest_bytes = (root / "manifest.json").read_bytes()
    signer = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    body = {"algorithm": ALGORITHM, "public_key": signer, "signature": key.sign(manifest_bytes).hex()}
    tmp = root / f".{SIGNATURE_NAME}.tmp"
    tmp.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
    tmp.replace(root / SIGNATURE_NAME)
    return signer
