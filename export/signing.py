"""Ed25519 keys and bundle signatures (``imunet-export --sign``, ``imunet-export keygen``).

The signature covers the canonical bytes of ``manifest.json``, which holds every file's sha256, so
it signs the whole bundle. Private keys are written with mode 0600 and never inside a bundle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from imunet.runtime.contract.bundle import MANIFEST
from imunet.runtime.contract.signature import SIGNATURE, fingerprint, sign_manifest
from imunet.runtime.errors import BundleError
from imunet.runtime.imaging.atomic import atomic_output, refuse_existing, write_text_atomic


def keygen(private_path: Path, overwrite: bool = False) -> tuple[Path, Path, str]:
    """Write a new ed25519 key pair: ``private_path`` (PEM, mode 0600) and the public key beside it
    (``.pub.pem``). Returns both paths and the key's fingerprint."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    public_path = private_path.with_name(private_path.name.removesuffix(".pem") + ".pub.pem")
    refuse_existing(private_path, overwrite)
    refuse_existing(public_path, overwrite)
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key()
    with atomic_output(private_path, overwrite) as tmp:
        tmp.write_bytes(private)
        os.chmod(tmp, 0o600)
    os.chmod(private_path, 0o600)  # atomic_output applies the umask; a private key stays private
    write_text_atomic(
        public_path,
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
        overwrite,
    )
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return private_path, public_path, fingerprint(raw)


def read_private_key(path: Path) -> bytes:
    """The PEM bytes of a signing key, checked to be an unencrypted ed25519 private key."""
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"--sign {path}: cannot read the key ({exc.strerror})") from None
    sign_manifest({}, pem)  # raises BundleError for anything but an unencrypted ed25519 key
    return pem


def sign_bundle(bundle_dir: Path, private_pem: bytes) -> str:
    """Write ``manifest.json.sig`` for the bundle's current manifest; returns the key fingerprint."""
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    signature = sign_manifest(manifest, private_pem)
    write_text_atomic(bundle_dir / SIGNATURE, json.dumps(signature, indent=2) + "\n", overwrite=True)
    return signature["key"]
