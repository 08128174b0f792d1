"""A GGUF LoRA's F32/F16 tensors are handed to the engine as copy-on-write maps of the file
(plugins/gguf/adapter_format.py, ``GGUFStore``), not a fresh copy per request: the values are gguf-py's
reader's, bit for bit; a caller writing into one changes neither the file nor the next request's tensor;
and Q/K ``lora_b`` rows (which must be reordered) and BF16/Q8_0 tensors still come decoded."""

from __future__ import annotations

import hashlib
import sys

import gguf
import numpy as np
import pytest
import torch
from conftest import ADAPTERS, BASES
from gguf import GGMLQuantizationType as Q

from adaptools import load
from adaptools_plugins.gguf.adapter_format import GGUFStore


def to_gguf(cli_runner, out, outtype: str) -> None:
    result = cli_runner("convert", ADAPTERS / "llama-lora", out, "--to", "gguf", "--base", BASES / "llama",
                        "--outtype", outtype)
    assert result.exit_code == 0, result.output


def maps_of_this_process() -> list[tuple[int, int, str]]:
    """(start, end, file) of each mapping of this process (Linux's /proc/self/maps)."""
    rows = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            rows.append((start, end, parts[5].strip() if len(parts) > 5 else ""))
    return rows


maps = maps_of_this_process if sys.platform == "linux" else None


def in_file_map(tensor: torch.Tensor, path, rows: list[tuple[int, int, str]]) -> bool:
    return any(start <= tensor.data_ptr() < end and file == str(path) for start, end, file in rows)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("outtype,qtype", [("f32", Q.F32), ("f16", Q.F16)])
def test_mapped_tensors_are_the_readers_values_and_private(outtype, qtype, tmp_path, cli_runner):
    path = tmp_path / "a.gguf"
    to_gguf(cli_runner, path, outtype)
    before = digest(path)
    adapter = load(path)
    store = adapter.tensors
    assert isinstance(store, GGUFStore)
    by_gguf_name = {t.name: t for t in gguf.GGUFReader(path).tensors}
    mapped = 0
    for name in store.names():
        tensor, how = store.entries[name]
        got = store.get(name)
        if by_gguf_name[tensor.name].tensor_type != qtype or (how == "rows" and (".attn_q." in tensor.name or
                                                                               ".attn_k." in tensor.name)):
            continue
        want = np.asarray(by_gguf_name[tensor.name].data).reshape(tuple(got.shape))
        assert got.numpy().dtype == want.dtype and np.array_equal(got.numpy().view(np.uint8), want.view(np.uint8))
        assert not maps or in_file_map(got, path, maps()), name  # held by the page cache, not copied
        again = store.get(name)
        assert again.data_ptr() != got.data_ptr()  # each request maps anew: no aliasing between callers
        got.fill_(7.0)  # a caller writing into its tensor ...
        assert np.array_equal(store.get(name).numpy().view(np.uint8), want.view(np.uint8)), name
        assert np.array_equal(again.numpy().view(np.uint8), want.view(np.uint8)), name
        mapped += 1
    assert mapped >= 10
    assert digest(path) == before  # ... never changes the file


def test_reordered_and_decoded_tensors_still_come_decoded(tmp_path, cli_runner):
    """Q/K lora_b rows are put back in HF order (a copy), and Q8_0 tensors are decoded: neither is a map."""
    path = tmp_path / "a.gguf"
    to_gguf(cli_runner, path, "q8_0")
    original = load(ADAPTERS / "llama-lora")
    back = load(path)
    for name in original.tensor_names():
        torch.testing.assert_close(back.tensor(name).float(), original.tensor(name).float(), rtol=0, atol=2e-2,
                                   msg=name)
