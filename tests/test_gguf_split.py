"""Split GGUF models (plugins/gguf/split.py): sets made by gguf-py's own split writer (``GGUFWriter`` with
``split_max_tensors`` / ``split_max_size``) read as merge and dequantize bases, and split outputs
(``--shard-size``) laid out, named and keyed as gguf-py's writer lays out the same file. The slow test in
test_gguf_merge_llamacpp.py loads a split output in llama.cpp."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest
from conftest import ADAPTERS, BASES
from gguf import GGMLQuantizationType as Q
from gguf_bases import SPLIT_KEYS, metadata, raw, split_with_gguf_py, write_base, write_bpe_llama


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def raw_set(parts: list[Path]) -> dict[str, tuple[Q, bytes]]:
    """Every tensor of a set of parts, in order (a tensor in two parts fails)."""
    out: dict[str, tuple[Q, bytes]] = {}
    for part in parts:
        for name, value in raw(part).items():
            assert name not in out, name
            out[name] = value
    return out


def layout(parts: list[Path]) -> list[tuple[str, list[str], dict]]:
    """Each part's name, tensor names in order, and metadata (without adaptools' provenance)."""
    out = []
    for part in parts:
        keys = metadata(part)
        keys.pop("adaptools.provenance", None)
        out.append((part.name, [t.name for t in gguf.GGUFReader(part).tensors], keys))
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny Llama in Q8_0 (metadata of every type), and the same file split in three by gguf-py. (GGUF's
    default alignment: gguf-py's split writer aligns every part to a custom ``general.alignment`` but writes
    the key in the first part only, so that readers misplace the other parts' tensors; see
    test_a_custom_alignment_stays_in_the_first_part.)"""
    tmp = tmp_path_factory.mktemp("gguf-split")
    whole = write_base(BASES / "llama", tmp / "llama-q8.gguf", Q.Q8_0)
    (tmp / "set").mkdir()
    parts = split_with_gguf_py(whole, tmp / "set" / "llama.gguf", split_max_tensors=9)
    assert [p.name for p in parts] == [f"llama-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    return whole, parts


def merge(cli_runner, base, out, *extra, adapter="llama-lora"):
    return cli_runner("merge", base, ADAPTERS / adapter, out, *extra)


# --- split bases -----------------------------------------------------------------------------------------------


def test_a_split_base_merges_to_the_tensors_and_metadata_of_the_whole_file(base, tmp_path, cli_runner):
    whole, parts = base
    ok(merge(cli_runner, whole, tmp_path / "whole.gguf"))
    ok(merge(cli_runner, parts[0], tmp_path / "from-parts.gguf"))
    assert raw(tmp_path / "from-parts.gguf") == raw(tmp_path / "whole.gguf")
    assert list(raw(tmp_path / "from-parts.gguf")) == list(raw(whole))  # the base's order, across parts
    got, want = metadata(tmp_path / "from-parts.gguf"), metadata(tmp_path / "whole.gguf")
    assert json.loads(got.pop("adaptools.provenance")[1])["base"]["files"][0]["file"] == parts[0].name
    want.pop("adaptools.provenance")
    assert got == want  # the set's split keys are not carried into an unsplit output
    assert not SPLIT_KEYS & set(got)


def test_dequantize_reads_a_split_base_as_the_whole_file(base, tmp_path, cli_runner):
    """``dequantize`` of a GGUF base writes it as one GGUF file (a split set joined), as of the whole file."""
    whole, parts = base
    ok(cli_runner("dequantize", whole, tmp_path / "whole.gguf"))
    ok(cli_runner("dequantize", parts[0], tmp_path / "joined.gguf"))
    assert raw(tmp_path / "joined.gguf") == raw(tmp_path / "whole.gguf") == raw(whole)


def test_a_split_base_gives_convert_the_architecture_of_the_whole_file(base, tmp_path, cli_runner):
    whole, parts = base
    for name, ref in (("whole", whole), ("parts", parts[0])):
        ok(cli_runner("convert", ADAPTERS / "llama-lora", tmp_path / f"{name}.gguf", "--to", "gguf", "--base", ref))
    assert raw(tmp_path / "parts.gguf") == raw(tmp_path / "whole.gguf")
    got, want = metadata(tmp_path / "parts.gguf"), metadata(tmp_path / "whole.gguf")
    assert {k: v for k, v in got.items() if k != "adaptools.provenance"} == {
        k: v for k, v in want.items() if k != "adaptools.provenance"}


def test_a_split_set_made_by_size_merges_as_well(base, tmp_path, cli_runner):
    whole, _ = base
    (tmp_path / "set").mkdir()
    parts = split_with_gguf_py(whole, tmp_path / "set" / "m.gguf", split_max_size=20_000)
    assert len(parts) > 3
    ok(merge(cli_runner, whole, tmp_path / "whole.gguf"))
    ok(merge(cli_runner, parts[0], tmp_path / "out.gguf"))
    assert raw(tmp_path / "out.gguf") == raw(tmp_path / "whole.gguf")


# --- split outputs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_size", [20_000, 60_000])
def test_a_split_output_is_laid_out_as_gguf_py_splits_the_merged_file(max_size, base, tmp_path, cli_runner):
    """The parts, their names, tensors and keys are those gguf-py's split writer makes of the unsplit merged
    file with the same limit; every tensor's bytes are the unsplit merge's."""
    whole, _ = base
    ok(merge(cli_runner, whole, tmp_path / "one.gguf"))
    (tmp_path / "ref").mkdir()
    want = split_with_gguf_py(tmp_path / "one.gguf", tmp_path / "ref" / "out.gguf", split_max_size=max_size)
    (tmp_path / "mine").mkdir()
    result = ok(merge(cli_runner, whole, tmp_path / "mine" / "out.gguf", "--shard-size", str(max_size), "--json"))
    got = sorted((tmp_path / "mine").iterdir())
    assert [p.name for p in got] == [p.name for p in want] and len(got) > 1
    assert json.loads(result.stdout)["output"] == str(got[0])
    assert layout(got) == layout(want)
    assert raw_set(got) == raw(tmp_path / "one.gguf")
    for part in got:  # each part says what wrote it, so that --force knows it
        assert "adaptools.provenance" in metadata(part)


def test_one_part_keeps_the_output_name_and_writes_no_split_keys(base, tmp_path, cli_runner):
    whole, _ = base
    ok(merge(cli_runner, whole, tmp_path / "out.gguf", "--shard-size", "1GB"))
    assert [p.name for p in tmp_path.iterdir()] == ["out.gguf"]
    assert not SPLIT_KEYS & set(metadata(tmp_path / "out.gguf"))


def test_a_split_output_of_a_split_base_reads_back_as_a_base(base, tmp_path, cli_runner):
    whole, parts = base
    ok(merge(cli_runner, parts[0], tmp_path / "out.gguf", "--shard-size", "30KB"))
    first = tmp_path / "out-00001-of-00004.gguf"
    assert first.is_file(), sorted(p.name for p in tmp_path.iterdir())
    ok(merge(cli_runner, whole, tmp_path / "one.gguf"))
    assert raw_set(sorted(tmp_path.glob("out-*.gguf"))) == raw(tmp_path / "one.gguf")
    ok(merge(cli_runner, first, tmp_path / "again.gguf", adapter="llama-layers"))  # the parts as a base
    # --force replaces the parts adaptools wrote; without it, an existing part is refused
    again = merge(cli_runner, whole, tmp_path / "out.gguf", "--shard-size", "30KB")
    assert again.exit_code == 2 and "already exists" in again.stderr
    ok(merge(cli_runner, whole, tmp_path / "out.gguf", "--shard-size", "30KB", "--force"))


def test_a_custom_alignment_stays_in_the_first_part(tmp_path, cli_runner):
    """The first part keeps the base's ``general.alignment``; the others carry no such key and are aligned
    to GGUF's default, as gguf-py's reader (and llama.cpp's) reads each part."""
    whole = write_base(BASES / "llama", tmp_path / "base.gguf", Q.Q8_0, alignment=64)
    ok(merge(cli_runner, whole, tmp_path / "one.gguf"))
    (tmp_path / "mine").mkdir()
    ok(merge(cli_runner, whole, tmp_path / "mine" / "out.gguf", "--shard-size", "20000"))
    got = sorted((tmp_path / "mine").iterdir())
    assert len(got) > 2 and raw_set(got) == raw(tmp_path / "one.gguf")
    assert [gguf.GGUFReader(p).alignment for p in got] == [64] + [32] * (len(got) - 1)
    assert [("general.alignment" in metadata(p)) for p in got] == [True] + [False] * (len(got) - 1)


@pytest.fixture(scope="module")
def bpe_llama(tmp_path_factory):
    return write_bpe_llama(tmp_path_factory.mktemp("bpe-llama"))


def test_a_dense_base_into_split_gguf(bpe_llama, tmp_path, cli_runner):
    """``--to gguf`` from a Hugging Face base, split: the metadata (vocabulary included) in the first part."""
    args = (bpe_llama / "base", bpe_llama / "adapter")
    ok(cli_runner("merge", *args, tmp_path / "one.gguf", "--outtype", "f32"))
    (tmp_path / "ref").mkdir()
    want = split_with_gguf_py(tmp_path / "one.gguf", tmp_path / "ref" / "out.gguf", split_max_size=40_000)
    (tmp_path / "mine").mkdir()
    ok(cli_runner("merge", *args, tmp_path / "mine" / "out.gguf", "--outtype", "f32", "--shard-size", "40000"))
    got = sorted((tmp_path / "mine").iterdir())
    assert len(got) > 1 and layout(got) == layout(want)
    assert raw_set(got) == raw(tmp_path / "one.gguf")


# --- hostile sets: one line naming the part, exit 2, nothing written --------------------------------------------


def refused(result, tmp_path, *expected):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for text in expected:
        assert text in lines[0], lines[0]
    assert not list(tmp_path.glob("*out*")), sorted(p.name for p in tmp_path.iterdir())
    return lines[0]


def copy_set(parts: list[Path], tmp_path: Path) -> list[Path]:
    (tmp_path / "set").mkdir(exist_ok=True)
    return [Path(shutil.copy(p, tmp_path / "set" / p.name)) for p in parts]


def missing_part(parts, tmp_path):
    copy_set(parts, tmp_path)[1].unlink()
    return "llama-00002-of-00003.gguf", "part 2 of this GGUF model split in 3 is missing"


def part_of_another_set(parts, tmp_path):
    """Part 2 taken from the same model split in two: its split.count says 2."""
    mine = copy_set(parts, tmp_path)
    (tmp_path / "other").mkdir()
    other = split_with_gguf_py(parts[0].parent.parent / "llama-q8.gguf", tmp_path / "other" / "llama.gguf",
                               split_max_tensors=14)
    shutil.copy(other[1], mine[1])
    return "llama-00002-of-00003.gguf", "not part 2 of this set"


def other_tensor_count(parts, tmp_path):
    """A part whose split.tensors.count differs from the first part's."""
    mine = copy_set(parts, tmp_path)
    data = bytearray(mine[2].read_bytes())
    field = gguf.GGUFReader(mine[2]).get_field("split.tensors.count")
    at = field.offset + sum(p.nbytes for p in field.parts[:-1])
    data[at:at + 4] = (99).to_bytes(4, "little")
    mine[2].write_bytes(bytes(data))
    return "llama-00003-of-00003.gguf", "not part 3 of this set"


def duplicate_tensor(parts, tmp_path):
    """Part 3 rewritten to hold part 2's first tensor under its own name (same counts): a tensor twice."""
    mine = copy_set(parts, tmp_path)
    second, third = gguf.GGUFReader(mine[1]), gguf.GGUFReader(mine[2])
    twice = second.tensors[0].name
    data = bytearray(mine[2].read_bytes())
    name = third.tensors[0].field.parts[1]  # the first tensor info's name bytes
    assert len(name.tobytes()) >= len(twice)
    at = third.tensors[0].field.offset
    new = twice.encode()
    data[at:at + 8] = len(new).to_bytes(8, "little")
    data[at + 8:at + 8 + len(new)] = new
    tail = third.tensors[0].field.offset + 8 + len(name.tobytes())
    data[at + 8 + len(new):tail] = b""  # the name shortened: move the rest of the header up
    gap = len(name.tobytes()) - len(new)
    # keep every offset: pad at the end of the tensor infos, before the (aligned) data
    start = third.data_offset - gap
    data[start:start] = bytes(gap)
    mine[2].write_bytes(bytes(data))
    assert [t.name for t in gguf.GGUFReader(mine[2]).tensors][0] == twice
    return "llama-00003-of-00003.gguf", "tensor stored twice"


def truncated_part(parts, tmp_path):
    mine = copy_set(parts, tmp_path)
    data = mine[2].read_bytes()
    mine[2].write_bytes(data[: len(data) - 1000])
    return "llama-00003-of-00003.gguf", "not a readable GGUF file"


def not_the_first_part(parts, tmp_path):
    copy_set(parts, tmp_path)
    return "llama-00002-of-00003.gguf", "this is part 2 of a GGUF model split in 3", "llama-00001-of-00003.gguf"


def first_part_renamed(parts, tmp_path):
    mine = copy_set(parts, tmp_path)
    mine[0].rename(mine[0].with_name("llama.gguf"))
    return "llama.gguf", "not named PREFIX-00001-of-00003.gguf"


def tensors_do_not_add_up(parts, tmp_path):
    """Every part says the set has 30 tensors; the parts hold fewer."""
    mine = copy_set(parts, tmp_path)
    for part in mine:
        data = bytearray(part.read_bytes())
        field = gguf.GGUFReader(part).get_field("split.tensors.count")
        at = field.offset + sum(p.nbytes for p in field.parts[:-1])
        data[at:at + 4] = (30).to_bytes(4, "little")
        part.write_bytes(bytes(data))
    held = sum(len(gguf.GGUFReader(part).tensors) for part in mine)
    return "llama-00001-of-00003.gguf", f"the parts hold {held} tensors; the first part says the set has 30"


HOSTILE = {"a missing part": missing_part, "a part of another set": part_of_another_set,
           "a part with another tensor count": other_tensor_count, "a tensor in two parts": duplicate_tensor,
           "a truncated part": truncated_part, "not the first part": not_the_first_part,
           "a first part not named as llama.cpp finds it": first_part_renamed,
           "tensors that do not add up": tensors_do_not_add_up}


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("command", ["merge", "dequantize"])
def test_hostile_split_sets_are_one_line_exit_2_and_nothing_written(case, command, base, tmp_path, cli_runner):
    _, parts = base
    named, *expected = HOSTILE[case](parts, tmp_path)
    given = {"not the first part": "llama-00002-of-00003.gguf", "a first part not named as llama.cpp finds it":
             "llama.gguf"}.get(case, "llama-00001-of-00003.gguf")
    args = (ADAPTERS / "llama-lora",) if command == "merge" else ()
    line = refused(cli_runner(command, tmp_path / "set" / given, *args, tmp_path / "out.gguf"), tmp_path, *expected)
    assert named in line


def test_a_one_file_container_that_does_not_split_refuses_shard_size(base, tmp_path, cli_runner, monkeypatch):
    """The engine asks the container (``splits``); one that cannot split says so before anything is read."""
    from adaptools_plugins.gguf.container import GGUFContainer

    monkeypatch.setattr(GGUFContainer, "splits", False)
    refused(merge(cli_runner, base[0], tmp_path / "out.gguf", "--shard-size", "1MB"), tmp_path,
            "a gguf output is one file; --shard-size does not apply")


def test_the_logits_check_reads_the_weight_type_across_the_parts(base, tmp_path, cli_runner):
    """``--check logits`` picks its tolerance from the type of most weights: of the whole set, not of the first
    part (which here holds F32 norms and one Q8_0 matrix)."""
    from adaptools_plugins.validators.gguf_logits import parts, weight_type

    whole, _ = base
    ok(merge(cli_runner, whole, tmp_path / "out.gguf", "--shard-size", "10KB"))
    got = sorted(tmp_path.glob("out-*.gguf"))
    assert len(parts(str(got[0]))) == len(got) > 2
    assert [t.name for r in parts(str(got[0])) for t in r.tensors] == list(raw(whole))
    assert weight_type(str(got[0])) == "Q8_0"
