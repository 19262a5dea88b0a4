"""What the installed PEFT can load, read from its source files without importing it.

``import peft`` takes seconds (it imports torch and transformers), and ``adaptr add`` refuses
a bad folder in milliseconds; so the PEFT methods (``PeftType``), the task types
(``TaskType``) and the fields of each method's config dataclass are read from the syntax
trees of ``peft/utils/peft_types.py``, ``peft/config.py`` and ``peft/tuners/*/config.py``
(a method's config class is the one whose ``__post_init__`` sets ``self.peft_type =
PeftType.X``; its fields include those of the config classes it derives from). A test checks
this against PEFT's own ``PEFT_TYPE_TO_CONFIG_MAPPING``.

PEFT loads a config with fields it does not know by dropping them (with a warning), so an
adapter saved by a newer PEFT loads as something else; :func:`check_config` refuses a
``peft_type`` the installed PEFT lacks and any unknown field that is switched on (not null,
false or empty), naming the PEFT version the adapter was saved with.

Also PEFT's ``layer_replication`` (:func:`unreplicated`): which base layer each of an
adapter's layers copies, for the check that an adapter fits its base.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from pathlib import Path

from adaptr.errors import InvalidAdapterError, brief


@dataclass(frozen=True)
class InstalledPeft:
    version: str
    methods: dict[str, frozenset[str]]  # peft_type -> the fields of its config class
    tasks: frozenset[str]


@functools.lru_cache(maxsize=1)
def installed() -> InstalledPeft | None:
    """The installed PEFT's methods, tasks and config fields; None when PEFT is not installed
    or its source is not laid out as expected (then nothing is checked)."""
    import importlib.metadata
    import importlib.util

    try:
        spec = importlib.util.find_spec("peft")  # finds the package without importing it
        version = importlib.metadata.version("peft")
    except (ImportError, ValueError, importlib.metadata.PackageNotFoundError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    try:
        types = _enum_values(root / "utils" / "peft_types.py")
        classes: dict[str, tuple[list[str], set[str], str | None]] = {}
        imported: dict[str, Path] = {}  # a name a parsed file imports -> the file it is from
        todo = [root / "config.py", *sorted(root.glob("tuners/*/config.py"))]
        parsed: set[Path] = set()
        while todo:
            for path in todo:
                found, imports = _config_classes(path, root)
                classes.update(found)
                imported.update(imports)
                parsed.add(path)
            missing = {b for bases, _, _ in classes.values() for b in bases} - set(classes)
            todo = sorted({imported[b] for b in missing if b in imported} - parsed)
    except (OSError, SyntaxError, ValueError):
        return None
    methods = {}
    for name, (_, _, peft_type) in classes.items():
        if peft_type in types.get("PeftType", {}):
            methods[types["PeftType"][peft_type]] = frozenset(_fields(classes, name))
    if "LORA" not in methods:
        return None
    return InstalledPeft(version, methods, frozenset(types.get("TaskType", {}).values()))


def _enum_values(path: Path) -> dict[str, dict[str, str]]:
    """Enum class name -> member name -> string value, for the classes of ``path``."""
    out: dict[str, dict[str, str]] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ClassDef):
            members = out.setdefault(node.name, {})
            for stmt in node.body:
                if (
                    isinstance(stmt, ast.Assign)
                    and len(stmt.targets) == 1
                    and isinstance(stmt.targets[0], ast.Name)
                    and isinstance(stmt.value, ast.Constant)
                    and isinstance(stmt.value.value, str)
                ):
                    members[stmt.targets[0].id] = stmt.value.value
    return out


def _config_classes(path: Path, root: Path):
    """(class name -> (base class names, annotated fields, the PeftType member its
    ``__post_init__`` sets, if any), imported name -> the file of PEFT it comes from)."""
    out, imports = {}, {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.level:  # relative: from the file's own package
                module = path.parent
                for _ in range(node.level - 1):
                    module = module.parent
                module = module.joinpath(*node.module.split("."))
            elif node.module.split(".")[0] == "peft":
                module = root.joinpath(*node.module.split(".")[1:])
            else:
                continue
            file = module.with_suffix(".py")
            if not file.is_file():
                file = module / "__init__.py"
            for alias in node.names:
                imports[alias.asname or alias.name] = file
            continue
        if not isinstance(node, ast.ClassDef):
            continue
        bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
        fields = {
            s.target.id
            for s in node.body
            if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
        }
        peft_type = None
        for stmt in node.body:
            if isinstance(stmt, ast.FunctionDef) and stmt.name == "__post_init__":
                for sub in ast.walk(stmt):
                    if (
                        isinstance(sub, ast.Assign)
                        and any(
                            isinstance(t, ast.Attribute) and t.attr == "peft_type"
                            for t in sub.targets
                        )
                        and isinstance(sub.value, ast.Attribute)
                        and isinstance(sub.value.value, ast.Name)
                        and sub.value.value.id == "PeftType"
                    ):
                        peft_type = sub.value.attr
        out[node.name] = (bases, fields, peft_type)
    return out, imports


def _fields(classes: dict, name: str, seen: frozenset[str] = frozenset()) -> set[str]:
    if name not in classes or name in seen:
        return set()
    bases, fields, _ = classes[name]
    found = set(fields)
    for base in bases:
        found |= _fields(classes, base, seen | {name})
    return found


def _release(version: object) -> tuple[int, ...] | None:
    """(major, minor, patch) of a version string such as ``0.22.0`` or ``0.22.0.dev0@abc``."""
    if not isinstance(version, str):
        return None
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    return tuple(int(g or 0) for g in m.groups()) if m else None


def _upgrade(peft: InstalledPeft, config: dict) -> str:
    """What the refusal says to do: the PEFT the adapter was saved with, when it is newer."""
    saved = config.get("peft_version")
    release = _release(saved)
    if release is not None and release > (_release(peft.version) or ()):
        need = ".".join(map(str, release))
        return (
            f"the adapter was saved with PEFT {brief(saved)}: install peft>={need} "
            f"(pip install -U 'peft>={need}') and add it again"
        )
    if release is not None:
        return (
            f"the adapter was saved with PEFT {brief(saved)}: load it with that PEFT, "
            "or re-save it with this one"
        )
    return "it was saved with a newer PEFT: upgrade PEFT (pip install -U peft) and add it again"


def _on(value: object) -> bool:
    """Whether a config value switches something on (PEFT dropping it changes the adapter)."""
    return value is not None and value is not False and value not in ("", [], {})


def check_config(config: dict, where: str) -> None:
    """Refuse (InvalidAdapterError, one line) a config the installed PEFT cannot load as
    saved: a method it does not have, a task type it does not know, or fields it does not
    know that are switched on (PEFT would drop them and load another adapter)."""
    peft = installed()
    if peft is None:
        return
    peft_type = config.get("peft_type")
    if peft_type not in peft.methods:
        raise InvalidAdapterError(
            f"{where}: peft_type {brief(peft_type)} is not a method of the installed PEFT "
            f"{peft.version}; {_upgrade(peft, config)}"
        )
    task = config.get("task_type")
    if task is not None and peft.tasks and task not in peft.tasks:
        raise InvalidAdapterError(
            f"{where}: task_type {brief(task)} is not one the installed PEFT {peft.version} knows "
            f"({', '.join(sorted(peft.tasks))}); {_upgrade(peft, config)}"
        )
    unknown = sorted(k for k, v in config.items() if k not in peft.methods[peft_type] and _on(v))
    if unknown:
        listed = ", ".join(brief(k) for k in unknown[:4]) + (" …" if len(unknown) > 4 else "")
        one = len(unknown) == 1
        raise InvalidAdapterError(
            f"{where} sets {listed}, {'a field' if one else 'fields'} of {peft_type} that the "
            f"installed PEFT {peft.version} does not know and would ignore; {_upgrade(peft, config)}"
        )


# the layer list PEFT's replicate_layers rebuilds: model(.model)*.layers, bert.encoder.layer, h
_LAYER = re.compile(r"((?:[^.]+\.)*?(?:layers|layer|h))\.(\d+)(\..+)")


def unreplicated(modules: dict[str, dict], config: dict) -> dict[str, dict]:
    """``modules`` (of :func:`~.adapter_dir.lora_modules`) named after the base's own layers. With
    ``layer_replication`` ([[start, end), …]) PEFT builds the model it trains from copies of
    the base's layers start..end-1, one span after another, so the adapter's layer ``i`` is
    a copy of the base layer at position ``i`` of those spans (its LoRA fits that layer)."""
    spans = config.get("layer_replication")
    if not spans:
        return modules
    origin = [i for start, end in spans for i in range(start, end)]
    out: dict[str, dict] = {}
    for module, parts in modules.items():
        m = _LAYER.fullmatch(module)
        if m and int(m[2]) < len(origin):
            module = f"{m[1]}.{origin[int(m[2])]}{m[3]}"
        out.setdefault(module, parts)
    return out
