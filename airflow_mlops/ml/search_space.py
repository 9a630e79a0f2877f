"""Plain JSON/YAML search spaces, checked without Ray and turned into Ray Tune spaces inside the task.

A search space is a mapping of parameter name to either a constant (number, string, bool, list, null)
or a one-key mapping naming a distribution::

    {"learning_rate": {"loguniform": [0.01, 0.3]},
     "max_leaf_nodes": {"randint": [8, 64]},
     "l2_regularization": {"choice": [0.0, 0.1, 1.0]},
     "max_iter": 200}

Distributions: ``uniform [low, high]``, ``quniform [low, high, q]``, ``loguniform [low, high]``,
``qloguniform [low, high, q]``, ``randint [low, high)``, ``qrandint [low, high, q]``,
``lograndint [low, high)``, ``randn [mean, sd]``, ``choice [values...]``, ``grid_search [values...]``.

:func:`parse_search_space` checks the form (no Ray import, so DAG tests can call it);
:func:`to_tune` builds the Ray Tune objects.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

# distribution -> (number of arguments or None for a non-empty list, integer arguments, positive arguments)
DISTRIBUTIONS: dict[str, tuple[int | None, bool, bool]] = {
    "uniform": (2, False, False),
    "quniform": (3, False, False),
    "loguniform": (2, False, True),
    "qloguniform": (3, False, True),
    "randint": (2, True, False),
    "qrandint": (3, True, False),
    "lograndint": (2, True, True),
    "randn": (2, False, False),
    "choice": (None, False, False),
    "grid_search": (None, False, False),
}


class SearchSpaceError(ValueError):
    """The search space is malformed; the message names the parameter and what is wrong."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def load_search_space(value: Any) -> dict[str, Any]:
    """Accept a mapping, or JSON / YAML text of one."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            import yaml

            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise SearchSpaceError(f"search_space is neither JSON nor YAML ({err}).") from err
    if not isinstance(value, Mapping) or not value:
        raise SearchSpaceError(
            f"search_space must be a non-empty mapping of parameter name to value or distribution, "
            f"got {type(value).__name__} {value!r:.80}."
        )
    return dict(value)


def _check_param(name: str, spec: Any) -> None:
    if not isinstance(spec, Mapping):
        return  # a constant
    if len(spec) != 1:
        raise SearchSpaceError(
            f"parameter {name!r}: a distribution is a mapping with exactly one key (one of "
            f"{', '.join(DISTRIBUTIONS)}), got keys {sorted(spec)}."
        )
    ((kind, args),) = spec.items()
    if kind not in DISTRIBUTIONS:
        raise SearchSpaceError(
            f"parameter {name!r}: unknown distribution {kind!r}; known: {', '.join(DISTRIBUTIONS)}."
        )
    arity, integer, positive = DISTRIBUTIONS[kind]
    if not isinstance(args, list):
        raise SearchSpaceError(f"parameter {name!r}: {kind} takes a list, got {args!r}.")
    if arity is None:
        if not args:
            raise SearchSpaceError(f"parameter {name!r}: {kind} needs at least one value.")
        return
    if len(args) != arity or not all(_is_number(a) for a in args):
        raise SearchSpaceError(f"parameter {name!r}: {kind} takes {arity} numbers, got {args!r}.")
    if integer and not all(float(a).is_integer() for a in args):
        raise SearchSpaceError(f"parameter {name!r}: {kind} takes integers, got {args!r}.")
    if kind == "randn":
        if args[1] <= 0:
            raise SearchSpaceError(f"parameter {name!r}: randn needs sd > 0, got {args[1]!r}.")
        return
    low, high = args[0], args[1]
    if not low < high:
        raise SearchSpaceError(f"parameter {name!r}: {kind} needs low < high, got [{low}, {high}].")
    if positive and low <= 0:
        raise SearchSpaceError(f"parameter {name!r}: {kind} needs low > 0, got {low}.")
    if arity == 3 and args[2] <= 0:
        raise SearchSpaceError(f"parameter {name!r}: {kind} needs q > 0, got {args[2]}.")


def parse_search_space(value: Any) -> dict[str, Any]:
    """Check a plain search space and return it as a dict (still plain, JSON-able).

    :raises SearchSpaceError: naming the parameter at fault.
    """
    space = load_search_space(value)
    for name, spec in space.items():
        if not isinstance(name, str) or not name:
            raise SearchSpaceError(f"parameter names must be non-empty strings, got {name!r}.")
        _check_param(name, spec)
    return space


def grid_size(space: Mapping[str, Any]) -> int:
    """How many grid points the ``grid_search`` parameters span (1 when there are none)."""
    size = 1
    for spec in space.values():
        if isinstance(spec, Mapping) and "grid_search" in spec:
            size *= len(spec["grid_search"])
    return size


def to_tune(space: Mapping[str, Any]) -> dict[str, Any]:
    """Ray Tune search space objects for a checked plain space."""
    from ray import tune

    out: dict[str, Any] = {}
    for name, spec in space.items():
        if not isinstance(spec, Mapping):
            out[name] = spec
            continue
        ((kind, args),) = spec.items()
        if kind == "choice":
            out[name] = tune.choice(args)
        elif kind == "grid_search":
            out[name] = tune.grid_search(args)
        elif DISTRIBUTIONS[kind][1]:
            out[name] = getattr(tune, kind)(*(int(a) for a in args))
        else:
            out[name] = getattr(tune, kind)(*args)
    return out
