"""GGUF files as bases: converted once into a safetensors model folder, then reused.

A GGUF file (llama.cpp's format, usually quantized) is a base wherever a base is taken:
``adaptr base add NAME FILE.gguf``, ``train --base FILE.gguf``, ``generate``/``merge``
``--base FILE.gguf``, and ``serve`` through the name it was registered under. adaptr trains
and serves dense weights, so the file is read with transformers' GGUF loader (the ``gguf``
package), every tensor dequantized to the chosen dtype (``float32`` by default: each
dequantized value kept exactly; ``bfloat16``/``float16`` halve the size and round), and
written as a plain model folder that any transformers, PEFT or vLLM reads:

    config.json  model.safetensors  generation_config.json
    tokenizer.json  tokenizer_config.json  chat_template.jinja (the GGUF's tokenizer and template)
    adaptr_gguf.json  where it came from: the GGUF's name, size, SHA-256, quantization, dtype

Cache. The folders live under the registry home, ``<home>/bases/gguf/`` (so a home keeps
its bases with it, and each machine of a store-backed registry converts for itself, as it
binds its own bases), named ``<sha256-of-the-file[:16]>-<dtype>``. The file's SHA-256 is
what finds a conversion: the same bytes under another name or path reuse it, a changed
file is converted anew. Hashing a large file costs a second, so the hash is remembered per
(path, size, mtime, inode) in ``<home>/bases/gguf/hashes/``. A conversion is built in a
marked work folder beside the cache and renamed into place whole: a killed conversion
leaves nothing half-made (the next one tidies its work folder). Conversions are not
removed by ``adaptr gc``; delete a folder there to reclaim its space (a base registered
from it then says it is gone).

Fingerprint. The converted folder is fingerprinted like any base (its config and tensor
headers). Its config.json carries ``adaptr_gguf`` (the file's SHA-256, size and
quantization), so a changed file is a new fingerprint even where its shapes are the same,
and the base summary shows where it came from.

Refused in one line: a file that is not a GGUF (no ``GGUF`` magic), a truncated or damaged
one, an architecture transformers cannot read from GGUF (the message lists the ones it
can), and a GGUF without a tokenizer (adaptr needs one to train and to serve).

torch, transformers, numpy and gguf are imported inside the functions that need them, so
that the CLI's start-up stays light.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from adaptr.errors import InvalidInputError, StorageFullError, clip, first_line
from adaptr.values import WEIGHT_DTYPES

MAGIC = b"GGUF"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # per weight, in WEIGHT_DTYPES
DEFAULT_DTYPE = "float32"
PROVENANCE = "adaptr_gguf.json"
CONFIG_KEY = "adaptr_gguf"  # in the converted config.json: part of the base's fingerprint
HASH_CHUNK = 1 << 22

Note = Callable[[str], None]


def stderr_note(message: str) -> None:
    """Print ``note: …`` on stderr, as the CLI's notes are."""
    import sys

    print(f"note: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ recognising a GGUF
def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` is a regular file that starts with the GGUF magic."""
    try:
        with open(Path(path).expanduser(), "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def looks_like_gguf(path: str | Path) -> bool:
    """A path meant as a GGUF file: named ``*.gguf`` (not a folder), or a file starting
    with the magic. :func:`convert` then says what is wrong with it (missing, not a GGUF,
    truncated…) rather than "no config.json"."""
    p = Path(path).expanduser()
    if p.suffix.lower() == ".gguf" and not p.is_dir():
        return True
    return p.is_file() and is_gguf(p)


def cache_dir(registry_or_home: Any) -> Path:
    """Where a registry home keeps its GGUF conversions: ``<home>/bases/gguf``."""
    home = getattr(registry_or_home, "home", registry_or_home)
    return Path(home).expanduser() / "bases" / "gguf"


# ------------------------------------------------------------------ hashing, remembered
def _stat_key(path: Path) -> tuple[str, os.stat_result]:
    st = os.stat(path)
    ident = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_dev}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32], st


def file_sha256(
    path: str | Path,
    root: Path,
    *,
    on_progress: Callable[[int, int], None] | None = None,
    remember: bool = True,
) -> str:
    """The SHA-256 of ``path``, hashed once per (path, size, mtime, inode): remembered under
    ``root/hashes`` (unless ``remember`` is false: then :func:`remember_sha` does it once
    the file proved usable). ``on_progress(done, total)`` hears the bytes as they are read."""
    path = Path(path).expanduser()
    key, st = _stat_key(path)
    try:
        doc = json.loads((root / "hashes" / f"{key}.json").read_text())
        if doc.get("size") == st.st_size and doc.get("mtime_ns") == st.st_mtime_ns:
            return str(doc["sha256"])
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        pass
    digest, done = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if on_progress is not None:
                on_progress(done, st.st_size)
    sha = digest.hexdigest()
    if remember:
        remember_sha(path, sha, root, key, st)
    return sha


def remember_sha(
    path: Path, sha: str, root: Path, key: str | None = None, st: os.stat_result | None = None
) -> None:
    """Remember ``sha`` for ``path`` as it is now (``key``/``st``: as it was when hashed;
    nothing is remembered if it changed since)."""
    now_key, now = _stat_key(path)
    if key is not None and now_key != key:
        return
    st = st or now
    doc = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    _write_json(root / "hashes" / f"{now_key}.json", {**doc, "sha256": sha}, quiet=True)


def _write_json(path: Path, doc: dict, *, quiet: bool = False) -> None:
    """Write ``doc`` to ``path`` whole (a temporary file renamed over it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        if not quiet:
            raise


# ------------------------------------------------------------------ reading the header
def supported_architectures() -> list[str]:
    """The GGUF architectures the installed transformers turns into a causal LM."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = {a for a in GGUF_SUPPORTED_ARCHITECTURES if a in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES}
    try:  # transformers 5.x: architectures its newer GGUF path reads
        from transformers.integrations.gguf import GGUF_ARCHS

        names |= set(GGUF_ARCHS)
    except ImportError:
        pass
    return sorted(names)


def _transformers_name(arch: str) -> str:
    """A GGUF ``general.architecture`` as transformers' GGUF tables spell it."""
    arch = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}.get(arch, arch)
    return arch.replace("-", "_")


def read_header(path: Path) -> dict[str, Any]:
    """What the file says about itself (architecture, name, quantization, tensor types),
    or a one-line refusal: not a GGUF, truncated or damaged, an architecture transformers
    cannot convert, no tokenizer."""
    from adaptr.registry.atomic import regular_file

    path = regular_file(path, "GGUF file", use="give a .gguf file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise InvalidInputError(
            f"{clip(str(path), 200)} is not a GGUF file (it starts with {head!r}, not b'GGUF'): "
            "give a .gguf file, or a model folder with a config.json"
        )
    from gguf import GGUFReader, GGUFValueType, LlamaFileType

    try:
        reader = GGUFReader(str(path))
        fields = reader.fields
        size = path.stat().st_size
        end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
        if end > size:
            raise ValueError(f"its tensors need {end:,} bytes and it has {size:,}")
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, OSError) as e:
        raise InvalidInputError(
            f"GGUF file {clip(str(path), 200)} is truncated or damaged ({first_line(e, 100)}): "
            "download or copy it again"
        ) from None

    def value(key: str) -> str | int | float | None:
        """A scalar field (as transformers' GGUF reader takes it); None if absent or not one."""
        field = fields.get(key)
        try:
            part = field.parts[field.data[0]]
            if field.types[0] == GGUFValueType.STRING:
                return bytes(part).decode("utf-8", "replace")
            return part[0].item() if field.types[0] != GGUFValueType.ARRAY else None
        except (AttributeError, IndexError, TypeError, ValueError):
            return None

    arch = str(value("general.architecture") or "(none recorded)")
    supported = supported_architectures()
    if _transformers_name(arch) not in supported:
        import transformers

        raise InvalidInputError(
            f"GGUF file {path.name} holds architecture {clip(arch, 40)!r}, which transformers "
            f"{transformers.__version__} cannot convert; it reads {', '.join(supported)} "
            "(a newer transformers may read more; or give the model's safetensors folder)"
        )
    if "tokenizer.ggml.tokens" not in fields or "tokenizer.ggml.model" not in fields:
        raise InvalidInputError(
            f"GGUF file {path.name} holds no tokenizer (no tokenizer.ggml.tokens/model), which "
            "adaptr needs to train and serve: use a GGUF written with its tokenizer (llama.cpp's "
            "convert_hf_to_gguf.py writes it), or give the model's folder"
        )
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    quant = None
    with suppress(ValueError, TypeError):
        quant = LlamaFileType(int(value("general.file_type"))).name
    if quant is None:  # not recorded: the most common type among the matrices
        mats = [t.tensor_type.name for t in reader.tensors if len(t.shape) > 1]
        quant = max(sorted(set(mats)), key=mats.count) if mats else "F32"
    quant = quant.removeprefix("MOSTLY_").removeprefix("ALL_")
    return {
        "architecture": arch,
        "general_name": value("general.name"),
        "quantization": quant,
        "tensor_types": dict(sorted(types.items())),
        "tensors": len(reader.tensors),
        "elements": sum(int(t.n_elements) for t in reader.tensors),
        "chat_template": "tokenizer.chat_template" in fields,
    }


# ------------------------------------------------------------------ converting
def provenance(folder: str | Path) -> dict[str, Any] | None:
    """A converted folder's ``adaptr_gguf.json``, or None (not a conversion, or unreadable)."""
    try:
        doc = json.loads((Path(folder) / PROVENANCE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("gguf"), dict) else None


def convert(
    gguf: str | Path,
    dtype: str = DEFAULT_DTYPE,
    cache_root: str | Path | None = None,
    *,
    on_note: Note | None = None,
    progress: bool = True,
) -> Path:
    """The converted model folder of the GGUF file ``gguf`` in ``dtype``, under
    ``cache_root`` (default: the default registry home's): found by the file's SHA-256 and
    reused, else converted now (seconds to minutes) and kept. ``on_note`` hears what was
    done (converted, with how long it took, or reused)."""
    from adaptr.registry.atomic import check_path, regular_file

    if dtype not in WEIGHT_DTYPES:
        raise InvalidInputError(f"--dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {dtype!r}")
    check_path(str(gguf), "GGUF file")
    src = regular_file(gguf, "GGUF file", use="give a .gguf file").resolve()
    if not is_gguf(src):
        read_header(src)  # the one-line refusal for what it is instead
    if cache_root is None:
        from adaptr.registry.registry import default_home

        cache_root = cache_dir(default_home())
    root = Path(cache_root)
    say = on_note or (lambda _m: None)
    with _Progress(progress) as bar:
        key, st = _stat_key(src)
        sha = file_sha256(src, root, on_progress=bar.hashing(src.name), remember=False)
        out = root / f"{sha[:16]}-{dtype}"
        reused = provenance(out) is not None
        if not reused:
            bar.step(f"reading {src.name}")
            header = read_header(src)
            started = time.time()
            params = _build(src, sha, st, dtype, header, root, out, bar)
        remember_sha(src, sha, root, key, st)
    if reused:
        say(f"reused the {dtype} conversion of {src.name} in {out} (no conversion: same SHA-256)")
        return out
    plain = header["quantization"] in ("F32", "F16", "BF16")
    how = f"{'cast' if plain else 'dequantized'} from {header['quantization']}"
    say(
        f"converted {src.name} ({header['architecture']}, {header['quantization']}, "
        f"{params:,} parameters) to {dtype} safetensors in {time.time() - started:.1f} s "
        f"({how}), in {out}; later uses of this file reuse it"
    )
    return out


def _build(
    src: Path,
    sha: str,
    before: os.stat_result,
    dtype: str,
    header: dict,
    root: Path,
    out: Path,
    bar,
) -> int:
    """Convert into a marked work folder and rename it to ``out``; returns the parameter count.
    ``before``: the file as it was hashed (a change since is refused)."""
    import errno

    from adaptr.registry.atomic import exit_on_sigterm, remove_work, replace_dir, work_dir
    from adaptr.values import human_size

    root.mkdir(parents=True, exist_ok=True)
    with exit_on_sigterm():
        work = work_dir("gguf", root)
        try:
            # config.json records the file's content only (never its name or path): two copies
            # of one file are one fingerprint, a changed file another
            stamp = {"sha256": sha, "size": before.st_size, "quantization": header["quantization"]}
            params = _write_folder(src, work, dtype, bar, stamp)
            after = os.stat(src)
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                raise InvalidInputError(
                    f"{src.name} changed while it was being converted; nothing was kept: run again"
                )
            gguf_doc = {
                "name": src.name, "path": str(src), "size": before.st_size, "sha256": sha, **header,
            }  # fmt: skip
            doc = {
                "gguf": gguf_doc,
                "dtype": dtype,
                "converted": time.time(),
                "libraries": _versions(),
            }
            _write_json(work / PROVENANCE, doc)  # last: a folder without it is not a conversion
            if out.exists() and provenance(out) is not None:
                remove_work(work)  # another process finished the same conversion first
            else:
                replace_dir(work, out)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFullError(
                    f"no space left converting {src.name} into {root} (it needs about "
                    f"{human_size(header['elements'] * DTYPE_BYTES[dtype])}); nothing was kept: "
                    "free space and run again"
                ) from None
            raise
        finally:
            remove_work(work)
    return params


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for lib in ("transformers", "gguf"):
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def _write_folder(src: Path, work: Path, dtype: str, bar, stamp: dict[str, Any]) -> int:
    """Load ``src`` with transformers' GGUF loader, dequantized, and save it as a plain folder."""
    import copy

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch_dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"gguf_file": str(src), "dtype": torch_dtype}
    if hasattr(transformers, "GgufConfig"):  # 5.x may keep blocks packed: ask for dense weights
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        bar.step(f"reading the tokenizer of {src.name}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=str(src))
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise InvalidInputError(
                f"transformers cannot build the tokenizer of {src.name} ({first_line(e, 120)}); "
                "give the model's folder instead"
            ) from None
        with bar.tensors(f"dequantizing {src.name} to {dtype}"):
            try:
                model = AutoModelForCausalLM.from_pretrained(str(src.parent), **kwargs)
            except (ValueError, KeyError, NotImplementedError) as e:
                raise InvalidInputError(
                    f"transformers cannot convert {src.name} ({first_line(e, 120)}); "
                    "give the model's folder instead"
                ) from None
        bar.step(f"writing {dtype} safetensors")
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are plain: nothing says otherwise
        setattr(config, CONFIG_KEY, stamp)
        with torch.device("meta"):  # a plain model of the same shape, given these tensors
            plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        plain.load_state_dict(model.state_dict(), assign=True, strict=True)
        plain.tie_weights()  # assign= leaves a tied head a parameter of its own
        plain.generation_config = model.generation_config
        plain.save_pretrained(work)
        tokenizer.save_pretrained(work)
        unique = {p.data_ptr(): p.numel() for p in plain.parameters()}
        return sum(unique.values())
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# ------------------------------------------------------------------ progress
class _Progress:
    """A rich bar on stderr while hashing and converting, where stderr is a terminal;
    transient, so that nothing is left behind."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.task = None

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def _start(self, description: str, total: float | None) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            console = Console(stderr=True)
            if not console.is_terminal:  # a pipe or a log: the note afterwards says it all
                self.enabled = False
                return
            self.bar = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True,
            )  # fmt: skip
            self.bar.start()
            self.task = self.bar.add_task(description, total=total)
        else:  # a task of its own per step (update/reset cannot clear a total)
            self.bar.remove_task(self.task)
            self.task = self.bar.add_task(description, total=total)

    def step(self, description: str) -> None:
        self._start(description, None)

    def hashing(self, name: str) -> Callable[[int, int], None]:
        started = []

        def update(done: int, total: int) -> None:
            if not started:
                started.append(True)
                self._start(f"hashing {name}", total)
            if self.bar is not None:
                self.bar.update(self.task, completed=done)

        return update

    @contextmanager
    def tensors(self, description: str) -> Iterator[None]:
        """Count the tensors transformers' GGUF loader dequantizes (it iterates them through
        ``tqdm`` in ``modeling_gguf_pytorch_utils``: that bar is swapped for this one)."""
        self._start(description, None)
        try:
            import transformers.modeling_gguf_pytorch_utils as loader
        except ImportError:
            yield
            return
        original = getattr(loader, "tqdm", None)
        if original is None:
            yield
            return

        def counted(iterable, *args, **kwargs):
            items = list(iterable)
            if self.bar is not None:
                self.bar.update(self.task, total=len(items), completed=0)
            for item in items:
                yield item
                if self.bar is not None:
                    self.bar.advance(self.task)

        loader.tqdm = counted
        try:
            yield
        finally:
            loader.tqdm = original


# ------------------------------------------------------------------ as a base
def resolve(
    path: str | Path, registry: Any, *, on_note: Note | None = stderr_note
) -> tuple[Path, str | None]:
    """(model folder, registered base name or None) for the GGUF file ``path`` given as a
    base: a registered base converted from the same file (same SHA-256), else the cached
    conversion in float32, made if need be. Found through :func:`adaptr.bases.resolve_base`."""
    from adaptr.registry.atomic import regular_file

    src = regular_file(path, "GGUF file", use="give a .gguf file").resolve()
    root = cache_dir(registry)
    if is_gguf(src):
        try:
            records = [r for r in registry.bases() if (r.summary or {}).get("gguf") and r.path]
        except Exception:  # no registry yet (or an unreadable one): convert
            records = []
        sha = file_sha256(src, root) if records else None  # hashed once: convert finds it
        for rec in records:
            if (
                rec.summary["gguf"].get("sha256") == sha
                and (Path(rec.path) / "config.json").is_file()
            ):
                if on_note is not None:
                    on_note(f"{src.name} is registered as base {rec.name}: using its conversion")
                return Path(rec.path), rec.name
    return convert(src, DEFAULT_DTYPE, root, on_note=on_note), None


def lineage(given: str | None, load_path: str | Path) -> dict[str, Any] | None:
    """The ``base_gguf`` lineage entry of a version trained on ``load_path`` (given as
    ``given``): the GGUF's name, size, SHA-256, quantization and the dtype it was converted
    to; None when the base is not a GGUF conversion."""
    doc = provenance(load_path)
    if doc is None:
        return None
    g = doc["gguf"]
    name = g.get("name")
    if given and looks_like_gguf(given):
        name = Path(given).name  # the file this run was given (the cache may hold a copy's)
    return {
        "name": name, "size": g.get("size"), "sha256": g.get("sha256"),
        "quantization": g.get("quantization"), "dtype": doc.get("dtype"),
    }  # fmt: skip
