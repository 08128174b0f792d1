"""Adapter algebra (``resize``, ``combine``) on image-model LoRAs, LoCon conv modules included, checked through
diffusers: the deltas diffusers fuses from the output are compared with the SVD of the deltas it fuses from
the input, so a wrong flattening of a conv kernel, a lost scale or a dropped module shows up as a wrong weight
in the pipeline, not only in our own reading."""

from __future__ import annotations

import pytest
import torch
from diffusion_checks import build_all
from safetensors.torch import load_file, save_file
from test_diffusion_merge import fused


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return build_all(tmp_path_factory)["sdxl"]


def _base_state(pipe_folder):
    from diffusion_checks import pipeline

    pipe = pipeline(pipe_folder)
    return {c: {k: v.detach().clone() for k, v in getattr(pipe, c).state_dict().items()}
            for c in ("unet", "text_encoder", "text_encoder_2")}


def _deltas(pipe_folder, lora_file):
    """Every weight diffusers changes when it fuses ``lora_file``: (component, key) -> fused - base, float64."""
    base = _base_state(pipe_folder)
    out = {}
    for component, state in fused(pipe_folder, lora_file).items():
        for key, value in state.items():
            if not torch.equal(value, base[component][key]):
                out[(component, key)] = value.double() - base[component][key].double()
    return out


def _kohya_deltas(lora_file):
    """kohya's own rule, computed here from the file's tensors: module -> (alpha / rank) * up @ down, a conv's
    factors flattened and the product shaped as the conv weight [out, in, kh, kw]; float64."""
    state = load_file(lora_file)
    out = {}
    for key in state:
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            down, up = state[key].double(), state[f"{name}.lora_up.weight"].double()
            alpha = float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else down.shape[0]
            delta = (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1))
            out[name] = delta.reshape(up.shape[0], *down.shape[1:])
    return out


def _truncated(delta: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of a (flattened, for a conv) delta."""
    flat = delta.reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(delta.shape)


def _close(after, before):
    assert set(after) == set(before)
    for key, delta in before.items():
        scale = float(delta.abs().max())
        assert float((after[key] - delta).abs().max()) <= 1e-5 * scale + 1e-7, key


def test_resize_of_a_diffusers_lora_is_what_diffusers_fuses_truncated(sdxl, tmp_path, cli_runner):
    """resize --rank 2 of the fixture LoRA in diffusers keys (rank 4 with rank and alpha patterns; LoCon on 3x3
    convs): every weight diffusers fuses from the output is the best rank-2 approximation of what it fuses from
    the input."""
    out = tmp_path / "r2.safetensors"
    result = cli_runner("resize", sdxl["diffusers"], out, "--rank", "2", "--to", "diffusers")
    assert result.exit_code == 0, result.output
    before, after = _deltas(sdxl["pipe"], sdxl["diffusers"]), _deltas(sdxl["pipe"], out)
    assert any(d.dim() == 4 and d.shape[-1] == 3 for d in before.values()), "the fixture holds 3x3 conv LoRAs"
    _close(after, {key: _truncated(delta, 2) for key, delta in before.items()})


def test_resize_of_a_kohya_lora_keeps_kohyas_rule(sdxl, tmp_path, cli_runner):
    """The same in kohya keys, by kohya's rule (scale alpha / rank per module) computed from both files'
    tensors: the output's LoCon factors are 4-D again ([2, in, 3, 3] down, [out, 2, 1, 1] up)."""
    out = tmp_path / "r2.safetensors"
    result = cli_runner("resize", sdxl["kohya"], out, "--rank", "2", "--to", "kohya")
    assert result.exit_code == 0, result.output
    state = load_file(out)
    conv = next(k for k in state if k.endswith("conv1.lora_down.weight"))
    assert state[conv].shape[0] == 2 and state[conv].shape[2:] == (3, 3)
    assert state[conv.replace("down", "up")].shape[1:] == (2, 1, 1)
    before = _kohya_deltas(sdxl["kohya"])
    _close(_kohya_deltas(out), {key: _truncated(delta, 2) for key, delta in before.items()})


def test_resize_at_full_rank_keeps_every_delta(sdxl, tmp_path, cli_runner):
    out = tmp_path / "same.safetensors"
    assert cli_runner("resize", sdxl["kohya"], out, "--rank", "64", "--to", "kohya").exit_code == 0
    _close(_kohya_deltas(out), _kohya_deltas(sdxl["kohya"]))


def test_combine_halves_of_one_lora_give_it_back(sdxl, tmp_path, cli_runner):
    """combine --how cat with weights 0.5 and 0.5 of the same LoRA: the deltas are the original's (conv
    modules concatenated along the rank, then reshaped back to kernels), in kohya keys and, read by diffusers,
    in diffusers keys."""
    for style, deltas in (("kohya", _kohya_deltas), ("diffusers", lambda f: _deltas(sdxl["pipe"], f))):
        out = tmp_path / f"{style}.safetensors"
        result = cli_runner("combine", sdxl[style], sdxl[style], out, "--weight", "0.5", "--weight", "0.5",
                            "--to", style)
        assert result.exit_code == 0, result.output
        _close(deltas(out), deltas(sdxl[style]))


def test_a_conv_lora_whose_up_is_not_1x1_is_refused_in_one_line(sdxl, tmp_path, cli_runner):
    """A kohya conv LoRA whose up factor is a 3x3 kernel (a file edited by hand, or another method's layout)
    is refused when read, naming the tensor and the kernel; and adapter algebra refuses such factors from any
    format rather than splitting them wrongly."""
    from adaptools import plugin
    from adaptools.plugin import Adapter, MemoryStore, UnsupportedOperationError

    state = load_file(sdxl["kohya"])
    up = next(k for k in sorted(state) if k.endswith("conv1.lora_up.weight"))
    state[up] = state[up].repeat(1, 1, 3, 3)
    save_file(state, tmp_path / "bad.safetensors")
    result = cli_runner("resize", tmp_path / "bad.safetensors", tmp_path / "out.safetensors", "--rank", "2")
    assert result.exit_code == 2, result.output
    assert "3x3 kernel" in result.stderr and up in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()

    method = plugin.get_method("lora")
    tensors = {"m.lora_A": torch.ones(2, 3, 3, 3), "m.lora_B": torch.ones(4, 2, 3, 3)}
    config = method.from_peft({"r": 2, "lora_alpha": 2, "target_modules": ["m"]}, {"m.lora_A": (2, 3, 3, 3)})
    with pytest.raises(UnsupportedOperationError, match="1x1"):
        method.low_rank(Adapter("lora", config, MemoryStore(tensors)))
    tensors["m.lora_B"] = torch.ones(4, 2, 1, 1)
    (factors,) = method.low_rank(Adapter("lora", config, MemoryStore(tensors))).values()
    assert factors.kernel == (3, 3) and factors.a.shape == (2, 27) and factors.b.shape == (4, 2)
