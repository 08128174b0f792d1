"""Reading JSON that came from a file: one careful reader and one schema check for every JSON input.

Adapter configs, base ``config.json`` files, shard indexes, schema-file metadata, safetensors headers and
4-bit quant states are all JSON written by someone else. Python's ``json`` module accepts far more than a
config should hold: ``NaN`` and ``Infinity``, ``1e400`` (which becomes ``inf``), integers of any length,
strings with lone surrogates (which crash later, when printed or encoded), nesting deep enough to raise
``RecursionError``, and repeated keys (the last silently wins). Opening a path can also block forever (a
FIFO) or read without end (a link to ``/dev/zero``). Everything here turns those into one
:class:`~adaptools.errors.InputError` naming the file and the field (docs/input-validation.md).

Schemas are JSON Schema (draft 2020-12), checked with ``jsonschema``; ``"integer"`` there means a JSON
integer, never ``true`` and never ``4.0``. A schema node's ``description`` is what the error says was
expected, so messages read "r is 'abc', expected a positive integer".
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import InputError, printable

#: Largest JSON file read (configs are kilobytes; a shard index of a huge model a few megabytes).
MAX_JSON_BYTES = 64 * 1024 * 1024
#: Deepest nesting accepted (real configs nest 3 or 4 levels).
MAX_DEPTH = 64
#: Longest integer literal accepted, in digits: 19 digits hold every 64-bit value.
MAX_INT_DIGITS = 19
#: Largest magnitude of an integer (safetensors offsets and shapes are 64-bit).
MAX_INT = 2**63 - 1


class _Rejected(Exception):
    """Raised inside json's hooks; turned into an InputError naming the file."""


def _reject_constant(name: str) -> Any:
    raise _Rejected(f"holds {name}, which is not a JSON number (only finite numbers are accepted)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Rejected(f"holds the number {text[:40]}, which is too large (it overflows to infinity)")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS or abs(int(text)) > MAX_INT:
        raise _Rejected(f"holds the integer {text[:40]}{'...' if len(text) > 40 else ''}, which is too large "
                        f"(at most {MAX_INT})")
    return int(text)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Rejected(f"gives the key {printable(key)!r} twice, so which value is meant is ambiguous")
        out[key] = value
    return out


def field_name(parts: Any) -> str:
    """A readable name for a position in a document: ``rank_pattern["q_proj"]``, ``shape[1]``."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif text == "" and str(part).isidentifier():
            text = str(part)
        else:  # keys below the top are often regexes or tensor names: always quoted
            text += f"[{json.dumps(str(part), ensure_ascii=False)}]"
    return printable(text) or "the document"


def _walk(value: Any, max_depth: int) -> str | None:
    """Why ``value`` is unusable (too deep, a string that is not valid Unicode), or None. Iterative."""
    stack: list[tuple[Any, int, tuple[Any, ...]]] = [(value, 1, ())]
    while stack:
        item, depth, where = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > max_depth:
                return f"nested more than {max_depth} levels deep"
            children = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in children:
                if isinstance(key, str) and not _is_unicode(key):
                    return f"a key in {field_name(where)} is not valid Unicode (a lone surrogate)"
                stack.append((child, depth + 1, (*where, key)))
        elif isinstance(item, str) and not _is_unicode(item):
            return f"the string at {field_name(where)} is not valid Unicode (a lone surrogate)"
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_json(data: bytes | str, *, path: object = None, what: str = "JSON", max_depth: int = MAX_DEPTH,
               hint: str | None = None) -> Any:
    """Parse JSON text strictly: UTF-8, finite numbers, 64-bit integers, no repeated keys, bounded depth.

    Raises:
        InputError: naming ``path`` and saying what is wrong and where (``what`` names the document,
            e.g. ``"metadata adaptools.config"``, when ``path`` alone does not).
    """
    prefix = f"{what}: " if what != "JSON" else ""
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{prefix}not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                             f"{exc.start})", path=path, hint=hint or "save it as UTF-8") from None
    else:
        text = data
    text = text.removeprefix("\ufeff")  # a byte-order mark some editors write; json.loads refuses it
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                           parse_int=_bounded_int, object_pairs_hook=_no_duplicates)
    except _Rejected as exc:
        raise InputError(f"{prefix}{exc}", path=path, hint=hint) from None
    except RecursionError:
        raise InputError(f"{prefix}nested too deeply to read", path=path, hint=hint) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{prefix}not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
                         path=path, hint=hint) from None
    except ValueError as exc:  # an integer beyond Python's digit limit, or a surrogate in a number
        raise InputError(f"{prefix}not usable JSON ({str(exc)[:80]})", path=path, hint=hint) from None
    problem = _walk(value, max_depth)
    if problem:
        raise InputError(f"{prefix}{problem}", path=path, hint=hint)
    return value


def read_bytes_limited(path: str | os.PathLike[str], *, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a *regular* file of at most ``max_bytes``, never blocking and never reading without end.

    The file is opened non-blocking and checked with ``fstat`` on the open descriptor, so a FIFO, a
    device such as ``/dev/zero``, a socket or a directory (or a symlink to one) is refused, not read.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputError(f"{what} not found", path=path) from None
    except PermissionError:
        raise InputError(f"cannot read the {what}: permission denied", path=path,
                         hint="check the file's permissions") from None
    except OSError as exc:
        raise InputError(f"cannot open the {what}: {exc.strerror or exc}", path=path) from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise InputError(f"the {what} is a directory, not a file", path=path)
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"the {what} is not a regular file (a FIFO, device or socket)", path=path,
                             hint="give a regular file")
        if info.st_size > max_bytes:
            raise InputError(f"the {what} is {info.st_size} bytes; adaptools reads at most {max_bytes}",
                             path=path, hint="is this the right file?")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:  # it grew while we read
                raise InputError(f"the {what} is larger than {max_bytes} bytes", path=path)
        return b"".join(chunks)
    except OSError as exc:
        raise InputError(f"cannot read the {what}: {exc.strerror or exc}", path=path) from None
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike[str], *, what: str = "JSON file", max_bytes: int = MAX_JSON_BYTES,
              schema: Mapping[str, Any] | None = None, hint: str | None = None) -> Any:
    """Read and parse a JSON file safely (:func:`read_bytes_limited`, :func:`parse_json`), and check it
    against ``schema`` when one is given (:func:`check_json`)."""
    value = parse_json(read_bytes_limited(path, max_bytes=max_bytes, what=what), path=path, hint=hint)
    if schema is not None:
        check_json(value, schema, path=path, hint=hint)
    return value


# --- schemas ---------------------------------------------------------------------------------------------


def _validator_class() -> Any:
    from jsonschema import Draft202012Validator, validators

    def is_integer(checker: Any, instance: Any) -> bool:
        return isinstance(instance, int) and not isinstance(instance, bool)

    def is_number(checker: Any, instance: Any) -> bool:
        return isinstance(instance, (int, float)) and not isinstance(instance, bool)

    checker = Draft202012Validator.TYPE_CHECKER.redefine_many({"integer": is_integer, "number": is_number})
    return validators.extend(Draft202012Validator, type_checker=checker)  # type: ignore[no-untyped-call]


_VALIDATOR: Any = None
_COMPILED: dict[int, Any] = {}


def _compiled(schema: Mapping[str, Any]) -> Any:
    global _VALIDATOR
    if _VALIDATOR is None:
        _VALIDATOR = _validator_class()
    key = id(schema)
    entry = _COMPILED.get(key)
    if entry is None or entry[0] is not schema:
        entry = (schema, _VALIDATOR(schema))
        _COMPILED[key] = entry
    return entry[1]


def short(value: Any, limit: int = 60) -> str:
    """A JSON rendering of ``value`` cut to ``limit`` characters, for messages."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    text = printable(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_TYPE_WORDS = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
               "object": "an object", "array": "a list", "null": "null"}


def _expected(error: Any) -> str:
    """What a failing schema node wanted, in words: its description, or one derived from the keyword."""
    description = error.schema.get("description") if isinstance(error.schema, Mapping) else None
    keyword, wanted = error.validator, error.validator_value
    if keyword == "type" and not description:
        kinds = [wanted] if isinstance(wanted, str) else list(wanted)
        return " or ".join(_TYPE_WORDS.get(k, k) for k in kinds)
    if description:
        return str(description)
    if keyword == "enum":
        return "one of " + ", ".join(short(v) for v in wanted)
    if keyword == "const":
        return f"exactly {short(wanted)}"
    words = {"minimum": f"at least {wanted}", "maximum": f"at most {wanted}",
             "exclusiveMinimum": f"more than {wanted}", "exclusiveMaximum": f"less than {wanted}",
             "minLength": f"at least {wanted} characters", "maxLength": f"at most {wanted} characters",
             "minItems": f"at least {wanted} items", "maxItems": f"at most {wanted} items",
             "maxProperties": f"at most {wanted} entries", "pattern": f"text matching {wanted}"}
    return str(words.get(keyword, error.message[:120]))


def _deepest(error: Any) -> Any:
    """For an ``anyOf`` whose value had the right kind but broke a rule inside (``text_config.hidden_size``
    is 0), the error inside; otherwise the error itself."""
    while error.validator in ("anyOf", "oneOf") and error.context:
        deeper = [e for e in error.context if len(e.absolute_path) > len(error.absolute_path)]
        if not deeper:
            break
        from jsonschema.exceptions import best_match

        error = best_match(deeper)
    return error


def json_problems(value: Any, schema: Mapping[str, Any], *, limit: int = 20) -> list[tuple[str, str]]:
    """Every way ``value`` breaks ``schema``, as ``(field, message)`` pairs in document order (at most
    ``limit``): e.g. ``("r", "r is 'abc', expected a positive integer")``."""
    problems = []
    for error in sorted(_compiled(schema).iter_errors(value), key=lambda e: [str(p) for p in e.absolute_path]):
        error = _deepest(error)
        where = list(error.absolute_path)
        if error.validator == "required":
            missing = error.message.split("'")[1] if "'" in error.message else error.message
            field = field_name([*where, missing])
            problems.append((field, f"{field} is missing"))
        elif error.validator == "additionalProperties" and error.validator_value is False:
            extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
            field = field_name([*where, extra[0]]) if extra else field_name(where)
            problems.append((field, f"{field} is not a known field"))
        elif error.validator == "propertyNames":
            problems.append((field_name(where), f"{field_name(where)} has a key that is not {_expected(error)}"))
        else:
            field = field_name(where)
            problems.append((field, f"{field} is {short(error.instance)}, expected {_expected(error)}"))
        if len(problems) >= limit:
            break
    return problems


def check_json(value: Any, schema: Mapping[str, Any], *, path: object = None, what: str | None = None,
               hint: str | None = None) -> None:
    """Raise InputError for the first way ``value`` breaks ``schema``, naming ``path`` and the field."""
    problems = json_problems(value, schema, limit=1)
    if problems:
        field, message = problems[0]
        raise InputError(f"{what + ': ' if what else ''}{message}", path=path, hint=hint)
