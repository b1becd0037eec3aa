"""bpnet model files: a Keras model plus the metadata every later command needs.

Plain file (no key): a standard Keras ``.keras`` archive, loadable by
``keras.saving.load_model`` as is. bpnet's metadata (pose config,
normalization, stride, model spec, input channels) rides in the zip archive's
comment, as ``BPNETMETA1`` + zlib-compressed JSON. A comment rather than an
extra archive member, because Keras extracts the whole archive to a temporary
folder when it finds more than its three own members.

Encrypted file (with a key):

    b"BPNETENC" | version (1 byte) | header length (4 bytes, big endian) |
    header (JSON: kdf, its parameters, salt, nonce) | AES-256-GCM ciphertext

The plaintext is the plain file above. The 256-bit key is derived from the
passphrase with scrypt (n=2**15, r=8, p=1) and a random 16-byte salt; the
nonce is random (12 bytes); the magic, version and header are authenticated
as associated data. A wrong key, a missing key or any change to the file
fails authentication and is reported as one BpnetError; it can never yield
garbage weights.

Writes are atomic: the file appears complete under its name or not at all.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import struct
import zipfile
import zlib
from pathlib import Path

from bpnet.errors import BpnetError
from bpnet.io import atomic_path, json_default

log = logging.getLogger(__name__)

ENC_MAGIC = b"BPNETENC"
ENC_VERSION = 1
META_MAGIC = b"BPNETMETA1"
FORMAT_VERSION = 1
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 15, 8, 1
_ZIP_COMMENT_MAX = 65535


# ------------------------------------------------------------------ helpers

def _meta_comment(meta: dict) -> bytes:
    from bpnet import __version__
    doc = {"format_version": FORMAT_VERSION, "bpnet_version": __version__, "meta": meta}
    try:
        text = json.dumps(doc, default=json_default, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise BpnetError(f"model metadata is not JSON serializable: {e}") from e
    comment = META_MAGIC + zlib.compress(text.encode(), 9)
    if len(comment) > _ZIP_COMMENT_MAX:
        raise BpnetError(f"model metadata is too large ({len(comment)} bytes compressed; "
                         f"the limit is {_ZIP_COMMENT_MAX})")
    return comment


def _meta_from_comment(comment: bytes, source: str) -> dict:
    if not comment.startswith(META_MAGIC):
        return {}
    try:
        doc = json.loads(zlib.decompress(comment[len(META_MAGIC):]).decode())
    except (zlib.error, UnicodeDecodeError, ValueError) as e:
        raise BpnetError(f"{source}: the bpnet metadata in the model file is damaged ({e})") from e
    if doc.get("format_version", 0) > FORMAT_VERSION:
        raise BpnetError(f"{source}: written by a newer bpnet (metadata format "
                         f"{doc.get('format_version')}); upgrade bpnet to read it")
    return doc.get("meta") or {}


def _keras_archive_bytes(model, meta: dict) -> bytes:
    buf = io.BytesIO()
    try:
        # In memory, so an encrypted model never touches the disk in clear.
        from keras.src.saving import saving_lib
        saving_lib.save_model(model, buf)
    except ImportError:  # a Keras 3 release that moved its internals
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            model.save(Path(d) / "model.keras")
            buf.write((Path(d) / "model.keras").read_bytes())
    with zipfile.ZipFile(buf, "a") as zf:
        zf.comment = _meta_comment(meta)
    return buf.getvalue()


def _derive_key(passphrase, salt: bytes, n: int, r: int, p: int) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
    if isinstance(passphrase, str):
        passphrase = passphrase.encode()
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)


def _check_key(key):
    if key is None:
        return None
    if not isinstance(key, (str, bytes)) or len(key) == 0:
        raise BpnetError("the model key (-k/--key) must be a non-empty string")
    return key


def encrypt_bytes(plain: bytes, key) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    salt, nonce = os.urandom(16), os.urandom(12)
    header = json.dumps({
        "kdf": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P,
        "salt": base64.b64encode(salt).decode(), "nonce": base64.b64encode(nonce).decode(),
        "cipher": "AES-256-GCM", "payload": "keras-zip",
    }, sort_keys=True).encode()
    prefix = ENC_MAGIC + bytes([ENC_VERSION]) + struct.pack(">I", len(header)) + header
    derived = _derive_key(key, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return prefix + AESGCM(derived).encrypt(nonce, plain, prefix)


def decrypt_bytes(data: bytes, key, source: str = "<bytes>") -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    if key is None:
        raise BpnetError(f"{source}: the model file is encrypted; pass its key with -k/--key")
    fixed = len(ENC_MAGIC) + 1 + 4
    if len(data) < fixed:
        raise BpnetError(f"{source}: the encrypted model file is truncated")
    version = data[len(ENC_MAGIC)]
    if version != ENC_VERSION:
        raise BpnetError(f"{source}: unknown encrypted model format version {version}; "
                         "it was written by a newer bpnet")
    (hlen,) = struct.unpack(">I", data[len(ENC_MAGIC) + 1:fixed])
    if hlen > 65536 or len(data) < fixed + hlen + 16:
        raise BpnetError(f"{source}: the encrypted model file is truncated or damaged")
    prefix = data[:fixed + hlen]
    try:
        header = json.loads(prefix[fixed:].decode())
        salt = base64.b64decode(header["salt"])
        nonce = base64.b64decode(header["nonce"])
        n, r, p = int(header["n"]), int(header["r"]), int(header["p"])
        if header.get("kdf") != "scrypt" or header.get("cipher") != "AES-256-GCM":
            raise ValueError(f"unsupported kdf/cipher {header.get('kdf')}/{header.get('cipher')}")
        if not (2 <= n <= 2 ** 20 and 1 <= r <= 32 and 1 <= p <= 16):
            raise ValueError("implausible key-derivation parameters")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise BpnetError(f"{source}: the encrypted model file's header is damaged ({e})") from e
    derived = _derive_key(key, salt, n, r, p)
    try:
        return AESGCM(derived).decrypt(nonce, data[fixed + hlen:], prefix)
    except InvalidTag:
        raise BpnetError(f"{source}: wrong key for this encrypted model file (or the file is "
                         "damaged): decryption failed authentication") from None


def _read(path) -> tuple[Path, bytes]:
    path = Path(path)
    if not path.exists():
        raise BpnetError(f"{path}: model file not found")
    if path.is_dir():
        raise BpnetError(f"{path}: is a folder; expected a bpnet model file (.keras)")
    try:
        return path, path.read_bytes()
    except OSError as e:
        raise BpnetError(f"{path}: cannot read the model file ({e.strerror or e})") from e


def is_encrypted(path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(ENC_MAGIC)) == ENC_MAGIC


def _plain_archive(path, key) -> tuple[Path, bytes]:
    """The plain Keras archive bytes of a model file (decrypted if needed)."""
    path, data = _read(path)
    key = _check_key(key)
    if data.startswith(ENC_MAGIC):
        data = decrypt_bytes(data, key, str(path))
    elif key is not None:
        log.warning("%s is not encrypted; the key given is not needed", path)
    if not data.startswith(b"PK"):
        raise BpnetError(f"{path}: not a bpnet model file (neither a Keras .keras archive nor an "
                         "encrypted bpnet model)")
    return path, data


def _open_zip(data: bytes, source: str) -> zipfile.ZipFile:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        names = set(zf.namelist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as e:
        raise BpnetError(f"{source}: the model file is truncated or damaged "
                         f"(not a valid zip archive: {e})") from e
    missing = {"config.json", "model.weights.h5"} - names
    if missing:
        raise BpnetError(f"{source}: not a Keras model archive (missing {', '.join(sorted(missing))})")
    bad = zf.testzip()
    if bad is not None:
        raise BpnetError(f"{source}: the model file is damaged (bad CRC in {bad})")
    return zf


# ------------------------------------------------------------------ API

def save_model(model, path, meta: dict, key=None) -> Path:
    """Write ``model`` with ``meta`` to ``path`` atomically, encrypted when ``key`` is given."""
    from . import register_custom_objects
    register_custom_objects()
    if not isinstance(meta, dict):
        raise BpnetError(f"model metadata must be a dict, got {type(meta).__name__}")
    key = _check_key(key)
    path = Path(path)
    data = _keras_archive_bytes(model, meta)
    if key is not None:
        data = encrypt_bytes(data, key)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise BpnetError(f"{path}: cannot write the model file ({e.strerror or e})") from e
    return path


def _keras_load_bytes(data: bytes, compile: bool):
    import keras
    try:
        from keras.src.saving import saving_lib
    except ImportError:  # a Keras 3 release that moved its internals
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "model.keras").write_bytes(data)
            return keras.saving.load_model(Path(d) / "model.keras", compile=compile)
    return saving_lib.load_model(io.BytesIO(data), compile=compile)


def read_meta(path, key=None) -> dict:
    """Only the metadata of a model file (no Keras import; decrypts when needed)."""
    path, data = _plain_archive(path, key)
    zf = _open_zip(data, str(path))
    return _meta_from_comment(zf.comment, str(path))


def load_model(path, key=None, compile: bool = False):
    """Load a bpnet model file -> (keras.Model, meta).

    ``meta`` is {} for a Keras file not written by bpnet.
    """
    path, data = _plain_archive(path, key)
    zf = _open_zip(data, str(path))
    meta = _meta_from_comment(zf.comment, str(path))
    from . import register_custom_objects
    register_custom_objects()
    try:
        model = _keras_load_bytes(data, compile)
    except Exception as e:  # Keras raises many types for bad configs or weights
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BpnetError(f"{path}: cannot load the Keras model ({msg})") from e
    return model, meta
