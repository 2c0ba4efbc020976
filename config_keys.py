"""Declaring config keys: each field of a config dataclass says what it means and which values it accepts, in one
`key(...)` call, which the checks (`check_declared`) and the key reference (config.keys_markdown) both read.

A leaf module (it imports no other module of this code), so that models.Objective (the loss settings) and
config.Config (every other key, extending Objective) declare their keys the same way. Combinations of keys (guidance
needs a class-drop rate, the model must fit the data, ...) are not declared here: they stay checks in code.
"""
import dataclasses
import typing


class ConfigError(ValueError):
    """A config value or combination that cannot run; the message names the key and how to fix it."""


class Interval:
    """The accepted values of a number, in interval notation: "[0, 1]", "(0, 1]", "[1, inf)", "(0, inf)"."""

    def __init__(self, text):
        self.text = text
        self.low, _, self.high = (v.strip() for v in text[1:-1].partition(","))
        try:
            ordered = float(self.low) < float(self.high)  # float() reads "inf"
        except ValueError:
            ordered = False
        if text[:1] not in ("[", "(") or text[-1:] not in ("]", ")") or not ordered:
            raise ValueError(f"interval {text!r}: write it as [low, high], (low, high], [low, inf), ... with "
                             f"low < high")

    def __contains__(self, x):
        above = x >= float(self.low) if self.text[0] == "[" else x > float(self.low)
        below = x <= float(self.high) if self.text[-1] == "]" else x < float(self.high)
        return above and below

    def describe(self):
        """">= 1" or "> 0" for a half line above a number, "in [0, 1]" otherwise."""
        if self.high == "inf" and self.low != "-inf":
            return (">= " if self.text[0] == "[" else "> ") + self.low
        return f"in {self.text}"

    def requirement(self):
        """The words after "must" in an error: "be >= 1", "lie in [0, 1]"."""
        return ("lie " if self.describe().startswith("in ") else "be ") + self.describe()


def key(default, help, *, choices=None, within=None, length=None, section=None):
    """A dataclass field declaring a config key: its default (a list default is copied for each instance), its
    meaning `help` (one line of the key reference), and its accepted values: one of `choices`; a number `within`
    an interval (see Interval), or for a list key, each item within it; a list of `length` items. A list key is
    never empty. `section` starts a section of the key reference, which the next keys share."""
    metadata = dict(help=help, choices=choices, within=Interval(within) if within else None, length=length,
                    section=section)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def declaration(f):
    """The declaration (metadata) of the dataclass field `f`; TypeError when it was not declared with `key`."""
    if "help" not in f.metadata:
        raise TypeError(f"field '{f.name}' is not declared with config_keys.key(default, help, ...): declare it, "
                        f"saying what the key means")
    return f.metadata


def declared_default(f):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def unwrap_optional(kind):
    """(the type inside Optional[...], whether it was Optional) of a field's type."""
    args = typing.get_args(kind)
    if type(None) not in args:
        return kind, False
    return next(a for a in args if a is not type(None)), True


def is_list_key(f):
    return typing.get_origin(unwrap_optional(f.type)[0]) is list


def check_choice(name, value, accepted):
    if value not in accepted:
        raise ConfigError(f"'{name}' is {value!r}; accepted: {', '.join(accepted)}")


def _check_value(name, value, declared):
    """Raises ConfigError when `value` of the key `name` is outside what `declared` (a field's metadata) accepts."""
    if declared["choices"] is not None:
        check_choice(name, value, declared["choices"])
    interval = declared["within"]
    if isinstance(value, list):
        if declared["length"] is not None and len(value) != declared["length"]:
            raise ConfigError(f"'{name}' must be a list of {declared['length']} values, got {value!r}")
        if not value:
            raise ConfigError(f"'{name}' must be a non-empty list, got {value!r}")
        if interval is not None and not all(v in interval for v in value):
            raise ConfigError(f"'{name}' items must {interval.requirement()}, got {value!r}")
    elif interval is not None and value not in interval:
        raise ConfigError(f"'{name}' must {interval.requirement()}, got {value}")


def check_declared(obj):
    """Checks every key of the dataclass instance `obj` against its declaration; raises ConfigError naming the
    first key outside it. None is "not set" for the keys whose default is None, and refused for the others."""
    for f in dataclasses.fields(obj):
        declared, value = declaration(f), getattr(obj, f.name)
        if value is None:
            if declared_default(f) is not None:
                raise ConfigError(f"'{f.name}' must not be empty")
            continue
        _check_value(f.name, value, declared)


def accepted_text(f):
    """What the key reference says a declared field accepts ("" when any value of its type is)."""
    declared = declaration(f)
    parts = []
    if declared["choices"] is not None:
        parts.append("one of: " + ", ".join(f"`{c}`" for c in declared["choices"]))
    if is_list_key(f):
        parts.append(f"a list of {declared['length']}" if declared["length"] else "a non-empty list")
    if declared["within"] is not None:
        parts.append(("each " if is_list_key(f) else "") + declared["within"].describe())
    return ", ".join(parts)
