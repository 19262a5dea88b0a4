"""Adapter names and references: ``NAME``, ``NAME@7`` (a version), ``NAME@prod`` (a tag)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from adaptr.errors import InvalidInputError, brief

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MAX_VERSION = 2**63 - 1  # SQLite's INTEGER
NAME_RULE = "lowercase letters, digits, '.', '_' or '-', starting with a letter or digit, at most 64 characters"


def check_name(name: str, what: str = "adapter name") -> str:
    """Return ``name`` if it is a valid adapter, tag or base name, else raise."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidInputError(f"invalid {what} {brief(name)}: use {NAME_RULE}")
    return name


def check_tag(tag: str) -> str:
    """Tags follow the name rule and must not look like a version number."""
    check_name(tag, "tag")
    if tag.isdigit():  # ASCII: check_name allows nothing else
        raise InvalidInputError(
            f"invalid tag {tag!r}: a tag cannot be all digits (NAME@{tag} means version {tag})"
        )
    if tag == "latest":
        raise InvalidInputError(
            "invalid tag 'latest': it is reserved for the newest version (NAME@latest)"
        )
    return tag


@dataclass(frozen=True)
class Ref:
    """A parsed reference; at most one of ``version`` and ``tag`` is set."""

    name: str
    version: int | None = None
    tag: str | None = None

    @classmethod
    def parse(cls, text: str) -> Ref:
        """Parse ``NAME``, ``NAME@N``, ``NAME@TAG`` or ``NAME@latest``."""
        if not isinstance(text, str):
            raise InvalidInputError(
                f"an adapter reference is text (NAME, NAME@VERSION or NAME@TAG), got {brief(text)}"
            )
        if not text:
            raise InvalidInputError("empty adapter reference: use NAME, NAME@VERSION or NAME@TAG")
        name, sep, selector = text.partition("@")
        check_name(name)
        if not sep or selector == "latest":
            return cls(name)
        if selector.isascii() and selector.isdigit():  # '²' and '٣' are digits to str.isdigit
            digits = selector.lstrip("0") or "0"  # int() of thousands of digits is refused
            version = int(digits) if len(digits) <= 19 else MAX_VERSION + 1
            if version < 1:
                raise InvalidInputError(f"invalid reference {brief(text)}: versions start at 1")
            if version > MAX_VERSION:
                raise InvalidInputError(
                    f"invalid reference {brief(text)}: no version is that large (at most {MAX_VERSION})"
                )
            return cls(name, version=version)
        try:
            check_name(selector, "tag")
        except InvalidInputError:
            raise InvalidInputError(
                f"invalid reference {brief(text)}: use NAME, NAME@VERSION or NAME@TAG ({NAME_RULE})"
            ) from None
        return cls(name, tag=selector)

    @property
    def floating(self) -> bool:
        """True when the reference can resolve to another version later (newest or a tag)."""
        return self.version is None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        if self.tag is not None:
            return f"{self.name}@{self.tag}"
        return self.name
