"""AWQ bases (``quant_method: awq``, GEMM): decode, dequantize, dequantize-merge against PEFT, ``--requantize`` onto
the stored grid, and (slow) the packer and decoder against AutoAWQ itself. Hostile checkpoints are in
test_awq_inputs.py."""

from __future__ import annotations

import json

import pytest
import torch
from awq_checks import PARTS, awq_modules, awq_oracle, build_awq, load_dense, same, state_of
from peft_oracle import seeded_lora
from safetensors.torch import load_file

import adaptools
from adaptools import MergeInput, merge
from adaptools.checkpoint import Checkpoint
from adaptools_plugins.awq import codec

KINDS = ("llama-awq", "llama-awq-g64", "llama-awq-gall")
GATE = "model.layers.1.mlp.gate_proj"  # an outlier at [7, 3]
Q = "model.layers.1.self_attn.q_proj"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The fp16 original, its AWQ checkpoints (fixtures/build_awq.py), and PEFT LoRAs on the original: every
    linear, and q_proj + gate_proj of layer 1."""
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("awq")
    paths = build_awq.build(root)
    seeded_lora(paths["llama-awq-dense"], LoraConfig(r=4, lora_alpha=8, target_modules=build_awq.LINEARS),
                root / "lora", 5, 0.05)
    seeded_lora(paths["llama-awq-dense"], LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"],
                                                     layers_to_transform=[1]), root / "lora-layer1", 6, 0.05)
    paths.update(lora=root / "lora", layer1=root / "lora-layer1")
    return paths


def rule_decode(qweight, qzeros, scales):
    """docs/awq.md's rule written out a nibble at a time: nibble i of word j is column 8j + ORDER[i]; the value
    is (q - z) * s with fp16 operands (AutoAWQ's dtypes), transposed to [out, in]."""
    def unpacked(words):
        out = torch.zeros(words.shape[0], words.shape[1] * 8, dtype=torch.int32)
        for i, column in enumerate((0, 2, 4, 6, 1, 3, 5, 7)):
            out[:, column::8] = (words >> (4 * i)) & 0xF
        return out

    group = qweight.shape[0] // scales.shape[0]
    q = unpacked(qweight)
    z = unpacked(qzeros).repeat_interleave(group, dim=0)
    return ((q - z).to(torch.float16) * scales.repeat_interleave(group, dim=0)).t().contiguous()


@pytest.mark.parametrize("kind", KINDS)
def test_decode_is_the_format_rule_and_near_the_original(bases, kind):
    path = bases[kind]
    checkpoint, stored = Checkpoint.open(path), load_file(str(path / "model.safetensors"))
    dense = load_file(str(bases["llama-awq-dense"] / "model.safetensors"))
    assert len(checkpoint.groups) == (13 if kind == "llama-awq-g64" else 14)
    for param in checkpoint.groups:
        module = param.removesuffix(".weight")
        ours = checkpoint.read(param)
        assert same(ours, rule_decode(*(stored[f"{module}.{p}"] for p in PARTS))), param
        step = stored[f"{module}.scales"].float().repeat_interleave(ours.shape[1] // stored[f"{module}.scales"]
                                                                    .shape[0], dim=0).t()
        assert bool(((ours.float() - dense[param].float()).abs() <= step * 0.5 + 1e-3).all()), param


def test_pack_and_unpack_are_inverse_on_every_bit_pattern():
    words = torch.randint(-(1 << 31), (1 << 31) - 1, (64, 16), dtype=torch.int32, generator=torch.Generator()
                          .manual_seed(0))
    words[0, :3] = torch.tensor([-1, -(1 << 31), (1 << 31) - 1], dtype=torch.int32)
    values = codec.unpack(words)
    assert values.shape == (64, 128) and int(values.min()) >= 0 and int(values.max()) <= 15
    assert torch.equal(codec.pack(values), words)
    assert torch.equal(build_awq.pack(values), words)  # the fixture's packer, written separately


def test_requantizing_an_unchanged_decode_gives_back_the_stored_qweight(bases):
    for kind in KINDS:
        checkpoint = Checkpoint.open(bases[kind])
        for param, (backend, names) in checkpoint.groups.items():
            settings = backend.group_settings(param, checkpoint.read_small)
            encoded = backend.encode_group(param, checkpoint.read(param).float(), settings)
            assert sorted(encoded) == sorted(names)
            assert all(same(encoded[n], checkpoint.read_small(n)) for n in names), param


def test_dequantize_output_is_the_decode_and_loads(bases, tmp_path, cli_runner):
    path = bases["llama-awq"]
    result = cli_runner("dequantize", path, tmp_path / "dense")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in config
    ours, stored, checkpoint = state_of(tmp_path / "dense"), state_of(path), Checkpoint.open(path)
    assert sorted(ours) == sorted(checkpoint.parameters())
    for key, value in ours.items():
        assert same(value, checkpoint.read(key) if key in checkpoint.groups else stored[key]), key
    reloaded = load_dense(tmp_path / "dense").state_dict()
    assert all(same(value, reloaded[key]) for key, value in ours.items())


@pytest.mark.parametrize("kind", KINDS)
def test_merge_equals_peft_on_the_dequantized_model(bases, kind, tmp_path):
    """Dequantize-merge (the default) against PEFT's merge_and_unload on the dequantized model in transformers."""
    import warnings

    from peft import PeftModel

    merge(bases[kind], [], tmp_path / "dense", operation="dequantize")
    summary = merge(bases[kind], [MergeInput(adaptools.load(bases["lora"]))], tmp_path / "m")
    assert summary.tensors_merged == 14  # with llama-awq-g64's dense o_proj
    ours = state_of(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(load_dense(tmp_path / "dense"), bases["lora"]).merge_and_unload()
    theirs = theirs.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(same(value, theirs[key]) for key, value in ours.items())
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())


def test_merge_requantize_keeps_the_grid_and_every_untouched_byte(bases, tmp_path):
    """--requantize: a changed linear's qweight is the dequantize-merge rounded onto its stored grid (the rule
    of docs/awq.md: round(w / s) + z, clamped), its qzeros and scales byte for byte; every other tensor byte for
    byte; the config unchanged; and decoding the output gives the grid points."""
    path, adapter = bases["llama-awq"], adaptools.load(bases["layer1"])
    summary = merge(path, [MergeInput(adapter)], tmp_path / "rq", requantize=True)
    merge(path, [MergeInput(adapter)], tmp_path / "dense")
    ours, base, dense = state_of(tmp_path / "rq"), state_of(path), state_of(tmp_path / "dense")
    assert sorted(ours) == sorted(base)
    for key, value in base.items():
        if not key.startswith((Q, GATE)) or not key.endswith(".qweight"):
            assert same(ours[key], value), key
    for module in (Q, GATE):
        scales, zeros = base[f"{module}.scales"].float(), base[f"{module}.qzeros"]
        group = base[f"{module}.qweight"].shape[0] // scales.shape[0]
        w = dense[f"{module}.weight"].float().t()
        z = codec.unpack(zeros).repeat_interleave(group, dim=0).float()
        codes = (torch.round(w / scales.repeat_interleave(group, dim=0)) + z).clamp(0, 15)
        assert same(ours[f"{module}.qweight"], build_awq.pack(codes.to(torch.int32))), module
        assert not same(ours[f"{module}.qweight"], base[f"{module}.qweight"])
    assert sorted(s["tensor"] for s in summary.survival) == [GATE + ".weight", Q + ".weight"]
    assert any("this is not AWQ" in w and "docs/awq.md" in w for w in summary.warnings), summary.warnings
    assert json.loads((tmp_path / "rq" / "config.json").read_text()) == json.loads((path / "config.json").read_text())
    checkpoint = Checkpoint.open(tmp_path / "rq")
    for module in (Q, GATE):
        assert same(checkpoint.read(module + ".weight"),
                    rule_decode(*(ours[f"{module}.{p}"] for p in PARTS)))


def test_requantize_merges_a_linear_left_dense_as_dense(bases, tmp_path):
    """llama-awq-g64 keeps layer 1's o_proj dense (modules_to_not_convert): with --requantize it is written as
    the dense merge writes it, while every AWQ linear keeps its scales and zeros and gets a new qweight."""
    path, adapter = bases["llama-awq-g64"], adaptools.load(bases["lora"])
    merge(path, [MergeInput(adapter)], tmp_path / "rq", requantize=True)
    merge(path, [MergeInput(adapter)], tmp_path / "dense")
    ours, base, dense = state_of(tmp_path / "rq"), state_of(path), state_of(tmp_path / "dense")
    assert sorted(ours) == sorted(base)
    o_proj = "model.layers.1.self_attn.o_proj.weight"
    assert same(ours[o_proj], dense[o_proj]) and not same(ours[o_proj], base[o_proj])
    for module in awq_modules(base):
        assert same(ours[f"{module}.scales"], base[f"{module}.scales"]), module
        assert same(ours[f"{module}.qzeros"], base[f"{module}.qzeros"]), module
        assert not same(ours[f"{module}.qweight"], base[f"{module}.qweight"]), module


def test_quantizing_dense_weights_to_awq_is_refused(bases, tmp_path, cli_runner):
    result = cli_runner("merge", bases["llama-awq"], bases["lora"], tmp_path / "q", "--merge-base", "original",
                        "--original-base", bases["llama-awq-dense"], "--requantize")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output
    result = cli_runner("requantize", bases["llama-awq-dense"], tmp_path / "r", "--quant-type", "awq")
    assert result.exit_code == 2 and "calibration" in result.stderr, result.output
    assert not (tmp_path / "q").exists() and not (tmp_path / "r").exists()


def test_plugins_lists_the_backend(cli_runner):
    out = cli_runner("plugins").stdout
    from adaptools import plugin

    assert f"backend awq: {plugin.describe_packed()}: AutoAWQ's (q - z) * s" in out


# --- against AutoAWQ itself (fixtures/awq_oracle.py builds its venv on first use) -------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_decode_is_autoawq_dequantize_gemm(bases, kind):
    """Every fixture linear, and random words with random positive fp16 scales over the whole fp16 range,
    decode bit for bit as AutoAWQ's dequantize_gemm (transposed)."""
    path = bases[kind]
    checkpoint, stored = Checkpoint.open(path), load_file(str(path / "model.safetensors"))
    gen = torch.Generator().manual_seed(1)
    extra = [{"qweight": torch.randint(-(1 << 31), (1 << 31) - 1, (256, 8), dtype=torch.int32, generator=gen),
              "qzeros": torch.randint(-(1 << 31), (1 << 31) - 1, (4, 8), dtype=torch.int32, generator=gen),
              "scales": torch.exp2(torch.empty(4, 64).uniform_(-24, 11, generator=gen)).to(torch.float16),
              "group_size": 64}]
    modules = awq_modules(stored)
    jobs = [{"op": "dequantize", **{p: stored[f"{m}.{p}"] for p in PARTS},
             "group_size": stored[f"{m}.qweight"].shape[0] // stored[f"{m}.scales"].shape[0]} for m in modules]
    answers = awq_oracle.run([*jobs, *({"op": "dequantize", **e} for e in extra)])
    for module, answer in zip(modules, answers):
        assert same(checkpoint.read(module + ".weight"), answer["weight"].t().contiguous()), module
    for job, answer in zip(extra, answers[len(modules):]):
        assert same(codec.dequantize(job["qweight"], job["qzeros"], job["scales"], job["group_size"]),
                    answer["weight"].t().contiguous())


@pytest.mark.slow
def test_packer_and_requantize_are_autoawq_from_linear(bases):
    """The fixture packer's bytes are AutoAWQ's WQLinear_GEMM.from_linear on the same weight, scales and zeros;
    so are adaptools' re-encoding's (from the decoded weight, on the stored grid)."""
    original = load_file(str(bases["llama-awq-dense"] / "model.safetensors"))
    checkpoint, stored = Checkpoint.open(bases["llama-awq"]), load_file(str(bases["llama-awq"] / "model.safetensors"))
    modules = awq_modules(stored)
    jobs = []
    for module in modules:
        codes, scales, zeros = build_awq.rtn(original[module + ".weight"], 32)
        decoded = checkpoint.read(module + ".weight")  # the weight on the grid, as AutoAWQ's linear holds it
        jobs.append({"op": "pack", "weight": decoded, "scales": scales, "zeros": zeros.to(torch.float16),
                     "group_size": 32})
    for module, answer in zip(modules, awq_oracle.run(jobs)):
        for part in PARTS:
            assert same(stored[f"{module}.{part}"], answer[part]), (module, part)
        backend, names = checkpoint.groups[module + ".weight"]
        encoded = backend.encode_group(module + ".weight", checkpoint.read(module + ".weight").float(),
                                       backend.group_settings(module + ".weight", checkpoint.read_small))
        assert same(encoded[module + ".qweight"], answer["qweight"]), module
