"""Property-based fuzzing of the surfaces added since the first hardening round (issue 21): GGUF files
(adapters and model bases) corrupted at the byte level, and the configs of the PEFT methods beyond LoRA.

The property: every command ends in success or one AdaptoolsError line, never anything else, and within a
few seconds: a count in a file or a config (array lengths, tensor counts, block counts, iteration counts) is
bounded by what the file can hold before anything is allocated or looped over. Each example runs under an
alarm, so a hang fails the test instead of stalling CI. The default run is small and derandomized; the
``slow`` tests run many more random examples.
"""

from __future__ import annotations

import json
import shutil
import signal
import struct
from pathlib import Path

import pytest
from conftest import adapter_path, base_path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adaptools
from adaptools.operations.check import check

FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
SECONDS = 20  # one example: reading a small file and checking it takes well under a second


class Hang(Exception):
    pass


def within_time(fn, *args, **kwargs):
    """Run ``fn``; an AdaptoolsError is an answer, anything else (or running past SECONDS) fails."""

    def alarm(signum, frame):
        raise Hang(f"{getattr(fn, '__name__', fn)} ran past {SECONDS} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(SECONDS)
    try:
        return fn(*args, **kwargs)
    except adaptools.AdaptoolsError as exc:
        assert str(exc) and "\n" not in str(exc) and len(str(exc)) < 2000
        return None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- GGUF files ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory) -> dict[str, bytes]:
    """A GGUF LoRA adapter (written by adaptools) and a Q8_0 GGUF model (gguf-py) from the fixtures, as bytes."""
    from click.testing import CliRunner
    from gguf import GGMLQuantizationType
    from gguf_bases import write_base

    from adaptools.cli import get_cli

    tmp = tmp_path_factory.mktemp("gguf")
    args = ["convert", adapter_path("llama-lora"), tmp / "adapter.gguf", "--to", "gguf", "--base", base_path("llama")]
    result = CliRunner().invoke(get_cli(), [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    write_base(base_path("llama"), tmp / "model.gguf", GGMLQuantizationType.Q8_0)
    return {"adapter": (tmp / "adapter.gguf").read_bytes(), "model": (tmp / "model.gguf").read_bytes()}


def header_end(data: bytes) -> int:
    """Where the tensor data starts (roughly: the header and tensor infos are what a corruption should hit)."""
    import gguf

    reader = gguf.GGUFReader(_write(data))
    return min(int(reader.data_offset), len(data))


_SCRATCH: list[Path] = []


def _write(data: bytes) -> Path:
    path = _SCRATCH[0] / "probe.gguf"
    path.write_bytes(data)
    return path


HUGE = [2**31 - 1, 2**32 - 1, 2**50, 2**63 - 1, 2**64 - 1, 0, 1, 1000, 2**20]


@st.composite
def corruptions(draw, size: int, end: int):
    """A list of edits: overwrite 8 or 4 bytes with a large or small count, flip a byte, or truncate."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["u64", "u32", "byte", "truncate"]))
        offset = draw(st.integers(4, max(4, end - 8)))
        if kind == "u64":
            edits.append(("put", offset, struct.pack("<Q", draw(st.sampled_from(HUGE)))))
        elif kind == "u32":
            edits.append(("put", offset, struct.pack("<I", draw(st.sampled_from(HUGE)) & 0xFFFFFFFF)))
        elif kind == "byte":
            edits.append(("put", offset, bytes([draw(st.integers(0, 255))])))
        else:
            edits.append(("cut", draw(st.integers(0, size - 1)), b""))
    return edits


def corrupt(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for kind, offset, value in edits:
        if kind == "put":
            out[offset:offset + len(value)] = value
        else:
            del out[offset:]
    return bytes(out)


def fuzz_gguf(tmp: Path, files: dict[str, bytes], which: str, edits) -> None:
    path = tmp / f"{which}.gguf"
    path.write_bytes(corrupt(files[which], edits))
    if which == "adapter":
        adapter = within_time(adaptools.load, path, base=str(base_path("llama")))
        within_time(check, path, base=str(base_path("llama")))
        if adapter is not None:
            within_time(adaptools.merge, base_path("llama"), [adaptools.MergeInput(adapter, 1.0)], tmp / "out",
                        force=True)
    else:
        adapter = adaptools.load(adapter_path("llama-lora"))
        out = tmp / "out.gguf"
        within_time(adaptools.plan, path, [adaptools.MergeInput(adapter, 1.0)], adaptools.MergeOptions(), out)
        within_time(adaptools.merge, path, [adaptools.MergeInput(adapter, 1.0)], out, force=True)
    for leftover in tmp.glob(".*adaptools-tmp*"):
        raise AssertionError(f"a failed run left {leftover}")


def run_gguf(tmp: Path, files: dict[str, bytes], which: str, profile) -> None:
    _SCRATCH[:] = [tmp]
    end = header_end(files[which])

    @given(corruptions(len(files[which]), end))
    def prop(edits):
        fuzz_gguf(tmp, files, which, edits)

    profile(prop)()


@pytest.mark.parametrize("which", ["adapter", "model"])
def test_gguf_corruption_is_an_answer_or_one_line(which, gguf_files, tmp_path):
    run_gguf(tmp_path, gguf_files, which, FAST)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["adapter", "model"])
def test_gguf_corruption_many_random_examples(which, gguf_files, tmp_path):
    run_gguf(tmp_path, gguf_files, which, SLOW)


# --- method configs ------------------------------------------------------------------------------------------

METHOD_FIXTURES = {"loha": "llama-loha", "lokr": "llama-lokr", "oft": "llama-oft", "boft": "llama-boft",
                   "vera": "llama-vera", "adalora": "llama-adalora"}
ODD = st.one_of(st.none(), st.booleans(), st.sampled_from([0, 1, -1, 2, 7, 2**31, 10**9, 2**63, 1e300, 0.5, -0.0]),
                st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                st.lists(st.sampled_from(["q_proj", "v_proj", "", "(a|a)*$"]), max_size=2),
                st.dictionaries(st.sampled_from(["q_proj", r"layers\.0\..*", ""]),
                                st.sampled_from([0, 1, -3, 2**40, 1e300, "x"]), max_size=2))


def fuzz_method_config(tmp: Path, fixture: str, edits: dict) -> None:
    folder = tmp / "adapter"
    if not folder.exists():
        shutil.copytree(adapter_path(fixture), folder)
    config = json.loads((adapter_path(fixture) / "adapter_config.json").read_text())
    config.update(edits)
    (folder / "adapter_config.json").write_text(json.dumps(config, allow_nan=True))
    adapter = within_time(adaptools.load, folder)
    within_time(check, folder, base=str(base_path("llama")))
    if adapter is not None:
        within_time(adaptools.merge, base_path("llama"), [adaptools.MergeInput(adapter, 1.0)], tmp / "out",
                    force=True)


def run_method(tmp: Path, method: str, profile) -> None:
    from adaptools.plugin import get_method

    fixture = METHOD_FIXTURES[method]
    config = json.loads((adapter_path(fixture) / "adapter_config.json").read_text())
    fields = sorted(set(config) - {"peft_type", "base_model_name_or_path", "task_type", "revision"})
    assert get_method(method).name == method

    @given(st.dictionaries(st.sampled_from(fields), ODD, max_size=3))
    def prop(edits):
        fuzz_method_config(tmp, fixture, edits)

    profile(prop)()


@pytest.mark.parametrize("method", sorted(METHOD_FIXTURES))
def test_method_config_is_an_answer_or_one_line(method, tmp_path):
    run_method(tmp_path, method, FAST)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHOD_FIXTURES))
def test_method_config_many_random_examples(method, tmp_path):
    run_method(tmp_path, method, SLOW)
