"""GGUF model files as merge bases: ``adaptools merge BASE.gguf ADAPTER OUT.gguf``.

The backend opens a GGUF model file as a checkpoint the merge engine streams like any other: every tensor
keeps its place and bytes, and each one gguf-py decodes is a one-tensor group named by its Hugging Face
parameter (``blk.0.attn_q.weight`` is ``model.layers.0.self_attn.q_proj.weight``), decoded to float32 in the
Hugging Face layout (Q/K rows put back in HF order, Conv1D weights transposed), so a LoRA merges into it
exactly as into the safetensors checkpoint it came from. A changed tensor is put back into GGUF's layout and
encoded in its own type where gguf-py or our K-quant encoders encode it, else Q8_0 (docs/gguf.md, "Tensor
types gguf-py encodes and decodes", "K-quant encoders" and "Merging into a GGUF base"); untouched ones are
copied byte for byte. Tensors without a Hugging Face name (norms) keep their GGUF name.

Imports run one way: this module offers the output container (``container.py``, which writes one GGUF file
from a GGUF base or, through ``export.py``, from a dense Hugging Face one) and hands it itself to encode
with; the per-tensor decoding and encoding all three share is in ``layout.py``. Nothing imports this module
but the family's hook.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gguf
import torch
from gguf import GGMLQuantizationType as Q

from adaptools import plugin
from adaptools.plugin import BaseTensor, InputError, TensorInfo, UnsupportedOperationError

from .arch import describe_reader, qk_heads
from .codec import changed_type, decodable, is_gguf, nbytes, scalar
from .container import GGUFContainer
from .fields import open_header
from .layout import GGUFBase, StoredTensor, decode_encoded, encode_value, encode_value_decoded, settings_for
from .split import open_parts

#: Most dimensions a GGUF tensor has (ggml's GGML_MAX_DIMS).
MAX_DIMS = 4


class GGUFBackend(plugin.Backend):
    """GGUF tensors as one-tensor groups. The registered instance opens files and encodes settings it is
    given; :meth:`open_checkpoint` makes one bound to a file (``base``), which also decodes that file's
    tensors."""

    name = "gguf"
    description = "llama.cpp GGUF model files (every type gguf-py decodes; merge BASE.gguf ... OUT.gguf)"

    def __init__(self, base: GGUFBase | None = None):
        self.base = base

    @property
    def implementation(self) -> str:
        from .native import describe

        return describe()

    def containers(self) -> Sequence[plugin.OutputContainer]:
        return (GGUFContainer(self),)

    def open_checkpoint(self, path: Path) -> plugin.Checkpoint | None:
        if not is_gguf(path):
            if path.suffix.lower() == ".gguf":
                raise InputError("not a GGUF file (it does not start with the GGUF magic)", path=path,
                                 hint="the file is corrupt or not a llama.cpp model")
            return None
        return open_base(path)

    # --- groups: each decodable tensor of the bound file is one --------------------------------------------

    def _bound(self) -> GGUFBase:
        if self.base is None:
            raise UnsupportedOperationError("this GGUF backend is bound to no file; it only encodes")
        return self.base

    def find_groups(self, tensors: Mapping[str, BaseTensor]) -> dict[str, list[str]]:
        stored = self.base.stored if self.base is not None else {}
        return {param: [] for param, t in stored.items() if param in tensors and decodable(t.qtype)}

    def group_info(self, param: str, read: Callable[[str], torch.Tensor]) -> tuple[torch.dtype, tuple[int, ...]]:
        return torch.float32, self._bound().hf_shape(param)

    def decode_group(self, param: str, read: Callable[[str], torch.Tensor], names: list[str],
                     settings: Mapping[str, Any] | None = None) -> torch.Tensor:
        if settings is not None:  # a group just encoded: its settings say everything, no file needed
            return decode_encoded(settings, read(param), self.base.path if self.base is not None else None)
        return self._bound().decode(param, read(param), settings)

    def decode_group_into(self, param: str, read: Callable[[str], torch.Tensor], names: list[str],
                          out: torch.Tensor) -> torch.Tensor:
        """Decoded into ``out`` by the native kernel where the GGUF layout is the Hugging Face one (not Q/K rows,
        not Conv1D weights)."""
        return self._bound().decode(param, read(param), out=out)

    def group_settings(self, param: str, read: Callable[[str], torch.Tensor]) -> dict[str, Any]:
        """How ``param`` is written when changed: its GGUF name, numpy shape and type, and the layout facts
        (architecture and head counts) that put a Hugging Face value into GGUF's layout."""
        base = self._bound()
        stored = base.stored[param]
        return settings_for(base.model, stored.gguf_name, stored.shape, changed_type(stored.qtype, stored.shape[-1]))

    def encode_group(self, param: str, dense: torch.Tensor, settings: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {param: encode_value(settings, dense, self.base.path if self.base is not None else None)}

    def encode_group_decoded(self, param: str, dense: torch.Tensor, settings: Mapping[str, Any],
                             out: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Encoded and decoded again in one pass where the native kernel encodes the type (layout.py)."""
        encoded, written = encode_value_decoded(settings, dense, self.base.path if self.base is not None else None,
                                                out)
        return {param: encoded}, written


def _check(ok: bool, message: str, path: Path, tensor: str | None = None) -> None:
    if not ok:
        raise InputError(message, path=path, tensor=tensor, hint="the file is truncated or corrupt; write it again")


def open_base(path: Path) -> plugin.Checkpoint:
    """A GGUF model file as a checkpoint: every tensor checked against the file before anything trusts it."""
    reader = open_header(path)  # the header only: metadata arrays stay bytes
    if reader.endianess != gguf.GGUFEndian.LITTLE:
        raise UnsupportedOperationError("big-endian GGUF files are not supported", path=path)
    parts = open_parts(path, reader)  # a split model: every part, checked to belong to the set
    tensors = [(part, t) for part, r in parts for t in r.tensors]
    model = describe_reader(reader, path, [t for _, t in tensors])
    arch = model.family.arch
    for key in ("block_count", "attention.head_count", "attention.head_count_kv"):
        value = scalar(reader, f"{arch}.{key}", int, path, required=False)
        if value is not None and value <= 0:
            raise InputError(f"GGUF metadata {arch}.{key} is {value}, not a positive count", path=path)
    if model.family.permute_qk and model.n_head is None and any(
            t.name.split(".")[2:3] in (["attn_q"], ["attn_k"]) for _, t in tensors):
        raise InputError(f"the GGUF metadata has no {arch}.attention.head_count, without which the Q/K rows "
                         "cannot be put in Hugging Face order", path=path)
    sizes = {part: part.stat().st_size for part, _ in parts}
    blocks = model.n_blocks or 1 + max((int(t.name.split(".")[1]) for _, t in tensors
                                        if t.name.startswith("blk.") and t.name.split(".")[1].isdigit()), default=-1)
    stored: dict[str, StoredTensor] = {}
    names: dict[str, Path] = {}
    for path, t in tensors:  # each tensor checked against its own part
        if t.name in names:
            raise InputError(f"tensor stored twice, in {names[t.name].name} and {path.name}", path=path,
                             tensor=t.name, hint="the parts come from different sets; download the whole set again")
        names[t.name] = path
        size = sizes[path]
        qtype, shape = Q(t.tensor_type), tuple(int(d) for d in reversed(t.shape.tolist()))
        _check(qtype in gguf.GGML_QUANT_SIZES, f"unknown tensor type {qtype.name}", path, t.name)
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        _check(0 < len(shape) <= MAX_DIMS and all(d > 0 for d in shape) and shape[-1] % block == 0,
               f"shape {list(shape)} is not a {qtype.name} tensor (rows of whole {block}-value blocks)", path, t.name)
        want = nbytes(qtype, shape)
        _check(int(t.n_bytes) == want, f"{t.n_bytes} bytes for a {qtype.name} tensor of shape {list(shape)} "
                                       f"(expected {want})", path, t.name)
        _check(int(t.data_offset) + want <= size, "tensor data runs past the end of the file", path, t.name)
        heads = qk_heads(model, t.name, path)
        if heads is not None and shape[0] % (2 * heads[1]):
            raise InputError(f"{shape[0]} rows do not split into {heads[1]} attention heads", path=path,
                             tensor=t.name)
        param = model.hf_parameter(t.name, blocks) or t.name
        if param in stored:  # two GGUF tensors for one Hugging Face name: keep the second by its own name
            param = t.name
        _check(param not in stored, "tensor stored twice", path, t.name)
        stored[param] = StoredTensor(t.name, qtype, shape, int(t.data_offset), want, path)
    config = {"architectures": list(model.family.hf_architectures), "model_type": model.family.model_types[0],
              "tie_word_embeddings": "output.weight" not in model.gguf_shapes}  # type: ignore[operator]
    first = parts[0][0]
    backend = GGUFBackend(GGUFBase(first, model, stored, reader))
    infos: dict[Path, dict[str, TensorInfo]] = {part: {} for part, _ in parts}
    for param, s in stored.items():
        infos[s.file or first][param] = TensorInfo("U8", (s.nbytes,), s.begin, s.begin + s.nbytes)
    checkpoint = plugin.Checkpoint.from_files(first, config, list(infos.items()), backend)
    checkpoint.find_groups([backend])
    return checkpoint
