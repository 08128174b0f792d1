"""Merging into GGUF bases (plugins/gguf/backend.py, container.py) and dense bases into GGUF
(plugins/gguf/export.py), without llama.cpp: the oracle is PEFT's merge_and_unload on the same (decoded) weights and
gguf-py's own encoders; test_gguf_llamacpp.py runs llama.cpp itself on the outputs (slow)."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from conftest import ADAPTERS, BASES
from gguf import GGMLQuantizationType as Q
from gguf_bases import decoded, finish, kquant_bytes, metadata, raw, write_base, write_bpe_llama
from peft_oracle import load_base

import adaptools
from adaptools.outputs import is_ours
from adaptools.plugin import Checkpoint
from adaptools_plugins.gguf import arch as gguf_arch
from adaptools_plugins.gguf import codec as gguf_codec
from adaptools_plugins.gguf.container import SNIFF_BYTES

LLAMA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def merge(cli_runner, base, adapter, out, *extra):
    return cli_runner("merge", base, adapter, out, *extra)


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def peft_merged_gguf(hf_dir, gguf_base, adapter_dir) -> dict[str, np.ndarray]:
    """PEFT's merge_and_unload on the Hugging Face model carrying the GGUF base's decoded weights, put in
    GGUF layout: what every changed tensor must hold before it is encoded."""
    from peft import PeftModel

    model = gguf_arch.describe_base(str(hf_dir))
    values = decoded(gguf_base)
    base = load_base(hf_dir)
    state = base.state_dict()
    for name in state:
        gname = model.gguf_name(name)
        if gname in values:
            state[name] = gguf_arch.from_gguf_layout(model, gname, torch.from_numpy(values[gname]))
    base.load_state_dict(state)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().state_dict()
    out = {}
    for name, value in merged.items():
        gname = model.gguf_name(name)
        if gname in values:
            out[gname] = gguf_arch.to_gguf_layout(model, gname, value.detach().float()).numpy()
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf-bases")
    return {"llama-f32": write_base(BASES / "llama", tmp / "llama-f32.gguf"),
            "llama-q8": write_base(BASES / "llama", tmp / "llama-q8.gguf", Q.Q8_0, alignment=64),
            "llama-f16": write_base(BASES / "llama", tmp / "llama-f16.gguf", Q.F16),
            "gpt2-f32": write_base(BASES / "gpt2", tmp / "gpt2-f32.gguf"),
            "qwen2-q4": write_base(BASES / "qwen2", tmp / "qwen2-q4.gguf", Q.Q4_0)}


# --- merged values --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base,hf,adapter", [("llama-f32", "llama", "llama-lora"),
                                             ("llama-f32", "llama", "llama-rslora-patterns"),
                                             ("gpt2-f32", "gpt2", "gpt2-lora"), ("llama-f16", "llama", "llama-lora")])
def test_f32_and_f16_bases_merge_as_peft_does(base, hf, adapter, bases, tmp_path, cli_runner):
    """Every tensor equals PEFT's merged weight in GGUF layout, rounded once to the base's type (Q/K rows in
    ggml's order, GPT-2's Conv1D weights transposed)."""
    ok(merge(cli_runner, bases[base], ADAPTERS / adapter, tmp_path / "out.gguf"))
    want = peft_merged_gguf(BASES / hf, bases[base], ADAPTERS / adapter)
    got, before = raw(tmp_path / "out.gguf"), raw(bases[base])
    changed = 0
    for name, (qtype, data) in got.items():
        assert qtype == before[name][0], name
        expected = gguf_codec.encode(want[name], qtype).tobytes() if name in want else before[name][1]
        assert data == expected, name
        changed += data != before[name][1]
    assert changed >= 6


def test_q8_0_base_changed_tensors_are_q8_0_of_the_peft_merge(bases, tmp_path, cli_runner):
    result = ok(merge(cli_runner, bases["llama-q8"], ADAPTERS / "llama-lora", tmp_path / "out.gguf", "--json"))
    summary = json.loads(result.stdout)
    want = peft_merged_gguf(BASES / "llama", bases["llama-q8"], ADAPTERS / "llama-lora")
    got, before = raw(tmp_path / "out.gguf"), raw(bases["llama-q8"])
    merged = [n for n in got if got[n][1] != before[n][1]]
    assert len(merged) == summary["tensors_merged"] == 14  # 7 projections x 2 layers
    for name in merged:
        assert got[name] == (Q.Q8_0, gguf_codec.encode(want[name], Q.Q8_0).tobytes()), name
    # untouched tensors (norms, embedding) are the base's bytes, and so is every metadata key
    assert summary["tensors_copied"] == len(got) - 14
    assert all(got[n] == before[n] for n in got if n not in merged)
    # a survival report for each changed tensor, as for NF4 --requantize
    assert sorted(s["tensor"] for s in summary["survival"]) == sorted(
        gguf_arch.describe_base(str(BASES / "llama")).hf_module(n, 2) + ".weight" for n in merged)
    assert all(0 < s["retained"] and s["delta_norm"] > 0 for s in summary["survival"])
    assert summary["warnings"] == []  # Q8_0 stays Q8_0


def test_metadata_and_alignment_are_kept_and_provenance_added(bases, tmp_path, cli_runner):
    ok(merge(cli_runner, bases["llama-q8"], ADAPTERS / "llama-lora", tmp_path / "out.gguf"))
    before, after = metadata(bases["llama-q8"]), metadata(tmp_path / "out.gguf")
    provenance = after.pop("adaptools.provenance")
    assert after == before  # every key, type and value, the empty string and unicode tokens included
    assert list(after)[0] == "general.architecture"
    record = json.loads(provenance[1])
    assert record["operation"] == "merge" and record["base"]["files"][0]["file"] == "llama-q8.gguf"
    assert record["adapters"][0]["source"] == str(ADAPTERS / "llama-lora")
    head = (tmp_path / "out.gguf").read_bytes()[:SNIFF_BYTES]
    assert b"adaptools.provenance" in head and is_ours(tmp_path / "out.gguf")
    reader = gguf.GGUFReader(tmp_path / "out.gguf")
    assert reader.alignment == 64 and all(t.data_offset % 64 == 0 for t in reader.tensors)
    assert [t.name for t in reader.tensors] == [t.name for t in gguf.GGUFReader(bases["llama-q8"]).tensors]


def test_k_quant_tensors_keep_their_type(tmp_path, cli_runner):
    """A base with 256-wide rows whose projections are Q4_K, Q6_K and Q5_K (random blocks, small scales):
    changed ones come out in their own type, the bytes of our K-quant encoder (ggml's reference quantizer,
    tests/test_gguf_kquants.py) on PEFT's merge of the decoded weights; an untouched K-quant keeps its bytes."""
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                      max_position_embeddings=64, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    kquant = {"blk.0.attn_q.weight": Q.Q4_K, "blk.0.attn_k.weight": Q.Q6_K, "blk.0.ffn_down.weight": Q.Q5_K,
              "blk.0.ffn_up.weight": Q.Q4_K}
    base = write_base(tmp_path / "hf", tmp_path / "base.gguf", Q.Q8_0, kquant=kquant)
    peft = get_peft_model(load_base(tmp_path / "hf"), LoraConfig(r=4, lora_alpha=8,
                                                                  target_modules=["q_proj", "k_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    peft.save_pretrained(tmp_path / "adapter")
    result = ok(merge(cli_runner, base, tmp_path / "adapter", tmp_path / "out.gguf", "--json"))
    summary = json.loads(result.stdout)
    assert summary["warnings"] == [] and "warning: " not in result.stderr  # no type changed
    want = peft_merged_gguf(tmp_path / "hf", base, tmp_path / "adapter")
    got, before = raw(tmp_path / "out.gguf"), raw(base)
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_down.weight"):
        assert got[name] == (kquant[name], gguf_codec.encode(want[name], kquant[name]).tobytes()), name
        assert got[name] != before[name]
    assert got["blk.0.ffn_up.weight"] == before["blk.0.ffn_up.weight"]  # untouched: still Q4_K, same bytes
    assert len(summary["survival"]) == 3
    # what the output decodes to is within each type's rounding of PEFT's merge (per 256-value block,
    # relative to its largest magnitude: docs/validation.md)
    out = decoded(tmp_path / "out.gguf")
    for name, bound in (("blk.0.attn_q.weight", 2.0**-3), ("blk.0.attn_k.weight", 2.0**-5),
                        ("blk.0.ffn_down.weight", 2.0**-4)):
        scale = np.abs(want[name]).reshape(-1, 256).max(axis=1)
        error = np.abs(out[name] - want[name]).reshape(-1, 256).max(axis=1)
        assert (error <= bound * scale).all() and error.max() > 0, name


def test_outtype_sets_the_type_of_changed_tensors(bases, tmp_path, cli_runner):
    result = ok(merge(cli_runner, bases["qwen2-q4"], ADAPTERS / "qwen2-multi", tmp_path / "out.gguf", "--outtype",
                      "f16", "--json"))
    summary = json.loads(result.stdout)
    got, before = raw(tmp_path / "out.gguf"), raw(bases["qwen2-q4"])
    changed = {n for n in got if got[n] != before[n]}
    assert changed and {got[n][0] for n in changed} == {Q.F16}
    assert {before[n][0] for n in changed} == {Q.Q4_0}
    assert summary["warnings"] == [w for w in summary["warnings"] if "written as F16 (as asked (--outtype))" in w]
    want = peft_merged_gguf(BASES / "qwen2", bases["qwen2-q4"], ADAPTERS / "qwen2-multi")
    for name in changed:
        assert got[name][1] == want[name].astype(np.float16).tobytes(), name


def test_embedding_lora_on_a_tied_base_unties_the_output(bases, tmp_path, cli_runner):
    """The tiny llama is tied (no output.weight): an embedding LoRA changes token_embd, and, as in PEFT's
    unmerged model, the output keeps the original embedding, written as output.weight."""
    ok(merge(cli_runner, bases["llama-f32"], ADAPTERS / "llama-embedding", tmp_path / "out.gguf"))
    before, got = decoded(bases["llama-f32"]), decoded(tmp_path / "out.gguf")
    assert "output.weight" not in before
    np.testing.assert_array_equal(got["output.weight"], before["token_embd.weight"])
    want = peft_merged_gguf(BASES / "llama", bases["llama-f32"], ADAPTERS / "llama-embedding")
    np.testing.assert_array_equal(got["token_embd.weight"], want["token_embd.weight"])
    assert not np.array_equal(got["token_embd.weight"], before["token_embd.weight"])


def test_dry_run_and_force(bases, tmp_path, cli_runner):
    out = tmp_path / "out.gguf"
    plan = json.loads(ok(merge(cli_runner, bases["llama-q8"], ADAPTERS / "llama-layers", out, "--dry-run",
                               "--json")).stdout)
    assert plan["container"] == "gguf" and plan["index"] is None and plan["shards"][0]["file"] == "out.gguf"
    assert plan["merged"] and all(n.startswith("model.layers.") for n in plan["merged"]) and not out.exists()
    ok(merge(cli_runner, bases["llama-q8"], ADAPTERS / "llama-layers", out))
    again = merge(cli_runner, bases["llama-q8"], ADAPTERS / "llama-lora", out)
    assert again.exit_code == 2 and "already exists" in again.stderr
    ok(merge(cli_runner, bases["llama-q8"], ADAPTERS / "llama-lora", out, "--force"))  # ours: replaced
    assert raw(out)["blk.1.attn_q.weight"] != raw(bases["llama-q8"])["blk.1.attn_q.weight"]
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(bases["llama-q8"].read_bytes())
    refused = merge(cli_runner, bases["llama-q8"], ADAPTERS / "llama-lora", foreign, "--force")
    assert refused.exit_code == 2 and "not written by adaptools" in refused.stderr


def test_a_gguf_checkpoint_reads_with_hf_names_and_layout(bases):
    checkpoint = Checkpoint.open(bases["gpt2-f32"])
    hf = Checkpoint.open(BASES / "gpt2")
    mapped = [name for name in hf.location if name in checkpoint.location]
    for name in mapped:  # Conv1D weights transposed back, the fused c_attn included
        assert torch.equal(checkpoint.read(name), hf.read(name).float()), name
    assert len(mapped) == 17  # wte, and per block c_attn, c_proj, c_fc, mlp.c_proj weights and biases
    others = set(checkpoint.location) - set(mapped)  # norms and positions keep their GGUF names
    assert others == {"position_embd.weight", "output_norm.weight", "output_norm.bias",
                      *(f"blk.{i}.{n}_norm.{p}" for i in (0, 1) for n in ("attn", "ffn") for p in ("weight", "bias"))}
    assert checkpoint.aliases == {"lm_head.weight": "transformer.wte.weight"}


# --- refusals: one line, exit 2, nothing written ---------------------------------------------------------------


def refused(result, tmp_path, *expected):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for text in expected:
        assert text in lines[0], lines[0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))]
    return lines[0]


@pytest.mark.parametrize("adapter,expected", [
    ("gpt2-lora", "has no such tensor"),  # another architecture's modules do not map to this file
    ("llama-modules-to-save", "has no such tensor"),  # a saved norm/head module with no GGUF mapping
])
def test_modules_that_do_not_map_are_refused(adapter, expected, bases, tmp_path, cli_runner):
    result = merge(cli_runner, bases["llama-q8"], ADAPTERS / adapter, tmp_path / "out.gguf",
                   "--ignore-base-mismatch")
    refused(result, tmp_path, expected)


@pytest.mark.parametrize("extra,expected", [
    (("--dtype", "bf16"), "--dtype bf16 does not apply to a GGUF output"),
    (("--outtype", "q4_k"), "--outtype 'q4_k' is not one of f32, f16, bf16, q8_0"),
    (("--check", "perplexity", "--eval-text", str(BASES / "llama" / "config.json")),
     "--check perplexity runs on a checkpoint folder"),
    (("--check", "generate"), "--check generate runs on a checkpoint folder"),
    (("--to", "onnx"), "unknown output container 'onnx'"),
])
def test_options_a_gguf_output_cannot_honour(extra, expected, bases, tmp_path, cli_runner):
    refused(merge(cli_runner, bases["llama-q8"], ADAPTERS / "llama-lora", tmp_path / "out.gguf", *extra), tmp_path,
            expected)


def test_the_logits_check_of_a_gguf_output_without_llama_cpp_is_refused_before_writing(bases, tmp_path, cli_runner,
                                                                                        monkeypatch):
    """It runs in llama.cpp (tests/test_gguf_check_llamacpp.py); without llama-cpp-python, one line, nothing
    merged."""
    from adaptools_plugins.validators import llamacpp

    monkeypatch.setattr(llamacpp, "installed", lambda: False)
    refused(merge(cli_runner, bases["llama-q8"], ADAPTERS / "llama-lora", tmp_path / "out.gguf", "--check", "logits"),
            tmp_path, "--check logits of a GGUF output runs the model in llama.cpp", "pip install llama-cpp-python")


def test_a_gguf_base_into_a_folder_is_refused(bases, tmp_path, cli_runner):
    refused(merge(cli_runner, bases["llama-q8"], ADAPTERS / "llama-lora", tmp_path / "out"), tmp_path,
            "cannot become a checkpoint folder", "ending in .gguf")


def test_an_outtype_on_a_folder_output_is_refused(tmp_path, cli_runner):
    refused(merge(cli_runner, BASES / "llama", ADAPTERS / "llama-lora", tmp_path / "out", "--outtype", "f16"),
            tmp_path, "--outtype f16 applies to containers")


# --- hostile GGUF bases ----------------------------------------------------------------------------------------


def truncated(tmp_path, base):
    data = base.read_bytes()
    (tmp_path / "bad.gguf").write_bytes(data[: len(data) * 2 // 3])


def truncated_header(tmp_path, base):
    (tmp_path / "bad.gguf").write_bytes(base.read_bytes()[:200])


def not_gguf(tmp_path, base):
    (tmp_path / "bad.gguf").write_bytes(b"PK\x03\x04" + bytes(500))


def rewrite(tmp_path, base, change):
    """The base rewritten through gguf-py with ``change(name, array, qtype)`` -> (array, qtype, kvs)."""
    reader = gguf.GGUFReader(base)
    writer = gguf.GGUFWriter(tmp_path / "bad.gguf", "llama")
    writer.data_alignment = reader.alignment
    for field in reader.fields.values():
        if not field.name.startswith("GGUF.") and field.name != "general.architecture":
            sub = field.types[-1] if len(field.types) > 1 else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub)
    for t in reader.tensors:
        array, qtype = change(t.name, np.asarray(t.data), gguf.GGMLQuantizationType(t.tensor_type), writer)
        writer.add_tensor(t.name, array, raw_dtype=qtype)
    finish(writer)


def with_key(key: str, value, vtype: gguf.GGUFValueType):
    """A hostile-base maker: the base rewritten with ``key`` (re)set to ``value`` of type ``vtype``."""
    def change(name, array, qtype, writer):
        writer.add_key_value(key, value, vtype)
        return array, qtype
    return lambda tmp_path, base: rewrite(tmp_path, base, change)


heads_as_string = with_key("llama.attention.head_count", "four", gguf.GGUFValueType.STRING)
rows_not_heads = with_key("llama.attention.head_count", 5, gguf.GGUFValueType.UINT32)


def patched(tmp_path, base, part: int, value: int, size: int) -> None:
    """The base with one field of the last tensor's info (-1: its offset, -2: its type) overwritten."""
    data = bytearray(base.read_bytes())
    reader = gguf.GGUFReader(base)
    info = max(reader.tensors, key=lambda t: t.data_offset).field  # name, dims, type, offset
    where = info.offset + sum(p.nbytes for p in info.parts[:part])
    data[where:where + size] = value.to_bytes(size, "little")
    (tmp_path / "bad.gguf").write_bytes(bytes(data))


def data_past_the_end(tmp_path, base):
    patched(tmp_path, base, -1, base.stat().st_size, 8)


def unknown_type(tmp_path, base):
    patched(tmp_path, base, -2, 99, 4)


def rows_not_whole_blocks(tmp_path, base):
    patched(tmp_path, base, -2, int(Q.Q4_K), 4)  # a 64-wide tensor as 256-value blocks


def an_adapter(tmp_path, base):
    writer = gguf.GGUFWriter(tmp_path / "bad.gguf", "llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 8.0)
    writer.add_tensor("blk.0.attn_v.weight.lora_a", np.ones((4, 64), np.float32))
    writer.add_tensor("blk.0.attn_v.weight.lora_b", np.ones((32, 4), np.float32))
    finish(writer)


a_split_part = with_key("split.count", 3, gguf.GGUFValueType.UINT16)


def no_head_count(tmp_path, base):
    reader = gguf.GGUFReader(base)
    writer = gguf.GGUFWriter(tmp_path / "bad.gguf", "llama")
    writer.add_type("model")
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=gguf.GGMLQuantizationType(t.tensor_type))
    finish(writer)


HOSTILE = {
    "truncated": (truncated, "not a readable GGUF file"),
    "truncated header": (truncated_header, "not a readable GGUF file"),
    "not GGUF at all": (not_gguf, "does not start with the GGUF magic"),
    "head count stored as a string": (heads_as_string, "llama.attention.head_count is STRING"),
    "Q/K rows that do not split into the heads": (rows_not_heads, "do not split into 5 attention heads"),
    "unknown tensor type": (unknown_type, "not a readable GGUF file"),
    "rows that are not whole blocks of the type": (rows_not_whole_blocks, "not a readable GGUF file"),
    "tensor data past the end": (data_past_the_end, "not a readable GGUF file"),
    "an adapter, not a model": (an_adapter, "an adapter, not a base model"),
    "one part of a split file": (a_split_part, "split in 3"),
    "no head count": (no_head_count, "no llama.attention.head_count"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_gguf_bases_are_one_line_exit_2_and_nothing_written(case, bases, tmp_path, cli_runner):
    make, expected = HOSTILE[case]
    make(tmp_path, bases["llama-q8"])
    line = refused(merge(cli_runner, tmp_path / "bad.gguf", ADAPTERS / "llama-lora", tmp_path / "out.gguf"),
                   tmp_path, expected)
    assert "bad.gguf" in line


def test_k_quant_blocks_decode_finite():
    """The K-quant stand-ins the tests write decode to small finite values (else the test base is garbage)."""
    for qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        values = gguf_codec.decode_bytes(kquant_bytes((4, 256), qtype, 1), qtype, (4, 256))
        assert np.isfinite(values).all() and 0 < np.abs(values).max() < 10


# --- a dense Hugging Face base into one GGUF file (--to gguf) ---------------------------------------------------

@pytest.fixture(scope="module")
def bpe_llama(tmp_path_factory):
    return write_bpe_llama(tmp_path_factory.mktemp("bpe-llama"))


@pytest.mark.parametrize("outtype,weights", [(None, Q.F16), ("q8_0", Q.Q8_0), ("f32", Q.F32), ("bf16", Q.BF16)])
def test_dense_base_into_one_gguf_file(outtype, weights, bpe_llama, tmp_path, cli_runner):
    """Tensors: the folder merge (bf16, as PEFT merges in the base's dtype) in GGUF names and layout, weights in
    --outtype (F16 by default), norms in F32. Metadata: what llama.cpp needs to run it, vocabulary included."""
    extra = ("--outtype", outtype) if outtype else ()
    result = ok(merge(cli_runner, bpe_llama / "base", bpe_llama / "adapter", tmp_path / "out.gguf", *extra))
    assert "converted" in result.stdout
    ok(merge(cli_runner, bpe_llama / "base", bpe_llama / "adapter", tmp_path / "folder"))
    model = gguf_arch.describe_base(str(bpe_llama / "base"))
    folder = Checkpoint.open(tmp_path / "folder")
    got = raw(tmp_path / "out.gguf")
    assert len(got) == len(folder.location)
    for name in folder.location:
        gname = model.gguf_name(name)
        value = gguf_arch.to_gguf_layout(model, gname, folder.read(name).float()).numpy()
        qtype = Q.F32 if value.ndim == 1 else weights
        assert got[gname] == (qtype, gguf_codec.encode(value, qtype).tobytes()), gname
    meta = {k: v for k, (_, v) in metadata(tmp_path / "out.gguf").items()}
    assert {k: meta[k] for k in ("general.architecture", "general.type", "llama.block_count", "llama.context_length",
                                 "llama.embedding_length", "llama.feed_forward_length", "llama.attention.head_count",
                                 "llama.attention.head_count_kv", "llama.vocab_size", "llama.rope.dimension_count",
                                 "llama.attention.key_length", "tokenizer.ggml.model", "tokenizer.ggml.pre",
                                 "tokenizer.ggml.bos_token_id")} == {
        "general.architecture": "llama", "general.type": "model", "llama.block_count": 2,
        "llama.context_length": 128, "llama.embedding_length": 64, "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.vocab_size": 300,
        "llama.rope.dimension_count": 16, "llama.attention.key_length": 16, "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 0}
    assert meta["general.file_type"] == int({Q.F16: 1, Q.Q8_0: 7, Q.F32: 0, Q.BF16: 32}[weights])
    assert meta["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = json.loads((bpe_llama / "base" / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(tokens) == len(types) == 300
    assert all(tokens[i] == t for t, i in vocab.items())
    assert tokens[0] == "<|endoftext|>" and types[0] == gguf.TokenType.CONTROL
    assert tokens[len(vocab):] == [f"[PAD{i}]" for i in range(len(vocab), 300)]
    assert set(types[len(vocab):]) == {gguf.TokenType.UNUSED} and set(types[1:len(vocab)]) == {gguf.TokenType.NORMAL}
    assert len(meta["tokenizer.ggml.merges"]) > 10 and "adaptools.provenance" in meta


@pytest.mark.parametrize("make,expected", [
    (lambda tmp: BASES / "llama", "not a byte-level BPE vocabulary (WordLevel)"),
    (lambda tmp: BASES / "qwen2", "Llama-family models for now, not qwen2"),
    (lambda tmp: BASES / "llama-nf4", "needs a dense base"),
])
def test_dense_bases_gguf_cannot_hold_are_refused(make, expected, tmp_path, cli_runner):
    adapter = ADAPTERS / ("qwen2-multi" if "qwen2" in expected else "llama-lora")
    refused(merge(cli_runner, make(tmp_path), adapter, tmp_path / "out.gguf", "--to", "gguf"), tmp_path, expected)


def copy_base(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_what_the_tokenizer_or_config_cannot_say_is_refused(bpe_llama, tmp_path, cli_runner):
    adapter = bpe_llama / "adapter"
    scaled = copy_base(bpe_llama / "base", tmp_path / "scaled",
                       rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    refused(merge(cli_runner, scaled, adapter, tmp_path / "out.gguf"), tmp_path, "RoPE scaling 'linear'")
    spm = copy_base(bpe_llama / "base", tmp_path / "spm")
    (spm / "tokenizer.json").unlink()
    (spm / "tokenizer.model").write_bytes(b"\x00")
    refused(merge(cli_runner, spm, adapter, tmp_path / "out.gguf"), tmp_path, "SentencePiece tokenizer.model")
    (spm / "tokenizer.model").unlink()
    refused(merge(cli_runner, spm, adapter, tmp_path / "out.gguf"), tmp_path, "the base has no tokenizer")
    other = copy_base(bpe_llama / "base", tmp_path / "other")
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Whitespace"}
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    refused(merge(cli_runner, other, adapter, tmp_path / "out.gguf"), tmp_path, "no pre-tokenizer name",
            "Whitespace")


def test_pre_tokenizer_names_follow_the_tokenizer_structure():
    from adaptools_plugins.gguf.export import LLAMA3_SPLIT, pre_tokenizer

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert pre_tokenizer({"pre_tokenizer": byte_level}, "t") == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    smollm = {"type": "Sequence", "pretokenizers": [digits, byte_level]}
    assert pre_tokenizer({"pre_tokenizer": smollm}, "t") == "smollm"
    split = {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False}
    llama3 = {"type": "Sequence", "pretokenizers": [split, {**byte_level, "use_regex": False}]}
    assert pre_tokenizer({"pre_tokenizer": llama3}, "t") == "llama-bpe"
    for wrong in ({**byte_level, "use_regex": False}, {"type": "Sequence", "pretokenizers": [byte_level, digits]}):
        with pytest.raises(adaptools.UnsupportedOperationError):
            pre_tokenizer({"pre_tokenizer": wrong}, "t")
    with pytest.raises(adaptools.UnsupportedOperationError):  # a normalizer changes what the split sees
        pre_tokenizer({"pre_tokenizer": byte_level, "normalizer": {"type": "NFC"}}, "t")


def test_a_dense_base_merged_to_gguf_f16_beyond_its_range_is_refused(bpe_llama, tmp_path, cli_runner):
    """Issue 21: a merged value beyond fp16's range became Inf in the GGUF file, with exit 0."""
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "adapter"
    shutil.copytree(bpe_llama / "adapter", adapter)
    weights = adapter / "adapter_model.safetensors"
    save_file({k: v * (1e7 if "lora_B" in k else 1) for k, v in load_file(weights).items()}, weights)
    out = tmp_path / "out.gguf"
    result = merge(cli_runner, bpe_llama / "base", adapter, out, "--outtype", "f16")
    assert result.exit_code == 2 and "non-finite" in result.stderr and "Traceback" not in result.output, result.output
    assert not out.exists()


@pytest.mark.parametrize("kernel", ["native", "gguf-py"])
def test_a_q8_0_scale_beyond_float16_made_by_the_encoding_is_refused(kernel, bases, tmp_path, cli_runner, monkeypatch):
    """docs/outputs.md, "Never garbage": merged values that are finite in float32 but whose Q8_0 block scale
    (max |x| / 127) overflows float16 would be written as infinite scales; the check of what was written
    (fused into the encoding with the native kernel, Backend.encode_group_decoded) refuses it, exit 2, naming
    the tensor and the encoding, with the kernel and without it."""
    from safetensors.torch import load_file, save_file

    from adaptools_plugins.gguf import native

    if kernel == "gguf-py":
        monkeypatch.setattr(native, "LIB", None)
    elif native.LIB is None:
        pytest.skip("the GGUF kernel is not built")
    adapter = tmp_path / "adapter"
    shutil.copytree(ADAPTERS / "llama-lora", adapter)
    weights = adapter / "adapter_model.safetensors"
    factors = load_file(weights)
    save_file({k: v * (1e9 if "lora_B" in k else 1) for k, v in factors.items()}, weights)
    out = tmp_path / "out.gguf"
    result = merge(cli_runner, bases["llama-q8"], adapter, out)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "non-finite" in result.stderr and "its encoding" in result.stderr and ".weight" in result.stderr
    assert not out.exists()
    # the same adapter a thousand times smaller merges: the refusal is the overflow's, not the adapter's
    save_file({k: v * (1e6 if "lora_B" in k else 1) for k, v in factors.items()}, weights)
    ok(merge(cli_runner, bases["llama-q8"], adapter, out))


def test_each_changed_tensor_is_read_from_the_base_once(bases, tmp_path, cli_runner, monkeypatch):
    """The survival report compares the written bytes with the base's: the reader keeps the stored bytes it
    decoded (Reader.stored_parts) instead of the encoding reading them again (docs/merge-engine.md,
    "Encoding a group")."""
    from collections import Counter

    reads: Counter[str] = Counter()
    original = Checkpoint.read_small

    def counted(self, name):
        reads[name] += 1
        return original(self, name)

    monkeypatch.setattr(Checkpoint, "read_small", counted)
    summary = json.loads(ok(merge(cli_runner, bases["llama-q8"], ADAPTERS / "llama-lora", tmp_path / "out.gguf",
                                  "--json")).stdout)
    merged = [s["tensor"] for s in summary["survival"]]
    assert len(merged) == 14 and all(reads[name] == 1 for name in merged), reads


def test_the_reader_decodes_a_gguf_weight_into_a_pooled_buffer(bases):
    """Backend.decode_group_into: the read-ahead decodes each Q8_0 weight into a buffer of the engine's pool
    (a fresh 46 MB array per weight faulted in page by page), with the values of the plain decode; Q/K rows,
    put back in Hugging Face order, come out in a new tensor instead, and nothing is lent then."""
    from adaptools.engine.source import BufferPool, Reader

    checkpoint = Checkpoint.open(bases["llama-q8"])
    pool = BufferPool()
    with Reader(checkpoint, pool) as reader:
        for name, pooled_expected in (("model.layers.0.mlp.up_proj.weight", True),
                                      ("model.layers.0.self_attn.q_proj.weight", False)):
            value, pooled = reader.read(name)
            assert pooled is pooled_expected and torch.equal(value, checkpoint.read(name)), name
            assert set(reader.stored_parts(name)) == {name} and reader.stored_parts(name) == {}
            assert bool(pool._lent) is pooled
            reader.release(value, pooled)
            assert not pool._lent
