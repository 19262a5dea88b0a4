"""The ``vllm.general_plugins`` entry point: adaptr refs as vLLM LoRA models.

:func:`register` (run by vLLM in each of its processes) registers :class:`AdaptrResolver`
with ``LoRAResolverRegistry``, the hook vLLM consults for a ``model`` it has not loaded
(with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``). Three things the bare hook cannot do are added
to vLLM's ``OpenAIServingModels`` (the one object that maps a request's ``model`` to a
``LoRARequest``), for adaptr refs only, every other name going to vLLM's own code:

- follow the registry: vLLM keeps a resolved name forever, so its ``lora_requests`` map
  re-checks an adaptr ref on each lookup and forgets it when the ref now names another
  version (moved tag, new version) or none (removed: 404);
- say why: a version for another base, or one vLLM cannot serve, is a 400 naming the reason
  (vLLM's hook can only say "could not be loaded");
- one engine adapter per version: ``qa``, ``qa@2`` and ``qa@prod`` naming the same version
  share one ``LoRARequest`` (one LoRA slot), under the version's own name ``qa@2~SHA``;
- answer with the ref asked: vLLM names an answer's ``model`` after its LoRARequest
  (``model_name(lora_request)``), which would be the internal ``qa@2~SHA``. The lookup of a
  request's adapter (``_maybe_get_adapters``: ``lora_requests[request.model]``) records in
  a context variable which ref asked for which internal name, and ``model_name`` answers
  with that ref; both run in the request's own task (``create_completion``,
  ``create_chat_completion``), so concurrent requests never see each other's;
- ``/v1/models`` lists every ref of the served base's adapters;
- chat with the version's own template: a version stored with a chat template (trained with
  ``sft.chat_template_path``, or any tokenizer saved beside it) renders chat with it, as
  adaptr's own engine does, instead of the base's. vLLM's ``OnlineRenderer.preprocess_chat``
  (chat completions, ``/tokenize``, responses) takes the server's template as its default;
  for a request whose ``model`` this task just resolved to such a version (the lookup's
  context variable) that default is the stored template. A request bringing its own
  ``chat_template`` is left to vLLM (refused without ``--trust-request-chat-template``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from http import HTTPStatus

from adaptr.serving.vllm.source import Refused, RegistrySource, Resolved, lora_name

log = logging.getLogger("adaptr.vllm")
_PATCHED: set[str] = set()  # what is patched in this process (once each)
# (internal LoRA name, the ref the request asked for) of this task's last adaptr lookup
ASKED: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "adaptr_asked", default=None
)


class AdaptrResolver:
    """Resolves adaptr refs for vLLM; one ``LoRARequest`` (one int id) per stored version."""

    def __init__(self, source: RegistrySource | None = None):
        self._source = source
        self._requests: dict = {}  # lora name (one per version) -> LoRARequest
        self._templates: dict[str, str] = {}  # lora name -> the chat template stored with it
        self._lock = threading.Lock()
        self._next_id = 1 << 30  # apart from vLLM's own counter (which starts at 1)

    def source(self, served_model: str | None = None) -> RegistrySource:
        if self._source is None:
            self._source = RegistrySource(served_model=served_model)
        elif served_model and self._source.served_model is None:
            self._source.served_model = served_model
        return self._source

    def request_for(self, resolved: Resolved):
        from vllm.lora.request import LoRARequest

        with self._lock:
            req = self._requests.get(resolved.lora_name)
            if req is None:
                self._next_id += 1
                req = LoRARequest(
                    lora_name=resolved.lora_name,
                    lora_int_id=self._next_id,
                    lora_path=str(resolved.path),
                )
                self._requests[resolved.lora_name] = req
                if resolved.chat_template is not None:
                    self._templates[resolved.lora_name] = resolved.chat_template
            return req

    def chat_template(self, lora_name: str) -> str | None:
        """The chat template stored with the version named ``lora_name``, if it has one."""
        return self._templates.get(lora_name)

    async def resolve_lora(self, base_model_name: str, lora_name: str):
        """vLLM's resolver hook (used as is when the serving patch is absent)."""
        source = self.source(base_model_name)
        if not source.is_ref(lora_name):
            return None
        try:
            resolved = source.resolve(lora_name)
        except Refused as e:
            log.warning("adaptr: %s", e)
            return None
        return None if resolved is None else self.request_for(resolved)


RESOLVER = AdaptrResolver()


def register() -> None:
    """Entry point (``vllm.general_plugins``): register the resolver and the serving patch."""
    from vllm.lora.resolver import LoRAResolverRegistry

    LoRAResolverRegistry.register_resolver("adaptr", RESOLVER)
    with contextlib.suppress(ImportError):  # a vLLM build without the OpenAI server
        _patch_serving_models()
        _patch_chat_templates()


class FollowingLoRAs(dict):
    """vLLM's name -> LoRARequest map, re-checked against the registry for adaptr refs."""

    def __init__(self, models, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._models = models

    def __contains__(self, name) -> bool:
        if not super().__contains__(name):
            return False
        req = super().__getitem__(name)
        if not _ours(req):
            return True
        source = RESOLVER.source(self._models.model_config.model)
        try:
            version = source.current(name)
            if version is not None and lora_name(version) == req.lora_name:
                ASKED.set((req.lora_name, name))  # the version this request renders for
                return True
        except Exception as e:  # a registry error: answer through resolve_lora
            log.warning("adaptr: re-checking %s: %s", name, e)
        super().pop(name, None)  # moved, new version, or removed: resolve again
        return False

    def __getitem__(self, name):
        req = super().__getitem__(name)
        if _ours(req):  # the answer names the ref asked (see model_name in the patch)
            ASKED.set((req.lora_name, name))
        return req


def _ours(req) -> bool:
    return "~" in getattr(req, "lora_name", "") and RESOLVER._requests.get(req.lora_name) is req


def _patch_serving_models() -> None:
    if "models" in _PATCHED:
        return
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelPermission
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    original_init = OpenAIServingModels.__init__
    original_resolve = OpenAIServingModels.resolve_lora
    original_models = OpenAIServingModels.show_available_models
    original_name = OpenAIServingModels.model_name

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.lora_requests = FollowingLoRAs(self, self.lora_requests)

    async def resolve_lora(self, lora_name: str):
        source = RESOLVER.source(self.model_config.model)
        if self.is_base_model(lora_name) or not source.is_ref(lora_name):
            return await original_resolve(self, lora_name)
        async with self.lora_resolver_lock[lora_name]:
            found = await _resolve_ref(self, source, lora_name)
        # not in the registry: perhaps another resolver's (outside the lock: vLLM takes it)
        return await original_resolve(self, lora_name) if found is None else found

    async def _resolve_ref(self, source, lora_name: str):
        try:
            resolved = source.resolve(lora_name)
        except Refused as e:
            return create_error_response(
                message=str(e), err_type="BadRequestError",
                status_code=HTTPStatus.BAD_REQUEST, param="model",
            )  # fmt: skip
        if resolved is None:
            return None
        req = RESOLVER.request_for(resolved)
        try:
            await self.engine_client.add_lora(req)
        except Exception as e:
            return create_error_response(
                message=f"vLLM could not load {resolved.version_ref}: {e}",
                err_type="BadRequestError", status_code=HTTPStatus.BAD_REQUEST, param="model",
            )  # fmt: skip
        dict.__setitem__(self.lora_requests, lora_name, req)
        ASKED.set((req.lora_name, lora_name))
        log.info("adaptr: %s -> %s (%s)", lora_name, resolved.version_ref, resolved.path)
        return req

    async def show_available_models(self):
        listing = await original_models(self)
        try:
            refs = RESOLVER.source(self.model_config.model).refs()
        except Exception as e:
            log.warning("adaptr: listing the registry: %s", e)
            return listing
        seen = {card.id for card in listing.data}
        base = self.base_model_paths[0].name
        listing.data.extend(
            ModelCard(id=ref, root=ref, parent=base, permission=[ModelPermission()])
            for ref in refs
            if ref not in seen
        )
        return listing

    def model_name(self, lora_request=None) -> str:
        asked = ASKED.get()
        if lora_request is not None and asked and asked[0] == lora_request.lora_name:
            return asked[1]
        return original_name(self, lora_request)

    OpenAIServingModels.__init__ = __init__
    OpenAIServingModels.model_name = model_name
    OpenAIServingModels.resolve_lora = resolve_lora
    OpenAIServingModels.show_available_models = show_available_models
    _PATCHED.add("models")


def stored_template(request) -> str | None:
    """The chat template to render ``request`` (a chat, tokenize or responses request) with
    instead of the server's: the one stored with the adaptr version its ``model`` resolved to
    in this task; None for any other model, a version storing none, or a request that brings
    its own template (vLLM decides on that one, as ever)."""
    own = (getattr(request, "chat_template_kwargs", None) or {}).get("chat_template")
    if getattr(request, "chat_template", None) is not None or own is not None:
        return None
    asked = ASKED.get()
    if asked is None or asked[1] != getattr(request, "model", None):
        return None
    return RESOLVER.chat_template(asked[0])


def _patch_chat_templates() -> None:
    if "templates" in _PATCHED:
        return
    from vllm.renderers.online_renderer import OnlineRenderer

    original = OnlineRenderer.preprocess_chat

    async def preprocess_chat(self, request, messages, default_template, *args, **kwargs):
        template = stored_template(request)
        return await original(
            self, request, messages, template or default_template, *args, **kwargs
        )

    OnlineRenderer.preprocess_chat = preprocess_chat
    _PATCHED.add("templates")
