"""A small wrapper over obstore's S3 client: the few calls the remote registry makes, with
typed errors whose messages name the store and never carry a credential.

Settings come from the standard AWS sources, read by obstore itself (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``/``AWS_DEFAULT_REGION``,
``AWS_ENDPOINT_URL``, web identity and container credentials, instance metadata), plus
profiles from ``~/.aws/credentials`` and ``~/.aws/config`` (``AWS_PROFILE``) read here
when no key is in the environment. Nothing of them is stored or printed.
"""

from __future__ import annotations

import configparser
import contextlib
import hashlib
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from adaptr.errors import AdaptrError, IntegrityError, StorageFullError


class StoreError(AdaptrError):
    """A request to the object store failed (the message names the store)."""

    exit_code = 8


class Unreachable(StoreError):
    """The store cannot be reached (no route, refused, timed out)."""

    brief = ""  # the first half of the message: what could not be reached, and why


class Denied(StoreError):
    """The store refused the credentials or the request (403, a wrong key or signature)."""


class NotFound(AdaptrError, LookupError):
    """No object at that key (internal: callers turn it into what is missing)."""

    exit_code = 3


class PreconditionFailed(AdaptrError):
    """A conditional write lost: the object exists (create) or changed (update)."""

    exit_code = 5


@dataclass(frozen=True)
class Location:
    """``s3://BUCKET/PREFIX`` split; ``prefix`` has no leading or trailing slash."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> Location:
        from adaptr.errors import InvalidInputError, brief

        m = re.fullmatch(r"s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(/.*)?", str(url).strip())
        if not m:
            raise InvalidInputError(
                f"invalid store address {brief(url)}: use s3://BUCKET/PREFIX (a lowercase "
                "bucket name of 3-63 letters, digits, '.' or '-')"
            )
        return cls(m.group(1), (m.group(2) or "").strip("/"))

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def rel(self, key: str) -> str:
        return key[len(self.prefix) + 1 :] if self.prefix else key


@dataclass
class Meta:
    """What the store says of one object."""

    key: str  # relative to the registry's prefix
    etag: str
    size: int
    modified: float  # seconds since the epoch, the store's clock


def _profile_credentials() -> dict:
    """Keys and region of ``$AWS_PROFILE`` (or ``default``) from the shared AWS files, when
    the environment holds no key of its own; {} when there are none."""
    out: dict = {}
    profile = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE")
    if os.environ.get("AWS_ACCESS_KEY_ID") or (
        profile is None and "AWS_WEB_IDENTITY_TOKEN_FILE" in os.environ
    ):
        return out
    profile = profile or "default"
    creds = Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials").expanduser()
    conf = Path(os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config").expanduser()
    parser = configparser.ConfigParser()
    try:
        parser.read([conf, creds], encoding="utf-8")
    except (OSError, configparser.Error):
        return out
    for section in (profile, f"profile {profile}"):
        if parser.has_section(section):
            sec = parser[section]
            for src, dest in (
                ("aws_access_key_id", "access_key_id"),
                ("aws_secret_access_key", "secret_access_key"),
                ("aws_session_token", "token"),
                ("region", "region"),
                ("endpoint_url", "endpoint"),
            ):
                if sec.get(src):
                    out.setdefault(dest, sec[src])
    return out


def _seconds(name: str, default: float) -> timedelta:
    try:
        return timedelta(seconds=float(os.environ.get(name, default)))
    except ValueError:
        return timedelta(seconds=default)


class ObjectStore:
    """The registry's objects under ``s3://BUCKET/PREFIX``: get, head, list, put, delete."""

    def __init__(self, location: Location):
        from obstore.store import S3Store

        self.location = location
        config: dict = {}
        for dest, value in _profile_credentials().items():
            if dest == "endpoint" and os.environ.get("AWS_ENDPOINT_URL"):
                continue
            if dest == "region" and (
                os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            ):
                continue
            config[dest] = value
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        endpoint = endpoint or config.get("endpoint")
        if endpoint:
            config["endpoint"] = endpoint
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        config["region"] = region or config.get("region") or "us-east-1"
        self.endpoint = endpoint or f"https://s3.{config['region']}.amazonaws.com"
        timeout = _seconds("ADAPTR_REMOTE_TIMEOUT", 30)
        client = {
            "allow_http": bool(endpoint and endpoint.startswith("http://")),
            "connect_timeout": _seconds("ADAPTR_REMOTE_CONNECT_TIMEOUT", 5),
            "timeout": timedelta(seconds=max(timeout.total_seconds(), 1) * 10),
        }
        retry = {
            "max_retries": int(os.environ.get("ADAPTR_REMOTE_RETRIES", "3")),
            "backoff": {
                "init_backoff": timedelta(milliseconds=100),
                "max_backoff": timedelta(seconds=2),
                "base": 2,
            },
            "retry_timeout": timeout,
        }
        self._store = S3Store(
            location.bucket,
            prefix=location.prefix or None,
            client_options=client,
            retry_config=retry,
            **config,
        )

    def __repr__(self) -> str:
        return f"ObjectStore({self.location.url!r})"

    # --------------------------------------------------------------- errors
    def _error(self, exc: BaseException, what: str, key: str) -> Exception:
        """A typed, one-line error for a failed request (credentials never appear)."""
        import obstore.exceptions as oe

        where = f"{self.location.url}/{key}".rstrip("/") if key else self.location.url
        text = str(exc)
        if isinstance(exc, oe.AlreadyExistsError | oe.PreconditionError):
            return PreconditionFailed(f"{where} changed meanwhile")
        if isinstance(exc, oe.NotFoundError | FileNotFoundError) and "NoSuchBucket" not in text:
            return NotFound(f"{where} does not exist")
        if "NoSuchBucket" in text:
            return StoreError(
                f"the bucket {self.location.bucket} does not exist at {self.endpoint}: create it, "
                "or check the address and AWS_ENDPOINT_URL"
            )
        if isinstance(exc, oe.PermissionDeniedError | oe.UnauthenticatedError) or re.search(
            r"\b(401|403)\b|SignatureDoesNotMatch|InvalidAccessKeyId|AccessDenied", text
        ):
            code = re.search(r"<Code>(\w+)</Code>", text)
            why = f" ({code.group(1)})" if code else ""
            return Denied(
                f"the store {self.location.url} at {self.endpoint} refused the credentials while "
                f"{what}{why}: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            )
        if re.search(r"EntityTooLarge|QuotaExceeded|InsufficientStorage|\b507\b", text):
            return StorageFullError(f"the store {self.location.url} is full while {what}")
        brief = (
            f"the store {self.location.url} at {self.endpoint} cannot be reached while {what} "
            f"({_reason(text)})"
        )
        err = Unreachable(
            f"{brief}; nothing was changed by this command: check the network and "
            "AWS_ENDPOINT_URL, then run it again"
        )
        err.brief = brief
        return err

    def _call(self, what: str, key: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # obstore raises its own classes (and OSError subclasses)
            raise self._error(e, what, key) from None

    # ---------------------------------------------------------------- reads
    def get(self, key: str) -> tuple[bytes, Meta]:
        import obstore

        res = self._call("reading", key, obstore.get, self._store, key)
        data = self._call("reading", key, lambda: bytes(res.bytes()))
        return data, _meta(res.meta, self.location)

    def head(self, key: str) -> Meta:
        import obstore

        return _meta(self._call("reading", key, obstore.head, self._store, key), self.location)

    def exists(self, key: str) -> Meta | None:
        try:
            return self.head(key)
        except NotFound:
            return None

    def list(self, prefix: str) -> list[Meta]:
        """Every object under ``prefix`` (a folder name ending in '/')."""
        import obstore

        def collect() -> list[Meta]:
            out = []
            for chunk in obstore.list(self._store, prefix=prefix, chunk_size=1000):
                out.extend(_meta(m, self.location) for m in chunk)
            return out

        return self._call("listing", prefix, collect)

    def download(self, key: str, dest: Path, digest: str) -> int:
        """Stream ``key`` into ``dest``, hashing as it comes: IntegrityError (and no file)
        unless the bytes hash to ``digest``. Returns the size."""
        import queue
        import threading

        import obstore

        h = hashlib.sha256()
        size = 0
        chunks: queue.Queue = queue.Queue(maxsize=4)
        hasher = threading.Thread(target=_hash_chunks, args=(h, chunks), daemon=True)
        hasher.start()  # hashes one chunk while the next is written (hashlib drops the GIL)
        try:
            res = self._call("downloading", key, obstore.get, self._store, key)
            with open(dest, "wb") as f:
                for chunk in self._call("downloading", key, res.stream, 8 << 20):
                    view = memoryview(chunk)
                    chunks.put(view)
                    f.write(view)
                    size += len(view)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        finally:
            chunks.put(None)
            hasher.join()
        # not fsynced: a cached file is hashed again before it is served (read_checked,
        # check_files), and one torn by a crash is fetched again
        if h.hexdigest() != digest:
            dest.unlink(missing_ok=True)
            raise IntegrityError(
                f"{self.location.url}/{key} is corrupt on the store (its SHA-256 is "
                f"{h.hexdigest()[:12]}…, not {digest[:12]}…); nothing was loaded: re-add the "
                "adapter from its source, or copy it from a home that holds it intact"
            )
        return size

    # --------------------------------------------------------------- writes
    def create(self, key: str, data: bytes) -> str:
        """Write ``key`` only if it does not exist (If-None-Match: *); its ETag.
        PreconditionFailed when it exists."""
        import obstore

        res = self._call("writing", key, obstore.put, self._store, key, data, mode="create")
        return res["e_tag"] or ""

    def update(self, key: str, data: bytes, etag: str) -> str:
        """Replace ``key`` only if its ETag is still ``etag`` (If-Match); the new ETag.
        PreconditionFailed when it changed (or is gone)."""
        import obstore

        mode = {"e_tag": etag}
        try:
            res = self._call("writing", key, obstore.put, self._store, key, data, mode=mode)
        except NotFound:
            raise PreconditionFailed(f"{self.location.url}/{key} was removed meanwhile") from None
        return res["e_tag"] or ""

    def put(self, key: str, data: bytes) -> str:
        import obstore

        res = self._call("writing", key, obstore.put, self._store, key, data)
        return res["e_tag"] or ""

    def upload(self, key: str, path: Path) -> None:
        """Upload a file (multipart when large); the content is the key's, so a second upload
        of the same blob writes the same bytes."""
        import obstore

        self._call("uploading", key, obstore.put, self._store, key, path, chunk_size=16 << 20)

    def copy(self, src: str, dest: str) -> None:
        """A server-side copy of ``src`` to ``dest`` (replacing it)."""
        import obstore

        self._call("copying", src, obstore.copy, self._store, src, dest)

    def delete(self, key: str) -> None:
        import obstore

        with contextlib.suppress(NotFound):
            self._call("deleting", key, obstore.delete, self._store, key)

    def check(self) -> None:
        """One cheap request that fails (typed) when the store is unreachable or refuses us."""
        self.list(f"_probe-{secrets.token_hex(2)}/")

    def walk(self, prefixes: tuple[str, ...]) -> Iterator[Meta]:
        for p in prefixes:
            yield from self.list(p)


def _hash_chunks(h, chunks) -> None:
    while (chunk := chunks.get()) is not None:
        h.update(chunk)


def _reason(text: str) -> str:
    for pattern, why in (
        (r"Connect|Connection refused|error sending request", "connection failed"),
        (r"timed out|Timeout|deadline", "timed out"),
        (r"dns|resolve", "the host name does not resolve"),
    ):
        if re.search(pattern, text, re.IGNORECASE):
            return why
    status = re.search(r"status code: (\d{3}[^:]*)", text)
    return status.group(1).strip() if status else "request failed"


def _meta(m, location: Location) -> Meta:
    modified = m["last_modified"]
    return Meta(
        key=location.rel(str(m["path"]))
        if location.prefix and str(m["path"]).startswith(location.prefix + "/")
        else str(m["path"]),
        etag=m.get("e_tag") or "",
        size=int(m.get("size") or 0),
        modified=modified.timestamp() if modified is not None else 0.0,
    )
