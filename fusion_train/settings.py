"""Settings declared once, on their dataclass field: type, default, range and help.

A stage's settings class (``train.TrainConfig``, ``implicit.tuning.TuneSettings``, ...) declares
each setting with :func:`setting`; its command's flags come from the fields (:func:`options_from`)
and a recipe checks its keys against the same ranges and choices (:func:`value_types`). Adding a
setting is one field: the flag, its ``--help``, the value in the settings and the recipe key
follow from it, and a launched rank gets it like every other setting.

A subclass that only changes a setting's default or help overrides the field (with
:func:`setting` for a new help, or a plain default); the rest of the declaration comes from the
base class's field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields, make_dataclass
from types import NoneType, UnionType
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import click

T = TypeVar("T")
DECLARATION = "fusion_train.settings"  # the key of a field's metadata that holds its Declaration
TYPES_OF_ANNOTATIONS: dict[Any, click.ParamType] = {
    int: click.INT,
    float: click.FLOAT,
    str: click.STRING,
    bool: click.BOOL,
}


@dataclass(frozen=True)
class Declaration:
    """What a field says about its setting beyond its annotation and default."""

    help: str | None = None
    type: click.ParamType | None = None  # a range, choice or path; None: the annotation's type
    aliases: tuple[str, ...] = ()  # flags besides the main one (--lr)
    flag: str | None = None  # the main flag, where not --name-with-dashes (--verifier for verifiers)
    metavar: str | None = None  # how --help shows the value (NAME|INDEX)


def setting(
    default: Any = MISSING,
    *,
    help: str | None = None,
    type: click.ParamType | None = None,
    aliases: Iterable[str] = (),
    flag: str | None = None,
    metavar: str | None = None,
    kw_only: bool | None = None,
) -> Any:
    """A dataclass field declaring a setting; without ``default`` its flag is required.
    ``kw_only``: as ``dataclasses.field``'s (None: the class's)."""
    return field(
        default=default,
        metadata={DECLARATION: Declaration(help, type, tuple(aliases), flag, metavar)},
        **({} if kw_only is None else {"kw_only": kw_only}),
    )


def declaration(cls: type, name: str) -> Declaration:
    """The declaration of ``cls``'s field ``name``: each part from the most derived class that
    declares it (a subclass may restate only the help, or only the default)."""
    found = [
        base.__dataclass_fields__[name].metadata[DECLARATION]
        for base in cls.__mro__
        if name in getattr(base, "__dataclass_fields__", {})
        and DECLARATION in base.__dataclass_fields__[name].metadata
    ]
    return Declaration(
        help=next((d.help for d in found if d.help is not None), None),
        type=next((d.type for d in found if d.type is not None), None),
        aliases=next((d.aliases for d in found if d.aliases), ()),
        flag=next((d.flag for d in found if d.flag is not None), None),
        metavar=next((d.metavar for d in found if d.metavar is not None), None),
    )


def _annotated(hint: Any) -> Any:
    """The type of an annotation, ``X | None`` read as ``X`` (a union of several types as it is)."""
    if get_origin(hint) in (Union, UnionType):
        args = [arg for arg in get_args(hint) if arg is not NoneType]
        return args[0] if len(args) == 1 else hint
    return hint


def value_types(cls: type) -> dict[str, click.ParamType]:
    """Field name -> the type its values must have (as a flag or a recipe key): the declared
    range, choice or path, else the annotation's type (a plain int, float, text or switch)."""
    hints, types = get_type_hints(cls), {}
    for f in fields(cls):
        found = declaration(cls, f.name).type or TYPES_OF_ANNOTATIONS.get(_annotated(hints[f.name]))
        if f.init and found is not None:  # a list or mapping without a declared type: its shape only
            types[f.name] = found
    return types


def _required(f: Field[Any]) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def options_from(cls: type, names: Sequence[str] | None = None) -> Callable[[Any], Any]:
    """A decorator adding a click option for every field of ``cls`` (or those ``names``), in
    ``--help`` in this order: the required ones, the ones ``cls`` adds, then the inherited ones,
    each in the fields' order (a stable sort). A bool is a ``--name/--no-name`` switch, a
    ``tuple[X, ...]`` a repeatable flag."""
    types, hints = value_types(cls), get_type_hints(cls)
    inherited = {name for base in cls.__mro__[1:] for name in getattr(base, "__dataclass_fields__", {})}
    chosen = sorted(
        (f for f in fields(cls) if f.init and (names is None or f.name in names)),
        key=lambda f: (not _required(f), f.name in inherited),
    )

    def option(f: Field[Any]) -> Callable[[Any], Any]:
        declared = declaration(cls, f.name)
        flag = declared.flag or "--" + f.name.replace("_", "-")
        default = None if _required(f) else f.default
        if _annotated(hints[f.name]) is bool:
            return click.option(f"{flag}/--no-{flag[2:]}", f.name, default=default, help=declared.help)
        if get_origin(hints[f.name]) is tuple:  # tuple[X, ...]: a repeatable flag
            (element, _) = get_args(hints[f.name])
            element_type = declared.type or TYPES_OF_ANNOTATIONS[element]
            return click.option(
                flag,
                *declared.aliases,
                f.name,
                type=element_type,
                multiple=True,
                default=default,
                metavar=declared.metavar,
                help=declared.help,
            )
        return click.option(
            flag,
            *declared.aliases,
            f.name,
            type=types[f.name],
            default=default,
            required=_required(f),
            metavar=declared.metavar,
            help=declared.help,
        )

    def decorate(function: Any) -> Any:
        for f in reversed(chosen):
            function = option(f)(function)
        return function

    return decorate


def settings_from(cls: type[T], params: dict[str, Any]) -> T:
    """The settings ``cls`` of a command's parsed parameters (its flags from :func:`options_from`)."""
    return cls(**{f.name: params[f.name] for f in fields(cls) if f.init})


def same_as(settings: type, name: str, default: Any = MISSING) -> Any:
    """A field declared as ``settings``' field ``name`` (its range, choice and help), for a recipe
    section that takes that setting: the declaration stays where the stage's flag comes from.
    ``default``: another default than the stage's (a recipe's own)."""
    declared = {f.name: f for f in fields(settings)}[name]
    if default is MISSING:
        default = declared.default
    return field(default=default, metadata={DECLARATION: declaration(settings, name)})


def section(
    name: str, module: str, settings: type, keys: Sequence[str], doc: str, **own: tuple[Any, Any]
) -> type:
    """A frozen dataclass ``module.name`` holding the fields ``keys`` of a stage's ``settings``
    class with their annotations, defaults and declarations (a recipe section that takes a chosen
    part of a stage's settings, declared once there), after ``own`` fields given as
    ``name=(annotation, setting(...))``."""
    hints = get_type_hints(settings)
    chosen = [(key, annotation, own_field) for key, (annotation, own_field) in own.items()]
    chosen += [(key, hints[key], same_as(settings, key)) for key in keys]
    made = make_dataclass(name, chosen, frozen=True, namespace={"__doc__": doc})
    made.__module__ = module
    return made
