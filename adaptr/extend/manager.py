"""The plugin manager: built-in and third-party plugins from the ``adaptr`` entry-point group.

All of its state is one :class:`Plugins` object, :data:`PLUGINS`. Loading is lazy and happens
once. A plugin is never trusted to behave: one that fails to import (any exception,
``sys.exit`` included) is recorded (:meth:`Plugins.broken`) and skipped; each implementation
of a hook is called on its own, so one that raises is named with its hook, skipped (register
hooks, commands, events) or refused in one line (look-ups), and never stops the others or the
command. ``ADAPTR_DISABLE_PLUGINS=a,b`` skips plugins by name.
"""

from __future__ import annotations

import enum
import importlib.metadata
import os
from dataclasses import dataclass
from typing import Any

import pluggy

from adaptr.errors import (
    AdaptrError,
    InterruptedAfterStore,
    PluginConflictError,
    PluginError,
    brief,
    clip,
    shadowing_package,
)
from adaptr.extend import hookspecs

ENTRY_POINT_GROUP = "adaptr"
BUILTIN_MODULES = "adaptr.plugins."  # the built-ins register families/formatters, no events
DISABLE_ENV = "ADAPTR_DISABLE_PLUGINS"


class Loaded(enum.IntEnum):
    """How much of the entry-point group is loaded; each level includes the one below."""

    NOTHING = 0
    THIRD_PARTY = 1  # enough to fire an event: the built-ins implement no event hooks
    ALL = 2  # adaptr's own built-ins too


@dataclass(frozen=True)
class Origin:
    """Where an entry-point plugin came from (a plugin registered in code has none)."""

    builtin: bool  # an entry point into adaptr.plugins
    source: str | None = None  # "dist version" (or the entry point) of the one that loaded
    dist: str | None = None  # the distribution's name, for `pip uninstall`


def _disabled_names() -> set[str]:
    """The plugin names ``ADAPTR_DISABLE_PLUGINS`` (comma-separated) asks to skip."""
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def _entry_points() -> dict[str, list[importlib.metadata.EntryPoint]]:
    """Each entry point name of the group -> its entry points, in ``sys.path`` order.

    ``importlib.metadata.entry_points()`` keeps one distribution per name, the first on
    ``sys.path``: a stale ``adaptr.egg-info`` in the current folder (first for ``python -c``
    and ``-m``) would hide the installed adaptr's built-ins. Every candidate is kept; the
    first that loads wins.
    """
    found: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group == ENTRY_POINT_GROUP:
                found.setdefault(ep.name, []).append(ep)
    return found


def _reason(e: BaseException) -> str:
    """What a plugin raised, on one line."""
    if isinstance(e, SystemExit):
        return f"SystemExit: it called sys.exit({e.code!r})"
    text = clip(e, 200)
    return f"{type(e).__name__}: {text}" if text and text != type(e).__name__ else type(e).__name__


def _shadow_hint() -> str:
    where = shadowing_package()
    return (
        f"; {where} is imported as adaptr instead of the installed package: run from another folder"
        if where
        else ""
    )


def _call(impl: Any, kwargs: dict[str, Any]) -> Any:
    return impl.function(**{a: kwargs[a] for a in impl.argnames if a in kwargs})


class Plugins:
    """The pluggy manager with what was loaded, what broke and what was reported.

    ``pm`` is the pluggy manager: tests register throwaway plugins on ``load()``'s answer
    and unregister them after. Every other way in is a method that survives a misbehaving
    plugin.
    """

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("adaptr")
        self.pm.add_hookspecs(hookspecs)
        self._loaded = Loaded.NOTHING
        self._origins: dict[str, Origin] = {}  # entry-point plugin name -> where it came from
        self._broken: dict[str, str] = {}  # plugin name -> why it failed to load
        self._failed: dict[tuple[str, str], str] = {}  # (plugin, hook) -> why it failed there
        self._disabled: set[str] = set()  # skipped through ADAPTR_DISABLE_PLUGINS
        self._warned: set[tuple[str, str | None]] = set()  # problems reported already
        # collect's cache: the plugins it was built from (held, so that no new plugin object can
        # take a freed one's id and pass for it) and what they registered
        self._collected: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    # -- loading ---------------------------------------------------------------------------

    def load(self, builtins: bool = True) -> pluggy.PluginManager:
        """Load every plugin of the entry-point group, once; returns the pluggy manager.

        ``builtins=False`` skips adaptr's own plugins, which implement no event hooks: enough
        for firing an event, and ~25 ms less on every ``add``. A KeyboardInterrupt (Ctrl-C)
        while a plugin imports is the user's and goes on; anything else a plugin raises at
        import, ``SystemExit`` included, only marks it broken.
        """
        wanted = Loaded.ALL if builtins else Loaded.THIRD_PARTY
        if self._loaded >= wanted:
            return self.pm
        self._loaded = wanted
        off = _disabled_names()
        for name, candidates in _entry_points().items():
            if self.pm.get_plugin(name) is not None or self.pm.is_blocked(name):
                continue
            if name in self._broken:
                continue
            if name in off:
                self._disabled.add(name)
                continue
            builtin = any(ep.value.startswith(BUILTIN_MODULES) for ep in candidates)
            if builtin and not builtins:
                continue
            self._load_one(name, candidates, builtin)
        return self.pm

    def _load_one(
        self, name: str, candidates: list[importlib.metadata.EntryPoint], builtin: bool
    ) -> None:
        """Register the first of ``candidates`` that loads, or record ``name`` as broken."""
        first: BaseException | None = None
        for ep in candidates:
            try:
                plugin = ep.load()
                self.pm.register(plugin, name=name)
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # any failure, sys.exit included: record it, go on
                first = first or e
                continue
            source = f"{ep.dist.name} {ep.dist.version}" if ep.dist else ep.value
            self._origins[name] = Origin(builtin, source, ep.dist.name if ep.dist else None)
            return
        dist = candidates[0].dist
        self._origins[name] = Origin(builtin, dist=dist.name if dist is not None else None)
        assert first is not None
        self._broken[name] = _reason(first) + _shadow_hint()

    # -- calling hooks ---------------------------------------------------------------------

    def _impls(self, hook_name: str) -> list[Any]:
        """The hook's implementations in the order pluggy calls them (tryfirst first, newest
        first)."""
        return [
            impl
            for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls())
            if not (impl.hookwrapper or impl.wrapper)
        ]

    def advice(self, name: str) -> str:
        """What to do about plugin ``name`` when it fails."""
        origin = self._origins.get(name)
        if origin is None:
            return "fix it or unregister it"
        skip = f"set {DISABLE_ENV}={name} to skip it"
        if origin.builtin:  # adaptr's own: a shadowed or damaged install
            return f"reinstall adaptr, or {skip}"
        how = f" (pip uninstall {origin.dist})" if origin.dist else ""
        return f"fix it or uninstall it{how}, or {skip}"

    def _failure(self, name: str, hook_name: str, e: BaseException) -> PluginError:
        return PluginError(
            f"plugin {name!r} failed in {hook_name} ({_reason(e)}); {self.advice(name)}",
            name,
            hook_name,
        )

    def fire(self, hook_name: str, **kwargs: Any) -> None:
        """Call an event hook (``adaptr_version_added``) on every third-party plugin, each on
        its own.

        The event happened already (a version is stored): a plugin that raises, or calls
        ``sys.exit``, does not stop the others; the first failure is raised after all ran, as
        a :class:`PluginError`, for the caller to note. Ctrl-C stops at once: for an event
        about a ``version`` it is raised as :class:`InterruptedAfterStore`, which names the
        stored ref.
        """
        stored = getattr(kwargs.get("version"), "ref", None)
        where = f"loading the plugins for {hook_name}"
        first: PluginError | None = None
        try:
            self.load(builtins=False)
            for impl in self._impls(hook_name):
                where = f"plugin {impl.plugin_name!r} ({hook_name})"
                try:
                    _call(impl, kwargs)
                except KeyboardInterrupt:
                    raise
                except BaseException as e:
                    first = first or self._failure(impl.plugin_name, hook_name, e)
        except KeyboardInterrupt as e:
            if stored is None or isinstance(e, InterruptedAfterStore):
                raise
            raise InterruptedAfterStore(stored, where) from e
        if first is not None:
            raise first

    def first_result(self, hook_name: str, kind: type, **kwargs: Any) -> Any:
        """A ``firstresult`` look-up: the first non-None answer, which must be a ``kind``.

        A plugin that raises (anything but an :class:`AdaptrError` of its own, which speaks
        to the user as it is) or answers something else is a :class:`PluginError` naming it.
        """
        self.load()
        for impl in self._impls(hook_name):
            try:
                result = _call(impl, kwargs)
            except (KeyboardInterrupt, AdaptrError):
                raise
            except BaseException as e:
                raise self._failure(impl.plugin_name, hook_name, e) from e
            if result is None:
                continue
            if not isinstance(result, kind):
                raise PluginError(
                    f"plugin {impl.plugin_name!r} failed in {hook_name}: it answered "
                    f"{brief(result)}, not a {kind.__name__} or None; "
                    f"{self.advice(impl.plugin_name)}",
                    impl.plugin_name,
                    hook_name,
                )
            return result
        return None

    def call_each(self, hook_name: str, **kwargs: Any) -> None:
        """Call a hook on every plugin, each on its own; one that raises is recorded (it shows
        in ``adaptr plugins`` and as a warning) and skipped."""
        self.load()
        for impl in self._impls(hook_name):
            try:
                _call(impl, kwargs)
            except KeyboardInterrupt:
                raise
            except BaseException as e:
                self._failed[(impl.plugin_name, hook_name)] = _reason(e)

    def collect(self, hook_name: str, kind: type, what: str) -> dict[str, Any]:
        """Call a ``register`` hook on every plugin; returns name -> object, refusing duplicates.

        A plugin whose hook raises (a bad object included) adds nothing, not even what it
        registered before failing, and is recorded; two plugins registering one name is a
        :class:`PluginConflictError`. The result is cached until the set of plugins changes.
        """
        self.load()
        key = tuple(sorted(self.pm.get_plugins(), key=id))
        cached = self._collected.get(hook_name)
        if (
            cached is not None
            and len(cached[0]) == len(key)
            and all(a is b for a, b in zip(cached[0], key, strict=True))
        ):
            return dict(cached[1])
        found: dict[str, Any] = {}
        # registration order: stable listings
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            if impl.hookwrapper or impl.wrapper:
                continue
            mine: dict[str, Any] = {}

            def register(obj: Any, _plugin: str = impl.plugin_name, _mine: dict = mine) -> None:
                if not isinstance(obj, kind):
                    raise TypeError(f"it registered {brief(obj)}, not a {kind.__name__}")
                other = found.get(obj.name) or _mine.get(obj.name)
                if other is not None:
                    raise PluginConflictError(
                        f"{what} {obj.name!r} is registered by both {other.plugin!r} and "
                        f"{_plugin!r}; uninstall one of the plugins"
                    )
                obj.plugin = _plugin
                _mine[obj.name] = obj

            try:
                _call(impl, {"register": register})
            except (KeyboardInterrupt, PluginConflictError):
                raise
            except BaseException as e:
                self._failed[(impl.plugin_name, hook_name)] = _reason(e)
                continue
            self._failed.pop((impl.plugin_name, hook_name), None)
            found.update(mine)
        self._collected[hook_name] = (key, found)
        return dict(found)

    # -- what went wrong -------------------------------------------------------------------

    def broken(self) -> dict[str, str]:
        """Plugins that failed to load: name -> reason."""
        self.load()
        return dict(self._broken)

    def failed_hooks(self) -> dict[tuple[str, str], str]:
        """(plugin, hook) -> why it failed there, for the plugins still registered."""
        return {k: v for k, v in self._failed.items() if self.pm.get_plugin(k[0]) is not None}

    def problems(self) -> dict[tuple[str, str | None], str]:
        """Every plugin failure so far as one line each: (plugin, hook or None) -> message."""
        out: dict[tuple[str, str | None], str] = {
            (name, None): (
                f"plugin {name!r} failed to load and is skipped ({why}); {self.advice(name)}"
            )
            for name, why in self._broken.items()
        }
        for (name, hook_name), why in self.failed_hooks().items():
            out[(name, hook_name)] = (
                f"plugin {name!r} failed in {hook_name} and is skipped ({why}); {self.advice(name)}"
            )
        return out

    def take_warnings(self) -> list[str]:
        """The failures not reported yet (see :meth:`forget_warnings`), each once."""
        fresh = [(k, m) for k, m in self.problems().items() if k not in self._warned]
        self._warned.update(k for k, _ in fresh)
        return [m for _, m in fresh]

    def forget_warnings(self) -> None:
        """Report every failure again (the CLI calls this as a command starts)."""
        self._warned.clear()

    def trouble(self, hook_name: str) -> str | None:
        """Why what ``hook_name`` registers may be missing, for a message: the plugins that
        failed to load or failed in that hook (None if none did)."""
        self.load()
        failed = self.failed_hooks().items()
        why = {name: f"failed in {h} ({w})" for (name, h), w in failed if h == hook_name}
        for name, w in sorted(self._broken.items()):
            why.setdefault(name, f"failed to load ({w})")
        if not why:
            return None
        name, what = next(iter(why.items()))  # a failure in this hook first, if any
        if len(why) == 1:
            return f"plugin {name!r} {what}"
        others = ", ".join(repr(n) for n in sorted(why) if n != name)
        return f"plugin {name!r} {what}, and {others} too (see `adaptr plugins`)"

    def listing(self) -> list[dict[str, Any]]:
        """Every loaded plugin with its hooks and origin, then the broken and disabled ones
        (the rows of ``adaptr plugins --json``)."""
        self.load()
        failures = self.failed_hooks()
        out = []
        for name, plugin in sorted(self.pm.list_name_plugin(), key=lambda p: p[0]):
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            failed = {h: why for (n, h), why in failures.items() if n == name}
            origin = self._origins.get(name)
            entry = {
                "name": name,
                "module": getattr(plugin, "__name__", repr(plugin)),
                "source": origin.source if origin and origin.source else "registered in code",
                "hooks": hooks,
                "ok": not failed,
            }
            if failed:
                entry["failed_hooks"] = failed
                entry["error"] = "; ".join(f"{h} failed: {why}" for h, why in failed.items())
            out.append(entry)
        unloaded = {"module": None, "source": None, "hooks": [], "ok": False}
        for name, reason in sorted(self._broken.items()):
            out.append({"name": name, **unloaded, "error": reason})
        for name in sorted(self._disabled):
            out.append(
                {"name": name, **unloaded, "disabled": True, "error": f"disabled by {DISABLE_ENV}"}
            )
        return out


PLUGINS = Plugins()
"""The one plugin manager of the process."""
