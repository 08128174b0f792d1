"""kohya files naming the SDXL UNet in the original SGM blocks (``lora_unet_input_blocks_4_1_…``), against
diffusers, which maps them on load: the fixture's kohya LoRA renamed to SGM names means the same LoRA to
diffusers' loader, and adaptools reads it to the same modules, factors and scales and merges it to the same
bits as the file in diffusers' names."""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusion_checks import build_all, diffusers_layers, ours, same_layers
from safetensors.torch import load_file, save_file
from test_diffusion_merge import assert_same, fused, merged_state

import adaptools
from adaptools_plugins.diffusion import ldm_names, sgm_kohya
from adaptools_plugins.diffusion.names import split_flat


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return build_all(tmp_path_factory)


def to_sgm(state, layout):
    """A kohya state dict in diffusers' names -> the same in SGM names (the table read backwards); every UNet
    key is renamed."""
    out = {}
    for key, tensor in state.items():
        name, dot, suffix = key.partition(".")
        if name.startswith("lora_unet_"):
            original = sgm_kohya.to_original(split_flat(name[len("lora_unet_"):]), layout)
            assert original is not None, key
            name = "lora_unet_" + original.replace(".", "_")
        out[name + dot + suffix] = tensor
    return out


@pytest.fixture(scope="module")
def sgm_file(built, tmp_path_factory):
    paths = built["sdxl"]
    unet = load_file(str(paths["pipe"] / "unet" / "diffusion_pytorch_model.safetensors"))
    state = to_sgm(load_file(str(paths["kohya"])), ldm_names.layout_of_diffusers(unet))
    assert any(k.startswith("lora_unet_input_blocks_") for k in state)
    assert any(k.startswith("lora_unet_output_blocks_") for k in state)
    assert any(k.startswith("lora_unet_middle_block_") for k in state)
    path = tmp_path_factory.mktemp("sgm") / "sgm.safetensors"
    save_file(state, str(path))
    return path


def test_diffusers_reads_the_sgm_file_as_the_diffusers_named_one(built, sgm_file):
    """The oracle for the renamed file: diffusers' loader puts the same factors and scales into the same layers."""
    paths = built["sdxl"]
    theirs = diffusers_layers(paths["pipe"], sgm_file)
    assert any(m.startswith("unet.up_blocks.") for m in theirs)
    same_layers(theirs, diffusers_layers(paths["pipe"], paths["kohya"]))


def test_sgm_names_read_to_the_same_modules_factors_and_scales(built, sgm_file, cli_runner):
    adapter = adaptools.load(sgm_file)
    same_layers(ours(adapter), ours(adaptools.load(built["sdxl"]["kohya"])))
    result = cli_runner("check", sgm_file)
    assert "DIFF003" not in result.output, result.output


def test_sgm_names_merge_as_diffusers_fuses_the_same_lora(built, sgm_file, tmp_path, cli_runner):
    """Bit for bit in fp32 with diffusers' fuse_lora of the same LoRA in diffusers keys (diffusers reads the
    fixture's kohya attention alphas differently, docs/diffusion.md)."""
    paths = built["sdxl"]
    result = cli_runner("merge", paths["pipe"], sgm_file, tmp_path / "m")
    assert result.exit_code == 0, result.output
    for component, state in fused(paths["pipe"], paths["diffusers-plain"]).items():
        assert_same(merged_state(tmp_path / "m", component), state, component)


def test_sgm_file_written_as_kohya_uses_diffusers_names(sgm_file, tmp_path):
    out = tmp_path / "k.safetensors"
    adaptools.save(adaptools.load(sgm_file), out, format="kohya")
    keys = list(load_file(str(out)))
    assert not any(sgm_kohya.is_sgm(k[len("lora_unet_"):]) for k in keys if k.startswith("lora_unet_"))
    same_layers(ours(adaptools.load(out)), ours(adaptools.load(sgm_file)))


def test_every_layer_of_an_sdxl_layout_unet_maps_as_diffusers_maps_it():
    """On an SDXL-shaped UNet (two resnets per level, attention in the lower levels, upsamplers after it; the
    fixture has one resnet per level), every linear and conv layer's SGM name goes where diffusers' SGM mapping
    puts it, and the file's keys alone give the resnets per level and the up levels with attention back."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(8, 16, 16), layers_per_block=2, sample_size=8, norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2), cross_attention_dim=28, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=44)
    layout = ldm_names.layout_of_diffusers(n for n, _ in unet.named_parameters())
    modules = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    original = {m: sgm_kohya.to_original(m, layout) for m in modules}
    assert None not in original.values()
    found = sgm_kohya.layout_of(original.values())
    assert (found.per_level, found.up_attention) == (layout.per_level, layout.up_attention)
    assert all(sgm_kohya.to_diffusers(o, layout) == m for m, o in original.items())

    def state(names):
        out = {}
        for i, (m, name) in enumerate(names.items()):
            out[f"lora_unet_{name.replace('.', '_')}.lora_down.weight"] = torch.tensor([i])
            out[f"lora_unet_{name.replace('.', '_')}.lora_up.weight"] = torch.tensor([-i])
        return out

    # diffusers' kohya converter gives add_embedding.linear_1 and _2 in diffusers' names one name (its "emb"
    # index rule), so those two are compared by their SGM names (label_emb.0.0, .0.2) alone
    plain_modules = {m: m for m in modules if not m.startswith("add_embedding.")}
    plain_modules_list = list(plain_modules)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, _ = StableDiffusionXLPipeline.lora_state_dict(state(original), unet_config=unet.config)
        plain, _ = StableDiffusionXLPipeline.lora_state_dict(state(plain_modules), unet_config=unet.config)
    assert len(plain) == 2 * len(plain_modules)
    index = {m: i for i, m in enumerate(modules)}
    for k in plain:  # the same layer gets the same factor, so numbered by its place in ``modules``
        assert torch.equal(theirs[k].abs(), torch.tensor([index[plain_modules_list[int(plain[k].abs())]]])), k
    for n in (1, 2):
        assert int(theirs[f"unet.add_embedding.linear_{n}.lora.down.weight"]) == index[f"add_embedding.linear_{n}"]
    assert len(theirs) == 2 * len(modules)


@pytest.mark.parametrize("name,says", [("lora_unet_middle_block_5_proj_in", "lora_unet_middle_block_5_proj_in"),
                                       ("lora_unet_down_blocks_0_resnets_0_conv1", "beside diffusers' block names")])
def test_an_sgm_key_that_names_no_module_is_refused_naming_it(sgm_file, name, says, tmp_path, cli_runner):
    """A block the original UNet does not have, or blocks in diffusers' names beside SGM ones: one line naming
    the file and key, exit 2, and DIFF003 from check."""
    state = load_file(str(sgm_file))
    state[f"{name}.lora_down.weight"] = torch.ones(1, 4)
    state[f"{name}.lora_up.weight"] = torch.ones(4, 1)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    out = tmp_path / "out.safetensors"
    result = cli_runner("convert", path, out, "--to", "kohya")
    assert result.exit_code == 2 and str(path) in result.stderr and says in result.stderr, result.output
    assert "lora_unet_" in result.stderr, result.stderr  # the key
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists(), result.stderr
    result = cli_runner("check", path, "--format", "json")
    assert result.exit_code == 1 and "DIFF003" in result.stdout, result.output
