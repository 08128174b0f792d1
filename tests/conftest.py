"""Shared fixtures. Entry-point plugins are off (ADAPTOOLS_LOAD_PLUGINS="") so that only the built-ins and
what a test registers are loaded; tests that need entry points turn them on themselves."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import pytest

# the method suites' shared checks assert in method_checks: rewrite them so a failure shows the values
pytest.register_assert_rewrite("method_checks")

os.environ.setdefault("ADAPTOOLS_LOAD_PLUGINS", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
logging.getLogger("transformers").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module="peft")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
BASES = FIXTURES / "bases"
ADAPTERS = FIXTURES / "adapters"

#: Every PEFT fixture adapter that reads without --allow-pickle, and the base it belongs to.
SAFE_ADAPTERS = {
    p.name: p.name.split("-")[0] for p in sorted(ADAPTERS.iterdir()) if (p / "adapter_model.safetensors").exists()
}
#: PEFT types whose adapters are virtual tokens (extra inputs), not weight changes: nothing to merge.
VIRTUAL_TOKEN_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")


def peft_type(name: str) -> str:
    return json.loads((ADAPTERS / name / "adapter_config.json").read_text())["peft_type"]


#: The fixtures that change weights (merge, LoRA runtime application), with their bases.
WEIGHT_ADAPTERS = {name: arch for name, arch in SAFE_ADAPTERS.items() if peft_type(name) not in VIRTUAL_TOKEN_TYPES}


def adapter_path(name: str) -> Path:
    return ADAPTERS / name


def base_path(arch: str) -> Path:
    return BASES / arch


@pytest.fixture(scope="session")
def bf16_base(tmp_path_factory):
    """``arch -> path``: that fixture base saved again in bf16 by transformers, made once a session on first use."""
    from method_checks import bf16_copy

    root = tmp_path_factory.mktemp("bf16")
    return lambda arch: bf16_copy(base_path(arch), root / arch)


@pytest.fixture
def cli_runner():
    from click.testing import CliRunner

    from adaptools.cli import get_cli

    runner = CliRunner()
    cli = get_cli()

    def invoke(*args: str):
        return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False, prog_name="adaptools")

    return invoke


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)


#: How far reference logits regenerated on this machine may be from the committed ones: a forward pass's last
#: bits depend on the CPU's matmul kernels (AVX2 or AVX-512, oneDNN's choice), and the committed files were
#: made on another machine (measured: at most 2.4e-7 on logits of size up to 1.05). Everything else a
#: generator writes (weights, configs, token ids) is compared byte for byte.
REFERENCE_LOGITS_TOLERANCE = 1e-5


def assert_regenerated(committed: Path, fresh: Path) -> None:
    """A file a fixture generator wrote again equals the committed one: bytes, except reference logits."""
    if fresh.name != "reference.safetensors":
        assert fresh.read_bytes() == committed.read_bytes(), fresh
        return
    import torch
    from safetensors.torch import load_file

    ours, theirs = load_file(str(committed)), load_file(str(fresh))
    assert sorted(ours) == sorted(theirs), fresh
    for key, value in ours.items():
        assert value.dtype == theirs[key].dtype and value.shape == theirs[key].shape, (fresh, key)
        if value.is_floating_point():
            distance = float((value.double() - theirs[key].double()).abs().max())
            assert distance <= REFERENCE_LOGITS_TOLERANCE, (fresh, key, distance)
        else:
            assert torch.equal(value, theirs[key]), (fresh, key)
