"""``extract`` on two diffusers pipeline folders, against diffusers and torch themselves: the tuned pipeline is
the fixture's base with its LoRA fused by diffusers' ``fuse_lora`` and saved; the LoRA extracted at full rank,
loaded back with ``load_lora_weights`` + ``fuse_lora`` into the base, gives the tuned weights to float
tolerance; at a lower rank each module's delta is the truncated SVD of the difference (``torch.linalg.svd``)."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from diffusion_checks import COMPONENTS, FAMILIES, build_all, pipeline
from safetensors.torch import load_file, save_file

import adaptools
from adaptools import plugin

#: Largest |fused extracted − tuned| allowed, for weights of magnitude about 1 stored in fp32: the full-rank
#: SVD is computed in float64, so what is left is the fp32 rounding of the factors and of fuse_lora's sum.
TOLERANCE = 1e-6


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return build_all(tmp_path_factory)


def states(pipe):
    return {c: {k: v.detach().clone() for k, v in getattr(pipe, c).state_dict().items()}
            for c in COMPONENTS if getattr(pipe, c, None) is not None}


def fuse(pipe_folder, lora_file):
    """The pipeline at ``pipe_folder`` with ``lora_file`` fused by diffusers (every component, scale 1)."""
    pipe = pipeline(pipe_folder)
    present = [c for c in COMPONENTS if getattr(pipe, c, None) is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(lora_file))
        pipe.fuse_lora(components=present, lora_scale=1.0)
        pipe.unload_lora_weights()
    return pipe


@pytest.fixture(scope="session")
def tuned(built, tmp_path_factory):
    """family -> a pipeline folder: the fixture's base with its diffusers LoRA fused by diffusers and saved."""
    out = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp("tuned") / family
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fuse(built[family]["pipe"], built[family]["diffusers"]).save_pretrained(folder)
        out[family] = folder
    return out


def max_error(a, b):
    assert sorted(a) == sorted(b)
    worst = 0.0
    for component in a:
        assert sorted(a[component]) == sorted(b[component]), component
        for k, v in a[component].items():
            worst = max(worst, float((v.double() - b[component][k].double()).abs().max()))
    return worst


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_extract_fuses_back_to_the_tuned_pipeline(built, tuned, family, tmp_path, cli_runner):
    out = tmp_path / "extracted.safetensors"
    result = cli_runner("extract", built[family]["pipe"], tuned[family], out, "--rank", "64", "--to", "diffusers")
    assert result.exit_code == 0, result.output
    adapter = adaptools.load(out)
    modules = adapter.modules()
    assert any(m.startswith("unet.") for m in modules) and any(m.startswith("text_encoder.") for m in modules)
    convs = [m for m, r in modules.items() if adapter.tensor(r["lora_A"]).dim() == 4]
    assert any(adapter.tensor(modules[m]["lora_A"]).shape[2:] == (3, 3) for m in convs)  # LoCon 3x3 convs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = states(pipeline(tuned[family]))
        base = states(pipeline(built[family]["pipe"]))
    assert max_error(base, reference) > 1e-2  # the LoRA changed the pipeline
    error = max_error(states(fuse(built[family]["pipe"], out)), reference)
    assert error < TOLERANCE, error  # measured: 1.2e-7 (sd1), 2.4e-7 (sdxl), one or two fp32 ulps


@pytest.mark.parametrize("family", FAMILIES)
def test_low_rank_extract_is_the_truncated_svd(built, tuned, family, tmp_path, cli_runner):
    """Written in kohya keys and read back: every changed weight's delta is torch.linalg.svd's rank-2
    truncation of tuned − base (conv kernels flattened to [out, in·kh·kw], as kohya's script does)."""
    out = tmp_path / "r2.safetensors"
    result = cli_runner("extract", built[family]["pipe"], tuned[family], out, "--rank", "2", "--to", "kohya")
    assert result.exit_code == 0, result.output
    assert any(k.startswith("lora_unet_") and k.endswith(".alpha") for k in load_file(str(out)))
    adapter = adaptools.load(out)
    factors = plugin.get_method("lora").low_rank(adapter)
    checked = 0
    for component in COMPONENTS:
        base_dir, tuned_dir = built[family]["pipe"] / component, tuned[family] / component
        if not base_dir.exists():
            continue
        name = "diffusion_pytorch_model.safetensors" if component == "unet" else "model.safetensors"
        before, after = load_file(str(base_dir / name)), load_file(str(tuned_dir / name))
        for key, w in before.items():
            d = after[key].double() - w.double()
            if not d.any():
                continue
            module = f"{component}.{key.rpartition('.')[0]}"
            u, s, vh = torch.linalg.svd(d.flatten(1), full_matrices=False)
            expected = (u[:, :2] * s[:2]) @ vh[:2]
            got = factors[module].b @ factors[module].a
            assert torch.allclose(got, expected, atol=1e-5), module
            checked += 1
    assert checked == len(factors) and checked > 10


def test_pipelines_with_different_components_are_refused(built, tuned, tmp_path, cli_runner):
    other = tmp_path / "other"
    shutil.copytree(tuned["sd1"], other)
    shutil.rmtree(other / "text_encoder")
    out = tmp_path / "out.safetensors"
    result = cli_runner("extract", built["sd1"]["pipe"], other, out, "--rank", "4", "--to", "diffusers")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "text_encoder" in result.stderr and not out.exists()


def test_a_tensor_of_another_shape_is_refused_naming_it(built, tuned, tmp_path, cli_runner):
    other = tmp_path / "other"
    shutil.copytree(tuned["sd1"], other)
    path = other / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    key = next(k for k in state if k.endswith("conv1.weight"))
    state[key] = state[key][:-1].contiguous()
    save_file(state, str(path))
    out = tmp_path / "out.safetensors"
    result = cli_runner("extract", built["sd1"]["pipe"], other, out, "--rank", "4", "--to", "kohya")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert f"unet.{key}" in result.stderr and not out.exists()


def test_a_pipeline_against_a_checkpoint_is_refused(built, tmp_path, cli_runner):
    out = tmp_path / "out.safetensors"
    result = cli_runner("extract", built["sd1"]["pipe"], built["sd1"]["pipe"] / "unet", out, "--rank", "4",
                        "--to", "kohya")
    assert result.exit_code == 2 and "pipeline" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_kohya_output_fuses_in_diffusers_as_the_diffusers_output(built, tuned, tmp_path, cli_runner):
    """At one rank for every module (alpha = rank everywhere, so diffusers' kohya alpha rule does not apply),
    the kohya file, loaded and fused by diffusers, gives what the diffusers file gives."""
    for to in ("kohya", "diffusers"):
        result = cli_runner("extract", built["sd1"]["pipe"], tuned["sd1"], tmp_path / f"{to}.safetensors",
                            "--rank", "2", "--to", to)
        assert result.exit_code == 0, result.output
    kohya = states(fuse(built["sd1"]["pipe"], tmp_path / "kohya.safetensors"))
    diffusers = states(fuse(built["sd1"]["pipe"], tmp_path / "diffusers.safetensors"))
    base = states(pipeline(built["sd1"]["pipe"]))
    assert max_error(kohya, base) > 1e-2
    assert max_error(kohya, diffusers) < TOLERANCE


def test_a_changed_norm_is_refused_by_the_image_model_writers(built, tuned, tmp_path, cli_runner):
    """A changed norm has no LoRA form; it becomes a full tensor, which kohya and diffusers keys cannot hold:
    one line naming the module, nothing written."""
    other = tmp_path / "other"
    shutil.copytree(tuned["sd1"], other)
    path = other / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    key = next(k for k in sorted(state) if k.endswith("norm1.weight"))
    state[key] = state[key] + 0.5
    save_file(state, str(path))
    for to in ("kohya", "diffusers"):
        out = tmp_path / f"{to}.safetensors"
        result = cli_runner("extract", built["sd1"]["pipe"], other, out, "--rank", "4", "--to", to)
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
        assert f"unet.{key.rpartition('.')[0]}" in result.stderr and not out.exists()
        assert "<memory>" not in result.stderr and str(other) in result.stderr, result.stderr
