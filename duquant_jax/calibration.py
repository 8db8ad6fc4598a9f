"""One calibration session over a model's layers, for the Flax and the PyTorch modules alike."""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Mapping, Protocol, TypeVar


class Calibratable(Protocol):
    def start_calibration(self) -> None: ...
    def finish_calibration(self) -> bool: ...  # False when the layer saw no batch
    def abort_calibration(self) -> None: ...


L = TypeVar("L", bound=Calibratable)


@contextlib.contextmanager
def calibration_session(layers: Mapping[str, L], quantize_fn: str) -> Iterator[Mapping[str, L]]:
    """Starts calibration on every layer; on a clean exit freezes their scales.

    A layer that saw no batch stays uncalibrated (with a warning); no batch at all
    is an error. On an exception every layer stops recording and nothing is frozen.
    """
    if not layers:
        raise ValueError(f"calibrate: the model has no DuQuantLinear layer (run {quantize_fn} first)")
    for m in layers.values():
        m.start_calibration()
    ok = False
    try:
        yield layers
        ok = True
    finally:
        if not ok:
            for m in layers.values():
                m.abort_calibration()
    missed = [n for n, m in layers.items() if not m.finish_calibration()]
    if len(missed) == len(layers):
        raise RuntimeError("calibrate: no batch reached any DuQuantLinear inside the block")
    if missed:
        warnings.warn(f"calibrate: these layers saw no batch and stay uncalibrated: {missed}", stacklevel=4)
