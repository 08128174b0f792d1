"""Merging image-model LoRAs into single-file SD 1.x and SDXL checkpoints (the original LDM/SGM key naming),
against diffusers itself.

The test files are made from the tiny pipelines of fixtures/diffusion.py with the diffusion family's own
inverse mapping, and proved right by diffusers' own single-file conversion (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``create_diffusers_clip_model_from_ldm``, which runs
``convert_ldm_clip_checkpoint`` or ``convert_open_clip_checkpoint``): converted back, every component equals
the pipeline's, key for key and byte for byte. A merged file converted the same way equals diffusers'
``load_lora_weights`` + ``fuse_lora`` on the pipeline, bit for bit in fp32."""

from __future__ import annotations

import json
import struct
import warnings

import pytest
import torch
from diffusion_checks import FAMILIES, build_all, diffusion_fixtures, raw_tensors
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_diffusion_merge import fused

import adaptools


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return build_all(tmp_path_factory)


@pytest.fixture(scope="module")
def singles(built, tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    out = {}
    for family in FAMILIES:
        out[family] = root / f"{family}.safetensors"
        diffusion_fixtures.single_file(built[family]["pipe"], family, out[family])
    return out


def pipeline_state(folder, component):
    return {k: v for f in sorted((folder / component).glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def converted(path, pipe):
    """Each component of the single file ``path`` as diffusers' single-file conversion makes it, the configs
    taken from the pipeline folder ``pipe`` (offline)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    checkpoint = load_file(str(path))
    out = {"unet": sfu.convert_ldm_unet_checkpoint(checkpoint, dict(UNet2DConditionModel.load_config(pipe / "unet"))),
           "vae": sfu.convert_ldm_vae_checkpoint(checkpoint, dict(AutoencoderKL.load_config(pipe / "vae")))}
    encoders = [("text_encoder", CLIPTextModel)]
    if (pipe / "text_encoder_2").is_dir():
        encoders.append(("text_encoder_2", CLIPTextModelWithProjection))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for component, cls in encoders:
            model = sfu.create_diffusers_clip_model_from_ldm(cls, checkpoint, config=str(pipe), subfolder=component,
                                                             local_files_only=True)
            out[component] = {k: v.detach() for k, v in model.state_dict().items()}
    return out


def assert_same(ours, theirs, component):
    assert sorted(ours) == sorted(theirs), component
    different = [k for k in theirs if not (ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]))]
    assert not different, f"{component}: {len(different)} tensors differ, first {different[:3]}"


@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_single_files_convert_back_to_their_pipeline(built, singles, family):
    """The inverse mapping is right: diffusers' conversion of the file gives every component back exactly."""
    pipe = built[family]["pipe"]
    got = converted(singles[family], pipe)
    assert sorted(got) == sorted(["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else []))
    for component, state in got.items():
        assert_same(state, pipeline_state(pipe, component), component)
    keys = load_file(str(singles[family])).keys()
    assert ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys) == (family == "sdxl")


def _merged_equals_fuse_lora(built, singles, family, lora, reference_lora, tmp_path, cli_runner):
    out = tmp_path / "merged.safetensors"
    result = cli_runner("merge", singles[family], lora, out)
    assert result.exit_code == 0, result.output
    pipe = built[family]["pipe"]
    reference = fused(pipe, reference_lora)
    got = converted(out, pipe)
    for component, state in reference.items():
        assert_same(got[component], state, component)
    assert_same(got["vae"], pipeline_state(pipe, "vae"), "vae")
    # the file is the base's: same keys, dtypes and shapes in the same order, untouched tensors byte for byte
    base, merged = raw_tensors(singles[family]), raw_tensors(out)
    assert list(base) == list(merged) and all(base[k][:2] == merged[k][:2] for k in base)
    changed = [k for k in base if base[k] != merged[k]]
    adapted = ("model.diffusion_model.", "cond_stage_model.", "conditioner.")
    assert changed and all(k.startswith(adapted) for k in changed)
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert metadata["modelspec.architecture"] == f"tiny-{family}" and "adaptools.provenance" in metadata
    return changed


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_equals_diffusers_fuse_lora(built, singles, family, tmp_path, cli_runner):
    """A diffusers LoRA (with its LoraConfig metadata) merged into the single file, converted back, equals the
    pipeline after load_lora_weights + fuse_lora: UNet, CLIP and (SDXL) OpenCLIP, whose q, k, v live in one
    fused in_proj tensor; the VAE and everything else is copied byte for byte."""
    changed = _merged_equals_fuse_lora(built, singles, family, built[family]["diffusers"], built[family]["diffusers"],
                                       tmp_path, cli_runner)
    if family == "sdxl":
        assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in changed


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_merge_equals_fuse_lora_of_the_same_lora(built, singles, family, tmp_path, cli_runner):
    """The kohya file (diffusers' converter, alpha = rank) merged into the single file equals fuse_lora of the
    same LoRA in diffusers keys (diffusers misreads some kohya alphas: test_diffusion_merge.py says why)."""
    _merged_equals_fuse_lora(built, singles, family, built[family]["kohya"], built[family]["diffusers-plain"],
                             tmp_path, cli_runner)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_lycoris_merge_equals_peft(built, singles, method, tmp_path, cli_runner):
    """LyCORIS LoHa and LoKr in kohya keys merge into the SD 1.x single file as peft merges them."""
    lora = tmp_path / f"{method}.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = getattr(diffusion_fixtures, f"{method}_kohya")(built["sd1"]["pipe"], lora)
    out = tmp_path / "merged.safetensors"
    result = cli_runner("merge", singles["sd1"], lora, out)
    assert result.exit_code == 0, result.output
    assert_same(converted(out, built["sd1"]["pipe"])["unet"], reference, "unet")


def test_json_summary_force_and_folder_output(built, singles, tmp_path, cli_runner):
    """--json reports the merge; an existing output adaptools did not write is refused even with --force, one
    it wrote is replaced with --force; an OUT without .safetensors says how to name it."""
    out = tmp_path / "merged.safetensors"
    result = cli_runner("merge", singles["sd1"], built["sd1"]["kohya"], out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tensors_merged"] > 0 and summary["output"] == str(out)
    again = cli_runner("merge", singles["sd1"], built["sd1"]["kohya"], out)
    assert again.exit_code == 2 and "--force" in again.stderr
    assert cli_runner("merge", singles["sd1"], built["sd1"]["kohya"], out, "--force").exit_code == 0
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign))
    refused = cli_runner("merge", singles["sd1"], built["sd1"]["kohya"], foreign, "--force")
    assert refused.exit_code == 2 and load_file(str(foreign)).keys() == {"x"}
    folder = cli_runner("merge", singles["sd1"], built["sd1"]["kohya"], tmp_path / "folder")
    assert folder.exit_code == 2 and "ending in .safetensors" in folder.stderr
    dtype = cli_runner("merge", singles["sd1"], built["sd1"]["kohya"], tmp_path / "d.safetensors", "--dtype", "fp16")
    assert dtype.exit_code == 2 and "--dtype" in dtype.stderr


# --- hostile inputs: one clean line naming the file (and tensor), exit 2, nothing written --------------------


def _refused(cli_runner, base, lora, tmp_path, *says):
    out = tmp_path / "out.safetensors"
    result = cli_runner("merge", base, lora, out)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for text in says:
        assert text in lines[0], lines[0]
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def _edited(singles, tmp_path, edit):
    state = load_file(str(singles["sdxl" if edit.startswith("xl-") else "sd1"]))
    path = tmp_path / "edited.safetensors"
    if edit == "not-sd":
        state = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2),
                 "model.diffusion_model.input_blocks.1.0.weird.weight": torch.zeros(2)}
    elif edit == "mixed":
        state["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.zeros(12)
    elif edit == "xl-in-proj-lies":
        key = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
        state[key] = state[key][:-1].contiguous()
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("edit, says", [
    ("not-sd", ["model.diffusion_model.input_blocks.1.0.weird.weight", "no place"]),
    ("mixed", ["conditioner.embedders.0.transformer.", "two checkpoint layouts"]),
    ("xl-in-proj-lies", ["resblocks.0.attn.in_proj_weight", "not three stacked"]),
])
def test_a_broken_single_file_is_refused(built, singles, tmp_path, cli_runner, edit, says):
    _refused(cli_runner, _edited(singles, tmp_path, edit), built["sd1"]["kohya"], tmp_path, "edited.safetensors",
             *says)


def test_a_truncated_single_file_is_refused(built, singles, tmp_path, cli_runner):
    data = singles["sd1"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    (length,) = struct.unpack("<Q", data[:8])
    last = max(json.loads(data[8:8 + length]).items(),
               key=lambda kv: kv[1]["data_offsets"][1] if isinstance(kv[1], dict) and "data_offsets" in kv[1] else -1)
    _refused(cli_runner, tmp_path / "cut.safetensors", built["sd1"]["kohya"], tmp_path, "cut.safetensors", last[0],
             "truncated")


def test_an_sdxl_lora_into_an_sd1_file_is_refused(built, singles, tmp_path, cli_runner):
    _refused(cli_runner, singles["sd1"], built["sdxl"]["kohya"], tmp_path, "SDXL LoRA", "SD 1.x single-file")


def test_a_module_the_file_lacks_is_named(built, singles, tmp_path, cli_runner):
    """A UNet module the file does not have (keys that map to no tensor): the error names it."""
    state = load_file(str(built["sd1"]["kohya"]))
    for suffix, value in ((".lora_down.weight", torch.ones(1, 8)), (".lora_up.weight", torch.ones(8, 1)),
                          (".alpha", torch.tensor(1.0))):
        state["lora_unet_down_blocks_3_resnets_0_conv9" + suffix] = value
    save_file(state, str(tmp_path / "extra.safetensors"))
    _refused(cli_runner, singles["sd1"], tmp_path / "extra.safetensors", tmp_path, "unet.down_blocks.3.resnets.0.conv9")


def test_a_file_that_is_no_sd_checkpoint_is_not_a_base(built, tmp_path, cli_runner):
    save_file({"model.diffusion_model.foo.weight": torch.zeros(2)}, str(tmp_path / "foo.safetensors"))
    _refused(cli_runner, tmp_path / "foo.safetensors", built["sd1"]["kohya"], tmp_path, "foo.safetensors")


def test_library_merge_names_the_single_file_container(built, singles, tmp_path):
    plan = adaptools.plan(singles["sdxl"], [adaptools.MergeInput(adaptools.load(built["sdxl"]["kohya"]))],
                          adaptools.MergeOptions(), tmp_path / "x.safetensors")
    assert plan.container.name == "sd-single-file"
    from conftest import FIXTURES  # a folder base's .safetensors OUT stays a folder: the container is its base's own

    llama = adaptools.plan(FIXTURES / "bases" / "llama", [adaptools.MergeInput(adaptools.load(
        FIXTURES / "adapters" / "llama-lora"))], adaptools.MergeOptions(), tmp_path / "y.safetensors")
    assert llama.container.name == "safetensors"
    pieces = [n for n in plan.entries if ".self_attn.q_proj.weight" in n and n.startswith("text_encoder_2.")]
    assert pieces and all(plan.entries[n].merged for n in pieces)


def test_readme_single_file_example_runs(built, singles, tmp_path, cli_runner):
    """The README's worked example "kohya LoRA -> merged SDXL single file", run as written on the fixtures."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"<!-- sdxl-single-file-example -->\n```bash\n(.+?)\n```", readme, re.S)
    assert block, "README has no single-file example"
    files = {"sd_xl_base_1.0.safetensors": singles["sdxl"], "my-lora-kohya.safetensors": built["sdxl"]["kohya"],
             "sdxl-merged.safetensors": tmp_path / "sdxl-merged.safetensors"}
    for line in block.group(1).splitlines():
        command, _, comment = line.partition("#")
        args = [str(files.get(a, a)) for a in shlex.split(command)]
        assert args[0] == "adaptools"
        result = cli_runner(*args[1:])
        assert result.exit_code == 0, result.output
        if "model_family: sdxl" in comment:
            assert "sdxl" in result.stdout
    assert (tmp_path / "sdxl-merged.safetensors").is_file()


#: SDXL base's UNet configuration (what differs from UNet2DConditionModel's defaults, which are SD 1.5's).
SDXL_UNET = {"block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "use_linear_projection": True,
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816}


@pytest.mark.parametrize("config", [{}, SDXL_UNET], ids=["sd15", "sdxl"])
def test_full_size_unet_names_match_diffusers_conversion(config):
    """At the real SD 1.5 and SDXL layouts (4 and 3 levels, 2 resnets each, 12 and 9 input blocks, 10 transformer
    blocks), names only: each original key our inverse gives, converted by diffusers, lands on the diffusers
    name it came from, and our forward mapping gives that name back."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from adaptools_plugins.diffusion import ldm_names

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    names = list(unet.state_dict())
    layout = ldm_names.layout_of_diffusers(names)
    original = {name: ldm_names.unet_to_original(name, layout) for name in names}
    assert None not in original.values()
    checkpoint = {ldm_names.UNET + key: torch.tensor(i) for i, key in enumerate(original.values())}
    assert len(checkpoint) == len(names)
    got = convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    assert sorted(got) == sorted(names)
    assert all(got[name] is checkpoint[ldm_names.UNET + original[name]] for name in names)
    assert ldm_names.layout_of_original(original.values()) == layout
    assert all(ldm_names.unet_to_diffusers(key, layout) == name for name, key in original.items())


def test_an_fp16_file_stays_fp16_rounded_once(built, singles, tmp_path, cli_runner):
    """Published single files are mostly fp16: changed tensors (the fused OpenCLIP in-projection's row blocks
    included) are written in fp16, each the fp32 merge of the same weights rounded once, the merge that
    equals fuse_lora above."""
    half = {k: v.half() for k, v in load_file(str(singles["sdxl"])).items()}
    save_file(half, str(tmp_path / "half.safetensors"))
    save_file({k: v.float() for k, v in half.items()}, str(tmp_path / "full.safetensors"))
    lora = built["sdxl"]["diffusers"]
    for name in ("half", "full"):
        result = cli_runner("merge", tmp_path / f"{name}.safetensors", lora, tmp_path / f"{name}-merged.safetensors")
        assert result.exit_code == 0, result.output
    merged, reference = (load_file(str(tmp_path / f"{n}-merged.safetensors")) for n in ("half", "full"))
    assert all(merged[k].dtype == torch.float16 and torch.equal(merged[k], reference[k].half()) for k in half)
    fused_key = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    assert not torch.equal(merged[fused_key], half[fused_key])


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_file_loads_with_from_single_file(built, singles, family, tmp_path, cli_runner):
    """diffusers' whole single-file loader (``from_single_file``, configs from the local pipeline folder) reads
    the merged file into a pipeline whose every adapted component equals load_lora_weights + fuse_lora."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipe, lora = built[family]["pipe"], built[family]["diffusers"]
    out = tmp_path / "merged.safetensors"
    assert cli_runner("merge", singles[family], lora, out).exit_code == 0
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = cls.from_single_file(str(out), config=str(pipe), local_files_only=True, torch_dtype=torch.float32)
    for component, state in fused(pipe, lora).items():
        assert_same({k: v.detach() for k, v in getattr(loaded, component).state_dict().items()}, state, component)
