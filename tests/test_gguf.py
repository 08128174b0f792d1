"""GGUF LoRA adapters (plugins/gguf/adapter_format.py): writing, reading back, refusals, hostile files, and the
helpers the GGUF base merge reuses. Checks against llama.cpp itself are in test_gguf_llamacpp.py (slow);
here the oracle is PEFT (what the GGUF file must reproduce) and an independent index formula for the
Q/K row order."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from conftest import ADAPTERS, BASES
from gguf import GGMLQuantizationType as Q
from gguf_bases import finish
from peft_oracle import load_base, peft_model, seeded_lora

import adaptools
from adaptools import load
from adaptools_plugins.gguf import arch as gguf_arch
from adaptools_plugins.gguf import codec as gguf_codec

LORA = adaptools.plugin.get_method

CASES = {  # adapter -> base
    "llama-lora": "llama", "llama-rslora-patterns": "llama", "llama-layers": "llama", "llama-regex": "llama",
    "gpt2-lora": "gpt2", "qwen2-multi": "qwen2",
}


def deltas(adapter) -> dict[str, torch.Tensor]:
    """Each module's delta s·B@A in float64, through the LoRA method (PEFT's scale, patterns included)."""
    return {m: f.b @ f.a for m, f in LORA("lora").low_rank(adapter).items()}


def to_gguf(cli_runner, name: str, out, *extra: str, base: str | None = None):
    result = cli_runner("convert", ADAPTERS / name, out, "--to", "gguf", "--base", base or BASES / CASES[name],
                        *extra)
    assert result.exit_code == 0, result.output
    return gguf.GGUFReader(out)


def interleave_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half row order -> ggml's interleaved one, written as an index formula (the oracle for
    permute_qk): within a head of d rows, GGUF row 2i + j is HF row j·d/2 + i."""
    d = w.shape[0] // n_head
    out = torch.empty_like(w)
    for h in range(n_head):
        for i in range(d // 2):
            for j in range(2):
                out[h * d + 2 * i + j] = w[h * d + j * (d // 2) + i]
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_peft_gguf_peft_is_exact_in_f32(name, tmp_path, cli_runner):
    to_gguf(cli_runner, name, tmp_path / "a.gguf")
    back = load(tmp_path / "a.gguf")
    assert back.read_format == "gguf" and back.method == "lora"
    want, got = deltas(load(ADAPTERS / name)), deltas(back)
    assert sorted(got) == sorted(want)
    for module, d in want.items():
        torch.testing.assert_close(got[module], d, rtol=1e-6, atol=1e-7, msg=module)
    if name == "llama-lora":  # plain LoRA: the factors themselves come back bit for bit
        original = load(ADAPTERS / name)
        for tensor in original.tensor_names():
            assert torch.equal(back.tensor(tensor), original.tensor(tensor)), tensor


@pytest.mark.parametrize("outtype,tol", [("f16", 2e-3), ("bf16", 1.6e-2), ("q8_0", 1.6e-2)])
def test_round_trip_within_the_storage_type(outtype, tol, tmp_path, cli_runner):
    reader = to_gguf(cli_runner, "llama-rslora-patterns", tmp_path / "a.gguf", "--outtype", outtype)
    types = {t.name: t.tensor_type for t in reader.tensors}
    if outtype == "q8_0":  # lora_a rows are 64 wide (2 blocks); lora_b rows are r wide: F16, as the converter
        assert {types[n] for n in types if n.endswith("lora_a")} == {Q.Q8_0}
        assert {types[n] for n in types if n.endswith("lora_b")} == {Q.F16}
    else:
        assert set(types.values()) == {gguf_codec.OUTTYPES[outtype]}
    want, got = deltas(load(ADAPTERS / "llama-rslora-patterns")), deltas(load(tmp_path / "a.gguf"))
    for module, d in want.items():
        assert float((got[module] - d).abs().max() / d.abs().max()) < tol, module


def test_file_is_what_llama_cpp_reads(tmp_path, cli_runner):
    """Metadata types, names, ne order, Q/K interleaving and the folded scale (docs/gguf.md, "A LoRA adapter as
    llama.cpp loads it", "Names, row order and orientation per architecture", "Exact scales with one alpha")."""
    reader = to_gguf(cli_runner, "llama-rslora-patterns", tmp_path / "a.gguf")
    fields = {k: f for k, f in reader.fields.items()}
    assert fields["general.type"].contents() == "adapter"
    assert fields["general.architecture"].contents() == "llama"
    assert fields["adapter.type"].contents() == "lora"
    assert fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    alpha = fields["adapter.lora.alpha"].contents()
    assert alpha == 8.0
    tensors = {t.name: t for t in reader.tensors}
    adapter = load(ADAPTERS / "llama-rslora-patterns")
    config = json.loads((BASES / "llama" / "config.json").read_text())
    for module, d in deltas(adapter).items():
        layer, kind = module.split(".")[2], module.split(".")[-1]
        target = {"q_proj": "attn_q", "v_proj": "attn_v", "down_proj": "ffn_down"}[kind]
        a, b = tensors[f"blk.{layer}.{target}.weight.lora_a"], tensors[f"blk.{layer}.{target}.weight.lora_b"]
        rank = adapter.info(f"{module}.lora_A").shape[0]
        assert a.shape.tolist() == [d.shape[1], rank] and b.shape.tolist() == [rank, d.shape[0]]  # ne order
        got = alpha / rank * torch.from_numpy(np.array(b.data)).double() @ torch.from_numpy(np.array(a.data)).double()
        want = interleave_rows(d, config["num_attention_heads"]) if kind == "q_proj" else d
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=module)
    assert fields["llama.attention.head_count"].contents() == 4
    assert fields["llama.attention.head_count_kv"].contents() == 2


def test_k_rows_use_the_kv_head_count(tmp_path, cli_runner):
    reader = to_gguf(cli_runner, "llama-lora", tmp_path / "a.gguf")
    b = next(t for t in reader.tensors if t.name == "blk.1.attn_k.weight.lora_b")
    lora_b = load(ADAPTERS / "llama-lora").tensor("model.layers.1.self_attn.k_proj.lora_B")
    assert torch.equal(torch.from_numpy(np.array(b.data)), interleave_rows(lora_b, 2))


def test_peft_loads_the_converted_back_adapter_with_the_same_outputs(tmp_path, cli_runner):
    for name in ("llama-rslora-patterns", "gpt2-lora"):
        to_gguf(cli_runner, name, tmp_path / f"{name}.gguf")
        result = cli_runner("convert", tmp_path / f"{name}.gguf", tmp_path / name, "--to", "peft")
        assert result.exit_code == 0, result.output
        base = BASES / CASES[name]
        ids = torch.tensor([[1, 5, 7, 9, 17, 33, 64, 100]])
        with torch.no_grad():
            want = peft_model(base, ADAPTERS / name)(input_ids=ids).logits
            got = peft_model(base, tmp_path / name)(input_ids=ids).logits
            plain = load_base(base)(input_ids=ids).logits
        assert (want - plain).abs().max() > 1e-3  # the adapter does something
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_info_check_diff_work_on_a_gguf_lora(tmp_path, cli_runner):
    to_gguf(cli_runner, "llama-rslora-patterns", tmp_path / "a.gguf")
    info = cli_runner("info", tmp_path / "a.gguf", "--json")
    assert info.exit_code == 0, info.output
    data = json.loads(info.stdout)
    assert data["format"] == "gguf" and data["summary"]["adapted_modules"] == 6
    check = cli_runner("check", tmp_path / "a.gguf", "--base", BASES / "llama")
    assert check.exit_code == 0, check.output
    diff = cli_runner("diff", ADAPTERS / "llama-rslora-patterns", tmp_path / "a.gguf", "--json")
    assert diff.exit_code == 0, diff.output
    rows = json.loads(diff.stdout)["modules"]
    assert len(rows) == 6 and max(r["relative"] for r in rows) < 1e-6


def test_embedding_lora_on_an_untied_base(tmp_path, cli_runner):
    """qwen2's fixture base has its own lm_head: embed_tokens and lm_head LoRAs both have a GGUF place. The
    embedding PEFT saves beside the LoRA equals the base's and is left out; a changed one is refused."""
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["embed_tokens", "lm_head", "v_proj"])
    seeded_lora(BASES / "qwen2", config, tmp_path / "emb", 5, 0.1)
    result = cli_runner("convert", tmp_path / "emb", tmp_path / "emb.gguf", "--to", "gguf", "--base", BASES / "qwen2")
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(tmp_path / "emb.gguf")
    shapes = {t.name: t.shape.tolist() for t in reader.tensors}
    assert shapes["token_embd.weight.lora_a"] == [4, 128] and shapes["token_embd.weight.lora_b"] == [4, 64]
    assert shapes["output.weight.lora_a"] == [64, 4] and shapes["output.weight.lora_b"] == [4, 128]
    want, got = deltas(load(tmp_path / "emb")), deltas(load(tmp_path / "emb.gguf"))
    assert sorted(got) == sorted(want)
    for module, d in want.items():
        torch.testing.assert_close(got[module], d, rtol=1e-6, atol=1e-7, msg=module)
    # a saved embedding that differs from the base's (trained or resized vocabulary) cannot be expressed
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "emb" / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith("embed_tokens.base_layer.weight"))
    state[key][3] += 1.0
    save_file(state, tmp_path / "emb" / "adapter_model.safetensors")
    result = cli_runner("convert", tmp_path / "emb", tmp_path / "emb2.gguf", "--to", "gguf", "--base", BASES / "qwen2")
    assert result.exit_code == 2 and "modules_to_save or replaced base tensors" in result.stderr
    assert not (tmp_path / "emb2.gguf").exists()


@pytest.mark.parametrize("name,base,expected", [
    ("llama-dora", "llama", "DoRA magnitudes"),
    ("gpt2-dora", "gpt2", "DoRA magnitudes"),
    ("llama-modules-to-save", "llama", "modules_to_save"),
    ("llama-resized-vocab", "llama", "modules_to_save or replaced base tensors"),
    ("qwen2-lora-bias", "qwen2", "lora_bias"),
    ("qwen2-bias-lora-only", "qwen2", "replaced base tensors"),
    ("llama-trainable-tokens", "llama", "trainable tokens"),
    ("llama-embedding", "llama", "tied to the output embedding"),
])
def test_what_a_gguf_lora_cannot_hold_is_refused(name, base, expected, tmp_path, cli_runner):
    result = cli_runner("convert", ADAPTERS / name, tmp_path / "out.gguf", "--to", "gguf", "--base", BASES / base)
    assert result.exit_code == 2, result.output
    assert expected in result.stderr and "merge" in result.stderr
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_writing_needs_a_fitting_base(tmp_path, cli_runner):
    out = tmp_path / "out.gguf"
    no_base = cli_runner("convert", ADAPTERS / "llama-lora", out, "--to", "gguf")
    assert no_base.exit_code == 2 and "--base" in no_base.stderr
    other = cli_runner("convert", ADAPTERS / "llama-lora", out, "--to", "gguf", "--base", BASES / "gpt2")
    assert other.exit_code == 2 and "has no GGUF tensor in architecture gpt2" in other.stderr
    import transformers

    small = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(small).save_pretrained(tmp_path / "small")
    smaller = cli_runner("convert", ADAPTERS / "llama-lora", out, "--to", "gguf", "--base", tmp_path / "small")
    assert smaller.exit_code == 2 and "does not fit the base's" in smaller.stderr
    config = json.loads((BASES / "llama" / "config.json").read_text())
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    bert = cli_runner("convert", ADAPTERS / "llama-lora", out, "--to", "gguf", "--base", tmp_path / "bert")
    assert bert.exit_code == 2 and "BertModel" in bert.stderr
    heads = {**config, "num_attention_heads": 3, "num_key_value_heads": 3}  # 64 q rows do not split in 3 heads
    (tmp_path / "heads").mkdir()
    (tmp_path / "heads" / "config.json").write_text(json.dumps(heads))
    wrong = cli_runner("convert", ADAPTERS / "llama-lora", out, "--to", "gguf", "--base", tmp_path / "heads")
    assert wrong.exit_code == 2 and "do not split into the base's 3 attention heads" in wrong.stderr
    assert not out.exists()


def test_config_json_alone_is_enough_and_so_is_a_gguf_base(tmp_path, cli_runner):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text((BASES / "llama" / "config.json").read_text())
    first = to_gguf(cli_runner, "llama-lora", tmp_path / "a.gguf", base=tmp_path / "cfg" / "config.json")
    # a GGUF base: only its metadata and tensor shapes are read (here: a stand-in with the right names)
    writer = gguf.GGUFWriter(tmp_path / "base.gguf", "llama")
    writer.add_block_count(2)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    for t in first.tensors:
        if t.name.endswith(".lora_a"):
            stem = t.name[: -len(".lora_a")]
            b = next(u for u in first.tensors if u.name == stem + ".lora_b")
            writer.add_tensor(stem, np.zeros((int(b.shape[1]), int(t.shape[0])), dtype=np.float16))
    finish(writer)
    second = to_gguf(cli_runner, "llama-lora", tmp_path / "b.gguf", base=tmp_path / "base.gguf")
    for t, u in zip(first.tensors, second.tensors):
        assert t.name == u.name and np.array_equal(t.data, u.data)


# --- hostile GGUF files ---------------------------------------------------------------------------------


def write(path, kvs=None, tensors=None, arch="llama", alpha: float | None = 8.0):
    writer = gguf.GGUFWriter(path, arch)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    if alpha is not None:
        writer.add_float32("adapter.lora.alpha", alpha)
    for key, (value, vtype) in (kvs or {}).items():
        writer.add_key_value(key, value, vtype)
    rng = np.random.default_rng(0)
    default = {"blk.0.attn_v.weight.lora_a": rng.standard_normal((4, 64)).astype(np.float32),
               "blk.0.attn_v.weight.lora_b": rng.standard_normal((32, 4)).astype(np.float32)}
    for name, array in (default if tensors is None else tensors).items():
        writer.add_tensor(name, array)
    finish(writer)
    return path


def good(tmp_path):
    return write(tmp_path / "good.gguf")


def truncated(tmp_path):
    data = good(tmp_path).read_bytes()
    good(tmp_path).unlink()
    (tmp_path / "t.gguf").write_bytes(data[: len(data) - 300])
    return tmp_path / "t.gguf"


def truncated_header(tmp_path):
    data = good(tmp_path).read_bytes()
    good(tmp_path).unlink()
    (tmp_path / "t.gguf").write_bytes(data[:40])
    return tmp_path / "t.gguf"


def alpha_wrong_type(tmp_path):
    return write(tmp_path / "a.gguf", alpha=None, kvs={"adapter.lora.alpha": (8, gguf.GGUFValueType.UINT32)})


def alpha_missing(tmp_path):
    return write(tmp_path / "a.gguf", alpha=None)


def alpha_nan(tmp_path):
    return write(tmp_path / "a.gguf", alpha=float("nan"))


def type_not_string(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "a.gguf", "llama")
    writer.add_uint32("general.type", 3)
    finish(writer)
    return tmp_path / "a.gguf"


def a_model_not_an_adapter(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    finish(writer)
    return tmp_path / "m.gguf"


def ranks_disagree(tmp_path):
    return write(tmp_path / "a.gguf", tensors={"blk.0.attn_v.weight.lora_a": np.ones((4, 64), np.float32),
                                               "blk.0.attn_v.weight.lora_b": np.ones((32, 3), np.float32)})


def half_a_pair(tmp_path):
    return write(tmp_path / "a.gguf", tensors={"blk.0.attn_v.weight.lora_a": np.ones((4, 64), np.float32)})


def unexpected_tensor(tmp_path):
    return write(tmp_path / "a.gguf", tensors={"blk.0.attn_v.weight": np.ones((32, 64), np.float32)})


def nan_values(tmp_path):
    b = np.ones((32, 4), np.float32)
    b[3, 1] = np.nan
    return write(tmp_path / "a.gguf", tensors={"blk.0.attn_v.weight.lora_a": np.ones((4, 64), np.float32),
                                               "blk.0.attn_v.weight.lora_b": b})


def q_without_head_counts(tmp_path):
    return write(tmp_path / "a.gguf", tensors={"blk.0.attn_q.weight.lora_a": np.ones((4, 64), np.float32),
                                               "blk.0.attn_q.weight.lora_b": np.ones((64, 4), np.float32)})


def q_rows_do_not_split(tmp_path):
    kvs = {"llama.attention.head_count": (4, gguf.GGUFValueType.UINT32)}
    return write(tmp_path / "a.gguf", kvs=kvs, tensors={"blk.0.attn_q.weight.lora_a": np.ones((4, 64), np.float32),
                                                        "blk.0.attn_q.weight.lora_b": np.ones((60, 4), np.float32)})


def zero_heads(tmp_path):
    kvs = {"llama.attention.head_count": (0, gguf.GGUFValueType.INT32)}
    return write(tmp_path / "a.gguf", kvs=kvs)


def unknown_arch(tmp_path):
    return write(tmp_path / "a.gguf", arch="mamba")


def unmapped_tensor(tmp_path):
    return write(tmp_path / "a.gguf", tensors={"blk.0.ssm_in.weight.lora_a": np.ones((4, 64), np.float32),
                                               "blk.0.ssm_in.weight.lora_b": np.ones((32, 4), np.float32)})


def three_d(tmp_path):
    return write(tmp_path / "a.gguf", tensors={"blk.0.attn_v.weight.lora_a": np.ones((2, 4, 64), np.float32),
                                               "blk.0.attn_v.weight.lora_b": np.ones((32, 4), np.float32)})


def garbage_with_magic(tmp_path):
    (tmp_path / "g.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 3)
    return tmp_path / "g.gguf"


HOSTILE = {
    "truncated tensor data": (truncated, "not a readable GGUF file"),
    "truncated header": (truncated_header, "not a readable GGUF file"),
    "garbage after the magic": (garbage_with_magic, "not a readable GGUF file"),
    "alpha stored as uint32": (alpha_wrong_type, "adapter.lora.alpha is UINT32"),
    "alpha missing": (alpha_missing, "adapter.lora.alpha is missing"),
    "alpha NaN": (alpha_nan, "adapter.lora.alpha is nan"),
    "general.type not a string": (type_not_string, "general.type is UINT32"),
    "a model, not an adapter": (a_model_not_an_adapter, "not an adapter"),
    "ranks disagree": (ranks_disagree, "ranks disagree"),
    "half a pair": (half_a_pair, "has only lora_a"),
    "a tensor that is not a LoRA factor": (unexpected_tensor, "not a LoRA tensor"),
    "NaN in a factor": (nan_values, "NaN/Inf"),
    "Q rows without head counts": (q_without_head_counts, "head counts are unknown"),
    "Q rows that do not split into heads": (q_rows_do_not_split, "cannot be split into 4 attention heads"),
    "zero attention heads": (zero_heads, "not a positive count"),
    "architecture without support": (unknown_arch, "'mamba' is not supported"),
    "tensor without a module name": (unmapped_tensor, "no Hugging Face module name"),
    "three-dimensional factor": (three_d, "non-empty matrices"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("command", ["info", "convert"])
def test_hostile_gguf_is_one_clear_line_exit_2_and_writes_nothing(case, command, tmp_path, cli_runner):
    make, expected = HOSTILE[case]
    bad = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [command, bad, *([tmp_path / "out", "--to", "peft"] if command == "convert" else [])]
    result = cli_runner(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and expected in lines[0], lines[0]
    assert str(bad) in lines[0]
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_head_counts_can_come_from_the_base(tmp_path, cli_runner):
    bad = q_without_head_counts(tmp_path)
    result = cli_runner("convert", bad, tmp_path / "out", "--to", "peft", "--base", BASES / "llama")
    assert result.exit_code == 0, result.output
    b = load(tmp_path / "out").tensor("model.layers.0.self_attn.q_proj.lora_B")
    assert b.shape == (64, 4)
    other = cli_runner("convert", bad, tmp_path / "out2", "--to", "peft", "--base", BASES / "qwen2")
    assert other.exit_code == 2 and "the adapter is for llama, the base is qwen2" in other.stderr


def test_a_good_hand_written_file_reads(tmp_path):
    adapter = load(good(tmp_path))
    assert adapter.config["r"] == 4 and adapter.config["lora_alpha"] == 8
    v_proj = "model.layers.0.self_attn.v_proj"
    assert adapter.tensor_names() == [f"{v_proj}.lora_A", f"{v_proj}.lora_B"]


def test_alpha_zero_means_unscaled(tmp_path):
    ones = {f"blk.{i}.attn_v.weight.{ab}": np.ones((r, 64) if ab == "lora_a" else (32, r), np.float32)
            for i, r in ((0, 4), (1, 2)) for ab in ("lora_a", "lora_b")}
    path = write(tmp_path / "a.gguf", alpha=0.0, tensors=ones)
    config = load(path).config
    assert {m: v["scaling"] for m, v in config["modules"].items()} == {
        "model.layers.0.self_attn.v_proj": 1.0, "model.layers.1.self_attn.v_proj": 1.0}


# --- helpers for the GGUF base merge ----------------------------------------------------------------------


@pytest.mark.parametrize("n_head,n_kv", [(4, 4), (4, 2), (9, 3)])
def test_permute_matches_the_index_formula_and_inverts(n_head, n_kv):
    w = torch.randn(n_kv * 8, 5)
    assert torch.equal(gguf_arch.permute_qk(w, n_head, n_kv), interleave_rows(w, n_kv))
    assert torch.equal(gguf_arch.unpermute_qk(gguf_arch.permute_qk(w, n_head, n_kv), n_head, n_kv), w)
    bias = torch.randn(n_kv * 8)
    assert torch.equal(gguf_arch.permute_qk(bias, n_head, n_kv), interleave_rows(bias[:, None], n_kv)[:, 0])
    assert np.array_equal(gguf_arch.permute_qk(w.numpy(), n_head, n_kv), interleave_rows(w, n_kv).numpy())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_names_map_both_ways_for_every_base_parameter(arch):
    shape = gguf_arch.describe_base(str(BASES / arch))
    mapped = 0
    for name in shape.hf_shapes:
        module, _, param = name.rpartition(".")
        target = shape.gguf_name(name)
        if target is None or param != "weight" or "norm" in target or "ln_" in name or "position" in target:
            continue
        assert shape.hf_module(target, shape.n_blocks) == module, name
        bias = target[: -len("weight")] + "bias"
        if module + ".bias" in shape.hf_shapes:
            assert shape.hf_parameter(bias, shape.n_blocks) == module + ".bias"
            assert shape.gguf_name(module + ".bias") == bias
        mapped += 1
    assert mapped >= 5
    hf, name = {"llama": ("model.layers.1.self_attn.k_proj.weight", "blk.1.attn_k.weight"),
                "qwen2": ("model.layers.1.mlp.up_proj.weight", "blk.1.ffn_up.weight"),
                "gpt2": ("transformer.h.1.attn.c_attn.weight", "blk.1.attn_qkv.weight")}[arch]
    assert shape.gguf_name(hf) == name


def test_layouts_invert_and_follow_the_converter():
    llama = gguf_arch.describe_base(str(BASES / "llama"))
    w = torch.randn(32, 64)  # k_proj: 2 kv heads of 16 rows
    g = gguf_arch.to_gguf_layout(llama, "blk.0.attn_k.weight", w)
    assert torch.equal(g, interleave_rows(w, 2))
    assert torch.equal(gguf_arch.from_gguf_layout(llama, "blk.0.attn_k.weight", g), w)
    gpt2 = gguf_arch.describe_base(str(BASES / "gpt2"))
    c = torch.randn(64, 192)  # Conv1D [in, out]
    assert torch.equal(gguf_arch.to_gguf_layout(gpt2, "blk.0.attn_qkv.weight", c), c.T)
    assert torch.equal(gguf_arch.from_gguf_layout(gpt2, "blk.0.attn_qkv.weight", c.T.contiguous()), c)
    e = torch.randn(128, 64)
    assert torch.equal(gguf_arch.to_gguf_layout(gpt2, "token_embd.weight", e), e)


@pytest.mark.parametrize("qtype,tol", [(Q.F32, 0), (Q.F16, 1e-3), (Q.BF16, 8e-3), (Q.Q8_0, 1e-2), (Q.Q5_0, 8e-2),
                                       (Q.Q5_1, 8e-2), (Q.Q4_0, 0.15), (Q.Q4_1, 0.15)])
def test_encode_decode_every_encodable_type(qtype, tol, tmp_path):
    values = np.random.default_rng(1).standard_normal((6, 64)).astype(np.float32)
    encoded = gguf_codec.encode(values, qtype)
    writer = gguf.GGUFWriter(tmp_path / "q.gguf", "llama")
    writer.add_tensor("t", encoded, raw_dtype=qtype)
    finish(writer)
    tensor = gguf.GGUFReader(tmp_path / "q.gguf").tensors[0]
    assert tensor.tensor_type == qtype and gguf_codec.numpy_shape(tensor) == (6, 64)
    decoded = gguf_codec.decode(tensor)
    assert decoded.shape == (6, 64) and decoded.dtype == np.float32
    assert np.abs(decoded - values).max() <= tol * np.abs(values).max()
    assert np.array_equal(gguf_codec.encode(decoded, qtype), encoded)  # re-encoding what was decoded: same bytes


def test_encode_refuses_what_gguf_py_cannot_and_falls_back_for_partial_blocks():
    with pytest.raises(KeyError):
        gguf_codec.encode(np.zeros((2, 256), np.float32), Q.IQ3_S)  # K-quants and IQ4 encode (test_gguf_kquants.py)
    array, qtype = gguf_codec.encode_with_fallback(np.ones((2, 40), np.float32), Q.Q8_0)
    assert qtype == Q.F16 and array.dtype == np.float16
