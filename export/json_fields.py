"""Typed reading of a JSON record's fields (the export sidecar, a run's manifest): each field's type is checked
where it is read, a field an older writer did not record takes the default its reader gives, and a missing or
malformed one is one line naming the file and the field."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

REQUIRED: Any = object()  # the default of a field the record must have


class Fields:
    """The fields of one JSON object of a file (`where`); `error` is raised for a missing or malformed one."""

    def __init__(self, record: Any, where: str, error: type[Exception], prefix: str = "") -> None:
        if not isinstance(record, Mapping):
            raise error(f"{where}: {f'field {prefix!r}' if prefix else 'the file'} is not a JSON object "
                        f"(got {type(record).__name__})")
        self.record, self.where, self.error, self.prefix = record, where, error, prefix

    def _name(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def _get(self, name: str, default: Any, kinds: tuple[type, ...], expected: str) -> Any:
        value = self.record.get(name)
        if value is None:
            if default is REQUIRED:
                raise self.error(f"{self.where}: field {self._name(name)!r} is missing")
            return default
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise self.error(f"{self.where}: field {self._name(name)!r} must be {expected}, got {value!r:.60}")
        return value

    def text(self, name: str, default: Any = REQUIRED) -> Any:
        return self._get(name, default, (str,), "a string")

    def integer(self, name: str, default: Any = REQUIRED) -> Any:
        return self._get(name, default, (int,), "an integer")

    def number(self, name: str, default: Any = REQUIRED) -> Any:
        value = self._get(name, default, (int, float), "a number")
        return float(value) if isinstance(value, int) else value

    def flag(self, name: str, default: Any = REQUIRED) -> Any:
        return self._get(name, default, (bool,), "true or false")

    def text_or_integer(self, name: str, default: Any = REQUIRED) -> Any:
        return self._get(name, default, (str, int), "a string or an integer")

    def mapping(self, name: str, default: Any = REQUIRED) -> Any:
        return self._get(name, default, (Mapping,), "a JSON object")

    def items(self, name: str, default: Any = REQUIRED) -> Any:
        return self._get(name, default, (list,), "a list")

    def child(self, name: str, default: Any = REQUIRED) -> Any:
        """The nested object `name` as Fields (`default` when absent)."""
        value = self.mapping(name, default)
        return value if value is default else Fields(value, self.where, self.error, self._name(name))

    def texts(self, name: str, default: Any = REQUIRED) -> Any:
        """A list of strings, as a tuple."""
        value = self.items(name, default)
        if value is default:
            return value
        if not all(isinstance(item, str) for item in value):
            raise self.error(f"{self.where}: field {self._name(name)!r} must be a list of strings")
        return tuple(value)
