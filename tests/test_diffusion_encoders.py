"""A text-encoder LoRA for the wrong encoder (DIFF002): the fixture's real SD 1.x and SDXL kohya files, edited
so that their text-encoder modules cannot belong to the encoders their UNet reads. Each is refused by ``info``
in one line naming the file (exit 2) and reported by ``check`` as DIFF002 (exit 1); the unedited files pass."""

from __future__ import annotations

import json

import pytest
import torch
from diffusion_checks import build_all
from safetensors.torch import load_file, save_file

HIDDEN = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1")


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return build_all(tmp_path_factory)


def swap_prefixes(state):
    """SDXL: lora_te1_ <-> lora_te2_ (each encoder's modules under the other's prefix)."""
    swap = {"lora_te1_": "lora_te2_", "lora_te2_": "lora_te1_"}
    return {next((swap[p] + k[len(p):] for p in swap if k.startswith(p)), k): v for k, v in state.items()}


def widen_te2(state, width=20):
    """SDXL: the second encoder's hidden-width inputs made ``width`` wide (an encoder of another model)."""
    for key in [k for k in state if k.startswith("lora_te2_") and k.endswith(".lora_down.weight")]:
        if any(f"_{h}.lora_down" in key for h in HIDDEN):
            state[key] = torch.zeros(state[key].shape[0], width)
    return state


def sdxl_te2_as_te1(built):
    """SD 1.x's UNet with SDXL's wider second encoder under lora_te1_ (in place of its own)."""
    sd1 = {k: v for k, v in load_file(built["sd1"]["kohya"]).items() if not k.startswith(("lora_te_", "lora_te1_"))}
    te2 = {"lora_te1_" + k[len("lora_te2_"):]: v for k, v in load_file(built["sdxl"]["kohya"]).items()
           if k.startswith("lora_te2_")}
    return {**sd1, **te2}


def one_encoder_two_widths(built):
    """SDXL: one of the second encoder's modules under lora_te1_ beside the first encoder's own."""
    state = load_file(built["sdxl"]["kohya"])
    key = next(k for k in state if k.startswith("lora_te2_") and "_self_attn_q_proj." in k)
    stem = key.split(".")[0]
    for k in [k for k in state if k.startswith(stem + ".")]:
        state["lora_te1_encoder_layers_9_self_attn_q_proj." + k.split(".", 1)[1]] = state.pop(k)
    return state


CASES = {
    "swapped": (lambda b: swap_prefixes(load_file(b["sdxl"]["kohya"])), "name each other's encoder"),
    "widths-miss-cross-attention": (lambda b: widen_te2(load_file(b["sdxl"]["kohya"])), "cross-attention width 28"),
    "wider-than-the-unet": (sdxl_te2_as_te1, "cross-attention width 12"),
    "two-widths-in-one-encoder": (one_encoder_two_widths, "hidden widths [12, 16]"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_text_encoder_lora_for_the_wrong_encoder_is_refused(case, built, tmp_path, cli_runner):
    make, named = CASES[case]
    path = tmp_path / "lora.safetensors"
    save_file(make(built), str(path))
    result = cli_runner("info", path)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert str(path) in result.stderr and named in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    result = cli_runner("check", path, "--format", "json")
    assert result.exit_code == 1, result.output
    findings = json.loads(result.stdout)["adapters"][0]["findings"]
    assert [f["rule"] for f in findings if f["severity"] == "error"] == ["DIFF002"], findings


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_fixtures_own_encoders_fit(family, built, cli_runner):
    result = cli_runner("info", built[family]["kohya"], "--json")
    assert result.exit_code == 0, result.output
