"""config_keys: a key's declaration (meaning and accepted values) and the check of values against it."""
import dataclasses
from typing import List, Optional

import pytest

from config_keys import ConfigError, Interval, accepted_text, check_declared, declaration, key


@dataclasses.dataclass
class Demo:
    ratio: float = key(0.5, "a share", within="[0, 1]", section="first")
    rate: float = key(1.0, "a positive rate", within="(0, inf)")
    steps: int = key(1, "a count", within="[1, inf)")
    kind: str = key("a", "a kind", choices=("a", "b"))
    pair: List[float] = key([0.1, 0.2], "two numbers", length=2, within="[0, 1)")
    sizes: Optional[List[int]] = key(None, "some sizes", within="[1, inf)")
    name: Optional[str] = key(None, "a name")


def test_interval_bounds_and_words():
    closed, half_open = Interval("[0, 1]"), Interval("(0, 1]")
    assert 0 in closed and 1 in closed and -1e-9 not in closed and 1 + 1e-9 not in closed
    assert 0 not in half_open and 1e-9 in half_open and 1 in half_open and 1.5 not in half_open
    assert 1e300 in Interval("(0, inf)") and 0 not in Interval("(0, inf)")
    assert 1 in Interval("[1, inf)") and 0.999 not in Interval("[1, inf)")
    assert 0.3 not in Interval("(0, 0.3)") and 0.2999 in Interval("(0, 0.3)")
    assert [Interval(t).describe() for t in ("[0, 1]", "(0, 1]", "[1, inf)", "(0, inf)")] == [
        "in [0, 1]", "in (0, 1]", ">= 1", "> 0"]
    assert (Interval("[1, inf)").requirement(), Interval("[0, 1)").requirement()) == ("be >= 1", "lie in [0, 1)")
    for bad in ("0, 1", "[1, 0]", "{0, 1}", "[0, x]", "[0, 1, 2]", ""):
        with pytest.raises(ValueError, match="interval .*write it as"):
            Interval(bad)


def test_key_declares_default_meaning_and_accepted_values():
    a, b = Demo(), Demo()
    assert a.pair == [0.1, 0.2] and a.pair is not b.pair  # a list default is copied for each instance
    ratio = next(f for f in dataclasses.fields(Demo) if f.name == "ratio")
    assert declaration(ratio)["help"] == "a share" and declaration(ratio)["section"] == "first"
    assert [accepted_text(f) for f in dataclasses.fields(Demo)] == [
        "in [0, 1]", "> 0", ">= 1", "one of: `a`, `b`", "a list of 2, each in [0, 1)", "a non-empty list, each >= 1",
        ""]


@pytest.mark.parametrize("change, message", [
    ({"ratio": 1.5}, r"^'ratio' must lie in \[0, 1\], got 1.5$"),
    ({"ratio": -0.1}, r"'ratio' must lie in \[0, 1\]"),
    ({"rate": 0}, "^'rate' must be > 0, got 0$"),
    ({"steps": 0}, "^'steps' must be >= 1, got 0$"),
    ({"kind": "c"}, "^'kind' is 'c'; accepted: a, b$"),
    ({"pair": [0.1]}, r"^'pair' must be a list of 2 values, got \[0.1\]$"),
    ({"pair": [0.1, 1.0]}, r"^'pair' items must lie in \[0, 1\), got \[0.1, 1.0\]$"),
    ({"sizes": []}, r"^'sizes' must be a non-empty list, got \[\]$"),
    ({"sizes": [2, 0]}, r"^'sizes' items must be >= 1, got \[2, 0\]$"),
    ({"ratio": None}, "^'ratio' must not be empty$"),
])
def test_values_outside_their_declaration_are_refused_with_the_key(change, message):
    with pytest.raises(ConfigError, match=message):
        check_declared(dataclasses.replace(Demo(), **change))


def test_values_inside_their_declaration_and_unset_keys_pass():
    for change in ({}, {"ratio": 0.0}, {"ratio": 1.0}, {"rate": 1e-12}, {"kind": "b"}, {"pair": [0.0, 0.999]},
                   {"sizes": [1, 3]}, {"name": "x"}):
        check_declared(dataclasses.replace(Demo(), **change))
    assert issubclass(ConfigError, ValueError)  # callers that catch ValueError (the release's calls) still do


def test_a_field_without_a_declaration_is_an_error():
    @dataclasses.dataclass
    class Undeclared:
        a: int = key(1, "declared")
        b: int = 2

    with pytest.raises(TypeError, match="field 'b' is not declared with config_keys.key"):
        check_declared(Undeclared())
