"""Detached ed25519 signatures over a bundle's manifest (``manifest.json.sig``).

The manifest holds every file's sha256, so signing its canonical bytes (keys sorted, no spaces,
UTF-8) signs the whole bundle. The signature file is JSON: the algorithm, the signer's public key
(raw, base64) and the signature (base64). A key is named by its fingerprint: ``ed25519:`` and the
first 16 hex digits of the sha256 of its raw public bytes. ``cryptography`` is imported only to
sign or verify.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BundleError
from .safe_json import read_regular

SIGNATURE = "manifest.json.sig"
ALGORITHM = "ed25519"


@dataclass(frozen=True)
class SignatureInfo:
    """Who signed a bundle, and whether that signature was checked against trusted keys."""

    fingerprint: str
    public_key: bytes
    signature: bytes
    verified: bool = False

    def describe(self) -> str:
        """The run header's words. An unchecked signature names no key: the key in an unchecked
        ``.sig`` is only a claim, which anyone can write."""
        if self.verified:
            return f"signed by {self.fingerprint} (verified against the trusted keys)"
        return "carries a signature (not checked: no --trusted-keys)"


def canonical_bytes(manifest: dict[str, Any]) -> bytes:
    """The bytes that are signed: the manifest as JSON with sorted keys and no whitespace."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def fingerprint(public_raw: bytes) -> str:
    return f"{ALGORITHM}:{hashlib.sha256(public_raw).hexdigest()[:16]}"


def _cryptography() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise BundleError("signature checks need the 'cryptography' package (pip install cryptography)") from None
    return ed25519


def read_signature(path: Path) -> SignatureInfo:
    """Parse a signature file; :class:`BundleError` when it is not one."""
    from .safe_json import load_object

    data, _ = load_object(path, "signature")
    try:
        if data.get("algorithm") != ALGORITHM:
            raise ValueError(f"algorithm {data.get('algorithm')!r}, not {ALGORITHM}")
        public, sig = base64.b64decode(data["public_key"]), base64.b64decode(data["signature"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BundleError(f"{path}: not a readable bundle signature ({exc})") from None
    return SignatureInfo(fingerprint(public), public, sig)


def public_raw(pem: bytes) -> bytes:
    """Raw 32 public-key bytes of an ed25519 public key in PEM form."""
    from cryptography.hazmat.primitives import serialization

    ed25519 = _cryptography()
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError(f"a {type(key).__name__}, not ed25519")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


KEY_BYTES = 64 << 10  # a PEM public key is about 110 bytes


def trusted_keys(folder: Path) -> dict[str, bytes]:
    """Public keys ``*.pem`` / ``*.pub`` in ``folder`` by fingerprint; :class:`BundleError` if none."""
    if not folder.is_dir():
        raise BundleError(f"--trusted-keys {folder}: no such folder")
    keys = {}
    for f in sorted(folder.iterdir()):
        if f.suffix in (".pem", ".pub") and f.is_file():
            text = read_regular(f, KEY_BYTES)
            if b"PRIVATE KEY" in text:  # refused unparsed: a private key is never loaded from here
                raise BundleError(
                    f"--trusted-keys: {f} is a private key; only public keys belong in this folder "
                    "(keep the private key where only its owner can read it)"
                )
            try:
                raw = public_raw(text)
            except (ValueError, TypeError) as exc:
                raise BundleError(f"--trusted-keys: {f} is not an ed25519 public key ({exc})") from None
            keys[fingerprint(raw)] = raw
    if not keys:
        raise BundleError(f"--trusted-keys {folder}: holds no public keys (*.pem, *.pub)")
    return keys


def verify_signature(
    bundle: Path, manifest: dict[str, Any], signature: SignatureInfo | None, keys_folder: Path
) -> SignatureInfo:
    """The bundle's signature, checked: signed, by a trusted key, over this very manifest."""
    keys = trusted_keys(keys_folder)
    if signature is None:
        raise BundleError(f"{bundle}: bundle is not signed, and --trusted-keys requires a signature")
    if signature.fingerprint not in keys:
        raise BundleError(f"{bundle}: signed by {signature.fingerprint}, which is not a key in {keys_folder}")
    ed25519 = _cryptography()
    from cryptography.exceptions import InvalidSignature

    try:
        ed25519.Ed25519PublicKey.from_public_bytes(keys[signature.fingerprint]).verify(
            signature.signature, canonical_bytes(manifest)
        )
    except InvalidSignature:
        raise BundleError(
            f"{bundle}: manifest.json was changed after it was signed by {signature.fingerprint}"
        ) from None
    return SignatureInfo(signature.fingerprint, signature.public_key, signature.signature, verified=True)


def sign_manifest(manifest: dict[str, Any], private_pem: bytes) -> dict[str, str]:
    """The signature file's content for ``manifest``, signed with an ed25519 private key (PEM)."""
    from cryptography.hazmat.primitives import serialization

    ed25519 = _cryptography()
    try:
        key = serialization.load_pem_private_key(private_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise BundleError(f"the signing key is {type(key).__name__}, not ed25519")
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {
        "algorithm": ALGORITHM,
        "key": fingerprint(raw),
        "public_key": base64.b64encode(raw).decode(),
        "signature": base64.b64encode(key.sign(canonical_bytes(manifest))).decode(),
    }
