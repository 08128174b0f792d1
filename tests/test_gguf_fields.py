"""Planning a GGUF merge from the header alone (plugins/gguf/fields.py): the keys and tensor infos gguf-py's own
reader gives, metadata arrays kept as their stored bytes and copied into OUT unchanged, and every header
gguf-py's reader refuses refused the same way (one line naming the file, exit 2, nothing written)."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
from conftest import ADAPTERS, BASES
from gguf import GGMLQuantizationType as Q
from gguf_bases import split_with_gguf_py, write_base

from adaptools_plugins.gguf.fields import open_header


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf-fields")
    made = [write_base(BASES / "llama", tmp / "llama-q8.gguf", Q.Q8_0, alignment=64),
            write_base(BASES / "gpt2", tmp / "gpt2-f32.gguf"),
            write_base(BASES / "qwen2", tmp / "qwen2-q4.gguf", Q.Q4_0)]
    (tmp / "set").mkdir()  # and the parts of a split model, as gguf-py's split writer makes them
    plain = write_base(BASES / "llama", tmp / "plain.gguf", Q.F16)
    return made + split_with_gguf_py(plain, tmp / "set" / "llama.gguf", split_max_tensors=9)


def test_the_header_reads_as_gguf_pys_reader_reads_it(bases):
    for path in bases:
        mine, theirs = open_header(path), gguf.GGUFReader(path)
        fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
        assert list(mine.fields) == list(fields), path
        for name, field in fields.items():
            assert mine.fields[name].types == field.types, name
            got, want = mine.fields[name].contents(), field.contents()
            assert got == want or (isinstance(want, list) and np.allclose(got, want)), name
            stored = bytes(theirs.data[field.offset:field.offset + sum(int(p.nbytes) for p in field.parts)])
            assert stored.endswith(mine.fields[name].raw), name  # key, type word, then the value as stored
        assert mine.alignment == theirs.alignment
        assert [(t.name, t.shape.tolist(), t.tensor_type, t.n_elements, t.n_bytes, t.data_offset)
                for t in mine.tensors] == [
            (t.name, t.shape.tolist(), Q(t.tensor_type), int(t.n_elements), int(t.n_bytes), int(t.data_offset))
            for t in theirs.tensors], path


def test_every_key_of_the_base_is_in_the_output_as_stored(bases, tmp_path, cli_runner):
    """Arrays (the vocabulary) are copied as their stored bytes: each key's bytes in OUT are the base's, in
    the base's order, with adaptools.provenance after general.architecture."""
    base = bases[0]
    result = cli_runner("merge", base, ADAPTERS / "llama-lora", tmp_path / "out.gguf")
    assert result.exit_code == 0, result.output

    def stored(path):
        reader = gguf.GGUFReader(path)
        return {k: bytes(reader.data[f.offset:f.offset + sum(int(p.nbytes) for p in f.parts)])
                for k, f in reader.fields.items() if not k.startswith("GGUF.")}

    got, want = stored(tmp_path / "out.gguf"), stored(base)
    assert list(got) == ["general.architecture", "adaptools.provenance", *list(want)[1:]]
    got.pop("adaptools.provenance")
    assert got == want
    assert any(len(v) > 100 for v in want.values())  # the token list among them


# --- hostile headers: what gguf-py's reader refuses, refused the same way --------------------------------------


def kv(key: str | bytes, vtype: int, value: bytes) -> bytes:
    name = key.encode() if isinstance(key, str) else key
    return struct.pack("<Q", len(name)) + name + struct.pack("<I", vtype) + value


def header(*kvs: bytes, version: int = 3, tensors: bytes = b"", n_tensors: int = 0) -> bytes:
    body = b"GGUF" + struct.pack("<IQQ", version, n_tensors, len(kvs)) + b"".join(kvs) + tensors
    return body + bytes(-len(body) % 32)


ARCH = kv("general.architecture", 8, struct.pack("<Q", 5) + b"llama")


def tensor_info(name: str, ne: list[int], qtype: int, offset: int) -> bytes:
    return (struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", len(ne))
            + b"".join(struct.pack("<Q", d) for d in ne) + struct.pack("<IQ", qtype, offset))


HOSTILE = {
    "a key given twice": header(ARCH, kv("a.b", 4, struct.pack("<I", 1)), kv("a.b", 4, struct.pack("<I", 2))),
    "a key that is not UTF-8": header(ARCH, kv(b"a.\xff", 4, b"\0" * 4)),
    "general.alignment of another type": header(ARCH, kv("general.alignment", 5, struct.pack("<i", 64))),
    "general.alignment not a power of two": header(ARCH, kv("general.alignment", 4, struct.pack("<I", 48))),
    "general.alignment zero": header(ARCH, kv("general.alignment", 4, struct.pack("<I", 0))),
    "version 1": header(ARCH, version=1),
    "a tensor named twice": header(ARCH, n_tensors=2, tensors=tensor_info("t", [32], 0, 0)
                                   + tensor_info("t", [32], 0, 128)) + bytes(256),
    "an unknown tensor type": header(ARCH, n_tensors=1, tensors=tensor_info("t", [32], 99, 0)) + bytes(256),
    "rows that are not whole blocks": header(ARCH, n_tensors=1, tensors=tensor_info("t", [48], 8, 0)) + bytes(256),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_headers_gguf_py_refuses_are_refused_in_one_line(case, tmp_path, cli_runner):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(HOSTILE[case])
    with pytest.raises(Exception):  # noqa: B017 (any of numpy's, struct's, gguf-py's own)
        gguf.GGUFReader(bad)
    result = cli_runner("merge", bad, ADAPTERS / "llama-lora", tmp_path / "out.gguf")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "bad.gguf" in lines[0], result.stderr
    assert "not a readable GGUF file" in lines[0], lines[0]
    assert "Traceback" not in result.output and not (tmp_path / "out.gguf").exists()


def test_a_string_value_that_is_not_utf8_is_copied_as_gguf_pys_reader_would(tmp_path, cli_runner):
    """gguf-py decodes a string only when it is read: a base whose general.name is not UTF-8 opens, merges and
    keeps those bytes."""
    base = write_base(BASES / "llama", tmp_path / "base.gguf", Q.Q8_0)
    data = base.read_bytes()
    at = data.index(b"tiny")  # general.name's value (EXTRA in gguf_bases)
    base.write_bytes(data[:at] + b"t\xffny" + data[at + 4:])
    gguf.GGUFReader(base)  # gguf-py opens it
    result = cli_runner("merge", base, ADAPTERS / "llama-lora", tmp_path / "out.gguf")
    assert result.exit_code == 0, result.output
    assert b"t\xffny" in (tmp_path / "out.gguf").read_bytes()
