"""The registry side of the vLLM resolver: refs to checked, linked PEFT folders (no vLLM needed).

A request's ``model`` that parses as an adaptr ref (``NAME``, ``NAME@N``, ``NAME@TAG``) is
looked up in the registry on every request, so a moved tag or a new version is seen at once.
Each version reaches vLLM under its own LoRA name (``NAME@N~SHA``, see :func:`lora_name`) as a
folder of symbolic links to the stored blobs (``<home>/cache/vllm/<lora name>/``): nothing is
copied, and a folder, once made, never changes.

Settings (environment, set by ``adaptr serve --engine vllm``): ``ADAPTR_HOME`` (the registry),
``ADAPTR_VLLM_BASE`` (the registered base the server runs, else the model vLLM was started
with), ``ADAPTR_VLLM_MAX_LORA_RANK`` (the server's ``--max-lora-rank``).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from adaptr.errors import AdaptrError, IntegrityError, InvalidInputError, NotFoundError
from adaptr.serving.vllm.compat import version_problems

CACHE = ("cache", "vllm")


class Refused(AdaptrError):
    """The ref names a version, but this server must not serve it (wrong base, unsupported)."""


@dataclass(frozen=True)
class Resolved:
    ref: str  # as requested
    version_ref: str  # NAME@N
    lora_name: str  # unique per stored version
    path: Path  # a PEFT folder of links to the blobs
    # the chat template stored with the version (trained with sft.chat_template_path, or the
    # tokenizer training saved beside it); None: chat renders with vLLM's default (the base's)
    chat_template: str | None = None


def lora_name(version) -> str:
    """A name unique to one stored version: a re-added NAME@N (after ``rm``) differs by content."""
    weights = next((f.sha256 for f in version.files if f.path == "adapter_model.safetensors"), "")
    config = next((f.sha256 for f in version.files if f.path == "adapter_config.json"), "")
    return f"{version.ref}~{(weights[:8] + config[:4]) or 'x'}"


class RegistrySource:
    """Resolve adaptr refs for a vLLM server running ``served_model``."""

    def __init__(self, home=None, *, served_model: str | None = None, base: str | None = None,
                 max_lora_rank: int | None = None):  # fmt: skip
        from adaptr.registry import Registry

        self.registry = Registry(home if home is not None else os.environ.get("ADAPTR_HOME"))
        self.served_model = served_model
        self.base = base if base is not None else os.environ.get("ADAPTR_VLLM_BASE") or None
        rank = max_lora_rank or os.environ.get("ADAPTR_VLLM_MAX_LORA_RANK")
        self.max_lora_rank = int(rank) if rank else None
        self._fingerprint: str | None | bool = False  # not computed yet
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- the served base
    def served_label(self) -> str:
        return self.base or self.served_model or "?"

    def served_fingerprint(self) -> str | None:
        """The fingerprint of the model the server runs (None: unknown, not checked)."""
        if self._fingerprint is False:
            from adaptr.registry.fingerprint import find_base_dir, read_base

            fp = None
            if self.base:
                fp = self.registry.get_base(self.base).fingerprint
            elif self.served_model:
                try:
                    rec = self.registry.get_base(self.served_model)
                    fp = rec.fingerprint
                except (NotFoundError, InvalidInputError):
                    found = find_base_dir(self.served_model)
                    fp = read_base(found).fingerprint if found else None
            self._fingerprint = fp
        return self._fingerprint  # type: ignore[return-value]

    def check_base(self, version) -> None:
        want = self.served_fingerprint()
        if want is None or version.base_fingerprint is None:
            return
        if version.base_fingerprint != want:
            trained = version.base or f"a model with fingerprint {version.base_fingerprint[:12]}"
            raise Refused(
                f"{version.ref} was made for base {trained}, but this server runs "
                f"{self.served_label()}; serve it on its own base"
            )

    # ---------------------------------------------------------------- refs
    @staticmethod
    def is_ref(text: str) -> bool:
        from adaptr.registry import Ref

        try:
            Ref.parse(text)
        except InvalidInputError:
            return False
        return True

    def current(self, ref: str):
        """The version ``ref`` names now, or None (not a ref, unknown, removed)."""
        try:
            return self.registry.get(ref)
        except (NotFoundError, InvalidInputError):
            return None

    def resolve(self, ref: str) -> Resolved | None:
        """``ref``'s version as a linked PEFT folder with its stored chat template; None when
        it names nothing; Refused when it names a version this server must not serve (with
        the reason)."""
        from adaptr.inference import stored_chat_template

        version = self.current(ref)
        if version is None:
            return None
        self.check_base(version)
        found = version_problems(self.registry, version, max_lora_rank=self.max_lora_rank)
        if found:
            raise Refused(f"vLLM cannot serve {version.ref}: {'; '.join(found)}")
        name = lora_name(version)
        try:
            folder = self.materialize(version, name)
            template = stored_chat_template(self.registry, version)
        except IntegrityError as e:  # a corrupt or missing blob: refused, never linked
            raise Refused(str(e)) from None
        return Resolved(ref, version.ref, name, folder, template)

    def materialize(self, version, name: str) -> Path:
        """``<home>/cache/vllm/NAME`` holding a link per stored file (made once, atomically)."""
        folder = self.registry.home.joinpath(*CACHE, name)
        # vLLM reads the linked files itself: each is re-hashed once it changed, so a blob
        # whose bytes are not its name is refused here, never linked or served
        self.registry.check_files(version)
        if folder.is_dir():
            return folder
        with self._lock:
            if folder.is_dir():
                return folder
            folder.parent.mkdir(parents=True, exist_ok=True)
            staging = folder.with_name(f".{name}.{os.getpid()}.{threading.get_ident()}")
            staging.mkdir(parents=True, exist_ok=True)
            for f in version.files:
                blob = self.registry.blobs.path(f.sha256).resolve()
                if not blob.is_file():
                    raise NotFoundError(
                        f"{version.ref}/{f.path} is missing from the store; run `adaptr verify`"
                    )
                link = staging / f.path
                if link.is_symlink():
                    link.unlink()
                link.symlink_to(blob)
            try:
                staging.rename(folder)
            except OSError:  # another process made it first
                import shutil

                shutil.rmtree(staging, ignore_errors=True)
        return folder

    def refs(self) -> list[str]:
        """The refs of the served base's adapters: every NAME, NAME@TAG and NAME@N."""
        want = self.served_fingerprint()
        out: list[str] = []
        for v in self.registry.list():
            if want is not None and v.base_fingerprint not in (None, want):
                continue
            out += [v.ref] + [f"{v.name}@{t}" for t in v.tags]
        names = sorted({r.partition("@")[0] for r in out})
        return names + sorted(set(out) - set(names))
