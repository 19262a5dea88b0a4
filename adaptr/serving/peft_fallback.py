"""PEFT's own path, for the LoRA adapters :class:`~adaptr.serving.AdapterServer` cannot stack.

Such adapters (DoRA and the other LoRA variants, ``lora_bias``, ``modules_to_save``,
trainable tokens, LoRA on embeddings or other non-``nn.Linear`` layers, ranks above
``max_rank``) are loaded by PEFT into the served base model itself, so the base is still
loaded once. PEFT's layers wrap the base layers and call them, so the stacked adapters'
hooks on those base layers keep working: in one forward, rows on stacked adapters get their
deltas from the stacks and rows on PEFT adapters from PEFT's mixed batch (``adapter_names``;
"__base__" for the others). Between batches PEFT's layers are disabled.

Everything adaptr knows about what PEFT (0.21) cannot mix lives here (:meth:`PeftFallback.traits`,
:func:`clash`), for :func:`partition` to split such batches:

- run apart (a batch of their own, with that adapter active): DoRA (its layers refuse
  ``adapter_names``: ValueError) and the other LoRA variants (their mixed path is not PEFT's
  plain one); a module saved whole (``modules_to_save``) or with trainable tokens that is not
  a linear, embedding or convolution layer (``TypeError: Mixed batching is only supported…``);
  LoRA on ``nn.MultiheadAttention`` or on parameters (``target_parameters``), whose layers
  refuse ``adapter_names``.
- never in one batch, never loaded together: two adapters that change one module in
  different ways (LoRA, a saved copy, trainable tokens). PEFT cannot wrap one of its
  wrappers in another (``TypeError: modules_to_save cannot be applied to modules of type
  lora.Embedding``; trainable tokens over a saved copy fail in every forward; a wrapper
  over a wrapper cannot mix). LoRA on a module's parameters (``target_parameters``, PEFT's
  ParamWrapper) counts as its own kind of change, and two such adapters clash unless they
  name the same parameters (PEFT: "all adapters must target the same set of parameters"):
  so a ``target_parameters`` adapter loads and answers alike whatever the server holds.
  Loading one evicts the other, and wrappers left without adapters are taken out of the
  model (:meth:`PeftFallback.unload`).
- refused: activated LoRA (``alora_invocation_tokens``), which only PeftModel.generate
  applies (it finds the invocation tokens).

Worked around, PEFT bugs: an adapter loaded after one with trainable tokens failed
(KeyError ``…token_adapter.trainable_tokens_delta``), and so did one loaded beside modules to
save after the last or the active adapter was deleted (ValueError ``Please specify at least
one adapter to set``). What PEFT still raises while loading becomes a one-line
:class:`AdaptrError`, and what it half-loaded is taken out.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from adaptr.errors import AdaptrError, InvalidInputError, first_line
from adaptr.registry import AdapterVersion, Registry
from adaptr.registry.adapter_dir import WEIGHTS, lora_modules
from adaptr.registry.patterns import check_stored_config
from adaptr.registry.safetensors_header import read_header

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch

# how an adapter changes a module of the base
LORA, SAVED, TOKENS = "LoRA", "a saved copy (modules_to_save)", "trainable tokens"
PARAMS = "LoRA on its parameters (target_parameters)"  # PEFT's ParamWrapper around the module


def _mixable_types() -> tuple:
    """The modules PEFT's mixed batches cover in a wrapper of modules to save / trainable
    tokens (``AuxiliaryTrainingWrapper._mixed_batch_forward``'s SUPPORTED_MODULES)."""
    from torch import nn

    return (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclasses.dataclass(frozen=True)
class Traits:
    """What PEFT needs to know of one adapter version to batch it with others."""

    ref: str
    changes: dict[str, str]  # module path in the base -> how it changes it (LORA, SAVED, TOKENS)
    alone: str | None  # why PEFT must run its rows as a batch of their own (None: it mixes)
    variant: str | None  # the LoRA variant (DoRA, …): not plain LoRA math, so never stacked
    params: frozenset[str] = frozenset()  # its target_parameters


def clash(a: Traits, b: Traits) -> str | None:
    """Why ``a`` and ``b`` cannot be in one batch nor loaded together (None: they can): a
    module that both change in different ways, or one inside the other; LoRA on two sets of
    parameters (PEFT holds ``target_parameters`` adapters only when they all name the same)."""
    if a.params and b.params and a.params != b.params:
        return (
            f"{a.ref} and {b.ref} put LoRA on different parameters (target_parameters), which "
            "PEFT cannot hold at once"
        )
    for m, how in a.changes.items():
        for n, other in b.changes.items():
            same = m == n
            if (same and how != other) or n.startswith(m + ".") or m.startswith(n + "."):
                return (
                    f"{a.ref} and {b.ref} both change {m if len(m) <= len(n) else n} "
                    f"({how} and {other}), which PEFT cannot hold at once"
                )
    return None


def partition(adapters: Sequence[Hashable], traits: Mapping[Any, Traits | None]) -> list[list[int]]:
    """The rows of a batch (``adapters[i]``: row i's adapter; ``traits``: each adapter's,
    None for the base or one the batch will report) as the batches they must run as, in
    order of first appearance: an adapter PEFT cannot mix with others (DoRA, …) gets its
    rows apart, and two that PEFT cannot hold at once go to different batches; everything
    else (the base's rows too) runs together in the first."""
    groups: list[tuple[bool, list[Traits], list[int]]] = []  # (alone, adapters' traits, rows)
    where: dict[Any, int] = {}
    for i, a in enumerate(adapters):
        if a not in where:
            where[a] = _group(groups, traits.get(a))
        groups[where[a]][2].append(i)
    return [rows for _, _, rows in groups]


def _group(groups: list[tuple[bool, list[Traits], list[int]]], t: Traits | None) -> int:
    """The first group an adapter (``t``: its traits; None: the base, or a ref the batch
    will report) can join, or a new one."""
    alone = bool(t and t.alone)
    fits = (
        g
        for g, (apart, members, _) in enumerate(groups)
        if not (alone or apart or (t and any(clash(t, m) for m in members)))
    )
    g = next(fits, len(groups))
    if g == len(groups):
        groups.append((alone, [], []))
    if t:
        groups[g][1].append(t)
    return g


class PeftFallback:
    """The PEFT-served adapters of one base model, by registry ref."""

    def __init__(self, model, registry: Registry, base_path: str):
        self.model = model
        self.registry = registry
        self.base_path = base_path
        self.peft = None  # the PeftModel wrapping ``model``, made on the first adapter
        # the base's own modules, before PEFT wraps any (the same objects stay inside wrappers)
        self.modules = dict(model.named_modules())
        self._embeddings = [self._name_of(model.get_input_embeddings())]  # what tokens change
        if getattr(model.config, "tie_word_embeddings", False):
            self._embeddings.append(self._name_of(model.get_output_embeddings()))
        self._traits: dict[str, Traits] = {}  # by version ref (versions are immutable)

    def __contains__(self, ref: str) -> bool:
        return self.peft is not None and ref in self.peft.peft_config

    # ------------------------------------------------------------------ what PEFT can mix
    def traits(self, v: AdapterVersion) -> Traits:
        """``v``'s :class:`Traits` (from its config and weights' names, before loading it);
        raises InvalidInputError for an adapter PEFT serves only through its own generate,
        and for one whose patterns cannot be matched in bounded time against the served
        model's module names (a version stored before adaptr checked them): the server
        asks for traits before it matches a pattern or PEFT sees the config, so such an
        adapter fails its own requests and the batch worker goes on."""
        if v.ref in self._traits:
            return self._traits[v.ref]
        cfg = v.config
        # the names PEFT matches against now: the base's, with the wrappers of loaded adapters
        check_stored_config(cfg, (n for n, _ in self.model.named_modules()), v.ref)
        if cfg.get("alora_invocation_tokens"):
            raise InvalidInputError(
                f"{v.ref} is an activated LoRA (alora_invocation_tokens), which only PEFT's own "
                "generate applies: serve it with adaptr.inference (adaptr generate)"
            )
        changes: dict[str, str] = {}
        why: list[str] = []
        weights = self.registry.path(v.ref).get(WEIGHTS)
        tensors = read_header(weights)[0] if weights is not None else {}
        params = cfg.get("target_parameters") or []
        owners = [p.rpartition(".")[0] for p in params if isinstance(p, str)]
        for module in lora_modules(tensors):
            on_params = any(module == o or module.endswith("." + o) for o in owners)
            changes[module] = PARAMS if on_params else LORA
            if type(self.modules.get(module)).__name__ == "MultiheadAttention":
                why.append(f"LoRA on {module} (MultiheadAttention)")
        if params:
            why.append("LoRA on parameters (target_parameters)")
        for module in self._matches(cfg.get("modules_to_save"), cfg.get("modules_to_tie")):
            changes[module] = SAVED
        for module in self._token_modules(cfg.get("trainable_token_indices")):
            changes[module] = TOKENS
        changes.pop(None, None)  # a base without input/output embeddings
        for module, how in changes.items():
            found = self.modules.get(module)
            if how != LORA and not isinstance(found, _mixable_types()):
                why.append(f"{how} of {module} ({type(found).__name__})")
        variant = _variant(cfg)
        if variant:
            why.insert(0, variant)
        alone = why[0] + (f" and {len(why) - 1} more" if len(why) > 1 else "") if why else None
        t = Traits(v.ref, changes, alone, variant, frozenset(map(str, params)))
        self._traits[v.ref] = t
        return t

    def known(self, ref: str) -> Traits | None:
        """The traits of a version already looked at (a resident adapter's), else None."""
        return self._traits.get(ref)

    def _matches(self, *lists) -> list[str]:
        """The base's modules PEFT's ``_set_trainable`` wraps for these names (name suffixes)."""
        names = [n for names in lists for n in (names or []) if isinstance(n, str) and n]
        return [m for m in self.modules if m and any(m.endswith(n) for n in names)]

    def _token_modules(self, indices) -> list[str]:
        """The modules trainable tokens wrap: the named ones, else the input embedding; with
        tied embeddings, the output embedding too."""
        if not indices:
            return []
        found = self._matches(list(indices)) if isinstance(indices, dict) else self._embeddings[:1]
        return [*found, *(n for n in self._embeddings[1:] if n not in found)]

    def _name_of(self, module) -> str | None:
        return next((n for n, m in self.modules.items() if m is module), None)

    # ------------------------------------------------------------------ loading
    def load(self, version: AdapterVersion) -> None:
        """Load ``version`` into the base through PEFT (named by its ref, disabled until used)."""
        from adaptr.bases import check_base_fits
        from adaptr.inference import attach

        # checked against the base's files: the served model's own names have PEFT's wrappers in them
        checked = check_base_fits(self.registry, [version], self.base_path) is not None
        try:
            with tempfile.TemporaryDirectory(prefix="adaptr-serve-") as tmp, self._load_fix():
                self.peft = attach(
                    self.model, self.registry, [version], Path(tmp), into=self.peft, checked=checked
                )
        except BaseException as e:
            self._strip(version.ref)  # nothing half-loaded stays in the served model
            if isinstance(e, AdaptrError) or not isinstance(e, _PEFT_REFUSALS):
                raise
            why = f"{type(e).__name__}: {first_line(e, 160)}"
            if self.peft is None:  # nothing else is loaded through PEFT: the adapter itself
                raise InvalidInputError(f"PEFT could not load {version.ref} ({why})") from None
            raise InvalidInputError(
                f"PEFT could not load {version.ref} beside the adapters this server holds "
                f"({why}): serve it from an AdapterServer of its own"
            ) from None
        self.peft.eval()
        self.peft.base_model.disable_adapter_layers()

    @contextmanager
    def _load_fix(self) -> Iterator[None]:
        """Two PEFT 0.21 bugs in loading an adapter beside others. TrainableTokensWrapper maps
        the weights of every adapter loaded after it to its own (ModulesToSaveWrapper skips
        adapters it lacks), so loading an adapter without trainable tokens next to one that
        has them fails with a KeyError: skip them too, while loading. And deleting the active
        adapter can leave none active (when the first LoRA layer held only it), after which
        loading beside a wrapper of modules to save fails (ValueError 'Please specify at
        least one adapter to set'): make one active first (its layers stay disabled)."""
        from peft.utils.other import TrainableTokensWrapper

        patched = []
        if self.peft is not None:
            tuner = self.peft.base_model
            if not tuner.active_adapters:  # see the docstring
                tuner.set_adapter(next(iter(self.peft.peft_config)), inference_mode=True)
            for m in self.peft.modules():
                if isinstance(m, TrainableTokensWrapper):
                    own = m.adapter_state_dict_load_map
                    m.adapter_state_dict_load_map = partial(_own_keys, m, own)
                    patched.append(m)
        try:
            yield
        finally:
            for m in patched:
                del m.adapter_state_dict_load_map

    def unload(self, ref: str) -> None:
        """Drop ``ref``'s weights, and PEFT's wrappers left without adapters."""
        if ref in self:
            self.peft.delete_adapter(ref)
            self._unwrap_empty()
            if not self.peft.peft_config:  # PEFT cannot load into a PeftModel left with none
                self.peft = None
            else:
                self.peft.base_model.disable_adapter_layers()

    def _strip(self, ref: str) -> None:
        """Take what a failed load left of ``ref`` out of the model."""
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        if self.peft is not None and ref in self.peft.peft_config:
            del self.peft.peft_config[ref]
        for m in self.model.modules():
            try:
                if isinstance(m, AuxiliaryTrainingWrapper) and ref in m._adapters:
                    m.delete_adapter(ref, new_active_adapters=None)
                elif isinstance(m, LoraLayer) and ref in _adapters_of(m):
                    m.delete_adapter(ref)
            except Exception:  # best effort: the wrapper goes below if it holds nothing else
                pass
        self._unwrap_empty()
        if self.peft is not None and not self.peft.peft_config:
            self.peft = None

    def _unwrap_empty(self) -> None:
        """Put back the base's own module wherever a PEFT wrapper holds no adapter any more
        (PEFT's delete_adapter leaves them, and no other wrapper may then go there)."""
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        changed = True
        while changed:
            changed = False
            for name, m in self.model.named_modules():
                if isinstance(m, AuxiliaryTrainingWrapper) and not m._adapters:
                    inner = m.original_module
                elif isinstance(m, LoraLayer) and not _adapters_of(m):
                    inner = m.base_layer
                else:
                    continue
                parent, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent), child, inner)
                changed = True
                break

    # ------------------------------------------------------------------ batches
    @contextmanager
    def rows(self, names: Sequence[str]) -> Iterator[None]:
        """Apply PEFT's adapters to a batch's rows: ``names[i]`` for row ``i`` (BASE: none)."""
        used = set(names) - {BASE}
        if not used:
            yield
            return
        tuner = self.peft.base_model
        handles = []
        try:
            tuner.enable_adapter_layers()
            if set(names) == used and len(used) == 1:  # every row on one adapter: make it active
                tuner.set_adapter(names[0], inference_mode=True)
            else:
                handles = self._inject(list(names))
            yield
        finally:
            for h in handles:
                h.remove()
            tuner.disable_adapter_layers()

    def _inject(self, names: list[str]) -> list:
        """Hooks handing ``adapter_names`` to PEFT's layers, repeated if generate() expanded rows.

        A layer that holds none of the batch's adapters is switched off for the batch
        (``rows()`` switches every PEFT layer off after it): it adds nothing, and some refuse
        any ``adapter_names``. A wrapper of modules to save (or trainable tokens) gets the
        names of its own adapters only. What PEFT cannot mix is refused here with an
        AdaptrError, never run (``partition()`` keeps such adapters apart).
        """
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        def hook(own, module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            if x.shape[0] % len(own):
                raise InvalidInputError(
                    f"{type(module).__name__} got {x.shape[0]} rows for a batch of {len(own)}: "
                    "PEFT's mixed batches need the batch as the inputs' first dimension"
                )
            k = x.shape[0] // len(own)
            kwargs["adapter_names"] = own if k == 1 else [a for a in own for _ in range(k)]
            return args, kwargs

        def refuse(ref: str, why: str):
            return InvalidInputError(
                f"PEFT cannot run {ref} in one batch with other adapters ({why}): run it apart, "
                "as AdapterServer.partition() does"
            )

        handles = []
        batch = set(names) - {BASE}
        for m in self.peft.modules():
            own = names
            if isinstance(m, AuxiliaryTrainingWrapper):
                known = m._get_available_adapters() & batch
                if not known:
                    m.enable_adapters(False)
                    continue
                if not isinstance(m.original_module, _mixable_types()):
                    kind = type(m.original_module).__name__
                    raise refuse(min(known), f"{m._error_message_name()} of a {kind}")
                own = [a if a in known else BASE for a in names]
            elif isinstance(m, LoraLayer):
                held = _adapters_of(m) & batch
                if not held:
                    m.enable_adapters(False)
                    continue
                if type(m)._check_forward_args is not LoraLayer._check_forward_args:
                    raise refuse(min(held), f"LoRA on a {type(m).__name__} layer")
                if held & set(m.lora_variant):
                    ref = min(held & set(m.lora_variant))
                    raise refuse(ref, type(m.lora_variant[ref]).__name__)
            else:
                continue
            handles.append(m.register_forward_pre_hook(partial(hook, own), with_kwargs=True))
        return handles


# what PEFT raises when it cannot load an adapter (beside others): TypeError for a wrapper in a
# wrapper, ValueError for a conflicting config, KeyError / AttributeError from its own bugs
_PEFT_REFUSALS = (TypeError, ValueError, KeyError, AttributeError)


def _own_keys(wrapper, own, adapter_name: str) -> dict:
    return own(adapter_name) if adapter_name in wrapper._adapters else {}


def _adapters_of(layer) -> set[str]:
    """The adapters a PEFT LoRA layer holds weights of."""
    return {a for name in layer.adapter_layer_names for a in getattr(layer, name, {})}


def _variant(cfg: dict) -> str | None:
    """The LoRA variant a config asks for (DoRA, VeLoRA, …), by PEFT's own LoraConfig fields."""
    from peft import LoraConfig

    if cfg.get("use_dora"):
        return "DoRA"
    for f in dataclasses.fields(LoraConfig):
        value = cfg.get(f.name)
        if f.metadata.get("is_lora_variant") and value:
            return f"a LoRA variant ({f.name})"
        if f.name == "init_lora_weights" and value in f.metadata.get("lora_variants", ()):
            return f"a LoRA variant (init_lora_weights={value})"
    return None
