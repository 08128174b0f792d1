"""Stage 1 of the engine: the plan, made from headers and configs before any weight is written.

Every output parameter becomes one :class:`Entry` that says what happens to it: copied byte for byte,
cast (decoded and re-encoded without change: a dtype change, dequantization, quantization), or merged
(decoded, updated, encoded). Tied and resized tensors are ordinary entries. Entries are laid out in
:class:`ShardPlan` s, and the plan carries the output config (dtype, vocab_size, tie_word_embeddings,
quantization_config) and the files to carry over, so that the dense and the quantized outputs are the
same program with different encoders (docs/merge-engine.md).

The only weight a plan ever reads is a tied embedding that an adapter changes: whether ``lm_head``
stays tied depends on whether the two results come out equal, which only the numbers can say.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .. import float_types, registry
from ..checkpoint import EMBEDDING_NAMES, Checkpoint
from ..errors import AdaptoolsError, IncompatibleBaseError, InputError
from ..interfaces import Backend, BaseTensor, Mergeable, TensorUpdate, capability
from .entries import (  # noqa: F401  (the plan's parts, re-exported for the modules that read a plan)
    CAST,
    COPY,
    KIND_ORDER,
    MERGE,
    STORAGE_KINDS,
    Entry,
    GroupOutput,
    MergePlan,
    ShardPlan,
    Slot,
)
from .options import MergeInput, MergeOptions
from .quantized import quantize_targets


def ordered(updates: Sequence[TensorUpdate]) -> tuple[TensorUpdate, ...]:
    return tuple(sorted(updates, key=lambda u: KIND_ORDER[u.kind]))


def plan_updates(inputs: Sequence[MergeInput], checkpoint: Checkpoint,
                 ignore_base_mismatch: bool = False) -> dict[str, list[TensorUpdate]]:
    """Every adapter's updates, grouped by base parameter, validated against the base's headers."""
    info = checkpoint.base_info()
    grouped: dict[str, list[TensorUpdate]] = {}
    undone: dict[str, list[TensorUpdate]] = {}
    replaced_by: dict[str, str] = {}
    for item in [*(i for i in inputs if i.invert), *(i for i in inputs if not i.invert)]:
        method = capability(registry.get_method(item.adapter.method), "unmerge" if item.invert else "merge",
                            Mergeable, item.adapter)
        if not ignore_base_mismatch:
            _check_architecture(item, checkpoint)
        produce = method.unmerge_updates if item.invert else method.merge_updates
        for update in produce(item.adapter, info, item.weight):
            if update.kind not in KIND_ORDER or update.kind == "undo":
                raise InputError(f"method {item.adapter.method!r} returned an update of unknown kind "
                                 f"{update.kind!r}", tensor=update.target,
                                 hint=f"kinds are {', '.join(k for k in KIND_ORDER if k != 'undo')}; report this "
                                      "to the plugin's author")
            if update.kind in ("replace", "replace_module") and not item.invert:
                if update.target in replaced_by and replaced_by[update.target] != item.adapter.source:
                    raise IncompatibleBaseError(
                        f"two adapters replace {update.target} ({replaced_by[update.target]} and "
                        f"{item.adapter.source})", hint="merge them separately or drop one")
                replaced_by[update.target] = item.adapter.source
            (undone if item.invert else grouped).setdefault(update.target, []).append(update)
    # Inverses are labelled with the kind of the change they undo: the exact reverse of the merge's chain
    # runs first, as undos (docs/unmerge.md, "Order").
    for target, inverses in undone.items():
        grouped[target] = [replace(u, kind="undo") for u in reversed(ordered(inverses))] + grouped.get(target, [])
    return grouped


def _check_architecture(item: MergeInput, checkpoint: Checkpoint) -> None:
    """Refuse an adapter made for another architecture: as PEFT records it (``auto_mapping``), or as the
    format that read it knows (a GGUF LoRA's ``general.architecture``)."""
    if item.adapter.read_format:
        why = registry.get_format(item.adapter.read_format).base_mismatch(item.adapter, checkpoint.config)
        if why:
            raise IncompatibleBaseError(why, path=item.adapter.source,
                                        hint="merge into the base the adapter was made for, or pass "
                                             "--ignore-base-mismatch if you are sure")
    mapping = item.adapter.config.get("auto_mapping") or {}
    wanted = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    architectures = checkpoint.config.get("architectures") or []
    if wanted and architectures and wanted not in architectures:
        raise IncompatibleBaseError(
            f"the adapter was trained on {wanted}, the base is {', '.join(map(str, architectures))}",
            path=item.adapter.source, hint="pass --ignore-base-mismatch if you are sure")


class _Backends:
    """Which backend decodes each stored tensor, and which encodes the output."""

    def __init__(self, options: MergeOptions, config: Mapping[str, Any]):
        self.all: list[Backend] = [e.obj for e in registry.backends().values()]
        self.config = config
        self.forced = registry.get_backend(options.dtype) if options.dtype != "auto" else None

    def decoder(self, tensor: BaseTensor) -> Backend | None:
        return next((b for b in self.all if b.claims(tensor, self.config)), None)

    def encoder(self, tensor: BaseTensor) -> Backend | None:
        """The forced backend for anything a backend decodes (floats); else the tensor's own."""
        decoder = self.decoder(tensor)
        return self.forced if self.forced is not None and decoder is not None else decoder

    def output_dtype(self, tensor: BaseTensor) -> str:
        if self.forced is not None and self.decoder(tensor) is not None:
            return float_types.by_short(self.forced.name).code
        return tensor.dtype


def build_plan(checkpoint: Checkpoint, inputs: Sequence[MergeInput], options: MergeOptions,
               out: str | os.PathLike[str] | None = None) -> MergePlan:
    """The whole merge, decided: entries, shard layout, config and files (nothing is written). ``out``,
    when given, chooses the output container by its suffix (``options.to`` names one outright)."""
    from .containers import choose

    container = choose(options, out, checkpoint)
    for check in options.checks:
        registry.get_validator(check.name).check_target(container.name, container.directory)
    if options.shard_size is not None and not container.directory and not container.splits:
        raise InputError(f"a {container.name} output is one file; --shard-size does not apply")
    encodings = container.prepare(checkpoint, options)
    if options.operation == "dequantize" and not checkpoint.groups:
        raise InputError("no quantized weights here: nothing to dequantize", path=checkpoint.path,
                         hint="expected a quantized checkpoint (e.g. bitsandbytes 4-bit)")
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but torch sees no CUDA device", hint="use --device cpu")
    backends = _Backends(options, checkpoint.config)
    if encodings:
        if options.quantize is not None:
            raise InputError(f"a {container.name} output stores its own types; it cannot also be quantized")
        group_targets = {param: GroupOutput(backend, settings) for param, (backend, settings) in encodings.items()}
    else:
        group_targets = _group_targets(checkpoint, options)
    if checkpoint.groups and not group_targets:
        _refuse_undecoded_fp8(checkpoint)
    updates = plan_updates(inputs, checkpoint, options.ignore_base_mismatch)
    for target in updates:
        stored = checkpoint.aliases.get(target, target)
        if stored in checkpoint.location and backends.decoder(checkpoint.tensor(stored)) is None:
            raise InputError(f"cannot merge into a {checkpoint.tensor(stored).dtype} tensor: no backend decodes it",
                             path=checkpoint.location[stored][0].path, tensor=target)

    entries: dict[str, Entry] = {}
    for name in checkpoint.parameters():
        entries[name] = _entry(name, name, ordered(updates.get(name, [])), checkpoint, backends, group_targets,
                               options)
    aliases = _tied_aliases(checkpoint, updates, entries, backends, options)

    shards = _layout(checkpoint, entries, aliases, options.shard_size if container.directory else None)
    if not container.directory:  # one file (named as the output): every slot, in the base's order
        shards = [ShardPlan(Path(out).name if out is not None else f"{container.name} file",
                            [slot for shard in shards for slot in shard.slots])]
    entries.update(aliases)
    vocab = _vocab_size(checkpoint, entries)
    config, changes = _output_config(checkpoint, options, bool(aliases), vocab, group_targets)
    warnings = []
    for item in inputs:  # merge_warnings is optional (Mergeable has it; a plain merge_updates need not)
        said = getattr(registry.get_method(item.adapter.method), "merge_warnings", None)
        warnings += [f"{item.adapter.source}: {w}" for w in (said(item.adapter) if said else [])]
    if options.requantize:  # what a backend's re-encoding is, and is not, in its own words
        warnings += sorted({g.backend.requantize_note for g in group_targets.values() if g.backend.requantize_note})
    built = MergePlan(checkpoint, inputs, options, entries, shards, config, changes, checkpoint.other_files(),
                      untied=bool(aliases), vocab_size=vocab, warnings=warnings, container=container)
    built.warnings += container.warnings(built)
    if options.shard_size is not None and not container.directory:  # parts of one file, as its format splits it
        built.shards = container.split(built, options.shard_size)
    return built


def _refuse_undecoded_fp8(checkpoint: Checkpoint) -> None:
    """A dense output of a quantized base drops quantization_config: an fp8 tensor that no backend decodes
    would reach it as raw codes, its scales unread, and load as garbage (docs/outputs.md, "Never garbage")."""
    for name in checkpoint.parameters():
        if name in checkpoint.location and name not in checkpoint.groups:
            shard, info = checkpoint.location[name]
            if info.dtype in ("F8_E4M3", "F8_E5M2"):
                raise InputError(f"an {info.dtype} tensor that no backend of this checkpoint decodes: a dense output "
                                 "would hold its raw values", path=shard.path, tensor=name,
                                 hint="the checkpoint mixes quantization formats adaptools does not read together")


def _group_targets(checkpoint: Checkpoint, options: MergeOptions) -> dict[str, GroupOutput]:
    """Parameters the output stores as groups: every quantized one (requantize) or the chosen dense
    linear weights (quantize)."""
    if options.requantize:
        if not checkpoint.groups:
            raise InputError("--requantize needs a quantized base", path=checkpoint.path,
                             hint="to quantize a dense model, use `adaptools requantize`")
        try:
            return {param: GroupOutput(backend, backend.group_settings(param, checkpoint.read_small))
                    for param, (backend, _) in checkpoint.groups.items()}
        except AdaptoolsError as exc:  # a backend refusing to encode a weight names it, not its file
            raise checkpoint.located(exc) from None
    if options.quantize is not None:
        backend = quantizing_backend(options.quantize.quant_type)
        return {name: GroupOutput(backend, settings)
                for name, settings in quantize_targets(checkpoint, backend, options.quantize).items()}
    return {}


def quantizing_backends() -> list[str]:
    """The registered backends that can quantize dense weights, in registration order."""
    return [n for n, e in registry.backends().items() if type(e.obj).quantize_settings is not Backend.quantize_settings]


def quantizing_backend(name: str) -> Backend:
    """The backend ``name`` (empty: the one marked ``quantize_default``, else the first that can quantize),
    refusing one that cannot."""
    names = quantizing_backends()
    if not name:
        if not names:
            raise InputError("no installed backend can quantize dense weights")
        name = next((n for n in names if registry.get_backend(n).quantize_default), names[0])
    if name not in names:
        raise InputError(f"backend {name!r} cannot quantize dense weights", hint=f"use one of {', '.join(names)}")
    return registry.get_backend(name)


def _entry(name: str, source: str, chain: tuple[TensorUpdate, ...], checkpoint: Checkpoint, backends: _Backends,
           group_targets: Mapping[str, GroupOutput], options: MergeOptions) -> Entry:
    like = checkpoint.tensor(source)
    shape = next((tuple(u.shape) for u in reversed(chain) if u.shape is not None), tuple(like.shape))
    decoder = backends.decoder(like)
    group = group_targets.get(source)
    if group is not None:
        stored = checkpoint.groups.get(source)
        if not chain and stored is not None and stored[0] is group.backend:
            return Entry(name, COPY, source, shape, like.dtype)  # untouched, in its own encoding: copied as is
        return Entry(name, MERGE if chain else CAST, source, shape, like.dtype, chain, decoder, decoder, group,
                     survival=bool(chain) and source in checkpoint.groups)
    out_dtype = backends.output_dtype(like)
    if chain:
        return Entry(name, MERGE, source, shape, out_dtype, chain, decoder, backends.encoder(like))
    if out_dtype != like.dtype or source in checkpoint.groups:
        return Entry(name, CAST, source, shape, out_dtype, (), decoder, backends.encoder(like))
    return Entry(name, COPY, source, shape, out_dtype)


def _tied_aliases(checkpoint: Checkpoint, updates: dict[str, list[TensorUpdate]], entries: dict[str, Entry],
                  backends: _Backends, options: MergeOptions) -> dict[str, Entry]:
    """Resolve tied parameters: an alias (``lm_head``) that an adapter changes differently from its storage
    becomes an explicit entry; one that comes out equal stays tied (the delta applied once)."""
    from .compute import dense_value  # the one weight a plan computes

    explicit: dict[str, Entry] = {}
    for alias, stored in checkpoint.aliases.items():
        if alias not in updates and stored not in updates:
            continue
        stored_entry = entries[stored]
        alias_chain = ordered([u for u in stored_entry.chain if u.kind in STORAGE_KINDS] + updates.get(alias, []))
        alias_entry = _computed(_entry(alias, stored, alias_chain, checkpoint, backends, {}, options), backends,
                                checkpoint)
        # compared as dense values, before any group encoding (which only the stored entry has)
        stored_dense = replace(stored_entry, group=None) if stored_entry.group else stored_entry
        if dense_value(_computed(stored_dense, backends, checkpoint), checkpoint, options.device).equal(
                dense_value(alias_entry, checkpoint, options.device)):
            continue
        alias_entry.note = f"untied from {stored}"
        explicit[alias] = alias_entry
    return explicit


def _computed(entry: Entry, backends: _Backends, checkpoint: Checkpoint) -> Entry:
    """``entry`` as one that is computed (never a byte copy): an explicit alias, or a storage whose value
    must be compared with it, even when neither changes anything."""
    if entry.action != COPY:
        return entry
    like = checkpoint.tensor(entry.source)
    return replace(entry, action=MERGE if entry.chain else CAST, decoder=backends.decoder(like),
                   encoder=backends.encoder(like))


def _layout(checkpoint: Checkpoint, entries: dict[str, Entry], aliases: dict[str, Entry],
            shard_size: int | None) -> list[ShardPlan]:
    """Output shards in the base's order (or re-sharded by size). A copied group keeps every stored
    tensor in its place; an encoded one is written where its parameter was; an alias follows its storage."""
    parents = {c: p for p, (_, names) in checkpoint.groups.items() for c in names}
    placed: list[tuple[str, Slot]] = []
    for shard in checkpoint.shards:
        for name in sorted(shard.header.tensors, key=lambda n: shard.header.tensors[n].begin):
            entry = entries[parents.get(name, name)]
            if entry.action == COPY:
                placed.append((shard.name, Slot(entry, raw=name)))
            elif name not in parents or checkpoint.anchors.get(parents[name]) == name:
                placed.append((shard.name, Slot(entry)))  # (a group stored under other names: at its first)
            else:
                continue
            for alias in aliases.values():
                if alias.source == name:
                    placed.append((shard.name, Slot(alias)))
    if shard_size is None:
        layout: dict[str, ShardPlan] = {}
        for shard_name, slot in placed:
            layout.setdefault(shard_name, ShardPlan(shard_name)).slots.append(slot)
        return list(layout.values())
    groups: list[list[Slot]] = [[]]
    size = 0
    for _, slot in placed:
        nbytes = checkpoint.location[slot.raw][1].nbytes if slot.raw else slot.entry.spec.nbytes  # type: ignore[union-attr]
        if groups[-1] and size + nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(slot)
        size += nbytes
    stem = checkpoint.stem
    if len(groups) == 1:
        return [ShardPlan(f"{stem}.safetensors", groups[0])]
    return [ShardPlan(f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors", g) for i, g in enumerate(groups)]


def _vocab_size(checkpoint: Checkpoint, entries: Mapping[str, Entry]) -> int | None:
    """The new vocabulary size when an adapter resized the input embedding or lm_head."""
    vocab = None
    for entry in entries.values():
        is_vocab = entry.name == "lm_head.weight" or any(
            entry.name == s or entry.name.endswith("." + s) for s in EMBEDDING_NAMES)
        if is_vocab and entry.shape != tuple(checkpoint.tensor(entry.source).shape):
            vocab = entry.shape[0]
    return vocab


def _output_config(checkpoint: Checkpoint, options: MergeOptions, untied: bool, vocab: int | None,
                   group_targets: Mapping[str, GroupOutput]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The output's config.json and what changed in it."""
    config = dict(checkpoint.config)
    changes: dict[str, Any] = {}
    if options.dtype != "auto":
        name = float_types.by_short(options.dtype).config
        for key in ("dtype", "torch_dtype"):
            if key in config or key == "dtype":
                changes[key] = name
    if untied:
        changes["tie_word_embeddings"] = False
    if vocab is not None:
        changes["vocab_size"] = vocab
    config.update(changes)
    text_config = config.get("text_config")
    if isinstance(text_config, dict):
        nested = {k: v for k, v in changes.items() if k in text_config}
        if nested:
            config["text_config"] = {**text_config, **nested}
    if not options.quantized_output and "quantization_config" in config:
        del config["quantization_config"]
        changes["quantization_config"] = None
    if options.quantize is not None:
        first = next(iter(group_targets.values()))
        config["quantization_config"] = changes["quantization_config"] = first.backend.quantization_config(
            first.settings, options.quantize)
    return config, changes
