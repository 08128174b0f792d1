"""OLoRA and PiSSA for the LoRA plugin: the initial factors PEFT computes from a base weight, a freshly
initialised adapter (``adaptools init``), and the conversion of a trained one to plain LoRA on the original
base (docs/peft.md, "OLoRA and PiSSA")."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from adaptools import plugin
from adaptools.plugin import Adapter, BaseInfo, IncompatibleBaseError, UnsupportedOperationError

from ..peft.common import locate
from ..peft.config_schema import MAX_ALPHA, MAX_RANK
from ..peft.matching import is_targeted
from .config import BASE_MUTATING_INITS, lora_rank_alpha, scaling_for

RECOMPUTABLE_INITS = ("olora", "pissa")


def initial_factors(init: str, weight: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B0, A0) that PEFT's ``olora`` / ``pissa`` initialisation computes from a base weight [out, in].

    OLoRA: reduced QR ``W = QR``; ``B0 = Q[:, :r]``, ``A0 = R[:r]``. PiSSA: ``W = V S Uᵀ`` (exact SVD), with
    the top r singular values divided by the scaling; ``A0 = √S Uᵀ``, ``B0 = V √S``. Both in fp32, as peft.
    The residual base PEFT trained on is ``W − (s·B0) @ A0``.
    """
    w = weight.to(torch.float32)
    if init == "olora":
        q, r = torch.linalg.qr(w)
        return q[:, :rank].contiguous(), r[:rank].contiguous()
    if init == "pissa":
        v, sv, uh = torch.linalg.svd(w, full_matrices=False)
        sr = sv[:rank] / scaling
        return v[:, :rank] @ torch.diag(torch.sqrt(sr)), torch.diag(torch.sqrt(sr)) @ uh[:rank]
    raise UnsupportedOperationError(f"init_lora_weights={init!r} cannot be recomputed from the base",
                                    hint="pass the initial adapter saved at init time (--initial)")



def initialize(method: Any, base: BaseInfo, read: Callable[[str], torch.Tensor], options: Mapping[str, Any]) -> Adapter:
    """The adapter PEFT's ``init_lora_weights="olora"|"pissa"`` creates: (B0, A0) per targeted Linear.

    The config records the init, so the adapter is what PEFT saves before training. Training also needs
    the residual base ``W - (s·B0) @ A0``: ``adaptools init --write-base`` writes it (a merge of this
    adapter with weight -1), or PEFT recomputes it when it loads the adapter onto the original base.
    """
    init = options.get("init", "olora")
    rank, alpha = options.get("rank"), options.get("alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_RANK:
        raise plugin.InputError(f"the rank must be an integer from 1 to {MAX_RANK}, not {rank!r}",
                                   hint="pass --rank N")
    if alpha is None:
        alpha = rank
    elif (not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha)
          or not 0 < abs(alpha) <= MAX_ALPHA):
        raise plugin.InputError(f"alpha must be a finite non-zero number of size at most {MAX_ALPHA:g}, "
                                   f"not {alpha!r}", hint="pass --alpha X, or leave it out for alpha = rank")
    config: dict[str, Any] = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
                              "target_modules": list(options["targets"]), "init_lora_weights": init,
                              "use_rslora": bool(options.get("use_rslora")), "lora_dropout": 0.0,
                              "bias": "none", "fan_in_fan_out": False, "inference_mode": True}
    s = scaling_for(config, rank, alpha)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in base.tensors.items():
        module, _, param = name.rpartition(".")
        if param != "weight" or len(tensor.shape) != 2 or not is_targeted(config, module):
            continue
        b0, a0 = initial_factors(init, read(name), rank, s)
        tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"] = a0, b0
    if not tensors:
        raise IncompatibleBaseError(f"no linear weight in the base matches {list(options['targets'])}",
                                    path=base.path)
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    return Adapter(method.name, method.from_peft(config, shapes), plugin.MemoryStore(tensors),
                   base=plugin.BaseRef(name=base.path), provenance={"operation": "init", "init": init})

def to_plain(method: Any, adapter: Adapter, base: BaseInfo | None, read: Callable[[str], torch.Tensor] | None,
             initial: Adapter | None) -> Adapter:
    """An OLoRA/PiSSA adapter as a plain LoRA on the *original* base, exactly as PEFT's
    ``path_initial_model_for_weight_conversion``: rank 2r, ``A' = [A; A0]``, ``B' = [B, -B0]``, alpha
    doubled (×√2 with rsLoRA) so the scaling is unchanged. (B0, A0) come from ``initial`` or are
    recomputed from the base. modules_to_save and other full tensors are kept (peft 0.21.2 drops them)."""
    config = dict(adapter.config)
    init = config.get("init_lora_weights")
    if not (isinstance(init, str) and init.lower().startswith(BASE_MUTATING_INITS)):
        raise UnsupportedOperationError(f"init_lora_weights={init!r} already applies to the original base")
    if config.get("use_rslora") and (config.get("rank_pattern") or config.get("alpha_pattern")):
        raise UnsupportedOperationError("rsLoRA with rank/alpha patterns has no exact conversion "
                                        "(peft refuses too)")
    if initial is None and init not in RECOMPUTABLE_INITS:
        raise UnsupportedOperationError(f"init_lora_weights={init!r} is not reproducible from the base",
                                        hint="pass the initial adapter saved right after init (--initial)")
    if initial is None and (base is None or read is None):
        raise UnsupportedOperationError("recomputing the initial factors needs the base (--base)")
    tensors: dict[str, torch.Tensor] = {}
    for module, roles in adapter.modules().items():
        for role, name in roles.items():
            if role not in ("lora_A", "lora_B"):
                tensors[name] = adapter.tensor(name)
        if "lora_A" not in roles:
            continue
        a, b = adapter.tensor(roles["lora_A"]).float(), adapter.tensor(roles["lora_B"]).float()
        if initial is not None:
            a0 = initial.tensor(f"{module}.lora_A").float()
            b0 = initial.tensor(f"{module}.lora_B").float()
        else:
            rank, alpha = lora_rank_alpha(config, module)
            target = locate(adapter, base, module, "weight", roles["lora_A"])  # type: ignore[arg-type]
            b0, a0 = initial_factors(init, read(target), rank, scaling_for(config, rank, alpha))  # type: ignore[misc]
        tensors[f"{module}.lora_A"] = torch.cat([a, a0], 0)
        tensors[f"{module}.lora_B"] = torch.cat([b, -b0], 1)
    factor = math.sqrt(2) if config.get("use_rslora") else 2
    config.update({"r": 2 * config.get("r", 8), "lora_alpha": config.get("lora_alpha", 8) * factor,
                   "init_lora_weights": True,
                   "rank_pattern": {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()},
                   "alpha_pattern": {k: 2 * v for k, v in (config.get("alpha_pattern") or {}).items()}})
    config.pop("modules", None)
    shapes = {n: tuple(t.shape) for n, t in tensors.items() if n.endswith((".lora_A", ".lora_embedding_A"))}
    return Adapter(method.name, method.from_peft(config, shapes), plugin.MemoryStore(tensors), base=adapter.base,
                   provenance={**adapter.provenance, "converted_from_init": init})
