"""One input transform at run time for the `DuQuantLinear` layers that read one input tensor.

The packs of such a group (`duquant_jax.shared_input.pack_group`: q/k/v, gate/up) have equal
`perm`, `in_diag`, `r_pre` and `r_in`, so `x2 = rotate_input(x)` and its quantized form are the
same for every member. `SharedInput` links the members:

- their transform buffers become one set of tensors, so a compiled graph holds one copy of the
  transform, which AOTAutograd's common-subexpression pass then computes once;
- in eager mode the first member to see an input keeps `x2` and each activation handling's
  prepared activations (`interop.kernels.prepare`) for the others. The cache holds one input,
  recognized by identity and version counter (an input changed in place is another input; under
  `torch.inference_mode` tensors have no version counter, and identity alone is checked), and is
  dropped once every member has read it. Not thread-safe: one forward at a time per model.

Sharing is safe whatever the groups say: members must hold bit-identical transforms to be linked,
and the cache is keyed by the input itself, so a wrong group only costs a recomputation.

Pure torch: no JAX.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Sequence

import torch

from interop import kernels

if TYPE_CHECKING:
    from interop.linear import DuQuantLinear

INPUT_BUFFERS = ("perm", "in_diag", "r_pre", "r_in")  # saved and shared; `r_in_t` is derived from r_in


def mismatch(members: Sequence[DuQuantLinear], names: Sequence[str]) -> str | None:
    """Why `members` cannot share one input transform, or None: widths, configs and every shared
    buffer must be equal (bit for bit)."""
    lead, lead_name = members[0], names[0]
    for m, name in zip(members[1:], names[1:]):
        if m.in_features != lead.in_features:
            return f"{name} reads {m.in_features} channels, {lead_name} {lead.in_features}"
        if m.config.replace(act_clip=lead.config.act_clip) != lead.config:  # a clip of its own is fine (search_act_clip)
            return f"{name} and {lead_name} were packed with different configurations"
        for field in INPUT_BUFFERS:
            a, b = getattr(lead, field), getattr(m, field)
            if (a is None) != (b is None):
                return f"{name} has {'no ' if b is None else ''}{field} and {lead_name} {'has' if b is None else 'has none'}"
            if a is not None and (a.shape != b.shape or a.dtype != b.dtype or a.device != b.device or not torch.equal(a, b)):
                return f"{name}'s {field} differs from {lead_name}'s: they were not packed as one group"
    return None


class SharedInput:
    """The link between the members of one input group (module docstring); members in call order."""

    def __init__(self, members: Sequence[DuQuantLinear], names: Sequence[str]):
        from interop.linear import DuQuantLinear

        if len(members) < 2 or len(members) != len(names):
            raise ValueError(f"an input group needs at least two named layers; got {len(members)} layers, {len(names)} names")
        for m, name in zip(members, names):
            if not isinstance(m, DuQuantLinear):
                raise TypeError(f"input group member {name!r} is a {type(m).__name__}, not a DuQuantLinear")
            if m.input_group is not None:
                raise ValueError(f"layer {name!r} is already in the input group {list(m.input_group.names)}")
        why = mismatch(members, names)
        if why is not None:
            raise ValueError(f"layers {list(names)} cannot share one input transform: {why}")
        self.members = list(members)
        self.names = tuple(names)
        self._clear()
        for m in self.members:
            m.input_group = self
        self.link()

    def _clear(self) -> None:
        self._input: weakref.ref | None = None
        self._version = -1
        self._x2: torch.Tensor | None = None
        self._prepared: dict[Any, tuple[torch.Tensor | None, tuple]] = {}
        self._reads = 0
        self._trace: tuple | None = None

    def link(self) -> None:
        """Makes every member's transform buffers the leader's tensors (where shape, dtype and device agree)."""
        lead = self.members[0]
        for m in self.members[1:]:
            for field in (*INPUT_BUFFERS, "r_in_t"):
                a, b = getattr(lead, field), getattr(m, field)
                if a is not None and b is not None and a is not b and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device:
                    setattr(m, field, a)

    def unlink(self) -> None:
        """Dissolves the group: each member transforms its input alone again (its buffers stay equal)."""
        for m in self.members:
            m.input_group = None
        self._clear()

    # -- eager: one transform per input ------------------------------------------
    def _same_input(self, x: torch.Tensor) -> bool:
        return self._input is not None and self._input() is x and self._version == version(x)

    def rotated(self, x: torch.Tensor) -> torch.Tensor:
        """`rotate_input(x)` of the group's (one) transform, computed once per input."""
        if not self._same_input(x):
            self._clear()
            self._input, self._version = weakref.ref(x), version(x)
        if self._x2 is None:
            self._x2 = self.members[0].rotate_input(x)
        return self._x2

    def prepared(self, x2: torch.Tensor, act: kernels.ActQuant, act_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`kernels.prepare` of x2 (..., in) as (T, in), once per activation handling for the group's input `x2`."""
        hit = self._prepared.get(act)
        if hit is not None and hit[0] is x2 and (act_scale is None) == (hit[2] is None) and (act_scale is None or torch.equal(act_scale, hit[2])):
            return hit[1]
        out = kernels.prepare(x2.reshape(-1, x2.shape[-1]), act, act_scale)
        self._prepared[act] = (x2, out, act_scale)
        return out

    def fused(self, layer: DuQuantLinear, x: torch.Tensor, act_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`layer._fused_input(x)` (the transform and activation codes in one C pass), once per input for the group
        (eager and traced alike; calibrated scales stay each layer's own)."""
        if torch.compiler.is_compiling():
            if self._trace is None or self._trace[0] is not x:
                self._trace = [x, None, {}, 0]
            cache = self._trace[2]
        else:
            if not self._same_input(x):
                self._clear()
                self._input, self._version = weakref.ref(x), version(x)
            cache = self._prepared
        key = ("fused", layer.act)
        if act_scale is not None:
            return layer._fused_input(x, act_scale)
        if key not in cache:
            cache[key] = layer._fused_input(x, None)
        return cache[key]

    # -- compiled: one transform per input in the graph -----------------------------
    def traced(self, layer: DuQuantLinear, x: torch.Tensor) -> torch.Tensor:
        """Under `torch.compile`: `rotate_input(x)`, traced once per input for the group.

        The first member's call stores its traced values on the group, the others read them while
        tracing the same graph (`traced_prepared` likewise), and the last member's `traced_read`
        clears them, so no tensor is kept past the graph."""
        if self._trace is None or self._trace[0] is not x:
            self._trace = [x, None, {}, 0]
        if self._trace[1] is None:
            self._trace[1] = layer.rotate_input(x)
        return self._trace[1]

    def traced_prepared(self, x2: torch.Tensor, act: kernels.ActQuant, act_scale: torch.Tensor | None) -> tuple | None:
        """Under `torch.compile`: `prepare` of the group's traced `x2`, once per activation handling
        (per-token and unquantized activations only; calibrated scales stay each layer's own)."""
        if self._trace is None or self._trace[1] is not x2 or act_scale is not None:
            return None
        cache = self._trace[2]
        if act not in cache:
            cache[act] = kernels.prepare(x2.reshape(-1, x2.shape[-1]), act, None)
        return cache[act]

    def traced_read(self) -> None:
        if self._trace is not None:
            self._trace[3] += 1
            if self._trace[3] >= len(self.members):
                self._trace = None

    def read(self) -> None:
        """One member is done with the input; after the last, nothing is kept alive past the group."""
        self._reads += 1
        if self._reads >= len(self.members):
            self._clear()

    def __getstate__(self) -> dict:  # pickling and deepcopy: the members and names, never a cached input
        return {"members": self.members, "names": self.names}

    def __setstate__(self, state: dict) -> None:
        self.members, self.names = state["members"], state["names"]
        self._clear()

    def __repr__(self) -> str:
        return f"SharedInput({list(self.names)})"


def link_input_groups(model: torch.nn.Module, groups: Sequence[Sequence[str]]) -> list[SharedInput]:
    """Links the named groups of `model`'s `DuQuantLinear` layers (`SharedInput`); a bad group raises, naming it."""
    out = []
    for g in groups:
        members = []
        for name in g:
            try:
                members.append(model.get_submodule(name))
            except AttributeError:
                raise ValueError(f"input group {list(g)}: {name!r} is not a module of the model") from None
        out.append(SharedInput(members, list(g)))
    return out


def version(x: torch.Tensor) -> int:
    """The tensor's version counter (bumped by every in-place change); -1 for an inference-mode
    tensor, which has none: such inputs are recognized by identity alone."""
    return -1 if x.is_inference() else x._version


def group_buffer_keys(model: torch.nn.Module) -> frozenset[str]:
    """The state-dict keys of every linked group member's shared transform buffers: one tensor for
    the whole group in memory, saved as a copy per member (safetensors stores no shared memory)."""
    return frozenset(
        f"{n}.{f}" for g in input_groups(model) for n in g for f in INPUT_BUFFERS if getattr(model.get_submodule(n), f) is not None
    )


def input_groups(model: torch.nn.Module) -> list[list[str]]:
    """The linked input groups of `model`, as lists of module names, in module order."""
    names = {id(m): n for n, m in model.named_modules()}
    seen, out = set(), []
    for _, m in model.named_modules():
        g = getattr(m, "input_group", None)
        if isinstance(g, SharedInput) and id(g) not in seen:
            seen.add(id(g))
            out.append([names[id(x)] for x in g.members])
    return out
