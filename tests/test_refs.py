import pytest

from adaptr.errors import InvalidInputError
from adaptr.registry import Ref, check_name


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
