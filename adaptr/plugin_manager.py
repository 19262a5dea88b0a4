"""The plugin manager: built-in and third-party plugins from the ``adaptr`` entry-point group.

Loading is lazy and happens once; a plugin that fails to import or register is recorded
(``broken()``) and skipped, so one bad package never breaks every command.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import pluggy

from . import hookspecs

ENTRY_POINT_GROUP = "adaptr"
BUILTIN_MODULES = "adaptr.plugins."  # the built-ins register families/formatters, no events

pm = pluggy.PluginManager("adaptr")
pm.add_hookspecs(hookspecs)
_loaded = False
_loaded_external = False
_broken: dict[str, str] = {}
_sources: dict[str, str] = {}  # plugin name -> distribution it came from


def load_plugins(builtins: bool = True) -> pluggy.PluginManager:
    """Load every plugin of the entry-point group, once; returns the manager.

    ``builtins=False`` skips adaptr's own plugins, which implement no event hooks: enough
    for firing an event, and ~25 ms less on every ``add``.
    """
    global _loaded, _loaded_external
    if _loaded or (_loaded_external and not builtins):
        return pm
    _loaded = _loaded or builtins
    _loaded_external = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        if not builtins and ep.value.startswith(BUILTIN_MODULES):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as e:  # any failure: record it, keep going
            _broken[ep.name] = f"{type(e).__name__}: {' '.join(str(e).split())}"
            continue
        _sources[ep.name] = f"{ep.dist.name} {ep.dist.version}" if ep.dist else ep.value
    return pm


def hook() -> Any:
    """The hook caller, with plugins loaded."""
    return load_plugins().hook


def event_hook() -> Any:
    """The hook caller for events (``adaptr_version_added``): third-party plugins loaded."""
    return load_plugins(builtins=False).hook


def broken() -> dict[str, str]:
    """Plugins that failed to load: name -> reason."""
    load_plugins()
    return dict(_broken)


def plugins() -> list[dict[str, Any]]:
    """Every loaded plugin with its hooks and origin, then the broken ones."""
    load_plugins()
    out = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda p: p[0]):
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        out.append(
            {
                "name": name,
                "module": getattr(plugin, "__name__", repr(plugin)),
                "source": _sources.get(name, "registered in code"),
                "hooks": hooks,
                "ok": True,
            }
        )
    for name, reason in sorted(_broken.items()):
        out.append(
            {
                "name": name,
                "module": None,
                "source": None,
                "hooks": [],
                "ok": False,
                "error": reason,
            }
        )
    return out


_collected: dict[str, tuple[frozenset[int], dict[str, Any]]] = {}


def collect(hook_name: str, kind: type, what: str) -> dict[str, Any]:
    """Call a ``register`` hook on every plugin; returns name -> object, refusing duplicates.

    The result is cached until the set of registered plugins changes.
    """
    load_plugins()
    key = frozenset(id(p) for p in pm.get_plugins())
    cached = _collected.get(hook_name)
    if cached is not None and cached[0] == key:
        return dict(cached[1])
    found: dict[str, Any] = {}
    caller = getattr(pm.hook, hook_name)
    for impl in caller.get_hookimpls():

        def register(obj: Any, _plugin: str = impl.plugin_name) -> None:
            if not isinstance(obj, kind):
                raise TypeError(f"plugin {_plugin!r} registered {obj!r}, not a {kind.__name__}")
            if obj.name in found:
                from .errors import AdaptrError

                raise AdaptrError(
                    f"{what} {obj.name!r} is registered by both {found[obj.name].plugin!r} and {_plugin!r}; "
                    "uninstall one of the plugins"
                )
            obj.plugin = _plugin
            found[obj.name] = obj

        try:
            impl.function(register=register)
        except Exception as e:
            from .errors import AdaptrError

            if isinstance(e, AdaptrError):
                raise
            _broken[impl.plugin_name] = (
                f"{hook_name} failed: {type(e).__name__}: {' '.join(str(e).split())}"
            )
    _collected[hook_name] = (key, found)
    return dict(found)
