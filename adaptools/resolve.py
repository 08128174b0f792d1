"""Turn what a user typed (a local path, ``org/name`` or ``org/name@revision``) into a local path.

Hub references are resolved with huggingface-hub, so its cache, ``HF_HUB_OFFLINE`` and token handling apply
unchanged. Only the files an operation needs are fetched (``allow_patterns``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import InputError

HUB_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


def parse_hub_ref(ref: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) if ``ref`` looks like a hub reference, else None."""
    m = HUB_REF.match(ref)
    if not m:
        return None
    return m.group("repo"), m.group("rev")


def resolve(ref: str | os.PathLike[str], *, allow_patterns: list[str] | None = None, what: str = "input") -> Path:
    """A local path for ``ref``: the path itself if it exists, else a hub snapshot in the local cache.

    Raises:
        InputError: the path does not exist and it is not a reachable hub reference.
    """
    path = Path(ref).expanduser()
    if path.exists():
        return path
    parsed = parse_hub_ref(str(ref))
    if parsed is None or str(ref).startswith((".", "/", "~")):
        raise InputError(f"{what} not found", path=ref, hint="give an existing path or a hub name like org/name")
    repo_id, revision = parsed
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface-hub is a required dependency
        raise InputError(f"{what} not found locally and huggingface-hub is missing", path=ref) from None
    try:
        local = snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns)
    except LocalEntryNotFoundError:
        raise InputError(f"{what} is not a local path and is not in the hub cache (offline)", path=ref,
                         hint="download it once with network access, or give a local path") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{what} is not a local path and the hub said: {first}", path=ref) from None
    return Path(local)
