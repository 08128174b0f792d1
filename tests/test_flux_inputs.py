"""Hostile FLUX.1 LoRA files: each ends in one line naming the file and the tensor and what to do, exit code 2,
nothing written, for ``info`` and ``convert``. The files are the fixture's real kohya, BFL and diffusers LoRAs
(fixtures/flux.py), edited one way each."""

from __future__ import annotations

import pytest
import torch
from flux_checks import build_all
from safetensors.torch import load_file, save_file

QKV = "lora_unet_double_blocks_0_img_attn_qkv"
TXT = "lora_unet_double_blocks_0_txt_attn_qkv"
LINEAR1 = "lora_unet_single_blocks_0_linear1"
FINAL = "lora_unet_final_layer_adaLN_modulation_1"
SD = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_all(tmp_path_factory)


def set_alpha(value):
    return lambda s: s.__setitem__(f"{QKV}.alpha", torch.tensor(value))


def rows(name, n):
    return lambda s: s.__setitem__(f"{name}.lora_up.weight", torch.ones(n, s[f"{name}.lora_up.weight"].shape[1]))


#: case -> (edit of the kohya fixture's state, what the one line must name)
KOHYA = {
    "alpha-nan": (set_alpha(float("nan")), f"{QKV}.alpha"),
    "alpha-zero": (set_alpha(0.0), f"{QKV}.alpha"),
    "alpha-negative": (set_alpha(-8.0), f"{QKV}.alpha"),
    "alpha-inf": (set_alpha(float("inf")), f"{QKV}.alpha"),
    "qkv-rows-not-in-three": (rows(QKV, 97), f"{QKV}.lora_up.weight"),
    "block-diagonal-qkv-rows-not-in-three": (rows(TXT, 95), f"{TXT}.lora_up.weight"),
    "linear1-without-mlp-rows": (rows(LINEAR1, 96), f"{LINEAR1}.lora_up.weight"),
    "final-modulation-odd-rows": (rows(FINAL, 63), f"{FINAL}.lora_up.weight"),
    "rank-mismatch": (lambda s: s.__setitem__(f"{QKV}.lora_up.weight", torch.ones(96, 3)), f"{QKV}.lora_up.weight"),
    "up-missing": (lambda s: s.pop(f"{QKV}.lora_up.weight"), QKV),
    "down-1d": (lambda s: s.__setitem__(f"{QKV}.lora_down.weight", torch.ones(4)), f"{QKV}.lora_down.weight"),
    "factor-nan": (lambda s: s[f"{QKV}.lora_up.weight"].__setitem__((0, 0), float("nan")), f"{QKV}.lora_up.weight"),
    "sd-keys-mixed-in": (lambda s: s.update({f"{SD}.lora_down.weight": torch.ones(2, 12),
                                             f"{SD}.lora_up.weight": torch.ones(12, 2)}), SD),
    "no-such-layer": (lambda s: s.__setitem__("lora_unet_double_blocks_0_img_attn_norm.alpha", torch.tensor(1.0)),
                      "lora_unet_double_blocks_0_img_attn_norm.alpha"),
    "dora-scale": (lambda s: s.__setitem__(f"{QKV}.dora_scale", torch.ones(1, 32)), f"{QKV}.dora_scale"),
}


def write(tmp_path, state):
    path = tmp_path / "lora.safetensors"
    save_file(state, str(path))
    return path


def one_clean_line(result, path, named):
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert str(path) in result.stderr and named in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("case", sorted(KOHYA))
def test_hostile_kohya_flux_files_end_in_one_clean_error(case, built, tmp_path, cli_runner):
    edit, named = KOHYA[case]
    state = load_file(built["kohya"])
    edit(state)
    path = write(tmp_path, state)
    out = tmp_path / "out.safetensors"
    for command in (["info", path], ["convert", path, out, "--to", "diffusers"]):
        one_clean_line(cli_runner(*command), path, named)
    assert not out.exists()


def test_hostile_bfl_alpha_is_named(built, tmp_path, cli_runner):
    state = load_file(built["comfy"])
    key = "diffusion_model.single_blocks.0.linear1.alpha"
    state[key] = torch.tensor(float("nan"))
    path = write(tmp_path, state)
    out = tmp_path / "out.safetensors"
    one_clean_line(cli_runner("convert", path, out, "--to", "kohya"), path, key)
    assert not out.exists()


def test_flux_and_sd_modules_in_one_diffusers_file_are_refused(built, tmp_path, cli_runner):
    state = load_file(built["diffusers"])
    state["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"] = torch.ones(2, 8)
    state["unet.down_blocks.0.attentions.0.proj_in.lora_B.weight"] = torch.ones(8, 2)
    path = write(tmp_path, state)
    result = cli_runner("info", path)
    one_clean_line(result, path, "unet.down_blocks.0.attentions.0.proj_in")
    assert "two model families" in result.stderr


def test_a_truncated_flux_file_is_refused(built, tmp_path, cli_runner):
    data = built["kohya"].read_bytes()
    path = tmp_path / "lora.safetensors"
    path.write_bytes(data[: len(data) - 100])
    out = tmp_path / "out.safetensors"
    result = cli_runner("convert", path, out, "--to", "kohya")
    assert result.exit_code == 2 and str(path) in result.stderr and "truncated" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_check_reports_each_problem(built, tmp_path, cli_runner):
    """check reports every unusable alpha and stray key of a Flux file, exit 1."""
    state = load_file(built["kohya"])
    state[f"{QKV}.alpha"] = torch.tensor(0.0)
    state["lora_unet_double_blocks_0_img_attn_norm.alpha"] = torch.tensor(1.0)
    path = write(tmp_path, state)
    result = cli_runner("check", path)
    assert result.exit_code == 1 and "DIFF001" in result.output and "DIFF003" in result.output, result.output


def test_check_warns_where_diffusers_drops_the_final_layer_alpha(built, tmp_path, cli_runner):
    """The fixture's final layer has alpha 8 at rank 4 (scale 2); diffusers' kohya loader uses scale 1
    (tests/test_flux.py shows it). The diffusers-style file of the same LoRA has no such warning."""
    result = cli_runner("check", built["kohya"])
    assert result.exit_code == 0 and "DIFF007" in result.output and "norm_out.linear" in result.output, result.output
    result = cli_runner("check", built["diffusers"])
    assert result.exit_code == 0 and "DIFF007" not in result.output, result.output
