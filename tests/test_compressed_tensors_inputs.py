"""Hostile and unsupported compressed-tensors checkpoints: each ends in one clear line naming what is wrong,
exit code 2, and nothing written, whether the command is ``dequantize`` or ``merge``."""

from __future__ import annotations

import pytest
import torch
from ct_checks import build_ct
from hostile_edits import edited, put, refused_in_one_line, setitem, truncated_is_refused

import adaptools
from adaptools.checkpoint import Checkpoint

M = "model.layers.0.mlp.gate_proj"  # int4 groups of 32, asymmetric: packed [196, 16], scales [196, 4], zp [25, 4]
D = "model.layers.0.mlp.down_proj"  # int4 per channel, asymmetric, 196 columns: packed [128, 25]
F = "model.layers.0.self_attn.q_proj"  # (fp8 fixture) one scale for the tensor


@pytest.fixture(scope="module")
def ct_bases(tmp_path_factory):
    from peft import LoraConfig
    from peft_oracle import seeded_lora

    root = tmp_path_factory.mktemp("ct-inputs")
    paths = build_ct.build(root, ("pack", "fp8", "nvfp4"))
    seeded_lora(paths["llama-ct-dense"], LoraConfig(r=2, target_modules=["gate_proj", "q_proj"]), root / "lora", 3,
                0.05)
    return paths["llama-ct-pack"], paths["llama-ct-fp8"], root / "lora", paths["llama-ct-nvfp4"]








def weights(group, **changes):
    return lambda q: q["config_groups"][group]["weights"].update(changes)


def _block_zero_points(dtype):
    def change(state):
        for module in (M, M.replace("gate", "up"), M.replace("0", "1"), M.replace("0", "1").replace("gate", "up")):
            state[f"{module}.weight_scale"] = torch.full((7, 4), 0.01, dtype=torch.bfloat16)
            state[f"{module}.weight_zero_point"] = torch.ones((7, 4), dtype=dtype)
    return change


def _block_scheme(quant):
    quant["config_groups"]["group_2"]["weights"].update(strategy="block", block_structure=[32, 32], group_size=None)


#: A target that backtracks exponentially on a module name (the `re` module would run for hours).
BACKTRACKS = r"re:([\w.]|[\w.])*\d$"
S, Z, W, SH = f"{M}.weight_scale", f"{M}.weight_zero_point", f"{M}.weight_packed", f"{M}.weight_shape"
#: case -> (tensor edit, config edit, what the one line must name)
HOSTILE = {
    "scale-nan": (setitem(S, (1, 1), float("nan")), None, S),
    "scale-zero": (setitem(S, (0, 0), 0.0), None, S),
    "scale-negative": (setitem(S, (2, 0), -0.001), None, S),
    "scale-inf": (setitem(S, (0, 1), float("inf")), None, S),
    "scale-grid": (put(S, lambda s: s[S][:, :2].clone()), None, S),
    "scale-int": (put(S, lambda s: s[S].to(torch.int32)), None, S),
    "scale-missing": (lambda s: s.pop(S), None, S),
    "packed-truncated": (put(W, lambda s: s[W][:, :15].clone()), None, SH),
    "packed-rows": (put(W, lambda s: s[W][:100].clone()), None, SH),
    "packed-3d": (put(W, lambda s: s[W].reshape(2, 98, 16).clone()), None, W),
    "packed-int8": (put(W, lambda s: s[W].view(torch.int8)), None, W),
    "packed-missing": (lambda s: s.pop(W), None, W),
    "shape-lies-wider": (put(SH, lambda s: torch.tensor([196, 256])), None, SH),
    "shape-lies-rows": (put(SH, lambda s: torch.tensor([195, 128])), None, SH),
    "shape-negative": (put(SH, lambda s: torch.tensor([196, -128])), None, SH),
    "shape-not-groups": (put(SH, lambda s: torch.tensor([196, 125])), None, W),
    "shape-three": (put(SH, lambda s: torch.tensor([196, 128, 1])), None, SH),
    "shape-float": (put(SH, lambda s: torch.tensor([196.0, 128.0])), None, SH),
    "zero-point-missing": (lambda s: s.pop(Z), None, Z),
    "zero-point-shape": (put(Z, lambda s: s[Z][:3].clone()), None, Z),
    "g-idx": (put(f"{M}.weight_g_idx", lambda s: torch.arange(128, dtype=torch.int32) // 32), None, "g_idx"),
    "g-idx-out-of-range": (put(f"{M}.weight_g_idx", lambda s: torch.full((128,), 99, dtype=torch.int32)), None,
                           "g_idx"),
    "static-activation": (put(f"{M}.input_scale", lambda s: torch.ones(1)), None, "input_scale"),
    "format-unknown": (None, lambda q: q["config_groups"]["group_2"].update({"format": "sparse-24-bitmask"}),
                       "format"),
    "strategy-token": (None, weights("group_2", strategy="token", group_size=None), "strategy"),
    "bits-nine": (None, weights("group_2", num_bits=9), "num_bits"),
    "actorder-group": (None, weights("group_2", actorder="group"), "actorder"),
    "group-size-zero": (None, weights("group_2", group_size=0), "group_2"),
    "untargeted": (None, lambda q: q["config_groups"].pop("group_2"), "gate_proj"),
    "ignored": (None, lambda q: q.update({"ignore": ["lm_head", M]}), "gate_proj"),
    # targets are regexes from the file: an invalid one, or one that backtracks for ages on a module name
    "target-regex-invalid": (None, lambda q: q["config_groups"]["group_2"].update({"targets": ["re:("]}),
                             "config_groups.group_2.targets"),
    "target-regex-backtracks": (None, lambda q: q["config_groups"]["group_2"].update({"targets": [BACKTRACKS]}),
                                "config_groups.group_2.targets"),
    "ignore-regex-invalid": (None, lambda q: q.update({"ignore": ["re:[lm_head"]}), "ignore"),
    "ignore-regex-backtracks": (None, lambda q: q.update({"ignore": [BACKTRACKS]}), "ignore"),
    # the library packs zero points into int32 only for group and channel strategies: an int32 grid of block
    # zero points is not packed, and unpacking it as if it were read garbage with exit 0
    "block-zero-point-int32": (_block_zero_points(torch.int32), _block_scheme, Z),
    # a dense weight beside the packed one: which is the model's is ambiguous (MXFP4 refuses the same)
    "dense-beside-packed": (put(f"{M}.weight", lambda s: torch.zeros(196, 128, dtype=torch.bfloat16)), None,
                            f"{M}.weight"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_checkpoints_end_in_one_clean_error(case, ct_bases, tmp_path, cli_runner):
    tensors, config, named = HOSTILE[case]
    path = edited(ct_bases[0], tmp_path, tensors, config)
    with pytest.raises(adaptools.InputError):
        Checkpoint.open(path)
    commands = (["dequantize", path, tmp_path / "out"], ["merge", path, ct_bases[2], tmp_path / "out"])
    refused_in_one_line(cli_runner, path, named, commands, tmp_path / "out")


def _refused_when_read(path, lora, tmp_path, cli_runner, named, says, *extra):
    """Refused once the weight is decoded: the one line still names the shard holding it, as header errors do."""
    commands = [["dequantize", path, tmp_path / "out"], ["merge", path, lora, tmp_path / "out", *extra]]
    for command in commands:
        result = cli_runner(*command)
        assert result.exit_code == 2 and named in result.stderr and says in result.stderr, result.output
        assert str(path / "model.safetensors") in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_a_weight_shape_naming_fewer_columns_than_were_packed_is_refused(ct_bases, tmp_path, cli_runner):
    """196 int4 columns fill 24.5 words; 193 need the same 25, so the packed width cannot tell: the padding
    bits after the last value, which the library leaves zero, do."""
    path = edited(ct_bases[0], tmp_path, put(f"{D}.weight_shape", lambda s: torch.tensor([128, 193])))
    _refused_when_read(path, ct_bases[2], tmp_path, cli_runner, f"{D}.weight_shape", "beyond")


def test_nan_codes_in_an_fp8_weight_are_refused_when_read(ct_bases, tmp_path, cli_runner):
    def nan_code(state):
        state[f"{F}.weight"].view(torch.uint8)[3, 4] = 0x7F
    path = edited(ct_bases[1], tmp_path, nan_code)
    _refused_when_read(path, ct_bases[2], tmp_path, cli_runner, f"{F}.weight", "NaN")


def test_fp8_scale_nan_is_refused(ct_bases, tmp_path, cli_runner):
    path = edited(ct_bases[1], tmp_path, setitem(f"{F}.weight_scale", 0, float("nan")))
    _refused_when_read(path, ct_bases[2], tmp_path, cli_runner, f"{F}.weight_scale", "NaN")


def test_a_truncated_file_is_refused(ct_bases, tmp_path, cli_runner):
    truncated_is_refused(cli_runner, ct_bases[0], tmp_path)


Q = "model.layers.0.self_attn.q_proj"  # (nvfp4 fixture) weight_packed [128, 64], weight_scale [128, 8]
#: case -> (fixture index, tensor edit, what the one line must name, what it must say, extra merge arguments):
#: files whose headers are sound but whose values are not, found only when the weight is decoded or written.
READ_TIME = {
    "fp8-scale-overflows-bf16": (1, setitem(f"{F}.weight_scale", 0, 3e38), f"{F}.weight", "NaN or infinite", ()),
    "fp8-scale-overflows-requantize": (1, setitem(f"{F}.weight_scale", 0, 3e38), f"{F}.weight", "NaN or infinite",
                                       ("--requantize",)),
    "nvfp4-global-scale-subnormal": (3, setitem(f"{Q}.weight_global_scale", 0, 1e-42), f"{Q}.weight",
                                     "NaN or infinite", ()),
    "nvfp4-input-global-scale-nan": (3, setitem(f"{Q}.input_global_scale", 0, float("nan")),
                                     f"{Q}.input_global_scale", "NaN", ("--requantize",)),
    "nvfp4-input-global-scale-inf": (3, setitem(f"{Q}.input_global_scale", 0, float("inf")),
                                     f"{Q}.input_global_scale", "Inf", ("--requantize",)),
    "nvfp4-input-global-scale-negative": (3, setitem(f"{Q}.input_global_scale", 0, -1.0),
                                          f"{Q}.input_global_scale", "negative", ("--requantize",)),
}


@pytest.mark.parametrize("case", sorted(READ_TIME))
def test_values_refused_when_read_name_the_file(case, ct_bases, tmp_path, cli_runner):
    base, tensors, named, says, extra = READ_TIME[case]
    path = edited(ct_bases[base], tmp_path, tensors)
    if extra:  # only a requantized output carries the tensor on: a dense one drops it
        result = cli_runner("merge", path, ct_bases[2], tmp_path / "out", *extra)
        assert result.exit_code == 2 and named in result.stderr and says in result.stderr, result.output
        assert str(path / "model.safetensors") in result.stderr and "Traceback" not in result.output
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
        return
    _refused_when_read(path, ct_bases[2], tmp_path, cli_runner, named, says)


def test_block_zero_points_are_read_unpacked_as_the_library_reads_them(ct_bases, tmp_path):
    """The library packs zero points only for group and channel strategies: a block-strategy pack-quantized
    weight keeps its int8 grid (partial blocks at the 196-row edge), and decodes as its decompress does."""
    from ct_checks import library_decompress, state_of

    gen = torch.Generator().manual_seed(5)

    def change(state):
        for module in (M, M.replace("gate", "up"), M.replace("0", "1"), M.replace("0", "1").replace("gate", "up")):
            state[f"{module}.weight_scale"] = (torch.rand((7, 4), generator=gen) * 0.02 + 1e-3).to(torch.bfloat16)
            state[f"{module}.weight_zero_point"] = torch.randint(-8, 8, (7, 4), generator=gen, dtype=torch.int8)
    path = edited(ct_bases[0], tmp_path, change, _block_scheme)
    checkpoint, state = Checkpoint.open(path), state_of(path)
    ours, theirs = checkpoint.read(f"{M}.weight"), library_decompress(path, state, M)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


def test_a_dense_weight_beside_an_nvfp4_one_is_refused(ct_bases, tmp_path, cli_runner):
    """(--requantize of such a checkpoint raised KeyError, a traceback.)"""
    path = edited(ct_bases[3], tmp_path, put(f"{Q}.weight", lambda s: torch.zeros(128, 128, dtype=torch.bfloat16)))
    for extra in ((), ("--requantize",)):
        result = cli_runner("merge", path, ct_bases[2], tmp_path / "out", *extra)
        assert result.exit_code == 2 and f"{Q}.weight" in result.stderr and str(path) in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [8, -9, 127])
def test_an_unpacked_zero_point_outside_the_bits_range_is_refused(value, ct_bases, tmp_path, cli_runner):
    """A block-strategy int4 weight keeps its zero points unpacked (int8); the library clamps them to int4's
    -8..7, so one outside it is a corrupt file, refused when read rather than decoded to what no one wrote."""
    def change(state):
        _block_zero_points(torch.int8)(state)
        state[Z][3, 1] = value
    path = edited(ct_bases[0], tmp_path, change, _block_scheme)
    _refused_when_read(path, ct_bases[2], tmp_path, cli_runner, Z, "-8 to 7")
