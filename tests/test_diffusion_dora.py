"""DoRA in kohya-key image-model files (LyCORIS' ``dora_scale``), against LyCORIS itself.

fixtures/lycoris-dora/ holds two files LyCORIS 4.1.3 wrote for the seeded SD 1.x fixture UNet (linear LoRA and
LoCon convs, DoRA per output row and per input column) and the UNet tensors LyCORIS' own ``merge_to`` made of
each (fixtures/lycoris_dora.py). The tests rebuild that UNet with fixtures/diffusion.py (its file's sha256 must
be the one LyCORIS merged into), merge with adaptools into the pipeline folder and into a single-file
checkpoint, and compare bit for bit in fp32; then the round trips, the refusals and the hostile files.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings

import pytest
import torch
from conftest import FIXTURES
from diffusion_checks import build_all, diffusion_fixtures
from lycoris_dora import build as build_lycoris_dora
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_diffusion_single_file import converted

import adaptools

FOLDER = FIXTURES / "lycoris-dora"
AXES = ("out", "in")
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return build_all(tmp_path_factory)


@pytest.fixture(scope="module")
def pipe(built):
    """The SD 1.x fixture pipeline, proved to be the one LyCORIS merged into."""
    folder = built["sd1"]["pipe"]
    digest = hashlib.sha256((folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    for axis in AXES:
        with safe_open(str(FOLDER / f"merged-{axis}.safetensors"), "pt") as f:
            assert f.metadata()["base_sha256"] == digest, "the fixture UNet is not the one LyCORIS merged into"
    return folder


def unet_state(folder):
    return {k: v for f in sorted((folder / "unet").glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def assert_lycoris_merge(ours, base, axis):
    """``ours`` (a merged UNet state) equals LyCORIS' merge: its changed tensors bit for bit, the rest the base's."""
    reference = load_file(str(FOLDER / f"merged-{axis}.safetensors"))
    assert sorted(ours) == sorted(base)
    different = [k for k in ours if not torch.equal(ours[k], reference.get(k, base[k]))]
    assert not different, f"{len(different)} of {len(ours)} tensors differ from LyCORIS' merge, first {different[:3]}"
    assert all(ours[k].dtype == torch.float32 for k in reference)


@pytest.mark.slow
def test_lycoris_reproduces_the_committed_files(tmp_path):
    """fixtures/lycoris_dora.py run again (in its cached LyCORIS venv, built if missing) writes the same
    tensors: the files and LyCORIS' merges are LyCORIS' and reproducible, not edited by hand."""
    paths = build_lycoris_dora(tmp_path / "out", tmp_path / "work")
    for name, path in paths.items():
        committed, generated = load_file(str(FOLDER / path.name)), load_file(str(path))
        assert sorted(committed) == sorted(generated), name
        assert all(torch.equal(committed[k], generated[k]) for k in committed), name


@pytest.mark.parametrize("axis", AXES)
def test_reads_as_lycoris_dora(axis):
    """Every module with its factors, alpha / rank as the file stores them, and its dora_scale as stored."""
    path = FOLDER / f"dora-{axis}.safetensors"
    state = load_file(str(path))
    adapter = adaptools.load(path)
    assert adapter.method == "lycoris_dora"
    modules = adapter.modules()
    assert len(modules) == len({k.partition(".")[0] for k in state})
    flat = {m: "lora_unet_" + m.partition(".")[2].replace(".", "_") for m in modules}
    for module, roles in modules.items():
        assert set(roles) == {"lora_A", "lora_B", "dora_scale"}
        key = flat[module]
        assert torch.equal(adapter.tensor(roles["dora_scale"]), state[f"{key}.dora_scale"])
        rank = state[f"{key}.lora_down.weight"].shape[0]
        assert adapter.config["modules"][module]["scaling"] == state[f"{key}.alpha"].item() / rank


@pytest.mark.parametrize("axis", AXES)
def test_merge_into_pipeline_equals_lycoris(pipe, axis, tmp_path, cli_runner):
    result = cli_runner("merge", pipe, FOLDER / f"dora-{axis}.safetensors", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert_lycoris_merge(unet_state(tmp_path / "out"), unet_state(pipe), axis)


@pytest.mark.parametrize("axis", AXES)
def test_merge_into_single_file_equals_lycoris(pipe, axis, tmp_path, cli_runner):
    """The same file merged into the pipeline's single-file checkpoint, converted back by diffusers."""
    single = tmp_path / "sd1.safetensors"
    diffusion_fixtures.single_file(pipe, "sd1", single)
    out = tmp_path / "merged.safetensors"
    result = cli_runner("merge", single, FOLDER / f"dora-{axis}.safetensors", out)
    assert result.exit_code == 0, result.output
    assert_lycoris_merge(converted(out, pipe)["unet"], unet_state(pipe), axis)


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_merge_at_a_strength_interpolates(pipe, weight, tmp_path):
    """At strength w the DoRA module lands at W + w·(W' − W), W' LyCORIS' full-strength merge (A1111's and
    ComfyUI's rule): 0 keeps the base, 0.5 is half way, in fp32 as that formula computes it."""
    adapter = adaptools.load(FOLDER / "dora-out.safetensors")
    adaptools.merge(pipe, [adaptools.MergeInput(adapter, weight=weight)], tmp_path / "out")
    base, merged = unet_state(pipe), unet_state(tmp_path / "out")
    reference = load_file(str(FOLDER / "merged-out.safetensors"))
    expected = {k: base[k] + weight * (reference[k] - base[k]) if k in reference else base[k] for k in base}
    different = [k for k in base if not torch.equal(merged[k], expected[k])]
    assert not different, different[:3]
    if weight == 0.0:
        assert all(torch.equal(merged[k], base[k]) for k in base)


@pytest.mark.parametrize("axis", AXES)
def test_kohya_round_trip_keeps_every_tensor(axis, tmp_path, cli_runner):
    source = FOLDER / f"dora-{axis}.safetensors"
    out = tmp_path / "back.safetensors"
    result = cli_runner("convert", source, out, "--to", "kohya")
    assert result.exit_code == 0, result.output
    before, after = load_file(str(source)), load_file(str(out))
    assert sorted(before) == sorted(after)
    assert all(before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before)


def test_schema_round_trip_merges_the_same(pipe, tmp_path, cli_runner):
    schema = tmp_path / "dora.safetensors"
    assert cli_runner("convert", FOLDER / "dora-in.safetensors", schema, "--to", "schema").exit_code == 0
    result = cli_runner("merge", pipe, schema, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert_lycoris_merge(unet_state(tmp_path / "out"), unet_state(pipe), "in")


@pytest.mark.parametrize("target", ["diffusers", "peft"])
def test_formats_without_lycoris_dora_refuse_in_one_line(target, tmp_path, cli_runner):
    out = tmp_path / ("out.safetensors" if target == "diffusers" else "out")
    result = cli_runner("convert", FOLDER / "dora-out.safetensors", out, "--to", target)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "lycoris_dora" in result.stderr.lower().replace(
        "lycoris dora", "lycoris_dora"), result.stderr
    assert not out.exists()


def test_info_and_check_show_dora(cli_runner):
    result = cli_runner("info", FOLDER / "dora-in.safetensors")
    assert result.exit_code == 0 and "lycoris_dora" in result.output, result.output
    assert "per input column" in result.output
    result = cli_runner("check", FOLDER / "dora-out.safetensors")
    assert result.exit_code == 0 and "0 finding" in result.output, result.output


# --- hostile files -----------------------------------------------------------------------------------------


def _edited(tmp_path, edit, axis="out"):
    state = load_file(str(FOLDER / f"dora-{axis}.safetensors"))
    edit(state)
    path = tmp_path / "edited.safetensors"
    save_file(state, str(path))
    return path


def _set(key, index, value):
    return lambda s: s[key].__setitem__(index, value)


#: case -> (edit, the key the one line names, the rule check reports)
HOSTILE = {
    "nan": (_set(f"{Q}.dora_scale", 0, float("nan")), f"{Q}.dora_scale", "DORA002"),
    "inf": (_set(f"{CONV}.dora_scale", 1, float("inf")), f"{CONV}.dora_scale", "DORA002"),
    "wrong-shape": (lambda s: s.__setitem__(f"{Q}.dora_scale", torch.ones(3, 1)), f"{Q}.dora_scale", "DORA001"),
    "transposed-conv": (lambda s: s.__setitem__(f"{CONV}.dora_scale", s[f"{CONV}.dora_scale"].reshape(1, 1, -1, 1)),
                        f"{CONV}.dora_scale", "DORA001"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_dora_scale_is_refused_in_one_line(case, pipe, tmp_path, cli_runner):
    edit, named, rule = HOSTILE[case]
    path = _edited(tmp_path, edit)
    result = cli_runner("check", path)
    assert result.exit_code != 0 and rule in result.output and named in result.output, result.output
    out = tmp_path / "out"
    for command in (["merge", pipe, path, out], ["convert", path, tmp_path / "x.safetensors", "--to", "kohya"]):
        result = cli_runner(*command)
        if command[0] == "convert" and rule == "DORA002":
            continue  # values are checked where they are used: a merge, and check
        assert result.exit_code == 2 and "Traceback" not in result.output, (command, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and named in lines[0] and str(path) in lines[0], result.stderr
    assert not out.exists()


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_zero_or_negative_dora_scale_is_a_check_warning(value, pipe, tmp_path, cli_runner):
    """A magnitude is a norm; zero or negative entries zero or flip rows. LyCORIS merges them as they are, so
    adaptools does too, and check warns."""
    path = _edited(tmp_path, _set(f"{Q}.dora_scale", 2, value))
    result = cli_runner("check", path)
    assert "DORA003 warning" in result.output and f"{Q}.dora_scale" in result.output, result.output
    result = cli_runner("merge", pipe, path, tmp_path / "out")
    assert result.exit_code == 0, result.output


def test_dora_scale_without_its_factors_is_refused(tmp_path, cli_runner):
    def edit(state):
        state.pop(f"{Q}.lora_down.weight")
        state.pop(f"{Q}.lora_up.weight")
        state.pop(f"{Q}.alpha")
    path = _edited(tmp_path, edit)
    for command in (["info", path], ["check", path]):
        result = cli_runner(*command)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and f"{Q}.dora_scale" in lines[0] and "lora_down" in lines[0], result.stderr


def test_truncated_dora_file_is_refused(pipe, tmp_path, cli_runner):
    path = tmp_path / "cut.safetensors"
    data = (FOLDER / "dora-out.safetensors").read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    result = cli_runner("merge", pipe, path, tmp_path / "out")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert str(path) in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_dora_on_loha_modules_is_refused_naming_the_key(built, tmp_path, cli_runner):
    """LyCORIS' DoRA on LoHa (and LoKr) modules is not read yet: refused naming the dora_scale key."""
    loha = tmp_path / "loha.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diffusion_fixtures.loha_kohya(built["sd1"]["pipe"], loha)
    state = load_file(str(loha))
    module = sorted(k for k in state if k.endswith(".hada_w1_a"))[0].rpartition(".")[0]
    state[f"{module}.dora_scale"] = torch.ones(state[f"{module}.hada_w1_a"].shape[0], 1)
    path = tmp_path / "doha.safetensors"
    save_file(state, str(path))
    result = cli_runner("info", path)
    assert result.exit_code == 2 and f"{module}.dora_scale" in result.stderr and "LoHa" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize("command", [["resize", "--rank", "2", "--to", "kohya"], ["convert", "--to", "lora"]])
def test_operations_dora_cannot_do_refuse_saying_why(command, tmp_path, cli_runner):
    """resize and conversion to plain LoRA need a low-rank delta, which a DoRA module does not have."""
    out = tmp_path / "out.safetensors"
    result = cli_runner(command[0], FOLDER / "dora-out.safetensors", out, *command[1:])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "low-rank" in result.stderr, result.stderr
    assert not out.exists()
