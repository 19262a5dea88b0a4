"""What every route of the UI shares: the registry, the secrets, the playground engines."""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from adaptr.errors import InvalidInputError

if TYPE_CHECKING:
    from adaptr.registry import AdapterVersion, Registry
    from adaptr.serving import AdapterServer


@dataclass
class UIContext:
    """The state of one UI app.

    ``token``: when set, every route but the static files and the login page needs it
    (``Authorization: Bearer TOKEN`` or the cookie the login page sets). ``csrf``: the
    token every write must carry (``X-CSRF-Token`` header or ``csrf`` form field; the pages
    hold it); a new one per process. ``allowed_hosts``: the Host headers answered (the
    loopback names when bound to loopback: a DNS-rebinding page cannot reach the app).

    Engines are created lazily, one :class:`~adaptr.serving.AdapterServer` per base, the
    first time the playground asks for that base: the pages never load torch, and a UI
    started on a registry with several bases only loads the ones someone plays with.
    ``adaptr ui --base B`` loads B's at start (in a thread) so its first answer does not wait.
    """

    registry: Registry
    token: str | None = None
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "[::1]", "testserver")
    max_adapters: int = 16
    server_factory: Any = None  # (registry, base) -> AdapterServer; tests and bench may swap it
    _engines: dict[str, AdapterServer] = field(default_factory=dict)
    _loading: threading.Lock = field(default_factory=threading.Lock)
    # lineage decoded or not -> (index state, Registry.list() at that state)
    _listed: dict[bool, tuple[Any, list]] = field(default_factory=dict)

    def versions(self, lineage: bool = True) -> list[AdapterVersion]:
        """``Registry.list()``, kept while the index is unchanged: reading 1,000 versions'
        records (lineage, log histories) takes far longer than a page may. The index state
        is its files' identity, size and mtime (``registry.db`` and its WAL: every commit of
        any process changes the WAL), read before the list, so a write during it is seen
        by the next page. ``lineage=False``: without lineage, for the list page (a trained
        version's log history is most of its record)."""
        state = self._index_state()
        cached = self._listed.get(lineage)
        if state is not None and cached is not None and cached[0] == state:
            return cached[1]
        versions = self.registry.list(lineage=lineage)
        if state is not None:
            self._listed[lineage] = (state, versions)
        return versions

    def _index_state(self) -> tuple | None:
        out = []
        for name in ("registry.db", "registry.db-wal"):
            try:
                st = (self.registry.home / name).stat()
            except OSError:
                if name == "registry.db":
                    return None
                out.append(None)
                continue
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def engine(self, base: str) -> AdapterServer:
        """The server for ``base`` (a registered base name), created on first use."""
        if base in self._engines:
            return self._engines[base]
        with self._loading:
            if base not in self._engines:
                self.registry.get_base(base)  # an unknown base: a one-line 404, nothing loaded
                self._engines[base] = self._create(base)
            return self._engines[base]

    def _create(self, base: str) -> AdapterServer:
        if self.server_factory is not None:
            return self.server_factory(self.registry, base)
        from adaptr.runtime import quiet_libraries
        from adaptr.serving import AdapterServer

        quiet_libraries()
        return AdapterServer(self.registry, base, max_adapters=self.max_adapters)

    def loaded(self) -> list[str]:
        """The bases whose engines are loaded."""
        return sorted(self._engines)

    def check_token(self, given: str | None) -> bool:
        """Whether ``given`` is the token (always true when none is required)."""
        if self.token is None:
            return True
        return given is not None and secrets.compare_digest(given.encode(), self.token.encode())

    def check_csrf(self, given: str | None) -> None:
        if not given or not secrets.compare_digest(given.encode(), self.csrf.encode()):
            raise CSRFError(
                "this write carries no valid CSRF token (reload the page and try again); "
                "nothing was changed"
            )


class CSRFError(InvalidInputError):
    """A write without the page's CSRF token, or from another origin: a 403."""
