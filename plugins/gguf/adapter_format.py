"""GGUF LoRA adapters, the file llama.cpp (and ollama, LM Studio, llamafile) loads with ``--lora``.

Writing (``convert ADAPTER OUT.gguf --to gguf --base BASE [--outtype ...]``): a PEFT LoRA becomes
``blk.N.<tensor>.weight.lora_a/.lora_b`` pairs with one file-wide ``adapter.lora.alpha``. llama.cpp scales
each pair by ``alpha / rank``; PEFT's own scale (rank/alpha patterns, rsLoRA) is folded into ``lora_b`` so
every module comes out exact (docs/gguf.md, "Exact scales with one alpha"). What a GGUF LoRA cannot hold
(DoRA, modules_to_save, lora_bias, trainable tokens, conv) is refused before anything is written.

Reading: a GGUF LoRA (ours, or llama.cpp's ``convert_lora_to_gguf.py``'s) becomes a plain PEFT LoRA: names
mapped back through gguf-py's tensor map, Q/K rows put back in HF order, ``alpha / rank`` per module kept
exactly with ``lora_alpha`` and a ``rank_pattern`` (docs/gguf.md, "Reading a GGUF LoRA back").

The LoRA method (its factors for writing, its PEFT config for reading) is reached through the registry,
``plugin.get_method("lora")``, not by importing the lora family: the gguf family then depends on the plugin
API alone, with no import across families, and uses only the methods the LoRA method offers every caller
(``LowRankAlgebra.low_rank``, ``AdapterMethod.from_peft``), so it stays correct whatever module of the lora
family defines them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import gguf
import numpy as np
import torch

from adaptools import plugin
from adaptools.plugin import (
    Adapter,
    BaseInfo,
    BaseRef,
    BaseTensor,
    IncompatibleBaseError,
    InputError,
    ReadOptions,
    StoredTensorInfo,
    UnsupportedOperationError,
    WriteOptions,
)

from .arch import ModelShape, describe_base, family_for_arch, family_for_config, permute_qk, qk_heads, unpermute_qk
from .codec import OUTTYPES, decode, encode_with_fallback, is_gguf, numpy_shape, open_reader, scalar

MERGE_HINT = "merge it into the base instead: adaptools merge BASE ADAPTER OUT"
#: Adapter features llama.cpp's LoRA has no place for: role -> what to call it.
INEXPRESSIBLE_ROLES = {"lora_magnitude": "DoRA magnitudes (use_dora)", "lora_bias": "lora_bias (a LoRA bias)",
                       "trainable_tokens": "trainable tokens"}
INEXPRESSIBLE_FIELDS = {"use_dora": "DoRA magnitudes (use_dora)", "lora_bias": "lora_bias (a LoRA bias)",
                        "trainable_token_indices": "trainable tokens",
                        "alora_invocation_tokens": "aLoRA invocation tokens",
                        "target_parameters": "target_parameters (fused expert parameters)",
                        "layer_replication": "layer_replication"}
BASE_MUTATING_INITS = ("olora", "pissa", "corda", "lora_ga", "loftq")
DTYPE_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def refusal(what: str, where: dict[str, Any] | None = None) -> UnsupportedOperationError:
    return UnsupportedOperationError(f"a GGUF LoRA cannot hold {what}", hint=MERGE_HINT, **(where or {}))


# --- writing -----------------------------------------------------------------------------------------------


def plan(adapter: Adapter, options: WriteOptions) -> tuple[ModelShape, float, list[tuple[str, np.ndarray, Any]]]:
    """Everything a GGUF LoRA file of ``adapter`` holds, computed before a byte is written: the base's shape,
    the file alpha, and (GGUF name, array, type) per tensor. Raises for anything the file cannot express."""
    if adapter.method != "lora":
        raise UnsupportedOperationError(f"a GGUF LoRA holds LoRA adapters, not {adapter.method!r}",
                                        path=adapter.source, hint=MERGE_HINT)
    config = adapter.config
    for key, what in INEXPRESSIBLE_FIELDS.items():
        if config.get(key):
            raise refusal(what, {"path": adapter.source})
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_MUTATING_INITS):
        raise UnsupportedOperationError(
            f"init_lora_weights={init!r}: the adapter applies to a modified base, which a GGUF LoRA cannot say",
            path=adapter.source, hint="convert it to plain LoRA first: adaptools convert ADAPTER OUT --to lora "
                                      "--base BASE")
    if options.base is None:
        raise InputError("writing a GGUF LoRA needs the base model, for its architecture",
                         hint="pass --base BASE (the base's folder with config.json, or its .gguf)")
    shape = describe_base(options.base)
    replaced = []
    for module, roles in adapter.modules().items():
        for role, name in roles.items():
            if role in INEXPRESSIBLE_ROLES:
                raise refusal(INEXPRESSIBLE_ROLES[role], adapter.where(name))
            if role.startswith("replace_") and not _unchanged_base_layer(adapter, shape, module, roles, role):
                replaced.append(name)
            elif role in ("lora_A", "lora_embedding_A") and len(adapter.info(name).shape) != 2:
                raise refusal("conv LoRA (llama.cpp applies LoRA to matrix products only)", adapter.where(name))
    if replaced:
        raise refusal(f"modules_to_save or replaced base tensors ({', '.join(replaced[:3])}"
                      f"{', ...' if len(replaced) > 3 else ''})", adapter.where(replaced[0]))
    outtype = OUTTYPES.get(options.outtype or "f32")
    if outtype is None:
        raise UnsupportedOperationError(f"--outtype {options.outtype!r} is not one of {', '.join(OUTTYPES)}")
    factors = cast(plugin.LowRankAlgebra, plugin.get_method("lora")).low_rank(adapter)
    if not factors:
        raise InputError("the adapter has no LoRA factors to write", path=adapter.source)
    alpha = float(config.get("lora_alpha") or 0.0)
    hf = _hf_base(shape)
    modules = adapter.modules()
    tensors: list[tuple[str, np.ndarray, Any]] = []
    for module, f in factors.items():
        roles = modules[module]
        a_name = roles["lora_embedding_A" if f.kind == "embedding" else "lora_A"]
        where = adapter.where(a_name)
        target = shape.gguf_name(module + ".weight")
        if target is None or shape.hf_module(target, shape.n_blocks or 0) != module:
            raise IncompatibleBaseError(f"module {module} has no GGUF tensor in architecture {shape.family.arch}",
                                        **where, hint="is the base right? Otherwise llama.cpp cannot apply it; "
                                                      + MERGE_HINT)
        if target in ("token_embd.weight", "output.weight") and shape.tied:
            raise UnsupportedOperationError(
                f"{module} is tied to the {'output' if target == 'token_embd.weight' else 'input'} embedding in "
                "this base, and llama.cpp would apply a LoRA on it to both (and abort)", **where, hint=MERGE_HINT)
        if (f.kind == "embedding") != (target == "token_embd.weight"):
            raise IncompatibleBaseError(f"{f.kind} LoRA on {module}, which is {target} in GGUF", **where)
        # llama.cpp scales every pair by alpha / rank; fold PEFT's own scale in (b already holds s·B).
        b = f.b * (f.rank / alpha) if alpha else f.b
        if f.kind == "embedding":
            lora_a, lora_b = f.a.T, b  # [vocab, r], [hidden, r]: llama.cpp gathers rows of lora_a per token
            _check_base(shape, hf, module, target, (int(f.a.shape[1]), int(b.shape[0])), where)
        else:
            # [r, in] and [out, r] as PEFT stores them, Conv1D included (B @ A is already GGUF's [out, in]);
            # only Q/K rows move, as the converter moves the base's
            # (docs/gguf.md, "Names, row order and orientation per architecture")
            want = (int(b.shape[0]), int(f.a.shape[1]))
            _check_base(shape, hf, module, target, want, where)
            heads = qk_heads(shape, target, options.base)
            if heads is not None and want[0] % (2 * heads[1]):
                raise IncompatibleBaseError(f"{want[0]} rows of {module} do not split into the base's {heads[1]} "
                                            "attention heads", **where, hint="is the base right?")
            lora_a, lora_b = f.a, (b if heads is None else permute_qk(b, *heads))
        for suffix, value in ((".lora_a", lora_a), (".lora_b", lora_b)):
            array, qtype = encode_with_fallback(value.float().contiguous().numpy(), outtype)
            tensors.append((target + suffix, array, qtype))
    return shape, alpha, tensors


def _unchanged_base_layer(adapter: Adapter, shape: ModelShape, module: str, roles: dict[str, str],
                          role: str) -> bool:
    """True for the embedding or lm_head PEFT saves beside their LoRA (``save_embedding_layers``) when it
    equals the base's, which only a base with weights can tell: then it changes nothing and is left out."""
    has_factors = "lora_embedding_A" in roles or "lora_A" in roles
    if role != "replace_weight" or not has_factors or shape.hf_shapes is None:
        return False
    hf = _hf_base(shape)
    name = hf.locate(module, "weight") if hf is not None else None
    if name is None or name not in shape.hf_files:
        return False
    saved = adapter.tensor(roles[role])
    base = plugin.SafetensorsFile(shape.hf_files[name]).get(name)
    return saved.shape == base.shape and torch.equal(saved.float(), base.float())


def _hf_base(shape: ModelShape) -> BaseInfo | None:
    if shape.hf_shapes is None:
        return None
    tensors = {n: BaseTensor(n, "F32", s) for n, s in shape.hf_shapes.items()}
    return BaseInfo(tensors, path=shape.source)


def _check_base(shape: ModelShape, hf: BaseInfo | None, module: str, target: str, want: tuple[int, int],
                where: dict[str, Any]) -> None:
    """The base must hold ``target`` as [out, in] = ``want`` (embeddings: [vocab, hidden]), as llama.cpp checks."""
    if shape.gguf_shapes is not None:
        have = shape.gguf_shapes.get(target)
        if have is None:
            raise IncompatibleBaseError(f"the base GGUF has no {target} for {module}", **where)
    elif hf is not None:
        name = hf.locate(module, "weight")
        if name is None:
            raise IncompatibleBaseError(f"the base has no {module}.weight", **where)
        have = hf.find(name).shape  # type: ignore[union-attr]
        if shape.family.conv1d and target.startswith("blk."):
            have = tuple(reversed(have))
    else:
        return
    if tuple(have) != want:
        raise IncompatibleBaseError(f"LoRA delta {list(want)} does not fit the base's {target} {list(have)}",
                                    **where, hint="the adapter was made for another model size")


# --- reading -----------------------------------------------------------------------------------------------


class GGUFStore:
    """An adapter's tensors in a GGUF file, decoded and put in PEFT's layout when read.

    F32 and F16 tensors that keep their layout are handed over as copy-on-write maps of their bytes in the
    file, as safetensors files are: the engine may ask for a tensor more than once and hold it for the whole
    merge, and a fresh copy per request cost an r=16 1.1B merge some 200 MB of RSS (docs/gguf.md, "Reading
    a GGUF LoRA back"). Each request maps anew, so a caller that writes into its tensor changes neither the
    file nor what the next request gets."""

    def __init__(self, path: Path, shape: ModelShape):
        self.path, self.shape = path, shape
        self.entries: dict[str, tuple[Any, str]] = {}  # canonical name -> (reader tensor, how to lay it out)
        self._size = path.stat().st_size

    def _mapped(self, tensor: Any) -> torch.Tensor | None:
        """The stored F32/F16 values, mapped copy-on-write, or None where they do not lie whole in the file
        (the reader's own view then says what is wrong)."""
        dtype = np.dtype(np.float16 if tensor.tensor_type == gguf.GGMLQuantizationType.F16 else np.float32)
        shape = numpy_shape(tensor)
        count = int(np.prod(shape))
        begin = int(tensor.data_offset)
        if tensor.data.size != count or count == 0 or begin + count * dtype.itemsize > self._size:
            return None
        return torch.from_numpy(np.memmap(self.path, dtype=dtype, mode="c", offset=begin, shape=shape))

    def names(self) -> list[str]:
        return list(self.entries)

    def info(self, name: str) -> StoredTensorInfo:
        tensor, how = self.entries[name]
        dims = numpy_shape(tensor)
        dtype = {gguf.GGMLQuantizationType.F16: "F16", gguf.GGMLQuantizationType.BF16: "BF16"}.get(
            tensor.tensor_type, "F32")
        return StoredTensorInfo(dtype, tuple(reversed(dims)) if how == "transpose" else dims)

    def get(self, name: str) -> torch.Tensor:
        tensor, how = self.entries[name]
        qtype = tensor.tensor_type
        heads = qk_heads(self.shape, tensor.name.rpartition(".")[0], self.path) if how == "rows" else None
        if how in ("as is", "rows") and heads is None and qtype in (gguf.GGMLQuantizationType.F32,
                                                                     gguf.GGMLQuantizationType.F16):
            view = self._mapped(tensor)
            if view is not None:
                return view
        if qtype == gguf.GGMLQuantizationType.F16:
            value = torch.from_numpy(np.array(tensor.data, dtype=np.float16).reshape(numpy_shape(tensor)))
        else:
            value = torch.from_numpy(np.array(decode(tensor, self.path)))
            if qtype == gguf.GGMLQuantizationType.BF16:
                value = value.to(torch.bfloat16)  # exact: the values came from bf16
        if how == "transpose":
            return value.T.contiguous()
        return value if heads is None else unpermute_qk(value, *heads).contiguous()

    def origin(self, name: str) -> tuple[str, str]:
        return str(self.path), self.entries[name][0].name


def read_gguf(path: Path, options: ReadOptions) -> Adapter:
    reader = open_reader(path)
    kind = scalar(reader, "general.type", str, path, required=False)
    if kind != "adapter":
        raise InputError(f"this GGUF file is a {kind or 'model'}, not an adapter (general.type)", path=path,
                         hint="pass a GGUF LoRA adapter")
    adapter_type = scalar(reader, "adapter.type", str, path)
    if adapter_type != "lora":
        raise UnsupportedOperationError(f"GGUF {adapter_type!r} adapters are not supported (only lora)", path=path)
    arch = scalar(reader, "general.architecture", str, path)
    alpha = scalar(reader, "adapter.lora.alpha", float, path, required=False)
    if alpha is None:
        raise InputError("adapter.lora.alpha is missing (llama.cpp would apply every pair unscaled)", path=path,
                         hint="set it explicitly, 0 meaning unscaled, with gguf-py's gguf_new_metadata")
    shape = ModelShape(family_for_arch(arch, path))
    for key, attr in (("block_count", "n_blocks"), ("attention.head_count", "n_head"),
                      ("attention.head_count_kv", "n_head_kv")):
        value = scalar(reader, f"{arch}.{key}", int, path, required=False)
        if value is not None and value <= 0:
            raise InputError(f"GGUF metadata {arch}.{key} is {value}, not a positive count", path=path)
        setattr(shape, attr, value)
    qk = any(t.name.split(".")[2:3] in (["attn_q"], ["attn_k"]) for t in reader.tensors)
    if shape.family.permute_qk and qk and shape.n_head is None and options.base:
        # the file lacks the head counts (llama.cpp's converter writes none): take the base's
        described = describe_base(options.base)
        if described.family.arch != arch:
            raise IncompatibleBaseError(f"the adapter is for {arch}, the base is {described.family.arch}",
                                        path=path)
        shape.n_head, shape.n_head_kv = described.n_head, described.n_head_kv
    pairs: dict[str, dict[str, Any]] = {}
    ignored = []
    for tensor in reader.tensors:
        base, _, suffix = tensor.name.rpartition(".")
        if suffix in ("lora_a", "lora_b"):
            pairs.setdefault(base, {})[suffix] = tensor
        elif tensor.name.endswith("_norm.weight"):
            ignored.append(tensor.name)  # llama.cpp skips these too (mergekit adds them)
        else:
            raise InputError("not a LoRA tensor (names end in .lora_a or .lora_b)", path=path, tensor=tensor.name)
    blocks = 1 + max((int(b.split(".")[1]) for b in pairs if b.startswith("blk.") and b.split(".")[1].isdigit()),
                     default=-1)
    store = GGUFStore(path, shape)
    ranks: dict[str, int] = {}
    for base, pair in pairs.items():
        if set(pair) != {"lora_a", "lora_b"}:
            raise InputError(f"{base} has only {next(iter(pair))}", path=path, tensor=base + "." + next(iter(pair)))
        a, b = pair["lora_a"], pair["lora_b"]
        a_shape, b_shape = numpy_shape(a), numpy_shape(b)
        if len(a_shape) != 2 or len(b_shape) != 2 or 0 in a_shape + b_shape:
            raise InputError(f"LoRA factors must be non-empty matrices, not {list(a_shape)} and {list(b_shape)}",
                             path=path, tensor=a.name)
        module = shape.hf_module(base, blocks)
        if module is None:
            raise UnsupportedOperationError(f"{base} has no Hugging Face module name in architecture {arch}",
                                            path=path, tensor=a.name)
        if base == "token_embd.weight":
            rank = a_shape[1]
            if b_shape[1] != rank:
                raise InputError(f"ranks disagree: lora_a {list(a_shape)} and lora_b {list(b_shape)}", path=path,
                                 tensor=b.name)
            store.entries[f"{module}.lora_embedding_A"] = (a, "transpose")
            store.entries[f"{module}.lora_embedding_B"] = (b, "as is")
        else:
            rank = a_shape[0]
            if b_shape[1] != rank:
                raise InputError(f"ranks disagree: lora_a {list(a_shape)} and lora_b {list(b_shape)}", path=path,
                                 tensor=b.name, hint="lora_a is [rank, in] and lora_b [out, rank]")
            if qk_heads(shape, base, path) is not None:
                n_head, n_kv = shape.heads(path)
                heads = n_head if base.split(".")[2] == "attn_q" else n_kv
                if b_shape[0] % (2 * heads):
                    raise InputError(f"{b_shape[0]} rows cannot be split into {heads} attention heads", path=path,
                                     tensor=b.name, hint="pass the right --base")
            store.entries[f"{module}.lora_A"] = (a, "as is")
            store.entries[f"{module}.lora_B"] = (b, "rows")  # Q/K rows back in HF order
        ranks[module] = rank
    if not ranks:
        raise InputError("the GGUF adapter holds no LoRA pair", path=path)
    config = peft_config(ranks, alpha, shape)
    peft_shapes = {n: store.info(n).shape for n in store.names()}
    config = plugin.get_method("lora").from_peft(config, peft_shapes)
    provenance: dict[str, Any] = {"source_format": "gguf", "source": str(path), "gguf_architecture": arch}
    if ignored:
        provenance["ignored_tensors"] = ignored
    base_name = scalar(reader, "adaptools.base_model", str, path, required=False)
    return Adapter(method="lora", config=config, tensors=store, base=BaseRef(name=base_name), provenance=provenance,
                   source=str(path))


def peft_config(ranks: dict[str, int], alpha: float, shape: ModelShape) -> dict[str, Any]:
    """A PEFT LoRA config whose per-module scale is llama.cpp's: ``alpha / rank``, or 1 when alpha is 0."""
    common = Counter(ranks.values()).most_common(1)[0][0]
    lora_alpha: float = int(alpha) if alpha == int(alpha) else alpha
    exact = {m: r for m, r in ranks.items() if r != common}
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": common, "lora_alpha": lora_alpha if alpha else common,
        "target_modules": sorted(ranks), "use_rslora": False, "use_dora": False, "lora_bias": False,
        "bias": "none", "lora_dropout": 0.0, "init_lora_weights": True, "inference_mode": True,
        "fan_in_fan_out": shape.family.conv1d,
        # exact module paths, anchored so that no other module matches (PEFT's pattern rule)
        "rank_pattern": {f"^{_escape(m)}": r for m, r in exact.items()},
        "alpha_pattern": {f"^{_escape(m)}": r for m, r in exact.items()} if not alpha else {},
    }
    return config


def _escape(module: str) -> str:
    return module.replace(".", r"\.")


class GGUFFormat(plugin.AdapterFormat):
    name = "gguf"
    description = "llama.cpp GGUF LoRA adapter (one .gguf file; writing needs --base)"
    writes_directory = False

    def detect(self, path: Path) -> bool:
        return path.is_file() and is_gguf(path)

    def read(self, path: Path, options: ReadOptions) -> Adapter:
        return read_gguf(path, options)

    def base_mismatch(self, adapter: Adapter, base_config: Mapping[str, Any]) -> str | None:
        """A GGUF LoRA names its architecture (``general.architecture``): a Qwen2 LoRA merged into a Llama
        base puts its Q/K rows in the wrong order and lands on the wrong modules."""
        arch = adapter.provenance.get("gguf_architecture")
        if not isinstance(arch, str):
            return None
        try:
            base_arch = family_for_config(dict(base_config)).arch
        except UnsupportedOperationError:
            base_arch = str((base_config.get("architectures") or [base_config.get("model_type")])[0])
        if base_arch == arch:
            return None
        return f"the adapter is a GGUF LoRA for architecture {arch!r}, the base is {base_arch!r}"

    def write(self, adapter: Adapter, path: Path, options: WriteOptions = WriteOptions()) -> None:
        shape, alpha, tensors = plan(adapter, options)
        arch = shape.family.arch
        writer = gguf.GGUFWriter(path, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        # Not read by llama.cpp for adapters; they let a reader reorder Q/K rows without the base.
        for key, value in (("block_count", shape.n_blocks), ("attention.head_count", shape.n_head),
                           ("attention.head_count_kv", shape.n_head_kv)):
            if value is not None:
                writer.add_uint32(f"{arch}.{key}", value)
        if adapter.base.name:
            writer.add_string("adaptools.base_model", adapter.base.name)
        writer.add_string("adaptools.provenance", json.dumps(adapter.provenance, sort_keys=True, default=str))
        for name, array, qtype in tensors:
            writer.add_tensor(name, array, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
