"""Patch signatures: a process can require that every patch be signed by a key it trusts.

Keys are Ed25519 (`livepatch keygen`): the private key is a PEM file readable only by its
owner, the public key a PEM file to hand to the processes that should trust it. A
signature is *detached*: `livepatch sign fix.py` writes `fix.py.sig`, a short text file

    livepatch-signature-v1
    key ed25519:<first 16 hex digits of sha256(public key)>
    sha256 <sha256 of the patch file>
    sig <base64 Ed25519 signature>

over the bytes `livepatch-signature-v1\\n` + the exact bytes of the patch file, so the
patch file itself stays an ordinary, reviewable Python file, and changing one byte of it
voids the signature. `livepatch apply` sends `PATCH.sig` along when it exists.

A process trusts the public keys named (as PEM file paths, separated by `:`) in
`LIVEPATCH_TRUSTED_KEYS`, or passed to `livepatch.agent.start(trusted_keys=...)`. Once it
trusts any key, it refuses unsigned patches and patches signed by any other key, before
executing a single line of them.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from livepatch.errors import PatchError

TRUSTED_KEYS_ENV = "LIVEPATCH_TRUSTED_KEYS"
MAGIC = "livepatch-signature-v1"


class SignatureError(PatchError):
    """The patch is unsigned, or its signature is wrong, or no trusted key signed it."""

    code = "bad-signature"


class KeyFileError(PatchError):
    """A key file could not be read or is not an Ed25519 key."""

    code = "bad-key"


@dataclass(frozen=True)
class Signature:
    """A parsed detached signature."""

    key_id: str
    sha256: str
    sig: bytes

    def dumps(self) -> str:
        return (
            f"{MAGIC}\nkey {self.key_id}\nsha256 {self.sha256}\n"
            f"sig {base64.b64encode(self.sig).decode()}\n"
        )


def key_id(public_raw: bytes) -> str:
    return "ed25519:" + hashlib.sha256(public_raw).hexdigest()[:16]


def generate(private_path: Path, public_path: Path) -> str:
    """Write a new key pair (private 0600, public 0644); return the key id."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key()
    public_pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(public_pem)
    return key_id(_raw(public))


def sign(data: bytes, private_path: Path) -> Signature:
    """Sign the bytes of a patch file with the private key in `private_path`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(
            f"cannot read the private key {private_path} ({exc.__class__.__name__}); "
            "make one with 'livepatch keygen'"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(
            f"{private_path} is not an Ed25519 key; make one with 'livepatch keygen'"
        )
    return Signature(
        key_id=key_id(_raw(key.public_key())),
        sha256=hashlib.sha256(data).hexdigest(),
        sig=key.sign(_signed_bytes(data)),
    )


def parse(text: str) -> Signature:
    """Parse a detached signature file's text."""
    lines = text.strip().splitlines()
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(" ")
        fields[name] = value.strip()
    if not lines or lines[0].strip() != MAGIC or not {"key", "sha256", "sig"} <= set(fields):
        raise SignatureError(
            f"the signature is not a {MAGIC} file; sign the patch again with 'livepatch sign'"
        )
    try:
        sig = base64.b64decode(fields["sig"], validate=True)
    except ValueError:
        raise SignatureError("the signature's 'sig' line is not base64; sign again") from None
    return Signature(key_id=fields["key"], sha256=fields["sha256"], sig=sig)


class TrustedKeys:
    """The public keys a process accepts patches from (empty: signatures not required)."""

    def __init__(self, keys: Iterable[object] = ()) -> None:
        self._keys: dict[str, object] = {}
        for key in keys:
            public = load_public(key)
            self._keys[key_id(_raw(public))] = public

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> TrustedKeys:
        value = (os.environ if environ is None else environ).get(TRUSTED_KEYS_ENV, "")
        return cls(Path(p) for p in value.split(os.pathsep) if p.strip())

    @property
    def required(self) -> bool:
        return bool(self._keys)

    @property
    def ids(self) -> list[str]:
        return sorted(self._keys)

    def verify(self, data: bytes, signature_text: str | None) -> str | None:
        """Check `signature_text` over `data`; return the signing key id (None: not required).

        Raises SignatureError when signatures are required and this one does not hold.
        """
        if not self.required:
            # before the import: cryptography's native modules load in one C call each,
            # holding the GIL (about 6 ms here), and a target that trusts no key never
            # needs them; one that does loaded them with its keys
            return None
        from cryptography.exceptions import InvalidSignature

        if not signature_text:
            raise SignatureError(
                "this process only accepts signed patches and the patch has no signature; "
                "sign it with 'livepatch sign PATCH --key KEY' (writes PATCH.sig)"
            )
        signature = parse(signature_text)
        if signature.sha256 != hashlib.sha256(data).hexdigest():
            raise SignatureError(
                "the signature was made for a different version of the patch file; "
                "sign the file again"
            )
        public = self._keys.get(signature.key_id)
        if public is None:
            raise SignatureError(
                f"the patch is signed by {signature.key_id}, which this process does not "
                f"trust (it trusts {', '.join(self.ids)}); sign it with a trusted key"
            )
        try:
            public.verify(signature.sig, _signed_bytes(data))  # type: ignore[attr-defined]
        except InvalidSignature:
            raise SignatureError(
                f"the signature by {signature.key_id} does not match the patch; "
                "the file was changed after signing or the signature is forged"
            ) from None
        return signature.key_id


def load_public(key: object) -> object:
    """An Ed25519 public key from a PEM path, PEM bytes/str, or a key object."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if isinstance(key, Ed25519PublicKey):
        return key
    try:
        if isinstance(key, (str, bytes)) and "-----BEGIN" in (
            key if isinstance(key, str) else key.decode("ascii", "replace")
        ):
            pem = key.encode() if isinstance(key, str) else key
        else:
            pem = Path(key).read_bytes()  # type: ignore[arg-type,call-overload]
        public = serialization.load_pem_public_key(pem)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(
            f"cannot read the trusted public key {key!s:.200} ({exc.__class__.__name__}); "
            f"check {TRUSTED_KEYS_ENV} or the trusted_keys argument"
        ) from None
    if not isinstance(public, Ed25519PublicKey):
        raise KeyFileError(f"the trusted key {key!s:.200} is not an Ed25519 public key")
    return public


def _raw(public: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def _signed_bytes(data: bytes) -> bytes:
    return MAGIC.encode() + b"\n" + data
