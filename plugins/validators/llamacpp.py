"""llama.cpp as a runtime for the ``logits`` check of a GGUF output, through llama-cpp-python's low-level API
(optional: the check is refused in one line, before anything is written, when it is not installed).

Each run loads the GGUF model once and evaluates every sequence in a fresh context with an F32 KV cache and no
flash attention, so that the only rounding that differs between two runs is the weights' (llama.cpp's F16
defaults would round K and V). A LoRA is applied at runtime as ``llama-cli --lora`` does, at scale 1
(docs/validation.md, "A GGUF output").
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptools.plugin import InputError

#: ggml's type id of F32, for the KV cache.
GGML_TYPE_F32 = 0


def installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def require(check: str) -> Any:
    """The ``llama_cpp`` module, or the one-line refusal saying how to install it."""
    if not installed():
        raise InputError(f"--check {check} of a GGUF output runs the model in llama.cpp, and llama-cpp-python is "
                         "not installed", hint="pip install llama-cpp-python, or merge to a folder to check it")
    return importlib.import_module("llama_cpp")


@contextmanager
def loaded(path: str | Path, check: str) -> Iterator[Runtime]:
    """The GGUF model at ``path`` in llama.cpp, freed on exit."""
    ll = require(check)
    ll.llama_backend_init()
    _quiet(ll)
    model = ll.llama_model_load_from_file(str(path).encode(), ll.llama_model_default_params())
    if not model:
        raise InputError("llama.cpp cannot load this GGUF file", path=str(path),
                         hint="check the file with `adaptools info`; llama.cpp's log says more with LLAMA_LOG")
    try:
        yield Runtime(ll, model, str(path))
    finally:
        ll.llama_model_free(model)


def _quiet(ll: Any) -> None:
    """llama.cpp logs every load to stderr; keep our one-line output (errors still surface as refusals)."""
    callback = ll.llama_log_callback(lambda level, text, data: None)
    _quiet.keep = callback  # type: ignore[attr-defined]  # the C side holds only a pointer: keep it alive
    ll.llama_log_set(callback, ctypes.c_void_p(0))


class Runtime:
    """One loaded model: its vocabulary size, its tokenizer, and logits with or without LoRA files."""

    def __init__(self, ll: Any, model: Any, path: str) -> None:
        self.ll, self.model, self.path = ll, model, path
        self.vocab = ll.llama_model_get_vocab(model)
        self.n_vocab = int(ll.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(ll.llama_model_n_ctx_train(model))

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added), or [] when the model has no usable tokenizer."""
        if int(self.ll.llama_vocab_type(self.vocab)) == self.ll.LLAMA_VOCAB_TYPE_NONE:
            return []  # llama.cpp aborts the process when asked to tokenize without a tokenizer
        data = text.encode()
        tokens = (self.ll.llama_token * (len(data) + 8))()
        n = self.ll.llama_tokenize(self.vocab, data, len(data), tokens, len(tokens), False, True)
        return [int(t) for t in tokens[:n]] if n > 0 else []

    def logits(self, sequences: Sequence[torch.Tensor], loras: Sequence[str], bar: Any) -> list[torch.Tensor]:
        """Next-token logits (fp32, [tokens, vocab]) of every sequence with ``loras`` applied at scale 1."""
        ll = self.ll
        adapters = []
        try:
            for path in loras:
                adapter = ll.llama_adapter_lora_init(self.model, str(path).encode())
                if not adapter:
                    raise InputError("llama.cpp cannot load the adapter written for the check", path=str(path),
                                     hint="convert the adapter with `adaptools convert --to gguf` and try it")
                adapters.append(adapter)
            return [self._run(ids, adapters, bar) for ids in sequences]
        finally:
            for adapter in adapters:
                ll.llama_adapter_lora_free(adapter)

    def _run(self, ids: torch.Tensor, adapters: list[Any], bar: Any) -> torch.Tensor:
        ll, tokens = self.ll, [int(t) for t in ids]
        params = ll.llama_context_default_params()
        params.n_ctx = max(len(tokens), 16)
        params.n_batch = params.n_ubatch = len(tokens)
        params.type_k = params.type_v = GGML_TYPE_F32
        params.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = ll.llama_init_from_model(self.model, params)
        if not ctx:
            raise InputError("llama.cpp cannot make a context for this model", path=self.path)
        batch = ll.llama_batch_init(len(tokens), 0, 1)
        try:
            if adapters:
                pointers = (ll.llama_adapter_lora_p_ctypes * len(adapters))(*adapters)
                scales = (ctypes.c_float * len(adapters))(*([1.0] * len(adapters)))
                if ll.llama_set_adapters_lora(ctx, pointers, len(adapters), scales) != 0:
                    raise InputError("llama.cpp cannot apply the adapter to this model", path=self.path)
            for i, token in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, 1
                batch.seq_id[i][0] = 0
            batch.n_tokens = len(tokens)
            if ll.llama_decode(ctx, batch) != 0:
                raise InputError("llama.cpp failed to evaluate the model", path=self.path)
            shape = (self.n_vocab,)
            rows = [torch.from_numpy(np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, i), shape=shape).copy())
                    for i in range(len(tokens))]
        finally:
            ll.llama_batch_free(batch)
            ll.llama_free(ctx)
        bar.update(1)
        return torch.stack(rows).float()
