"""A Hugging Face checkpoint folder (or a single-file base a backend opens), known from its config and
headers only.

Nothing here reads weights: a :class:`Checkpoint` knows which tensor lives in which shard at which offset,
what the config says, and which parameters are tied (``lm_head.weight`` absent under
``tie_word_embeddings``), so that a merge can plan everything before it reads a byte of weight data.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .errors import AdaptoolsError, InputError
from .finite import count_nonfinite
from .interfaces import Backend, BaseInfo, BaseTensor
from .jsonio import read_json
from .resolve import resolve
from .safetensors_io import TORCH_TO_CODE, Header, TensorInfo, read_header, read_tensor

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
#: Weight file stems a checkpoint folder may use: transformers' ``model``, and ``diffusion_pytorch_model``, which
#: diffusers uses for every pipeline component that is not a transformers model (a UNet, a VAE, a transformer).
STEMS = ("model", "diffusion_pytorch_model")
#: Files of a checkpoint that hold weights; everything else (config, tokenizer, ...) is copied as is.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")
#: Files a merge fetches from the hub: config, tokenizer, generation settings, and safetensors weights.
BASE_FILE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py"]
#: Input-embedding tensor names, most specific first, used to resolve a tied ``lm_head.weight``.
EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                   "tok_embeddings.weight", "embeddings.weight")

_COUNT = {"type": ["integer", "null"], "minimum": 1, "maximum": 2**31, "description": "a positive integer"}
#: What adaptools reads from a base ``config.json``; every other field is carried into an output unread.
CONFIG_SCHEMA = {
    "type": "object",
    "description": "a JSON object",
    "properties": {
        "architectures": {"type": ["array", "null"], "items": {"type": "string", "maxLength": 200},
                          "description": "a list of class names"},
        "model_type": {"type": ["string", "null"], "maxLength": 200},
        "tie_word_embeddings": {"type": ["boolean", "null"]},
        "text_config": {"anyOf": [{"type": "null"}, {"$ref": "#"}], "description": "a JSON object"},
        "quantization_config": {"type": ["object", "null"]},
        **{key: _COUNT for key in ("hidden_size", "n_embd", "num_hidden_layers", "n_layer", "num_attention_heads",
                                   "n_head", "num_key_value_heads", "head_dim", "vocab_size",
                                   "max_position_embeddings", "n_positions", "intermediate_size")},
    },
}
#: ``model.safetensors.index.json``: which shard holds each tensor (docs/input-validation.md).
INDEX_SCHEMA = {
    "type": "object",
    "description": "a JSON object",
    "required": ["weight_map"],
    "properties": {
        "metadata": {"type": ["object", "null"]},
        "weight_map": {
            "type": "object",
            "description": "an object mapping tensor names to shard file names",
            "additionalProperties": {"type": "string", "minLength": 1, "maxLength": 255,
                                     "description": "a shard file name"},
        },
    },
}


def index_name(stem: str) -> str:
    """The shard index of a checkpoint whose weight files are ``<stem>*.safetensors``."""
    return f"{stem}.safetensors.index.json"


def shard_name_problem(name: str) -> str | None:
    """Why an index's shard name must not be opened: only plain file names beside the index are."""
    if "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        return "is a path, not the name of a file beside the index"
    if not name.endswith(".safetensors"):
        return "is not a .safetensors file"
    return None


class StoredTensors(dict[str, BaseTensor]):
    """A checkpoint's stored tensors by name, as backends' ``find_groups`` sees them, with its config."""

    config: dict[str, Any]


@dataclass(frozen=True)
class Shard:
    """One safetensors file of a checkpoint, with its validated header."""

    path: Path
    header: Header

    @property
    def name(self) -> str:
        return self.path.name


def _keeping(kept: dict[str, torch.Tensor]) -> Callable[[Checkpoint, str], torch.Tensor]:
    """``Checkpoint.read_small`` that also puts what it reads in ``kept``; bound to the checkpoint (``__self__``),
    as ``read_small`` is, because backends tell the checkpoint a reader reads from by it (compressed-tensors, FP8)."""
    def read(checkpoint: Checkpoint, name: str) -> torch.Tensor:
        if name not in kept:
            kept[name] = checkpoint.read_small(name)
        return kept[name]

    return read


class Checkpoint:
    """A local checkpoint folder (one ``model.safetensors`` or shards with an index)."""

    def __init__(self, path: Path, config: dict[str, Any], shards: list[Shard], index: dict[str, Any] | None):
        self.path = path
        self.config = config
        self.shards = shards
        self.index = index
        #: The stem of its weight files (STEMS); an output folder names its files the same way.
        self.stem = "model"
        self.location: dict[str, tuple[Shard, TensorInfo]] = {}
        for shard in shards:
            for name, info in shard.header.tensors.items():
                if name in self.location:
                    raise InputError(f"tensor stored twice ({self.location[name][0].name} and {shard.name})",
                                     path=path, tensor=name)
                self.location[name] = (shard, info)
        self.aliases = self._tied_aliases()
        self.groups: dict[str, tuple[Any, list[str]]] = {}
        self.logical: dict[str, BaseTensor] = {}
        self.companions: set[str] = set()
        #: Groups whose parameter is stored under none of its own name (compressed-tensors' ``weight_packed``,
        #: GPTQ's ``qweight``): parameter -> the stored companion whose place it takes in an output.
        self.anchors: dict[str, str] = {}
        #: The backend that opened this checkpoint from a single file of its own format (None: a folder).
        self.opened_by: Any = None

    @classmethod
    def from_file(cls, path: Path, config: dict[str, Any], tensors: Mapping[str, TensorInfo],
                  opened_by: Any) -> Checkpoint:
        """A base stored as one file of another format, for a backend's ``open_checkpoint``: ``tensors``
        says where each stored tensor's bytes lie in the file (absolute offsets; dtype ``U8`` and shape
        ``(nbytes,)`` for bytes only the backend decodes), ``config`` is what the file says in config.json's
        terms (``tie_word_embeddings``, ``architectures``). The backend then registers its groups with
        :meth:`find_groups`."""
        return cls.from_files(path, config, [(path, tensors)], opened_by)

    @classmethod
    def from_files(cls, path: Path, config: dict[str, Any], parts: list[tuple[Path, Mapping[str, TensorInfo]]],
                   opened_by: Any) -> Checkpoint:
        """A base stored as several files of another format (a set of parts, opened by ``path``, its first):
        each part's tensors as :meth:`from_file` takes them, with offsets in that part. A tensor in two parts
        is refused."""
        checkpoint = cls(path, config, [Shard(file, Header(dict(tensors), {}, 0)) for file, tensors in parts], None)
        checkpoint.opened_by = opened_by
        return checkpoint

    def find_groups(self, backends: list[Any]) -> None:
        """Ask each backend which parameters it stores as groups (4-bit weights); record their dense view."""
        stored = StoredTensors({name: BaseTensor(name, info.dtype, info.shape)
                                for name, (_, info) in self.location.items()})
        stored.config = self.config
        try:
            for backend in backends:
                for param, names in backend.find_groups(stored).items():
                    if param not in self.location and (not names or any(n not in self.location for n in names)):
                        raise InputError(f"backend {backend.name!r} groups a parameter it stores under no stored "
                                         "name", tensor=param, hint="report this to the plugin's author")
                    if param not in self.location:
                        self.anchors[param] = names[0]
                    self.groups[param] = (backend, names)
                    self.companions.update(names)
                    dtype, shape = backend.group_info(param, self.read_small)
                    self.logical[param] = BaseTensor(param, TORCH_TO_CODE[dtype], tuple(shape))
        except AdaptoolsError as exc:
            raise self.located(exc) from None

    def located(self, exc: AdaptoolsError) -> AdaptoolsError:
        """``exc`` naming the file: a backend knows the tensor, not the file, so the shard holding the tensor
        (the folder when no shard holds it); an error that names a file already is returned as it is."""
        if exc.path is not None:
            return exc
        stored = self.anchors.get(exc.tensor or "", exc.tensor)  # a weight stored under another name
        where = self.location[stored][0].path if stored in self.location else self.path
        return type(exc)(exc.message, path=where, tensor=exc.tensor, hint=exc.hint)

    def read_small(self, name: str) -> torch.Tensor:
        """Read one stored tensor by name (for the small parts of groups)."""
        shard, info = self.location[name]
        with open(shard.path, "rb") as fh:
            return read_tensor(fh, info)

    def read(self, name: str, handle: BinaryIO | None = None) -> torch.Tensor:
        """A parameter's value: decoded from its group if it has one, else the stored tensor."""
        if name in self.groups:
            return self.read_group(name)
        shard, info = self.location[name]
        if handle is not None:
            return read_tensor(handle, info)
        return self.read_small(name)

    def read_group(self, name: str, kept: dict[str, torch.Tensor] | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """A grouped parameter's decoded value. ``kept``, when given, receives the stored tensors it was decoded
        from: the merge engine compares them with what it writes, and reading them again cost as much as the
        encoding (docs/merge-engine.md, "Encoding a group"). ``out``: a buffer the backend may decode into
        (Backend.decode_group_into)."""
        backend, names = self.groups[name]
        read = self.read_small if kept is None else types.MethodType(_keeping(kept), self)
        try:
            value: torch.Tensor = backend.decode_group(name, read, names) if out is None else \
                backend.decode_group_into(name, read, names, out)
        except AdaptoolsError as exc:  # found only when decoded (NaN codes, overflowing scales)
            raise self.located(exc) from None
        if count_nonfinite(value):
            self._refuse_overflowing_group(name, backend, names, value)
        return value

    def _refuse_overflowing_group(self, name: str, backend: Backend, names: list[str], value: torch.Tensor) -> None:
        """A quantized weight whose stored tensors are finite decodes to NaN or infinity only when its scales
        exceed the dtype it decodes to (an LLM.int8 SCB beyond fp16's range): the base, as its own library
        reads it, is then garbage, and no merge or dequantize may pass that on (docs/outputs.md, "Never
        garbage"). Non-finite stored scales are the base's own and are kept, as for a dense base."""
        stored = (self.read_small(n) for n in names)
        if any(t.is_floating_point() and count_nonfinite(t) for t in stored):
            return
        raise InputError(f"decoding this {backend.name} weight as its library does gives {count_nonfinite(value)} "
                         f"non-finite value(s) in {value.dtype}: its stored scales exceed that dtype's range",
                         path=self.location[name][0].path if name in self.location else self.path, tensor=name,
                         hint="the checkpoint is corrupt; quantize it again from the 16-bit original")

    def tensor(self, name: str) -> BaseTensor:
        """What a parameter looks like to a merge: dense for groups, as stored otherwise."""
        if name in self.logical:
            return self.logical[name]
        info = self.location[name][1]
        return BaseTensor(name, info.dtype, info.shape)

    @classmethod
    def open(cls, ref: str | os.PathLike[str]) -> Checkpoint:
        """Open a local folder or a hub reference (only config, tokenizer and safetensors files fetched)."""
        path = resolve(ref, allow_patterns=BASE_FILE_PATTERNS, what="base model")
        from . import registry  # late: registry loads plugins, which import adaptools

        if path.is_file():
            for entry in registry.backends().values():  # a single-file format some backend reads
                opened = entry.obj.open_checkpoint(path)
                if opened is not None:
                    return opened  # type: ignore[no-any-return]
            raise InputError("the base must be a checkpoint folder, not a file", path=path,
                             hint="pass the folder holding config.json and the .safetensors files")
        config_path = path / "config.json"
        if not config_path.exists() and not config_path.is_symlink():
            raise InputError("no config.json: not a Hugging Face checkpoint folder", path=path)
        config = read_json(config_path, what="config.json", max_bytes=16 * 1024 * 1024, schema=CONFIG_SCHEMA,
                           hint="fix the base model's config.json")
        index = None
        stem = next((s for s in STEMS if (path / index_name(s)).exists() or (path / index_name(s)).is_symlink()
                     or (path / f"{s}.safetensors").is_file()), "model")
        index_path, single = path / index_name(stem), f"{stem}.safetensors"
        if index_path.exists() or index_path.is_symlink():
            index = read_json(index_path, what="index", schema=INDEX_SCHEMA,
                              hint="the index is corrupt; download the checkpoint again")
            for tensor, file in index["weight_map"].items():
                problem = shard_name_problem(file)
                if problem:
                    raise InputError(f"the index entry {file!r} {problem}", path=index_path, tensor=tensor,
                                     hint="shards must sit beside the index; the index is corrupt or hostile")
            files = sorted(set(index["weight_map"].values()))
        elif (path / single).is_file():
            files = [single]
        else:
            if any(path.glob("*.bin")):
                raise InputError("only pickle weights (.bin) here; adaptools merges safetensors checkpoints",
                                 path=path, hint="convert the base to safetensors first")
            raise InputError("no model.safetensors or model.safetensors.index.json", path=path)
        shards = []
        for name in files:
            if not (path / name).is_file():
                raise InputError("shard named in the index is missing", path=path / name)
            shards.append(Shard(path / name, read_header(path / name)))
        checkpoint = cls(path, config, shards, index)
        checkpoint.stem = stem
        # Every caller wants the dense view (a 4-bit weight as one parameter of its real shape), so the
        # groups registered backends store (NF4 and friends) are found here, once, for all of them.
        checkpoint.find_groups([entry.obj for entry in registry.backends().values()])
        if index is not None:
            for name, file in index["weight_map"].items():
                if name not in checkpoint.location or checkpoint.location[name][0].name != file:
                    raise InputError(f"index says {file} holds it, but that shard does not", path=index_path,
                                     tensor=name)
        return checkpoint

    def _tied_aliases(self) -> dict[str, str]:
        tied = self.config.get("tie_word_embeddings", True)
        text_config = self.config.get("text_config")
        if isinstance(text_config, dict):
            tied = text_config.get("tie_word_embeddings", tied)
        if not tied or "lm_head.weight" in self.location:
            return {}
        for suffix in EMBEDDING_NAMES:
            for name in self.location:
                if name == suffix or name.endswith("." + suffix):
                    return {"lm_head.weight": name}
        return {}

    def parameters(self) -> list[str]:
        """Every parameter: the stored tensors that are no group's companions, then the groups stored under
        other names (:attr:`anchors`: compressed-tensors' ``weight_packed``, MXFP4's
        ``P_blocks`` + ``P_scales``)."""
        return [name for name in self.location if name not in self.companions] + list(self.anchors)

    def base_info(self) -> BaseInfo:
        tensors = {name: self.tensor(name) for name in self.parameters()}
        return BaseInfo(tensors=tensors, config=self.config, aliases=dict(self.aliases), path=str(self.path))

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for _, info in self.location.values())

    def other_files(self) -> list[Path]:
        """Non-weight files to carry into an output (tokenizer, generation config, ...)."""
        skip = {index_name(self.stem), "config.json", "README.md", ".gitattributes"}
        if not self.path.is_dir():  # a single-file base carries everything inside
            return []
        return sorted(p for p in self.path.iterdir()
                      if p.is_file() and p.name not in skip and not p.name.endswith(WEIGHT_SUFFIXES))
