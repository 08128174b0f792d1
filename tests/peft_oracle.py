"""Helpers that ask the real PEFT and transformers (test oracles only; the library never imports them)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

logging.getLogger("transformers").setLevel(logging.ERROR)
logging.getLogger("peft").setLevel(logging.ERROR)

INPUT_IDS = torch.tensor([[1, 5, 7, 9, 17, 33, 64, 100, 127, 3, 2, 8]])


def load_base(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def peft_model(base_dir: Path, adapter_dir: Path, dtype: torch.dtype = torch.float32, resize: int | None = None):
    from peft import PeftModel

    base = load_base(base_dir, dtype)
    if resize:
        base.resize_token_embeddings(resize)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(base, adapter_dir).eval()


def seeded_lora(base_dir: Path, config, out: Path, seed: int, scale: float):
    """A PEFT LoRA (``config``) on ``base_dir`` with every lora_ tensor set to ``scale`` × seeded normal noise
    (PEFT initialises B to zero: a fresh adapter would change nothing), saved to ``out``; the PEFT model is
    returned for further edits."""
    from peft import get_peft_model

    model = get_peft_model(load_base(base_dir), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    return model


@torch.no_grad()
def logits(model, ids: torch.Tensor = INPUT_IDS) -> torch.Tensor:
    return model(input_ids=ids).logits.float()
