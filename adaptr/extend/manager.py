"""The plugin manager: built-in and third-party plugins from the ``adaptr`` entry-point group.

Loading is lazy and happens once. A plugin is never trusted to behave: one that fails to
import (any exception, ``sys.exit`` included) is recorded (``broken()``) and skipped; each
implementation of a hook is called on its own, so one that raises is named with its hook,
skipped (register hooks, commands, events) or refused in one line (look-ups), and never
stops the others or the command. ``ADAPTR_DISABLE_PLUGINS=a,b`` skips plugins by name.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
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

pm = pluggy.PluginManager("adaptr")
pm.add_hookspecs(hookspecs)
_loaded = False
_loaded_external = False
_broken: dict[str, str] = {}  # plugin name -> why it failed to load
_failed: dict[tuple[str, str], str] = {}  # (plugin, hook) -> why it failed there
_disabled: set[str] = set()  # skipped through ADAPTR_DISABLE_PLUGINS
_sources: dict[str, str] = {}  # plugin name -> distribution it came from
_dists: dict[str, str] = {}  # plugin name -> the distribution's name (for pip uninstall)
_builtins: set[str] = set()  # entry points into adaptr.plugins
_warned: set[tuple[str, str | None]] = set()


def disabled_names() -> set[str]:
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


def load_plugins(builtins: bool = True) -> pluggy.PluginManager:
    """Load every plugin of the entry-point group, once; returns the manager.

    ``builtins=False`` skips adaptr's own plugins, which implement no event hooks: enough
    for firing an event, and ~25 ms less on every ``add``. A KeyboardInterrupt (Ctrl-C)
    while a plugin imports is the user's and goes on; anything else a plugin raises at
    import, ``SystemExit`` included, only marks it broken.
    """
    global _loaded, _loaded_external
    if _loaded or (_loaded_external and not builtins):
        return pm
    _loaded = _loaded or builtins
    _loaded_external = True
    off = disabled_names()
    for name, candidates in _entry_points().items():
        if pm.get_plugin(name) is not None or pm.is_blocked(name) or name in _broken:
            continue
        if name in off:
            _disabled.add(name)
            continue
        if any(ep.value.startswith(BUILTIN_MODULES) for ep in candidates):
            if not builtins:
                continue
            _builtins.add(name)
        first: BaseException | None = None
        for ep in candidates:
            try:
                plugin = ep.load()
                pm.register(plugin, name=name)
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # any failure, sys.exit included: record it, go on
                first = first or e
                continue
            _sources[name] = f"{ep.dist.name} {ep.dist.version}" if ep.dist else ep.value
            if ep.dist:
                _dists[name] = ep.dist.name
            break
        else:
            dist = candidates[0].dist
            if dist is not None:
                _dists[name] = dist.name
            assert first is not None
            _broken[name] = _reason(first) + _shadow_hint()
    return pm


def _shadow_hint() -> str:
    where = shadowing_package()
    return (
        f"; {where} is imported as adaptr instead of the installed package: run from another folder"
        if where
        else ""
    )


def hook() -> Any:
    """The hook caller, with plugins loaded (see :func:`first_result` and :func:`call_each`
    for calls that survive a misbehaving plugin)."""
    return load_plugins().hook


def event_hook() -> Any:
    """The caller for events (``adaptr_version_added``), third-party plugins loaded.

    ``event_hook().adaptr_version_added(registry=…, version=…)`` calls every plugin's
    implementation on its own (see :func:`fire`).
    """
    return _Events()


class _Events:
    def __getattr__(self, hook_name: str) -> Any:
        if not hook_name.startswith("adaptr_"):
            raise AttributeError(hook_name)
        return functools.partial(fire, hook_name)


def _impls(hook_name: str) -> list[Any]:
    """The hook's implementations in the order pluggy calls them (tryfirst first, newest first)."""
    return [
        impl
        for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls())
        if not (impl.hookwrapper or impl.wrapper)
    ]


def _call(impl: Any, kwargs: dict[str, Any]) -> Any:
    return impl.function(**{a: kwargs[a] for a in impl.argnames if a in kwargs})


def advice(name: str) -> str:
    """What to do about plugin ``name`` when it fails."""
    if name not in _sources and name not in _dists and name not in _broken:
        return "fix it or unregister it"
    skip = f"set {DISABLE_ENV}={name} to skip it"
    if name in _builtins:  # adaptr's own: a shadowed or damaged install
        return f"reinstall adaptr, or {skip}"
    dist = _dists.get(name)
    how = f" (pip uninstall {dist})" if dist else ""
    return f"fix it or uninstall it{how}, or {skip}"


def _failure(name: str, hook_name: str, e: BaseException) -> PluginError:
    return PluginError(
        f"plugin {name!r} failed in {hook_name} ({_reason(e)}); {advice(name)}", name, hook_name
    )


def fire(hook_name: str, **kwargs: Any) -> None:
    """Call an event hook on every (third-party) plugin, each on its own.

    The event happened already (a version is stored): a plugin that raises, or calls
    ``sys.exit``, does not stop the others; the first failure is raised after all ran, as a
    :class:`PluginError`, for the caller to note. Ctrl-C stops at once: for an event about a
    ``version`` it is raised as :class:`InterruptedAfterStore`, which names the stored ref.
    """
    stored = getattr(kwargs.get("version"), "ref", None)
    where = f"loading the plugins for {hook_name}"
    first: PluginError | None = None
    try:
        load_plugins(builtins=False)
        for impl in _impls(hook_name):
            where = f"plugin {impl.plugin_name!r} ({hook_name})"
            try:
                _call(impl, kwargs)
            except KeyboardInterrupt:
                raise
            except BaseException as e:
                first = first or _failure(impl.plugin_name, hook_name, e)
    except KeyboardInterrupt as e:
        if stored is None or isinstance(e, InterruptedAfterStore):
            raise
        raise InterruptedAfterStore(stored, where) from e
    if first is not None:
        raise first


def first_result(hook_name: str, kind: type, **kwargs: Any) -> Any:
    """A ``firstresult`` look-up: the first non-None answer, which must be a ``kind``.

    A plugin that raises (anything but an :class:`AdaptrError` of its own, which speaks to
    the user as it is) or answers something else is a :class:`PluginError` naming it.
    """
    load_plugins()
    for impl in _impls(hook_name):
        try:
            result = _call(impl, kwargs)
        except (KeyboardInterrupt, AdaptrError):
            raise
        except BaseException as e:
            raise _failure(impl.plugin_name, hook_name, e) from e
        if result is None:
            continue
        if not isinstance(result, kind):
            raise PluginError(
                f"plugin {impl.plugin_name!r} failed in {hook_name}: it answered {brief(result)}, "
                f"not a {kind.__name__} or None; {advice(impl.plugin_name)}",
                impl.plugin_name,
                hook_name,
            )
        return result
    return None


def call_each(hook_name: str, **kwargs: Any) -> None:
    """Call a hook on every plugin, each on its own; one that raises is recorded (it shows in
    ``adaptr plugins`` and as a warning) and skipped."""
    load_plugins()
    for impl in _impls(hook_name):
        try:
            _call(impl, kwargs)
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            _failed[(impl.plugin_name, hook_name)] = _reason(e)


def broken() -> dict[str, str]:
    """Plugins that failed to load: name -> reason."""
    load_plugins()
    return dict(_broken)


def failed_hooks() -> dict[tuple[str, str], str]:
    """(plugin, hook) -> why it failed there, for the plugins still registered."""
    return {k: v for k, v in _failed.items() if pm.get_plugin(k[0]) is not None}


def problems() -> dict[tuple[str, str | None], str]:
    """Every plugin failure so far as one line each: (plugin, hook or None) -> message."""
    out: dict[tuple[str, str | None], str] = {
        (name, None): f"plugin {name!r} failed to load and is skipped ({why}); {advice(name)}"
        for name, why in _broken.items()
    }
    for (name, hook_name), why in failed_hooks().items():
        out[(name, hook_name)] = (
            f"plugin {name!r} failed in {hook_name} and is skipped ({why}); {advice(name)}"
        )
    return out


def take_warnings() -> list[str]:
    """The failures not reported yet (see :func:`forget_warnings`), each once."""
    fresh = [(k, m) for k, m in problems().items() if k not in _warned]
    _warned.update(k for k, _ in fresh)
    return [m for _, m in fresh]


def forget_warnings() -> None:
    """Report every failure again (the CLI calls this as a command starts)."""
    _warned.clear()


def trouble(hook_name: str) -> str | None:
    """Why what ``hook_name`` registers may be missing, for a message: the plugins that failed
    to load or failed in that hook (None if none did)."""
    load_plugins()
    failed = failed_hooks().items()
    why = {name: f"failed in {h} ({w})" for (name, h), w in failed if h == hook_name}
    for name, w in sorted(_broken.items()):
        why.setdefault(name, f"failed to load ({w})")
    if not why:
        return None
    name, what = next(iter(why.items()))  # a failure in this hook first, if any
    if len(why) == 1:
        return f"plugin {name!r} {what}"
    others = ", ".join(repr(n) for n in sorted(why) if n != name)
    return f"plugin {name!r} {what}, and {others} too (see `adaptr plugins`)"


def plugins() -> list[dict[str, Any]]:
    """Every loaded plugin with its hooks and origin, then the broken and disabled ones."""
    load_plugins()
    failures = failed_hooks()
    out = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda p: p[0]):
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        failed = {h: why for (n, h), why in failures.items() if n == name}
        entry = {
            "name": name,
            "module": getattr(plugin, "__name__", repr(plugin)),
            "source": _sources.get(name, "registered in code"),
            "hooks": hooks,
            "ok": not failed,
        }
        if failed:
            entry["failed_hooks"] = failed
            entry["error"] = "; ".join(f"{h} failed: {why}" for h, why in failed.items())
        out.append(entry)
    unloaded = {"module": None, "source": None, "hooks": [], "ok": False}
    for name, reason in sorted(_broken.items()):
        out.append({"name": name, **unloaded, "error": reason})
    for name in sorted(_disabled):
        out.append(
            {"name": name, **unloaded, "disabled": True, "error": f"disabled by {DISABLE_ENV}"}
        )
    return out


_collected: dict[str, tuple[frozenset[int], dict[str, Any]]] = {}


def collect(hook_name: str, kind: type, what: str) -> dict[str, Any]:
    """Call a ``register`` hook on every plugin; returns name -> object, refusing duplicates.

    A plugin whose hook raises (a bad object included) adds nothing, not even what it
    registered before failing, and is recorded; two plugins registering one name is a
    :class:`PluginConflictError`. The result is cached until the set of plugins changes.
    """
    load_plugins()
    key = frozenset(id(p) for p in pm.get_plugins())
    cached = _collected.get(hook_name)
    if cached is not None and cached[0] == key:
        return dict(cached[1])
    found: dict[str, Any] = {}
    for impl in getattr(pm.hook, hook_name).get_hookimpls():  # registration order: stable listings
        if impl.hookwrapper or impl.wrapper:
            continue
        mine: dict[str, Any] = {}

        def register(obj: Any, _plugin: str = impl.plugin_name, _mine: dict = mine) -> None:
            if not isinstance(obj, kind):
                raise TypeError(f"it registered {brief(obj)}, not a {kind.__name__}")
            other = found.get(obj.name) or _mine.get(obj.name)
            if other is not None:
                raise PluginConflictError(
                    f"{what} {obj.name!r} is registered by both {other.plugin!r} and {_plugin!r}; "
                    "uninstall one of the plugins"
                )
            obj.plugin = _plugin
            _mine[obj.name] = obj

        try:
            _call(impl, {"register": register})
        except (KeyboardInterrupt, PluginConflictError):
            raise
        except BaseException as e:
            _failed[(impl.plugin_name, hook_name)] = _reason(e)
            continue
        _failed.pop((impl.plugin_name, hook_name), None)
        found.update(mine)
    _collected[hook_name] = (key, found)
    return dict(found)
