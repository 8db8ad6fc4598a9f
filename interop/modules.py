"""Finding and replacing a torch model's submodules by name. Pure torch: no JAX."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

FilterFn = Callable[[str, nn.Module], bool]


def selected_linears(model: nn.Module, filter_fn: FilterFn | None, who: str) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of every `nn.Linear` of `model` that `filter_fn` keeps, in `named_modules()`
    order; a ValueError naming `who` when there is none."""
    selected = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and (filter_fn is None or filter_fn(name, m))
    ]
    if not selected:
        raise ValueError(f"{who}: no nn.Linear of the model passed the filter")
    return selected


def set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    """Puts `new` at the dotted module name `name` of `model`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def run_batch(model: nn.Module, batch: Any) -> Any:
    """The default way a calibration batch goes through a model: `model(**batch)` for a dict,
    `model(*batch)` for a tuple or list, else `model(batch)`."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)
