"""Schema tensors cut from stored ones: a Flux LoRA on a fused BFL layer (``img_attn.qkv``, ``linear1``) is read
as one LoRA per diffusers layer, each a block of rows (and for a block-diagonal file, of columns) of the stored
factors, and the final layer's up factor has its two row halves swapped (docs/diffusion.md, "Flux").

The cuts are made when a tensor is read, so reading a file stays lazy like the other formats' ``FileStore``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptools.plugin import SafetensorsFile, StoredTensorInfo


@dataclass(frozen=True)
class Piece:
    """Rows ``rows`` (and columns ``cols``) of the stored tensor ``key``; ``swap``: its two row halves swapped."""

    file: SafetensorsFile
    key: str
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None
    swap: bool = False

    def shape(self) -> tuple[int, ...]:
        shape = list(self.file.info(self.key).shape)
        if self.rows is not None:
            shape[0] = self.rows[1] - self.rows[0]
        if self.cols is not None:
            shape[1] = self.cols[1] - self.cols[0]
        return tuple(shape)

    def read(self) -> torch.Tensor:
        tensor = self.file.get(self.key)
        if self.rows is not None:
            tensor = tensor[self.rows[0]:self.rows[1]]
        if self.cols is not None:
            tensor = tensor[:, self.cols[0]:self.cols[1]]
        if self.swap:
            first, second = tensor.chunk(2, dim=0)
            tensor = torch.cat([second, first], dim=0)
        return tensor.clone() if (self.rows or self.cols) else tensor.contiguous()


class PieceStore:
    """A ``TensorStore`` of :class:`Piece` s under canonical names (``<module>.lora_A`` ...)."""

    def __init__(self, pieces: dict[str, Piece]):
        self._pieces = dict(pieces)

    def names(self) -> list[str]:
        return list(self._pieces)

    def info(self, name: str) -> StoredTensorInfo:
        piece = self._pieces[name]
        return StoredTensorInfo(piece.file.info(piece.key).dtype, piece.shape())

    def get(self, name: str) -> torch.Tensor:
        return self._pieces[name].read()

    def origin(self, name: str) -> tuple[str, str]:
        piece = self._pieces[name]
        return str(piece.file.path), piece.key

    def source_key(self, name: str) -> str:
        return self._pieces[name].key
