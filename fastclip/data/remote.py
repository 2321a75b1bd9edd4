"""Shards that are not files here: ``pipe:COMMAND`` (webdataset's convention: the command's stdout is the tar),
``s3://bucket/key`` (S3 and S3-compatible stores, through s3fs) and ``http(s)://`` (through fsspec), read as one
seekable file (:class:`RemoteFile`) that survives the network.

A read is a range request for the next chunk, fetched ahead in a thread while the reader works on the last. A
request that fails for a reason that may pass (a connection reset or refused, a timeout, a 5xx, a ``pipe:``
command exiting non-zero, a response shorter than asked) is retried with backoff, from the byte it reached; what
cannot pass (no such object, access denied) is raised at once. A ``pipe:`` stream cannot start mid-way: a retry
runs the command again and reads past the bytes already taken. A short read never passes as the shard's end: an
object's size is asked for first and every byte up to it must arrive; a ``pipe:`` stream, whose size nobody
knows, must end on a tar's end-of-archive marker (zero blocks), else it is a failed read and retried.

Credentials come from where the client libraries look (the AWS chain: environment, ``~/.aws``, instance roles;
``AWS_ENDPOINT_URL`` for S3-compatible stores) and are never part of a message: :func:`display` strips a URL's
user and query (a presigned URL's signature) wherever a shard is named.

Why one module: what counts as a failure worth retrying is decided by the sources that raise it (a pipe's exit
status, fsspec's and botocore's errors), and the file that retries must know each source's limits (a pipe
cannot seek); apart, the two would have to share those rules through an interface as long as they are.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

log = logging.getLogger("fastclip.data")

SCHEMES = ("pipe:", "s3://", "http://", "https://")
CHUNK = 4 << 20  # bytes a range request asks for: large enough that a request's round trip is a small part of it
WINDOW = 2  # chunks kept behind the read position: tarfile and the index tool step back within a sample
END_OF_ARCHIVE = b"\0" * 1024  # a tar ends with two zero blocks (and zero padding to its record size)


def is_remote(path: str) -> bool:
    return path.startswith(SCHEMES)


def names_remote(spec: str) -> bool:
    """Whether a shard spec (``::``-joined parts) names remote shards: DataLoader workers read them, counted first,
    under either loader (DALI's own reader opens local files only)."""
    return any(is_remote(part.strip()) for part in spec.split("::"))


def display(path: str) -> str:
    """``path`` as messages name it: a URL without its user, password and query (a presigned URL's signature)."""
    if path.startswith("pipe:"):
        return path
    return re.sub(r"\?.*$", "?…", re.sub(r"^(\w+://)[^/@]*@", r"\1", path))


@dataclass(frozen=True)
class RemotePolicy:
    """How hard a remote read tries (``data.remote_retries``, ``data.remote_timeout_s``)."""

    retries: int = 5  # retries of one request after its first try; backoff 0.5 s, doubling, at most 30 s
    timeout_s: float = 60.0  # a connection that sends nothing for this long is dropped and retried

    def backoff(self, attempt: int) -> float:
        return min(0.5 * 2**attempt, 30.0)


DEFAULT = RemotePolicy()


class Permanent(OSError):
    """A remote read that retrying cannot fix (no such object, access denied, a server ignoring ranges)."""


def _unwrapped(error: BaseException) -> BaseException:
    """fsspec's HTTP filesystem reports any failure to learn an object's size (a 503, a reset) as
    FileNotFoundError: the error underneath says what happened."""
    cause = error.__cause__
    if type(error) is FileNotFoundError and cause is not None and not isinstance(cause, FileNotFoundError):
        return _unwrapped(cause)
    return error


def _status(error: BaseException) -> int | None:
    """The HTTP status of a failed request: aiohttp's ``status``, botocore's response metadata."""
    if isinstance(status := getattr(error, "status", None), int):
        return status
    response = getattr(error, "response", None)
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None


NETWORK_LIBRARIES = ("aiohttp", "botocore", "aiobotocore", "fsspec", "s3fs", "urllib3")


def _permanent(error: BaseException) -> bool:
    """Whether retrying cannot help: what is not a network's, a server's or a command's failure (a bug raises at
    once), a missing object, denied access, a 4xx other than a timeout or throttling."""
    error = _unwrapped(error)
    if isinstance(error, (Permanent, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    if not isinstance(error, (OSError, TimeoutError)) and type(error).__module__.split(".")[0] not in NETWORK_LIBRARIES:
        return True
    status = _status(error)
    return status is not None and 400 <= status < 500 and status not in (408, 429)


class _Fsspec:
    """An object in S3 or on an HTTP server, read by ranges."""

    rangeable = True

    def __init__(self, url: str, policy: RemotePolicy):
        self.url, self.fs, self.path = url, *_filesystem(url, policy)

    def close(self) -> None:
        """Close this shard's connections: a loader worker forked later must not inherit them (its copy of the
        session, collected there, reset the parent's pooled connections: a 60 s stall in the parent's next request)."""
        from fsspec.asyn import sync

        session = getattr(self.fs, "_session", None) or getattr(self.fs, "_s3", None)
        if session is not None and self.fs.loop.is_running():
            with contextlib.suppress(Exception):
                sync(self.fs.loop, session.close, timeout=5)

    def size(self) -> int | None:
        return self.fs.size(self.path)

    def fetch(self, start: int, end: int, size: int | None) -> bytes:
        end = end if size is None else min(end, size)
        data = self.fs.cat_file(self.path, start=start, end=end)
        if len(data) > end - start:
            raise Permanent(f"the server sent {len(data)} bytes for a range of {end - start}: it ignores ranges")
        return data


def _filesystem(url: str, policy: RemotePolicy):
    """fsspec's filesystem for ``url`` (one per process and settings: fsspec caches them, and starts anew after a
    fork) and the object's path in it. Imported here: s3fs and aiohttp cost a second, paid only by remote runs."""
    import fsspec

    if url.startswith("s3://"):
        options = {"config_kwargs": {"connect_timeout": policy.timeout_s, "read_timeout": policy.timeout_s,
                                     "retries": {"max_attempts": 1}}}  # fmt: skip
        if endpoint := os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"):
            options["endpoint_url"] = endpoint
    else:
        import aiohttp

        timeout = aiohttp.ClientTimeout(sock_connect=policy.timeout_s, sock_read=policy.timeout_s)
        options = {"client_kwargs": {"timeout": timeout}}
    try:  # a filesystem of its own (not fsspec's cached one), closed with the shard: see _Fsspec.close
        fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True, **options)
    except ImportError as e:
        raise Permanent(f"{display(url)}: reading it needs {e.name} (pip install s3fs aiohttp)") from None
    if url.startswith("s3://"):
        fs.retries = 1  # one try in s3fs (and botocore): RemoteFile retries, logged, from the byte it reached
    return fs, path


class _Pipe:
    """A command's stdout, webdataset's ``pipe:``: read from its start on every try, its exit status checked."""

    rangeable = False

    def __init__(self, spec: str):
        self.command = spec[len("pipe:") :]
        self.proc: subprocess.Popen | None = None
        self.at = 0  # bytes read from the running command

    def size(self) -> None:
        return None

    def fetch(self, start: int, end: int, size: None) -> bytes:
        if self.proc is None or start != self.at:
            self.close()
            self.proc = subprocess.Popen(self.command, shell=True, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
            self.at = 0
        while self.at < start:  # a retry: past the bytes already taken
            if not (skipped := self.proc.stdout.read(min(start - self.at, CHUNK))):
                break
            self.at += len(skipped)
        data = self.proc.stdout.read(end - start) if self.at == start else b""
        self.at += len(data)
        if len(data) < end - start:  # the end: it counts only if the command says it went well
            if (code := self.proc.wait()) != 0:
                self.proc = None
                raise OSError(f"the command exited with status {code}")
        return data

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()
            self.proc = None


class RemoteFile(io.RawIOBase):
    """A remote shard as a read-only, seekable file. Reading forward is the fast path (the next chunk is already
    on its way); a seek within the last chunks or a little ahead costs nothing more, a seek elsewhere starts a
    range request there (``pipe:``: reads its way there, from the start if it is behind)."""

    def __init__(self, url: str, policy: RemotePolicy = DEFAULT, *, expect_size: int | None = None):
        self.url, self.policy = url, policy
        self.source = _Pipe(url) if url.startswith("pipe:") else _Fsspec(url, policy)
        self.size = self._retrying(self.source.size, "asking its size")
        if expect_size is not None and self.size is not None and self.size != expect_size:
            raise Permanent(f"it is {self.size} bytes, {expect_size} when it was indexed: re-run the index tool on it")
        self.pos = 0
        self.chunks: dict[int, bytes] = {}  # chunk start -> bytes, the last WINDOW and the one being read
        self.ended: int | None = self.size  # the stream's length once known
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fastclip-remote")
        self._ahead: tuple[int, Future] | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            if self.ended is None:
                raise io.UnsupportedOperation(f"{display(self.url)}: a pipe's end is not known before reading it")
            offset += self.ended
        elif whence == io.SEEK_CUR:
            offset += self.pos
        self.pos = max(offset, 0)
        return self.pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = 0
        while n < len(view):
            chunk = self._chunk(self.pos - self.pos % CHUNK)
            piece = chunk[self.pos % CHUNK : self.pos % CHUNK + len(view) - n]
            if not piece:
                break
            view[n : n + len(piece)] = piece
            n += len(piece)
            self.pos += len(piece)
        return n

    def _chunk(self, start: int) -> bytes:
        if (data := self.chunks.get(start)) is None:
            data = self._load(start)
            self.chunks[start] = data
            for old in [s for s in self.chunks if s < start - WINDOW * CHUNK or s > start]:
                del self.chunks[old]
        return data

    def _load(self, start: int) -> bytes:
        if self.ended is not None and start >= self.ended:
            return b""
        ahead, self._ahead = self._ahead, None
        if ahead and ahead[0] == start:
            data = ahead[1].result()
        else:
            if ahead and not ahead[1].cancel():  # one request at a time: a pipe's command is one stream
                ahead[1].exception()
            data = self._fetch(start)
        if len(data) == CHUNK and (self.ended is None or start + CHUNK < self.ended):
            self._ahead = (start + CHUNK, self._pool.submit(self._fetch, start + CHUNK))
        return data

    def _fetch(self, start: int) -> bytes:
        """Chunk ``start``, retried until it is whole: ``CHUNK`` bytes, or the rest up to a known size, or (a pipe)
        a last chunk that ends the tar."""
        got = b""
        for attempt in range(self.policy.retries + 1):
            try:
                while len(got) < CHUNK:
                    part = self.source.fetch(start + len(got), start + CHUNK, self.size)
                    got += part
                    if self.size is not None and start + len(got) >= self.size:
                        return got
                    if not part:
                        break
                if len(got) == CHUNK:
                    return got
                if self.size is not None:
                    raise OSError(f"the stream ended before its {self.size} bytes")
                if not self._ends_archive(start, got):
                    raise OSError("the stream ended before a tar's end-of-archive marker")
                self.ended = start + len(got)
                return got
            except Exception as e:  # what a network, a server or a command may throw
                if _permanent(e) or attempt == self.policy.retries:
                    if isinstance(e, Permanent):
                        raise
                    raise OSError(f"{display(self.url)}: {_what(e)} at byte {start + len(got)}"
                                  f"{f', after {attempt + 1} tries' if attempt else ''}") from e  # fmt: skip
                self._wait(attempt, f"{_what(e)} at byte {start + len(got)}")
        raise AssertionError("unreachable")

    def _ends_archive(self, start: int, got: bytes) -> bool:
        tail = got[-len(END_OF_ARCHIVE) :]
        if len(tail) < len(END_OF_ARCHIVE):  # the marker began in the chunk before
            before = self.chunks.get(start - CHUNK, b"")
            tail = (before + got)[-len(END_OF_ARCHIVE) :]
        return tail == END_OF_ARCHIVE

    def close(self) -> None:
        if not self.closed:
            if self._ahead:
                self._ahead[1].cancel()
            self._pool.shutdown(wait=False, cancel_futures=True)  # a chunk fetched ahead and never read: dropped
            self.source.close()
            self.chunks.clear()
        super().close()

    def _retrying(self, call, what: str):
        return _retrying(self.url, self.policy, call, what)

    def _wait(self, attempt: int, what: str) -> None:
        _wait(self.url, self.policy, attempt, what)


def _retrying(url: str, policy: RemotePolicy, call, what: str):
    """``call()``, retried on failures that may pass; a failure that cannot, or the last, named and raised."""
    for attempt in range(policy.retries + 1):
        try:
            return call()
        except Exception as e:
            if _permanent(e) or attempt == policy.retries:
                raise _named(url, e, what) from e
            _wait(url, policy, attempt, f"{_what(e)} {what}")


def _wait(url: str, policy: RemotePolicy, attempt: int, what: str) -> None:
    wait = policy.backoff(attempt)
    log.warning("%s: %s; retrying in %.1f s (%d of %d)", display(url), what, wait, attempt + 1, policy.retries)
    time.sleep(wait)


def read_range(path: str, offset: int, size: int, policy: RemotePolicy = DEFAULT) -> bytes:
    """Bytes ``offset`` to ``offset + size`` of a shard: a file's by a seek, a remote one's by one range request
    (a ``pipe:`` runs its command and reads up to them)."""
    if not is_remote(path):
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    else:
        source = _Pipe(path) if path.startswith("pipe:") else _Fsspec(path, policy)
        try:
            data = _retrying(path, policy, lambda: source.fetch(offset, offset + size, None),
                             f"reading bytes {offset} to {offset + size}")  # fmt: skip
        finally:
            source.close()
    if len(data) != size:
        raise OSError(f"{display(path)} ends at byte {offset + len(data)}, inside a sample at {offset} to "
                      f"{offset + size}: truncated since it was indexed; re-run the index tool on it")  # fmt: skip
    return data


def _what(error: BaseException) -> str:
    """An error in a line: its type (unless a plain OSError, which says no more) and its first line."""
    error = _unwrapped(error)
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    kind = "" if type(error) is OSError else type(error).__name__
    return ": ".join(filter(None, [kind, text])) or "failed"


def _named(url: str, error: BaseException, what: str) -> OSError:
    error = _unwrapped(error)
    if isinstance(error, FileNotFoundError):
        return FileNotFoundError(f"{display(url)} does not exist")
    if isinstance(error, PermissionError):
        return PermissionError(f"{display(url)}: access denied (check the credentials the AWS chain finds, or the "
                               "object's permissions)")  # fmt: skip
    if isinstance(error, Permanent):
        return error
    return OSError(f"{display(url)}: {_what(error)} {what}")


def list_glob(pattern: str, policy: RemotePolicy = DEFAULT) -> list[str]:
    """The objects an ``s3://`` glob matches, sorted, as URLs."""
    bucket = _Fsspec(pattern, policy)
    try:
        return sorted(f"s3://{p}" for p in bucket.fs.glob(bucket.path))
    finally:
        bucket.close()


def download(url: str, to, policy: RemotePolicy = DEFAULT) -> int:
    """Copy a remote shard into the open file ``to`` (the index tool reads every byte anyway); its size."""
    n = 0
    with RemoteFile(url, policy) as f:
        while chunk := f.read(CHUNK):
            to.write(chunk)
            n += len(chunk)
    return n


def open_shard(path: str, policy: RemotePolicy = DEFAULT, *, expect_size: int | None = None):
    """A shard opened for reading: a file here, or a :class:`RemoteFile` buffered for small reads."""
    if not is_remote(path):
        return open(path, "rb")
    return io.BufferedReader(RemoteFile(path, policy, expect_size=expect_size), buffer_size=64 << 10)
