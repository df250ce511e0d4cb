"""Reading YAML configuration files with line numbers, and reporting their errors.

Every problem names the file, the line, the path inside the document
(`routes[2].destination`) and the offending value, and all problems of a load
are reported together.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

PathKey = tuple[str | int, ...]
ModelT = TypeVar("ModelT", bound=pydantic.BaseModel)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One configuration error."""

    file: str
    path: str
    message: str
    line: int | None = None
    hint: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        text = f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"
        return f"{text} ({self.hint})" if self.hint else text


class ConfigError(Exception):
    """One or more configuration errors, all reported at once."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


@dataclasses.dataclass
class Document:
    """A loaded YAML document and the line of every path in it."""

    file: str
    data: Any
    lines: dict[PathKey, int]

    def line_of(self, path: PathKey) -> int | None:
        # The nearest enclosing node that has a line, so an error on a missing
        # key points at the mapping that should contain it.
        for length in range(len(path), -1, -1):
            line = self.lines.get(path[:length])
            if line is not None:
                return line
        return None

    def problem(self, path: PathKey, message: str, hint: str = "") -> Problem:
        return Problem(self.file, format_path(path), message, self.line_of(path), hint)


def format_path(path: Iterable[str | int]) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def load_document(path: Path, display_name: str | None = None) -> Document:
    """Load one YAML file. Raises ConfigError for unreadable or malformed files."""
    name = display_name or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([Problem(name, "", f"cannot be read: {error.strerror}")]) from None
    except UnicodeDecodeError as error:
        raise ConfigError([Problem(name, "", f"is not UTF-8 text ({error.reason})")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(error, "problem", None) or str(error)
        raise ConfigError([Problem(name, "", f"invalid YAML: {reason}", line)]) from None
    lines: dict[PathKey, int] = {}
    repeated: list[Problem] = []
    data = _to_python(node, (), lines, repeated, name) if node is not None else None
    if repeated:
        raise ConfigError(repeated)
    return Document(name, data, lines)


def _to_python(
    node: yaml.Node, path: PathKey, lines: dict[PathKey, int], repeated: list[Problem], name: str
) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        key_lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = _construct_scalar(key_node)
            key_path = (*path, str(key))
            line = key_node.start_mark.line + 1
            if key in result:
                # YAML loaders keep the last value silently. A repeated key is
                # almost always a copy-paste slip, so both lines are named.
                repeated.append(
                    Problem(
                        name,
                        format_path(key_path),
                        f"key '{key}' repeated: line {key_lines[key]} has it first",
                        line,
                        "remove or rename one of them",
                    )
                )
                continue
            key_lines[key] = line
            result[key] = _to_python(value_node, key_path, lines, repeated, name)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [
            _to_python(item, (*path, index), lines, repeated, name)
            for index, item in enumerate(node.value)
        ]
    return _construct_scalar(node)


def _construct_scalar(node: yaml.Node) -> Any:
    # A fresh loader per value keeps construction free of shared state between threads.
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    except ValueError:
        # An impossible date such as 2026-13-01 stays text, so validation reports it
        # with its path and value instead of the load failing.
        return node.value
    finally:
        loader.dispose()


def validate(document: Document, model: type[ModelT], base: PathKey = ()) -> ModelT:
    """Validate a document (or the part at `base`) against a pydantic model.

    Raises ConfigError with one problem per validation error.
    """
    data: Any = document.data
    for part in base:
        data = data[part]
    try:
        return model.model_validate(data if data is not None else {})
    except pydantic.ValidationError as error:
        raise ConfigError(problems_from_validation(document, error, base)) from None


def problems_from_validation(
    document: Document, error: pydantic.ValidationError, base: PathKey = ()
) -> list[Problem]:
    problems = []
    for detail in error.errors():
        location = tuple(part for part in detail["loc"] if not _is_union_tag(part))
        path = (*base, *location)
        message = _message_for(detail)
        problems.append(document.problem(path, message))
    return problems


def _is_union_tag(part: str | int) -> bool:
    # pydantic adds the tag of a tagged union or a function validator name to the location.
    return isinstance(part, str) and (part.startswith("function-") or "[" in part)


def _message_for(detail: Any) -> str:
    kind = detail["type"]
    if kind == "missing":
        return "missing required setting"
    if kind == "extra_forbidden":
        return f"unknown setting (value {_short(detail.get('input'))})"
    message = str(detail["msg"])
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    message = message[:1].lower() + message[1:]
    if "input" in detail and not isinstance(detail["input"], dict | list):
        value = _short(detail["input"])
        # A message that quotes the value already names it; "greater than 0" does not.
        quoted = isinstance(detail["input"], str) and value in message
        if f"'{detail['input']}'" not in message and not quoted:
            return f"{message} (value {value})"
    return message


_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def check_ae_title(value: str) -> str:
    """Return an AE title unchanged, or raise ValueError for one DICOM does not allow."""
    if not _AE_TITLE.match(value):
        raise ValueError(
            f"invalid AE title {_short(value)}: use 1 to 16 characters, without backslash"
            " or control characters"
        )
    return value


def _short(value: Any) -> str:
    # Booleans and null as YAML spells them (true, not Python's True).
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    else:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
