from __future__ import annotations

import pytest

from adaptr.errors import InvalidInputError
from adaptr.registry import Ref, check_name

from helpers import refused


@pytest.mark.parametrize("name", ["a", "llama-legal", "x.y_z-1", "0abc", "a" * 64])
def test_valid_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "A", "Legal", "a/b", "..", "a..b", "/abs", ".hidden", "-x", "a" * 65, "a b", "é"]
)
def test_invalid_names(name):
    with pytest.raises(InvalidInputError):
        check_name(name)


def test_parse_refs():
    assert Ref.parse("legal") == Ref("legal")
    assert Ref.parse("legal@latest") == Ref("legal")
    assert Ref.parse("legal@7") == Ref("legal", version=7)
    assert Ref.parse("legal@prod") == Ref("legal", tag="prod")
    assert str(Ref.parse("legal@prod")) == "legal@prod"
    assert Ref.parse("legal@7").floating is False
    assert Ref.parse("legal@prod").floating is True


@pytest.mark.parametrize(
    "text", ["", "legal@", "legal@0", "legal@Prod", "Legal@1", "a@b@c", "x@../y"]
)
def test_bad_refs(text):
    with pytest.raises(InvalidInputError):
        Ref.parse(text)


@pytest.mark.parametrize(
    "text", ["p0@²", "p0@٣", "p0@３", "p0@99999999999999999999999", "p0@9223372036854775808",
             "p0@" + "9" * 5000, "p0@00", "p0@-1"],
)  # fmt: skip
def test_versions_are_ascii_digits_within_sqlite_int64(text):
    with pytest.raises(InvalidInputError) as e:
        Ref.parse(text)
    assert len(str(e.value)) < 300


def test_largest_version_parses():
    assert Ref.parse("p0@9223372036854775807").version == 2**63 - 1
    assert Ref.parse("p0@007").version == 7
    assert Ref.parse("p0@" + "0" * 20 + "7").version == 7  # leading zeros do not make it large
    assert Ref.parse("p0@" + "0" * 5000 + "7").version == 7


def test_non_text_reference_is_refused():
    with pytest.raises(InvalidInputError, match="is text"):
        Ref.parse(7)


def test_long_names_are_cut_in_messages():
    with pytest.raises(InvalidInputError) as e:
        check_name("X" * 100_000)
    assert len(str(e.value)) < 300 and "…" in str(e.value)


# ------------------------------------------------------------------ references
@pytest.mark.parametrize(
    "ref, match",
    [
        ("p0@²", "invalid reference 'p0@²'"),
        ("p0@٣", "invalid reference 'p0@٣'"),  # not version 3: only ASCII digits are versions
        ("p0@99999999999999999999999", "no version is that large"),
        ("p0@" + "9" * 5000, "no version is that large"),
        ("p" * 10_000, "invalid adapter name"),
    ],
)
def test_hostile_references(cli, home, populated, ref, match):
    for command in (("show", ref), ("switch", ref), ("tag", ref, "prod"), ("rm", ref)):
        refused(cli, home, populated, *command, match=match)
