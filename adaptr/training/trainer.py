"""SFT training with TRL's SFTTrainer + PEFT LoRA/QLoRA, straight into the registry.

The usual PEFT + TRL workflow as one call: load the base (optionally 8-bit or 4-bit NF4 through
bitsandbytes, then ``prepare_model_for_kbit_training``), build the ``LoraConfig`` from the
model family's defaults and the recipe, format the data, run ``SFTTrainer``, and store the
adapter as the next version with its lineage. adaptr adds defaults, never different math:
the ``lora`` and ``sft`` sections reach PEFT and TRL unchanged.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from adaptr.data.sft import DataSplits, LengthReport, load_splits, loss_defaults, prepare
from adaptr.errors import (
    AdaptrError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    StorageFullError,
    brief,
    first_line,
)
from adaptr.registry import AdapterVersion, Registry, check_name
from adaptr.registry.fingerprint import looks_like_hub_id
from adaptr.registry.refs import check_tag
from adaptr.training.recipe import Recipe

LIBRARIES = (
    "adaptr",
    "torch",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "accelerate",
    "bitsandbytes",
)


class TrainingInterrupted(AdaptrError):
    """Ctrl-C during training: nothing was stored; checkpoints allow ``--resume``."""

    exit_code = 130


@dataclass
class TrainResult:
    """What a training run produced (``version`` is None on non-main processes)."""

    version: AdapterVersion | None
    metrics: dict[str, Any]
    run_dir: Path
    notes: list[str] = field(default_factory=list)


def library_versions(libraries: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """Installed version of each library (None where it is not installed)."""
    out = {}
    for lib in libraries:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def bitsandbytes_problem() -> str | None:
    """Why bitsandbytes quantization cannot run here, or None if it can."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a broken native library
        return f"bitsandbytes cannot be imported ({type(e).__name__}: {e})"
    return None


def resolve_base(path_or_name: str, registry: Registry) -> tuple[str, str]:
    """(what to load, the base key recorded with the version) for a name, folder, GGUF file
    or Hub id."""
    from adaptr.registry.atomic import check_path

    check_path(path_or_name, "--base")
    try:
        rec = registry.get_base(path_or_name)
        return rec.path, rec.name
    except (NotFoundError, InvalidInputError):
        pass
    p = Path(path_or_name).expanduser()
    if p.exists():
        from adaptr import gguf

        if gguf.looks_like_gguf(p):  # converted once, then the cached folder (or its base)
            folder, name = gguf.resolve(p, registry)
            return str(folder), name or str(folder)
        if not (p / "config.json").is_file():
            raise InvalidInputError(
                f"base {brief(path_or_name)} is not a model folder (no config.json)"
            )
        return str(p.resolve()), str(p.resolve())
    if not looks_like_hub_id(path_or_name):
        raise NotFoundError(
            f"base {brief(path_or_name)} not found: give a model folder, a Hub id (org/name) or a name from `adaptr base list`"
        )
    return path_or_name, path_or_name


def _check_causal_lm(path: str, trust_remote_code: bool) -> dict:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"could not load base {path}: {first_line(e)}") from None
    heads = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = config.architectures or []
    causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        not archs or any(a in heads for a in archs)
    )
    if not causal and not trust_remote_code:
        what = f"model_type {brief(config.model_type)}" + (
            f", architectures {brief(archs)}" if archs else ""
        )
        raise InvalidInputError(
            f"base {path} is not a causal language model ({what}); "
            "adaptr trains decoder-only models that AutoModelForCausalLM loads"
        )
    return config.to_dict()


def load_tokenizer(path: str, base: dict[str, Any]):
    """The base's tokenizer with its family's fix-ups; returns (tokenizer, family). No weights."""
    from transformers import AutoTokenizer

    from adaptr.extend.catalog import family_for, get_family

    config = _check_causal_lm(path, base["trust_remote_code"])
    family = get_family(base["family"]) if base.get("family") else family_for(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=base["trust_remote_code"])
    except (OSError, ValueError, TypeError) as e:
        raise InvalidInputError(
            f"could not load the tokenizer of base {path}: {first_line(e)}"
        ) from None
    if family is not None:
        family.fix_tokenizer(tokenizer)
    if tokenizer.eos_token is None:
        raise InvalidInputError(
            f"the tokenizer of base {path} has no EOS token; set eos_token in its tokenizer_config.json"
        )
    return tokenizer, family


def load_model(path: str, base: dict[str, Any], *, gradient_checkpointing: bool = False):
    """The base model as the recipe's ``base`` section says (dtype, 8-bit or 4-bit NF4)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": base["trust_remote_code"]}
    kwargs["dtype"] = "auto" if base["dtype"] == "auto" else getattr(torch, base["dtype"])
    quant = str(base["quantization"])
    if quant != "none":
        problem = bitsandbytes_problem()
        if problem:
            raise InvalidInputError(
                f"quantization {quant} needs bitsandbytes, which cannot run here: {problem}; use --quantization none"
            )
        from transformers import BitsAndBytesConfig

        compute = getattr(torch, base["compute_dtype"]) if base.get("compute_dtype") else (
            torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        )  # fmt: skip
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=base["bnb_4bit_quant_type"],
                bnb_4bit_use_double_quant=bool(base["double_quant"]),
                bnb_4bit_compute_dtype=compute,
            )  # fmt: skip
            if quant == "4bit"
            else BitsAndBytesConfig(load_in_8bit=True)
        )
        if base["dtype"] == "auto":
            kwargs["dtype"] = compute
    if torch.cuda.is_available() and "LOCAL_RANK" not in os.environ:
        kwargs["device_map"] = "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"could not load base {path}: {first_line(e)}") from None
    if quant != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    return model


@dataclass
class Plan:
    """A checked recipe and what it resolved to, before anything heavy is loaded."""

    recipe: Recipe
    load_path: str
    base_key: str
    parent: AdapterVersion | None
    data: DataSplits
    seed: int


def plan(recipe: Recipe | dict | str | Path, registry: Registry) -> Plan:
    """Every check that needs no model and no torch: recipe, name, tags, parent, base, data."""
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_yaml(recipe) if isinstance(recipe, (str, Path)) else Recipe(recipe)
    recipe.check()
    check_name(recipe.name)
    for t in recipe.tags:
        check_tag(t)
    parent = registry.get(recipe.parent) if recipe.parent else None
    load_path, base_key = resolve_base(recipe.base["path"], registry)
    seed = 42 if recipe.sft.get("seed") is None else int(recipe.sft["seed"])
    data = load_splits(recipe.data, seed)
    loss_defaults(recipe.sft, data.kind)
    recipe.check_settings()
    return Plan(recipe, load_path, base_key, parent, data, seed)


def sft_config(sft: dict[str, Any], output_dir: Path, *, progress: bool):
    """The SFTConfig: the recipe's fields, plus the defaults this machine needs (CPU, precision)."""
    import torch
    from trl import SFTConfig

    kwargs: dict[str, Any] = {
        "report_to": "none",
        "disable_tqdm": True,
        **sft,
        "output_dir": str(output_dir),
    }
    if not torch.cuda.is_available():
        kwargs.setdefault("use_cpu", True)
        kwargs.setdefault("bf16", False)
    elif not torch.cuda.is_bf16_supported():
        kwargs.setdefault("bf16", False)
        kwargs.setdefault("fp16", True)
    try:
        return SFTConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"invalid sft setting: {first_line(e)}") from None


def train(
    recipe: Recipe | dict | str | Path,
    *,
    registry: Registry | None = None,
    resume: bool = False,
    restart: bool = False,
    keep_run: bool = False,
    progress: bool = True,
    on_note: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a LoRA adapter as ``recipe`` says and store it as the next version of its name.

    ``on_note`` hears each note as it is made (what the data lost to max_length, before the
    model loads); all of them are also in the result's ``notes``.
    """
    if progress:
        from adaptr.runtime import quiet_libraries

        quiet_libraries()
    started = time.time()
    notes: list[str] = []

    def say(message: str) -> None:
        notes.append(message)
        if on_note is not None:
            on_note(message)

    registry = registry or Registry()
    p = plan(recipe, registry)
    recipe, parent = p.recipe, p.parent
    run_dir = registry.home / "runs" / recipe.name
    resume_from = _prepare_run_dir(run_dir, resume=resume, restart=restart, name=recipe.name)
    tokenizer, family = load_tokenizer(p.load_path, recipe.base)
    args = sft_config(recipe.sft, run_dir, progress=progress)
    train_ds, eval_ds, reports = prepare(p.data, tokenizer, args, recipe.data["over_length"])
    for report in reports:
        for line in report.lines():
            say(line)
    data_info = _data_lineage(p.data.info, reports)
    gc = bool(recipe.sft.get("gradient_checkpointing", True))
    model = load_model(p.load_path, recipe.base, gradient_checkpointing=gc)
    if family is None:
        say(
            f"no family claims model_type {brief(model.config.model_type)}: PEFT's default LoRA targets are used"
        )

    from transformers import set_seed
    from trl import SFTTrainer

    from adaptr.data.sft import for_trainer

    peft_config = None
    if parent is not None:
        model = _load_parent(model, registry, parent, run_dir)
        if recipe.lora:
            say(
                f"lora settings are ignored: training continues {parent.ref} with its own LoRA config"
            )
    else:
        from adaptr.training.lora import lora_config

        lora = dict(recipe.lora)
        targets = lora.pop("target_modules", None)
        peft_config, _ = lora_config(model, family=family, targets=targets, **lora)
    trl_args = copy.copy(args)  # the examples carry their loss masks: TRL masks nothing again
    trl_args.assistant_only_loss, trl_args.completion_only_loss = False, None
    set_seed(args.seed)
    try:
        trainer = SFTTrainer(
            model=model, args=trl_args, train_dataset=for_trainer(train_ds),
            eval_dataset=for_trainer(eval_ds), processing_class=tokenizer, peft_config=peft_config,
        )  # fmt: skip
    except ValueError as e:
        raise InvalidInputError(f"cannot set up training: {first_line(e)}") from None
    trainable, total = trainer.model.get_nb_trainable_parameters()
    say(
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    )
    if progress:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        from adaptr.training.callbacks import RichProgressCallback

        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)  # raw log dicts: the rich bar shows the loss
        trainer.add_callback(RichProgressCallback(f"training {recipe.name}"))
    from adaptr.training.callbacks import StopOnInterrupt

    stop = StopOnInterrupt()  # Ctrl-C ends the current step, then training
    trainer.add_callback(stop)
    try:
        with stop.catching_sigint():
            out = trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:  # a second Ctrl-C
        raise _interrupted(recipe.name, trainer.state.global_step, run_dir) from None
    except Exception as e:
        if resume_from and _loading_checkpoint(e):
            raise InvalidInputError(
                f"checkpoint {resume_from} cannot be read ({type(e).__name__}: {first_line(e, 120)}); "
                "start over with --restart, or delete that folder to resume from an earlier checkpoint"
            ) from None
        raise
    if stop.requested:
        raise _interrupted(recipe.name, trainer.state.global_step, run_dir)
    metrics = _metrics(trainer, out, eval_ds, trainable, total, started)
    version = None
    if trainer.is_world_process_zero():
        final = run_dir / "final"
        with _storing(recipe.name, p.base_key, final, run_dir, trainer.state.global_step):
            trainer.save_model(str(final))
            (final / "training_args.bin").unlink(missing_ok=True)  # a pickle: never stored
            lineage = {
                "base": p.base_key, "dataset": data_info, "recipe": recipe.to_dict(), "seed": args.seed,
                "family": family.name if family else None, "libraries": library_versions(),
                "resumed_from": str(resume_from) if resume_from else None,
                "parents": [parent.ref] if parent else [], "method": "sft",
                "log_history": json.loads(json.dumps(trainer.state.log_history, default=float)),
            }  # fmt: skip
            from adaptr.gguf import lineage as gguf_lineage

            if base_gguf := gguf_lineage(recipe.base["path"], p.load_path):
                lineage["base_gguf"] = base_gguf  # the GGUF's name, size and SHA-256
            version = registry.add(
                recipe.name, final, base=p.base_key, tags=recipe.tags, lineage=lineage, metrics=metrics,
                origin=f"adaptr train --data {data_info['path']}",
            )  # fmt: skip
        for n in registry.notes:
            if "skipped" not in n:
                say(n)
        if not keep_run:
            shutil.rmtree(run_dir, ignore_errors=True)
    return TrainResult(version, metrics, run_dir, notes)


@contextmanager
def _storing(name: str, base: str | None, final: Path, run_dir: Path, steps: int) -> Iterator[None]:
    """A full disk while saving or storing the trained adapter: the run folder is kept and
    the one-line error says how to store what was trained once there is space."""
    from adaptr.registry.faults import is_full

    try:
        yield
    except Exception as e:
        if not is_full(e):
            raise
        saved = (final / "adapter_model.safetensors").is_file() and (
            final / "adapter_config.json"
        ).is_file()
        how = (
            f"the trained adapter is saved in {final}: free some space, then store it with "
            f"`adaptr add {name} {final}" + (f" --base {base}`" if base else "`")
            if saved
            else f"its checkpoints are kept in {run_dir}: free some space, then rerun the same "
            "`adaptr train` with --resume"
        )
        raise StorageFullError(
            f"no space left on the device while storing {name} after {steps} training step(s); "
            f"nothing was stored in the registry and {how}"
        ) from e


def _data_lineage(info: dict[str, Any], reports: list[LengthReport]) -> dict[str, Any]:
    """The dataset's lineage, with the records that trained after max_length had its say."""
    info = copy.deepcopy(info)
    info["lengths"] = {r.split: r.to_dict() for r in reports}
    info["train_records"] = reports[0].kept
    if len(reports) > 1:
        info["eval"]["records"] = reports[1].kept
    return info


# Where transformers' Trainer reads a checkpoint back (weights, optimizer, scheduler, RNG,
# trainer state): an exception raised under one of these is a damaged checkpoint.
CHECKPOINT_LOADERS = {
    "_load_from_checkpoint", "_load_optimizer_and_scheduler", "_load_scaler", "_load_rng_state",
    "_load_callback_state", "load_from_json",
}  # fmt: skip


def _loading_checkpoint(exc: BaseException) -> bool:
    import traceback

    return any(
        frame.f_code.co_name in CHECKPOINT_LOADERS
        for frame, _ in traceback.walk_tb(exc.__traceback__)
    )


def _interrupted(name: str, step: int, run_dir: Path) -> TrainingInterrupted:
    return TrainingInterrupted(
        f"training of {name} interrupted at step {step}; the registry is unchanged. "
        f"Checkpoints (if any were saved) are in {run_dir}: continue with --resume"
    )


def _complete(checkpoint: Path) -> bool:
    """A checkpoint is whole once its trainer_state.json (written last) parses."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def _prepare_run_dir(run_dir: Path, *, resume: bool, restart: bool, name: str) -> str | bool | None:
    found = run_dir.glob("checkpoint-*") if run_dir.is_dir() else []
    steps = {c: c.name.removeprefix("checkpoint-") for c in found if c.is_dir()}
    checkpoints = sorted(
        (c for c, step in steps.items() if step.isascii() and step.isdigit()),
        key=lambda c: int(steps[c]),
    )  # Trainer's own checkpoint-<step> folders; anything else there is not ours to judge
    if resume:
        whole = [c for c in checkpoints if _complete(c)]
        if not whole:
            raise NotFoundError(
                f"nothing to resume: no complete checkpoint of {name} in {run_dir}; start without --resume"
            )
        if int(os.environ.get("RANK", "0")) == 0:
            for partial in checkpoints[checkpoints.index(whole[-1]) + 1 :]:
                shutil.rmtree(partial)  # cut short by the interruption
        return str(whole[-1])
    if checkpoints and not restart:
        raise ConflictError(
            f"an earlier run of {name} left checkpoints in {run_dir}: pass --resume to continue it or --restart to discard them"
        )
    if int(os.environ.get("RANK", "0")) == 0:  # under accelerate launch, one process clears it
        shutil.rmtree(run_dir, ignore_errors=True)
    return None


def _load_parent(model, registry: Registry, parent: AdapterVersion, run_dir: Path):
    from peft import PeftModel

    from adaptr.registry.patterns import check_stored_config

    check_stored_config(parent.config, (n for n, _ in model.named_modules()), parent.ref)
    src = registry.export(parent.ref, run_dir / "parent", force=True)
    return PeftModel.from_pretrained(model, str(src), is_trainable=True)


def _metrics(trainer, out, eval_ds, trainable: int, total: int, started: float) -> dict[str, Any]:
    logs = trainer.state.log_history
    tokens = getattr(trainer, "_total_train_tokens", None)  # TRL's running count (non-pad tokens)
    if not tokens:
        tokens = next((float(h["num_tokens"]) for h in reversed(logs) if "num_tokens" in h), None)
    m: dict[str, Any] = {
        "train_loss": out.training_loss, "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch, "train_runtime_s": out.metrics.get("train_runtime"),
        "trainable_params": trainable, "total_params": total, "duration_s": round(time.time() - started, 3),
    }  # fmt: skip
    if tokens and out.metrics.get("train_runtime"):
        m["tokens"] = tokens
        m["tokens_per_second"] = tokens / out.metrics["train_runtime"]
    if eval_ds is not None:
        ev = trainer.evaluate()
        m["eval_loss"] = ev["eval_loss"]
        m["perplexity"] = math.exp(ev["eval_loss"]) if ev["eval_loss"] < 50 else float("inf")
    return json.loads(json.dumps(m, default=float))
