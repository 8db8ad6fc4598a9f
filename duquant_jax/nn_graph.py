"""Finding and replacing an NNX model's modules by graph path. No torch."""

from __future__ import annotations

import re
from typing import Any, Callable

from flax import nnx

FilterFn = Callable[[str, nnx.Module], bool]


def path_filter(include: str | None = None, exclude: str | None = None) -> FilterFn:
    """A filter over module paths ("block.mlp.up"): `re.search(include)` and not `re.search(exclude)`."""
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    return lambda name, module: (inc is None or bool(inc.search(name))) and (exc is None or not exc.search(name))


def selected_linears(model: nnx.Module, filter_fn: FilterFn | None, who: str) -> list[tuple[tuple, str, nnx.Linear]]:
    """(path, name, layer) of every `nnx.Linear` of `model` that `filter_fn` keeps; names are paths
    joined by "."; an error naming `who` when there is none."""
    selected = []
    for path, node in nnx.iter_graph(model):
        name = ".".join(str(p) for p in path)
        if path and isinstance(node, nnx.Linear) and (filter_fn is None or filter_fn(name, node)):
            selected.append((path, name, node))
    if not selected:
        raise ValueError(f"{who}: no nnx.Linear of the model passed the filter")
    return selected


def _get(node: Any, key: Any) -> Any:
    return node[key] if isinstance(key, int) else getattr(node, key)


def set_child(model: nnx.Module, path: tuple, value: Any) -> None:
    """Puts `value` at graph path `path` of `model` (attribute names and list indices)."""
    parent = model
    for key in path[:-1]:
        parent = _get(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = value
    else:
        setattr(parent, path[-1], value)
