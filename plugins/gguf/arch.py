"""What a GGUF file needs to know about a model architecture: HF names <-> GGUF names, the Q/K row
order llama.cpp's converter uses, Conv1D orientation, head counts, tied embeddings (docs/gguf.md, "Names, row
order and orientation per architecture" and "Exact scales with one alpha").

Names go through gguf-py's own tensor-name map (``gguf.get_tensor_name_map``), so every spelling it knows
maps; the only table kept here is, per architecture family, which Hugging Face classes it covers, whether
the converter reorders Q/K rows, and the module names a PEFT adapter on that class uses (to map GGUF names
back). The functions at the end turn one parameter between the Hugging Face layout and the GGUF layout,
for adapters and for merging into a GGUF base alike.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch

from adaptools.plugin import InputError, UnsupportedOperationError, read_header

if TYPE_CHECKING:
    from .fields import Header

_LLAMA_LIKE = ("model.embed_tokens", "lm_head", "model.layers.{bid}.self_attn.q_proj",
               "model.layers.{bid}.self_attn.k_proj", "model.layers.{bid}.self_attn.v_proj",
               "model.layers.{bid}.self_attn.o_proj", "model.layers.{bid}.mlp.gate_proj",
               "model.layers.{bid}.mlp.up_proj", "model.layers.{bid}.mlp.down_proj")


@dataclass(frozen=True)
class Family:
    """One GGUF architecture as llama.cpp's converter writes it (docs/gguf.md, "Names, row order and orientation
    per architecture")."""

    arch: str  # general.architecture
    hf_architectures: tuple[str, ...]  # config.json "architectures" it covers
    model_types: tuple[str, ...]  # config.json "model_type" it covers
    modules: tuple[str, ...]  # HF module names of a CausalLM of this family, ``{bid}`` for the block
    permute_qk: bool = False  # the converter reorders Q/K rows from HF's rotate-half to ggml's interleaved RoPE
    conv1d: bool = False  # HF stores the linear weights [in, out] (GPT-2 Conv1D); GGUF stores [out, in]
    tied_default: bool = False  # tie_word_embeddings when config.json does not say

    @property
    def model_arch(self) -> gguf.MODEL_ARCH:
        return next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == self.arch)


FAMILIES = (
    Family("llama", ("LlamaForCausalLM", "MistralForCausalLM"), ("llama", "mistral"), _LLAMA_LIKE,
           permute_qk=True),
    Family("qwen2", ("Qwen2ForCausalLM",), ("qwen2",), _LLAMA_LIKE),
    Family("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), _LLAMA_LIKE),
    Family("gpt2", ("GPT2LMHeadModel",), ("gpt2",),
           ("transformer.wte", "lm_head", "transformer.h.{bid}.attn.c_attn", "transformer.h.{bid}.attn.c_proj",
            "transformer.h.{bid}.mlp.c_fc", "transformer.h.{bid}.mlp.c_proj"), conv1d=True, tied_default=True),
)
SUPPORTED = ", ".join(f.arch for f in FAMILIES)


def family_for_arch(arch: str, path: object = None) -> Family:
    for family in FAMILIES:
        if family.arch == arch:
            return family
    raise UnsupportedOperationError(f"GGUF architecture {arch!r} is not supported yet (supported: {SUPPORTED})",
                                    path=path)


def family_for_config(config: dict[str, Any], path: object = None) -> Family:
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    for family in FAMILIES:
        if any(a in family.hf_architectures for a in archs) or (not archs and model_type in family.model_types):
            return family
    what = archs[0] if archs else model_type
    raise UnsupportedOperationError(f"architecture {what!r} has no GGUF adapter support yet (supported: "
                                    f"{', '.join(a for f in FAMILIES for a in f.hf_architectures)})", path=path)


#: The most transformer blocks a GGUF file may declare (the largest models have a few hundred).
MAX_BLOCKS = 4096


@dataclass
class ModelShape:
    """What reading or writing a GGUF adapter needs to know about the base model."""

    family: Family
    n_blocks: int | None = None
    n_head: int | None = None
    n_head_kv: int | None = None
    tied: bool | None = None  # None: unknown
    #: GGUF tensor name -> numpy shape (out, in) of the base, when the base's tensors are known.
    gguf_shapes: dict[str, tuple[int, ...]] | None = None
    #: HF parameter name -> shape as stored, when a checkpoint's safetensors headers are known.
    hf_shapes: dict[str, tuple[int, ...]] | None = None
    #: HF parameter name -> the safetensors file holding it.
    hf_files: dict[str, Path] = field(default_factory=dict)
    source: str = "<base>"
    name_map: tuple[int, gguf.TensorNameMap] | None = field(default=None, repr=False)

    def tensor_map(self, n_blocks: int | None = None) -> gguf.TensorNameMap:
        blocks = self.n_blocks if self.n_blocks is not None else (n_blocks or 0)
        if blocks > MAX_BLOCKS:  # gguf-py builds the name map block by block: 4e9 blocks never return
            raise InputError(f"{blocks} blocks (block_count, or a tensor's block index) is more than any model "
                             f"has (at most {MAX_BLOCKS} are read)", path=self.source,
                             hint="the file is corrupt or was made to mislead")
        if self.name_map is None or self.name_map[0] != blocks:
            self.name_map = (blocks, gguf.get_tensor_name_map(self.family.model_arch, blocks))
        return self.name_map[1]

    def gguf_name(self, hf_param: str) -> str | None:
        """``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight`` (None if it has no GGUF name)."""
        block = re.search(r"\.(\d+)\.", hf_param)
        tmap = self.tensor_map(int(block.group(1)) + 1 if block else 0)
        return tmap.get_name(hf_param, try_suffixes=(".weight", ".bias"))

    def hf_module(self, gguf_name: str, n_blocks: int) -> str | None:
        """``blk.0.attn_q.weight`` -> ``model.layers.0.self_attn.q_proj``: the inverse of :meth:`gguf_name`
        over the family's module names (gguf-py's map is many-to-one, so it is inverted by enumeration)."""
        blocks = max(n_blocks, self.n_blocks or 0)
        tmap = self.tensor_map(blocks)
        match = re.match(r"blk\.(\d+)\.", gguf_name)
        bid = int(match.group(1)) if match else 0
        suffix = ".bias" if gguf_name.endswith(".bias") else ".weight"
        for template in self.family.modules:
            module = template.format(bid=bid)
            if tmap.get_name(module + suffix, try_suffixes=(".weight", ".bias")) == gguf_name:
                return module
        return None

    def hf_parameter(self, gguf_name: str, n_blocks: int) -> str | None:
        """``blk.0.attn_qkv.bias`` -> ``transformer.h.0.attn.c_attn.bias`` (weights and biases of the
        family's linear and embedding modules; None for anything else, norms included)."""
        module = self.hf_module(gguf_name, n_blocks)
        return None if module is None else module + (".bias" if gguf_name.endswith(".bias") else ".weight")

    def heads(self, path: object = None) -> tuple[int, int]:
        if not self.n_head:
            raise InputError("the attention head counts are unknown, and the Q/K rows cannot be reordered "
                             "without them", path=path,
                             hint="merge takes them from its BASE; other commands take --base (the base's folder "
                                  "with config.json, or its .gguf)")
        return self.n_head, self.n_head_kv or self.n_head


def describe_base(ref: str) -> ModelShape:
    """The architecture facts of a base: a folder with config.json (weights optional), a config.json, or a
    GGUF model file."""
    path = Path(ref)
    if path.is_file() and path.suffix == ".gguf":
        return _describe_gguf(path)
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise InputError("the base must be a folder with config.json, a config.json, or a .gguf model file",
                         path=ref)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"not valid JSON ({exc})", path=config_path) from None
    if not isinstance(config, dict):
        raise InputError("must hold a JSON object", path=config_path)
    family = family_for_config(config, config_path)

    def number(*keys: str) -> int | None:
        for key in keys:
            value = config.get(key)
            if value is not None:
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise InputError(f"{key} must be a positive integer, not {value!r}", path=config_path)
                return value
        return None

    n_head = number("num_attention_heads", "n_head")
    hf_shapes, hf_files = None, {}
    files = sorted(config_path.parent.glob("*.safetensors"))
    if files:
        hf_shapes = {}
        for file in files:
            for name, info in read_header(file).tensors.items():
                hf_shapes[name], hf_files[name] = tuple(info.shape), file
    if hf_shapes is not None:
        tied = "lm_head.weight" not in hf_shapes
    else:
        tied = bool(config.get("tie_word_embeddings", family.tied_default))
    return ModelShape(family, number("num_hidden_layers", "n_layer"), n_head,
                      number("num_key_value_heads") or n_head, tied, None, hf_shapes, hf_files, str(config_path))


def _describe_gguf(path: Path) -> ModelShape:
    from .fields import open_header
    from .split import open_parts

    reader = open_header(path)
    return describe_reader(reader, path, [t for _, part in open_parts(path, reader) for t in part.tensors])


def describe_reader(reader: gguf.GGUFReader | Header, path: Path, tensors: Sequence[Any] | None = None) -> ModelShape:
    """The architecture facts of an open GGUF model file (refusing an adapter file); ``tensors``: those of
    every part of a split model (default: the file's own)."""
    from .codec import scalar

    if scalar(reader, "general.type", str, path, required=False) == "adapter":
        raise InputError("this GGUF file is an adapter, not a base model", path=path)
    arch = scalar(reader, "general.architecture", str, path)
    family = family_for_arch(arch, path)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist()))
              for t in (reader.tensors if tensors is None else tensors)}
    return ModelShape(family, scalar(reader, f"{arch}.block_count", int, path, required=False),
                      scalar(reader, f"{arch}.attention.head_count", int, path, required=False),
                      scalar(reader, f"{arch}.attention.head_count_kv", int, path, required=False),
                      "output.weight" not in shapes, shapes, None, {}, str(path))


# --- layouts: one parameter between Hugging Face and GGUF ---------------------------------------------------


def permute_qk(rows: torch.Tensor | np.ndarray, n_head: int, n_head_kv: int | None = None) -> Any:
    """HF rotate-half row order -> ggml's interleaved order, as llama.cpp's converter reorders Q/K weights
    (``n_head_kv`` given and different: the K projection). Works on the rows (axis 0) of any tensor."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = tuple(rows.shape)
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute_qk(rows: torch.Tensor | np.ndarray, n_head: int, n_head_kv: int | None = None) -> Any:
    """The exact inverse of :func:`permute_qk`."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = tuple(rows.shape)
    return rows.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def qk_heads(shape: ModelShape, gguf_name: str, path: object = None) -> tuple[int, int] | None:
    """(n_head, n_head_kv) to reorder this GGUF tensor's rows with, or None if it keeps HF's order."""
    if not shape.family.permute_qk:
        return None
    kind = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else ""
    if kind == "attn_q":
        n_head, _ = shape.heads(path)
        return n_head, n_head
    if kind == "attn_k":
        return shape.heads(path)
    return None


def to_gguf_layout(shape: ModelShape, gguf_name: str, hf_value: torch.Tensor, path: object = None) -> torch.Tensor:
    """A base parameter (or a delta of it) in the HF checkpoint's layout -> the GGUF tensor's numpy layout:
    Conv1D transposed, Q/K rows reordered."""
    value = hf_value
    if shape.family.conv1d and value.dim() == 2 and gguf_name.startswith("blk."):
        value = value.T
    heads = qk_heads(shape, gguf_name, path)
    if heads is not None:
        value = permute_qk(value, *heads)
    return value.contiguous()


def from_gguf_layout(shape: ModelShape, gguf_name: str, gguf_value: torch.Tensor, path: object = None) -> torch.Tensor:
    """The inverse of :func:`to_gguf_layout`."""
    value = gguf_value
    heads = qk_heads(shape, gguf_name, path)
    if heads is not None:
        value = unpermute_qk(value, *heads)
    if shape.family.conv1d and value.dim() == 2 and gguf_name.startswith("blk."):
        value = value.T
    return value.contiguous()
