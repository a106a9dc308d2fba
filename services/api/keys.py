"""API keys: named (so one can be rotated out while another stays), kept and compared only as SHA-256 hashes.

    keyring = ApiKeyring.load({"ops": "sha256:9f86...", }, env=os.environ)   # + $FACECAST_API_KEYS, its file
    name = keyring.match(presented_key)          # the key's name, or None; constant time over every key

Where keys come from (all of them are accepted together):
- the Serve application arg `api_keys`: a mapping name -> "sha256:<64 hex digits>" (`facecast keys hash` prints
  the line for a key), so no config file or controller checkpoint ever holds a key itself;
- `$FACECAST_API_KEYS`: comma-separated `name=key` entries (a bare `key` is named `env-1`, `env-2`, ...) — how a
  Kubernetes Secret reaches the pods;
- the file named by `$FACECAST_API_KEY_FILE` (or `facecast serve --api-key-file`): one `name=key` (or `name key`)
  per line, `#` comments and blank lines ignored.
A key itself is held only long enough to hash it. Keys shorter than `MIN_KEY_CHARS` are refused (`secrets.token_urlsafe`
keys are 43); names are 1 to 64 characters of letters, digits, `.`, `_`, `-`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ApiKeyError", "ApiKeyring", "hash_api_key", "parse_api_keys", "MIN_KEY_CHARS"]

MIN_KEY_CHARS = 16
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HASH = re.compile(r"sha256:[0-9a-f]{64}")


class ApiKeyError(ValueError):
    """A key source is malformed; the message names the source and line, never a key."""


def hash_api_key(key: str) -> str:
    """The stored form of a key: "sha256:" + its lowercase hex SHA-256."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def _check_key(key: str, where: str) -> None:
    if len(key) < MIN_KEY_CHARS:
        raise ApiKeyError(f"{where}: the key is {len(key)} characters long; at least {MIN_KEY_CHARS} are required "
                          "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if any(ch.isspace() or not ch.isprintable() for ch in key):
        raise ApiKeyError(f"{where}: the key contains whitespace or unprintable characters")


def _check_name(name: str, where: str) -> None:
    if not _NAME.fullmatch(name):
        raise ApiKeyError(f"{where}: key name {name[:80]!r} is invalid: 1 to 64 letters, digits, '.', '_' or '-'")


def parse_api_keys(text: str, source: str, *, separator: str = "\n", default_prefix: str = "key") -> dict[str, str]:
    """`name=key` entries (or `name key`, or a bare key named `<default_prefix>-<n>`) -> {name: key}.

    Raises ApiKeyError naming `source` and the entry number for a short key, a bad name or a repeated name."""
    keys: dict[str, str] = {}
    for number, raw in enumerate(text.split(separator), 1):
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        where = f"{source} entry {number}"
        if "=" in entry:
            name, _, key = entry.partition("=")
        elif len(entry.split()) == 2:
            name, key = entry.split()
        else:
            name, key = f"{default_prefix}-{len(keys) + 1}", entry
        name, key = name.strip(), key.strip()
        _check_name(name, where)
        _check_key(key, where)
        if name in keys:
            raise ApiKeyError(f"{where}: key name {name!r} is given twice")
        keys[name] = key
    return keys


@dataclass(frozen=True)
class ApiKeyring:
    """Accepted keys as (name, SHA-256 digest) pairs. Empty: no authentication."""

    entries: tuple[tuple[str, bytes], ...] = ()

    @classmethod
    def from_hashes(cls, hashes: Mapping[str, str], source: str = "api_keys") -> "ApiKeyring":
        """{name: "sha256:<hex>"}; a value that is not a hash is refused (a raw key must not sit in a config)."""
        if not isinstance(hashes, Mapping):
            raise ApiKeyError(f"{source} must be a mapping of key name to 'sha256:<64 hex digits>' (print one with "
                              "`facecast keys hash`); put keys themselves in $FACECAST_API_KEYS or a key file")
        entries = []
        for name, value in hashes.items():
            _check_name(str(name), source)
            if not isinstance(value, str) or not _HASH.fullmatch(value):
                raise ApiKeyError(f"{source}[{name!r}] must be 'sha256:<64 lowercase hex digits>' (print it with "
                                  "`facecast keys hash`), not a key itself")
            entries.append((str(name), bytes.fromhex(value.removeprefix("sha256:"))))
        return cls(tuple(entries))

    @classmethod
    def from_keys(cls, keys: Mapping[str, str]) -> "ApiKeyring":
        return cls(tuple((name, hashlib.sha256(key.encode("utf-8")).digest()) for name, key in keys.items()))

    @classmethod
    def load(cls, hashes: Mapping[str, str] | None = None, *, env: Mapping[str, str] | None = None,
             key_file: str | None = None) -> "ApiKeyring":
        """Every source together: the hashes, $FACECAST_API_KEYS, the key file ($FACECAST_API_KEY_FILE unless
        `key_file`). Raises ApiKeyError naming the source of a bad entry or of a name given twice."""
        env = os.environ if env is None else env
        ring = cls.from_hashes(hashes or {})
        from_env = parse_api_keys(env.get("FACECAST_API_KEYS", ""), "$FACECAST_API_KEYS", separator=",",
                                  default_prefix="env")
        ring = ring.merged(cls.from_keys(from_env), "$FACECAST_API_KEYS")
        path = key_file or env.get("FACECAST_API_KEY_FILE")
        if path:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise ApiKeyError(f"API key file {path!r} cannot be read: {getattr(error, 'strerror', None) or error}")
            ring = ring.merged(cls.from_keys(parse_api_keys(text, f"API key file {path!r}", default_prefix="file")),
                               f"API key file {path!r}")
        return ring

    def merged(self, other: "ApiKeyring", source: str) -> "ApiKeyring":
        """Both keyrings' keys; the same name with the same key twice is one entry, with another key an error."""
        mine = dict(self.entries)
        clash = sorted(name for name, digest in other.entries if name in mine and mine[name] != digest)
        if clash:
            raise ApiKeyError(f"{source}: key name(s) {clash} are already given, with another key, by another source")
        return ApiKeyring(self.entries + tuple(entry for entry in other.entries if entry[0] not in mine))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.entries)

    def hashes(self) -> dict[str, str]:
        """{name: "sha256:<hex>"}: what may be written into a Serve config."""
        return {name: "sha256:" + digest.hex() for name, digest in self.entries}

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def match(self, presented: str) -> str | None:
        """The name of the key `presented` is, or None. Hashes it once and compares the digest with every stored
        one in constant time, so the time taken says nothing about which key (or how much of one) matched."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found = None
        for name, stored in self.entries:
            if hmac.compare_digest(digest, stored) and found is None:
                found = name
        return found

    def __repr__(self) -> str:   # never the digests: a log line of the settings shows names only
        return f"ApiKeyring(names={list(self.names)})"
