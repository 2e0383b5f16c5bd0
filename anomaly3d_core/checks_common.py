"""The conformance kit's shared part (see :mod:`anomaly3d_core.testing`): the error, the check
wrapper and the checks every component passes."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from anomaly3d_core.interfaces import (
    FAMILY_BASES,
    Params,
    api_version_problem,
    family_of,
)

Check = Callable[[type], None]
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_EXAMPLE_DIM = 24  # autoencoder input width in the checks
_SHAPE = (32, 32, 32)  # extractor input in the checks


class ConformanceError(AssertionError):
    """A component does not meet its contract; the message names it, the check and the fix."""


def _label(cls: type) -> str:
    family = family_of(cls)
    kind = family[:-1] if family else "component"
    return f"{kind} '{getattr(cls, 'name', '?')}' ({cls.__module__}.{cls.__qualname__})"


def _fail(cls: type, check: str, message: str) -> None:
    raise ConformanceError(f"{_label(cls)} fails {check}: {message}")


def _ensure(ok: Any, cls: type, check: str, message: str) -> None:
    if not ok:
        _fail(cls, check, message)


def _check(fn: Check) -> Check:
    """A check whose unexpected exceptions become a :class:`ConformanceError` naming the component."""

    @functools.wraps(fn)
    def run(cls: type) -> None:
        try:
            fn(cls)
        except ConformanceError:
            raise
        except Exception as exc:
            text = " ".join(str(exc).split())
            raise ConformanceError(
                f"{_label(cls)} fails {fn.__name__}: {type(exc).__name__}{': ' + text if text else ''}"
            ) from exc

    return run


def _example_params(cls: type, **override: Any) -> dict[str, Any]:
    """``example_params()`` (or the defaults) with ``override``, validated by the component's ``Params``."""
    params = {**dict(cls.example_params()), **override}
    try:
        cls.Params(**params)
    except ValidationError as exc:
        where = "example_params()" if cls.example_params() else "its default parameters"
        _fail(
            cls,
            "check_params",
            f"cannot be built from {where} {params} ({' '.join(str(exc).split())}); "
            "give every parameter a default or declare a classmethod example_params() returning valid ones",
        )
    return params


# --------------------------------------------------------------------------------------------- common
@_check
def check_declaration(cls: type) -> None:
    """A family base class, a valid unique-able ``name``, a ``Params`` model, the contract version."""
    check = "check_declaration"
    _ensure(
        family_of(cls),
        cls,
        check,
        f"it subclasses none of {', '.join(b.__name__ for b in FAMILY_BASES.values())} (anomaly3d_core.interfaces)",
    )
    name = getattr(cls, "name", None)
    _ensure(
        isinstance(name, str) and _NAME.fullmatch(name),
        cls,
        check,
        f"name {name!r} is not valid; set a class attribute name = 'my_name' (letters, digits, _ . -)",
    )
    _ensure(
        isinstance(cls.Params, type) and issubclass(cls.Params, Params),
        cls,
        check,
        "Params must subclass anomaly3d_core.interfaces.Params (unknown keys are then rejected)",
    )
    abstract = sorted(
        getattr(cls, "__abstractmethods__", None)
        or [n for n in dir(cls) if getattr(getattr(cls, n, None), "__isabstractmethod__", False)]
    )
    _ensure(not abstract, cls, check, f"abstract methods left unimplemented: {', '.join(abstract)}")
    problem = api_version_problem(cls)
    _ensure(not problem or problem[0] != "error", cls, check, problem[1] if problem else "")
    _ensure(isinstance(cls.example_params(), Mapping), cls, check, "example_params() must return a dict")


@_check
def check_params(cls: type) -> None:
    """The component builds from its defaults or ``example_params()``; unknown parameters are refused."""
    params = _example_params(cls)
    try:
        cls.Params(**{**params, "no_such_parameter_xyz": 1})
    except ValidationError:
        return
    _fail(
        cls,
        "check_params",
        "Params accepts an unknown key; derive Params from anomaly3d_core.interfaces.Params",
    )
