"""Dense backends: weights stored as plain fp32, fp16 or bf16 tensors. Decoding is a cast to fp32; encoding
rounds once to the stored dtype, which is what makes a merge bit-exact against PEFT
(docs/peft.md, "Linear layers and precision")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from adaptools import plugin
from adaptools.plugin import BaseTensor


class Dense(plugin.Backend):
    elementwise = True

    def __init__(self, kind: plugin.FloatType):
        self.name = kind.short  # type: ignore[misc]
        self.code, self.dtype = kind.code, kind.torch
        self.description = f"dense {kind.short} tensors"  # type: ignore[misc]

    def claims(self, tensor: BaseTensor, checkpoint_config: Mapping[str, Any]) -> bool:
        return tensor.dtype == self.code

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        # always a new tensor: the merge updates what decode returns in place, and an fp32 ``float()`` would
        # hand back the stored tensor itself (the base the non-finite check and survival compare with)
        return stored.to(torch.float32, copy=True)

    def encode(self, dense: torch.Tensor, like: BaseTensor) -> torch.Tensor:
        return dense.to(self.dtype)
