"""PEFT's own path, for the LoRA adapters :class:`~adaptr.serving.AdapterServer` cannot stack.

Such adapters (DoRA, ``lora_bias``, ``modules_to_save``, trainable tokens, LoRA on
embeddings or other non-``nn.Linear`` layers, ranks above ``max_rank``) are loaded by PEFT
into the served base model itself, so the base is still loaded once. PEFT's layers wrap
the base layers and call them, so the stacked adapters' hooks on those base layers keep
working: in one forward, rows on stacked adapters get their deltas from the stacks and
rows on PEFT adapters from PEFT's mixed batch (``adapter_names``; "__base__" for the
others). What PEFT cannot mix with other adapters (DoRA; modules to save that are not
linear, embedding or convolution layers) runs as a batch of its own with that adapter
active (``AdapterServer.partition``). Between batches PEFT's layers are disabled.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from .registry import AdapterVersion, Registry

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class PeftFallback:
    """The PEFT-served adapters of one base model, by registry ref."""

    def __init__(self, model, registry: Registry):
        self.model = model
        self.registry = registry
        self.peft = None  # the PeftModel wrapping ``model``, made on the first adapter

    def __contains__(self, ref: str) -> bool:
        return self.peft is not None and ref in self.peft.peft_config

    def load(self, version: AdapterVersion) -> None:
        """Load ``version`` into the base through PEFT (named by its ref, disabled until used)."""
        from .inference import attach

        with tempfile.TemporaryDirectory(prefix="adaptr-serve-") as tmp:
            self.peft = attach(self.model, self.registry, [version], Path(tmp), into=self.peft)
        self.peft.eval()
        self.peft.base_model.disable_adapter_layers()

    def unload(self, ref: str) -> None:
        """Drop ``ref``'s weights (PEFT's wrappers stay, disabled)."""
        if ref in self:
            self.peft.delete_adapter(ref)
            self.peft.base_model.disable_adapter_layers()

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

        A wrapper of modules to save (or trainable tokens) fails on adapters it lacks, and
        on any ``adapter_names`` if its module is not a linear, embedding or convolution
        layer: it gets the names of its own adapters only, and none when the batch uses none
        of them (it is then switched off for the batch).
        """
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        def hook(own, module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            k = x.shape[0] // len(own)
            kwargs["adapter_names"] = own if k == 1 else [a for a in own for _ in range(k)]
            return args, kwargs

        handles = []
        for m in self.peft.modules():
            own = names
            if isinstance(m, AuxiliaryTrainingWrapper):
                known = m._get_available_adapters()
                if not known.intersection(names):
                    m.enable_adapters(False)  # rows() switches every PEFT layer off after the batch
                    continue
                own = [a if a in known else BASE for a in names]
            elif not isinstance(m, LoraLayer):
                continue
            handles.append(m.register_forward_pre_hook(partial(hook, own), with_kwargs=True))
        return handles
