"""`DuQuantLinear`: a packed layer's forward in PyTorch, on the integer kernels of `interop.kernels`.

The layer holds its weight only in quantized form (a `QuantizedWeight`: 4-bit
codes two a byte, or int8 codes, plus scales) with the rotations and scales of
its pack; no float copy of the weight is kept, persistent or derived. The
forward rotates the input, multiplies through the fastest correct kernel path of
the machine (`interop.kernels`), and rotates the output rows back where the row
mode asks. Constructing one from saved state needs no JAX (`DuQuantLinear.empty`
then `load_state_dict`, as `interop.serialize.load_quantized` does); packing a
weight (`from_linear`, `from_pack`) uses the JAX path.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from duquant_jax.config import DuQuantConfig, qmax
from interop import native
from interop.kernels import ActQuant, compiled_helpers_on, fake_quantize, path_spec, quantized_matmul
from interop.layer_product import layer_product, register_layer
from interop.qweight import QuantizedWeight

if TYPE_CHECKING:  # the JAX side, imported only where a Pack is packed or converted
    from duquant_jax.packed import Pack
    from duquant_jax.stats import LayerStats

STATIC_EPS = 1e-6  # as duquant_jax.activations
ROTATION_FIELDS = ("in_diag", "r_pre", "r_in", "r_out", "out_diag")


def _as_tensor(a: Any) -> torch.Tensor:
    """A JAX array through DLPack (no copy on CPU); a NumPy array through torch.from_numpy."""
    if isinstance(a, torch.Tensor):
        return a
    if hasattr(a, "__dlpack__") and not hasattr(a, "__array_interface__"):
        from interop.dlpack import jax_to_torch

        return jax_to_torch(a)
    return torch.from_numpy(a.copy() if not a.flags.writeable else a)


def rotate_blocks(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x: (..., C), r: (n, B, B) -> `x diag(r)` (..., C): each block of B channels times its matrix;
    one matrix for every block when n == 1 (C a multiple of B); a short last block zero-padded."""
    n, size, _ = r.shape
    c = x.shape[-1]
    if n == 1 and c % size == 0:
        return (x.reshape(*x.shape[:-1], c // size, size) @ r[0]).reshape(x.shape)
    if n * size != c:
        x = nn.functional.pad(x, (0, n * size - c))
    y = torch.einsum("...nb,nbc->...nc", x.reshape(*x.shape[:-1], n, size), r)
    return y.reshape(*x.shape[:-1], n * size)[..., :c]


def abs_percentile(x2: torch.Tensor, q: float) -> torch.Tensor:
    """x2: (..., in) -> (in,) the q-th percentile of |x2| over all tokens, NumPy's linear method."""
    v = x2.detach().abs().reshape(-1, x2.shape[-1]).float().sort(dim=0).values
    pos = q / 100.0 * (v.shape[0] - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


class DuQuantLinear(nn.Module):
    """A DuQuant-packed linear layer (docs/ALGORITHM.md "Forward pass").

    State (`state_dict`): `perm (in,)` int64; the rotation fields of the pack that
    are present (`in_diag`, `r_pre`, `r_in`, `r_out`, `out_diag`, see
    `duquant_jax.packed.Pack`), in the module's dtype; the weight as
    `qweight.codes` (uint8 nibbles for 2..4 bits, int8 for 5..8) and
    `qweight.scales` (float32, `(out,)` or `(out, groups)`), or `w2 (out, in)` in
    the module's dtype when weights are unquantized; `a_scale` (float32, `(in,)`
    or `(1,)`), `calibrated` and `bias`.

    Derived, non-persistent buffers (recomputed on `.to()` and load): `r_in_t`
    (each input rotation transposed) and `b_eff` (the bias, rotated into the row
    basis for "propagate").
    """

    def __init__(
        self,
        config: DuQuantConfig,
        in_features: int,
        out_features: int,
        fields: Mapping[str, torch.Tensor],
        *,
        a_scale: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        name: str = "",
    ):
        """Low-level constructor; use `from_pack`, `from_linear`, `from_file` or `empty`.

        `fields` holds `perm`, `w_codes` ((out, in) integer codes, or the float W2
        when weights are unquantized), `w_scale`, and the present rotation fields.
        """
        super().__init__()
        if not isinstance(config, DuQuantConfig):
            raise TypeError(f"config must be a DuQuantConfig; got {type(config).__name__}")
        self.config = config
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.name = name
        dtype = dtype or torch.float32
        self.register_buffer("perm", fields["perm"].to(torch.int64))
        for field in ROTATION_FIELDS:
            value = fields.get(field)
            self.register_buffer(field, None if value is None else value.to(dtype))
        codes = fields["w_codes"]
        if config.quantize_weights:
            self.qweight = QuantizedWeight(
                codes.to(torch.int8), fields["w_scale"].float(), bits=config.weight_bits,
                group_size=config.weight_group_size, name=name, integer_acts=ActQuant.from_config(config).integer,
            )
            self.register_buffer("w2", None)
        else:
            self.qweight = None
            self.register_buffer("w2", codes.to(dtype))
        calibrated = a_scale is not None
        n_scales = 1 if config.act_scheme == "static-tensor" else self.in_features
        self.register_buffer("a_scale", a_scale.float() if calibrated else torch.zeros(n_scales))
        self.register_buffer("calibrated", torch.tensor(calibrated))
        self._calibrated = calibrated  # a Python copy of `calibrated`, read under torch.compile
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().to(dtype), requires_grad=False)
        self.act = ActQuant.from_config(config)
        for derived in ("r_in_t", "b_eff"):
            self.register_buffer(derived, None, persistent=False)
        self._stats: torch.Tensor | None = None
        self._handle = register_layer(self)  # names this layer to the compiled op `duquant::layer_call`
        self._stat_batches = -1  # -1: not calibrating
        self.input_group = None  # an `interop.shared_input.SharedInput` when it shares its input transform
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh_derived())
        self._refresh_derived()

    # -- construction -------------------------------------------------------
    @classmethod
    def from_pack(cls, pack: Pack, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None, name: str = "") -> DuQuantLinear:
        """From a Pack (JAX arrays arrive through DLPack without copies on CPU)."""
        fields = {f: _as_tensor(getattr(pack, f)) for f in ("perm", "w_codes", "w_scale", *ROTATION_FIELDS) if getattr(pack, f) is not None}
        a_scale = None if pack.a_scale is None else _as_tensor(pack.a_scale)
        return cls(pack.config, pack.in_features, pack.out_features, fields, a_scale=a_scale, bias=bias, dtype=dtype, name=name)

    @classmethod
    def from_file(cls, path, layer: str, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> DuQuantLinear:
        """From layer `layer` of a pack file written by `duquant_jax.io.save_packs`."""
        from duquant_jax.io import load_packs

        return cls.from_pack(load_packs(path, [layer])[layer], bias=bias, dtype=dtype, name=layer)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, config: DuQuantConfig = DuQuantConfig(), name: str = "", stats: LayerStats | None = None,
        consume_stats: bool = False,
    ) -> DuQuantLinear:
        """Packs `linear.weight` with the JAX path and carries the result over.
        `stats`: the layer's input statistics, for configs that need them (`interop.observe`);
        `consume_stats`: GPTQ may factor `stats.xtx` in its own buffer (`pack_weight`'s option)."""
        from duquant_jax.pack import pack_weight
        from interop.dlpack import torch_to_jax

        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear; got {type(linear).__name__}")
        return cls.replacing(linear, pack_weight(torch_to_jax(linear.weight.detach()), config, stats, name=name, consume_stats=consume_stats), name)

    @classmethod
    def replacing(cls, linear: nn.Linear, pack: Pack, name: str = "") -> DuQuantLinear:
        """The layer that stands in for `linear`, from its pack: its bias, dtype (float32 for a
        non-float weight) and device."""
        dtype = linear.weight.dtype if linear.weight.dtype.is_floating_point else torch.float32
        return cls.from_pack(pack, bias=linear.bias, dtype=dtype, name=name).to(linear.weight.device)

    @classmethod
    def empty(
        cls,
        config: DuQuantConfig,
        in_features: int,
        out_features: int,
        shapes: Mapping[str, tuple[int, ...]],
        *,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        name: str = "",
    ) -> DuQuantLinear:
        """A layer with zero state of the given field `shapes` (`layout()`), to `load_state_dict` into.

        Needs no JAX: this is how saved quantized models are rebuilt.
        """
        fields = {f: torch.zeros(tuple(s)) for f, s in shapes.items() if f in ROTATION_FIELDS}
        fields["perm"] = torch.arange(in_features)
        fields["w_codes"] = torch.zeros(out_features, in_features, dtype=torch.int8 if config.quantize_weights else torch.float32)
        fields["w_scale"] = torch.ones(tuple(shapes.get("w_scale", (out_features,))))
        b = torch.zeros(out_features) if bias else None
        layer = cls(config, in_features, out_features, fields, bias=b, dtype=dtype, name=name)
        if config.needs_calibration:
            layer.a_scale = torch.zeros(tuple(shapes["a_scale"]))
        return layer

    def layout(self) -> dict[str, list[int]]:
        """The shapes of the fields that vary between packs (for `empty`): rotations, w_scale, a_scale."""
        shapes = {f: list(getattr(self, f).shape) for f in ROTATION_FIELDS if getattr(self, f) is not None}
        if self.qweight is not None:
            shapes["w_scale"] = list(self.qweight.scales.shape)
        shapes["a_scale"] = list(self.a_scale.shape)
        return shapes

    def codes(self) -> torch.Tensor:
        """The weight codes `Q`: (out, in) int8 (the float W2 when weights are unquantized)."""
        return self.w2 if self.qweight is None else self.qweight.codes()

    # -- state ---------------------------------------------------------------
    @property
    def param_dtype(self) -> torch.dtype:
        """The float dtype of the layer's state (rotations, bias, float weight): its inputs' dtype."""
        for t in (*(getattr(self, f) for f in ROTATION_FIELDS), self.bias, self.w2):
            if t is not None and t.dtype.is_floating_point:
                return t.dtype
        return torch.float32

    @property
    def kernel_paths(self) -> dict[str, dict[str, str]] | None:
        """The frozen kernel choices, {dtype name: {token bucket: path}} (`interop.kernels.freeze_paths`)."""
        return None if self.qweight is None else getattr(self.qweight, "frozen_paths", None)

    def _refresh_derived(self) -> None:
        if self.calibrated.device.type != "meta":
            self._calibrated = bool(self.calibrated)
        if self.qweight is not None:
            from interop.custom_ops import register

            register(self.qweight)
        self.r_in_t = None if self.r_in is None else self.r_in.transpose(-1, -2).contiguous()
        float32 = lambda t: t is None or (t.dtype == torch.float32 and t.device.type == "cpu")  # noqa: E731
        self._fusable = (self.qweight is not None and self.act.integer and self.r_pre is None and self.perm.device.type == "cpu"
                         and float32(self.in_diag) and float32(self.r_in))
        bias = self.bias
        if bias is not None and self.config.rotate_rows and self.config.row_rot_mode == "propagate":
            b = bias.detach().float()
            if self.out_diag is not None:
                b = b * self.out_diag.float()
            bias = rotate_blocks(b, self.r_out.float().transpose(-1, -2)).to(bias.dtype)
        self.b_eff = None if bias is None else bias.detach()
        if getattr(self, "input_group", None) is not None:  # .to() converts each member's buffers alone
            self.input_group.link()

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .bfloat16() ...
        out = super()._apply(fn, recurse)
        if self.a_scale.dtype != torch.float32:  # activation scales stay float32 (what the saved format stores)
            self.a_scale = self.a_scale.float()
        self._refresh_derived()
        return out

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"W{c.weight_bits}A{c.act_bits}, rotation={c.rotation!r}, block_size={c.block_size}, "
            f"block_out_size={c.out_block_size}, row_rot_mode={c.row_rot_mode!r}, act_scheme={c.act_scheme!r}, "
            f"weight_group_size={c.weight_group_size}, weight_method={c.weight_method!r}, calibrated={bool(self.calibrated)}"
        )

    # -- calibration ---------------------------------------------------------
    def start_calibration(self) -> None:
        self._stats, self._stat_batches = None, 0

    def abort_calibration(self) -> None:
        self._stats, self._stat_batches = None, -1

    def finish_calibration(self) -> bool:
        """Freezes `a_scale` from the statistics; False (and unchanged) if no batch was seen."""
        stats, self._stats, self._stat_batches = self._stats, None, -1
        if stats is None:
            return False
        if self.config.needs_calibration:
            if self.config.act_scheme == "static-tensor":
                stats = stats.max().reshape(1)
            self.a_scale.copy_(torch.clamp(stats / qmax(self.config.act_bits), min=STATIC_EPS))
            self.calibrated.fill_(True)
            self._calibrated = True
        return True

    def _record(self, x2: torch.Tensor) -> None:
        cfg = self.config
        if self._stat_batches >= cfg.calib_batches:
            return
        if not torch.isfinite(x2).all():
            raise ValueError(f"{self.name or 'DuQuantLinear'}: calibration batch {self._stat_batches} holds NaN/Inf")
        p = abs_percentile(x2, cfg.act_percentile)
        self._stats = p if self._stats is None else torch.maximum(self._stats, p)
        self._stat_batches += 1

    # -- forward -------------------------------------------------------------
    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        """Forward steps 1-2: x (..., in) -> `rot(rot(x * in_diag, r_pre)[..., perm], r_in)` (..., in).

        Works on `x^T`, whose permuted channels are whole rows: gathering rows and
        one `bmm` of `R_in^T` blocks is 2-4x faster on CPU than gathering columns
        (bfloat16 most). The result is a transposed view; matmul takes it as is.
        """
        lead, n_in = x.shape[:-1], self.in_features
        if self.in_diag is not None:
            x = x * self.in_diag.to(x.dtype)
        if self.r_pre is not None:
            x = rotate_blocks(x, self.r_pre.to(x.dtype))
        xt = x.reshape(-1, n_in).t().contiguous().index_select(0, self.perm)  # (in, T)
        tokens = xt.shape[1]
        if self.r_in_t is None:
            return xt.t().reshape(*lead, n_in)
        n, size, _ = self.r_in_t.shape
        if n == 1 and tokens == 1:  # one token (decode): its blocks are the rows of one (n_in / B, B) product with
            # R_in itself, where broadcasting R_in^T over the blocks would copy it on every call
            return (xt.view(n_in // size, size) @ self.r_in[0].to(x.dtype)).reshape(*lead, n_in)
        r = self.r_in_t.to(x.dtype)
        if n == 1:
            x2t = (r[0] @ xt.view(n_in // size, size, tokens)).view(n_in, tokens)
            return x2t.t().reshape(*lead, n_in)
        if n * size != n_in:
            xt = nn.functional.pad(xt, (0, 0, 0, n * size - n_in))
        x2t = torch.bmm(r, xt.view(n, size, tokens)).view(n * size, tokens)
        return x2t[:n_in].t().reshape(*lead, n_in)

    def restore_output(self, y1: torch.Tensor) -> torch.Tensor:
        """y1: (..., out) in the rotated row basis -> `(y1 diag(r_out)) * out_diag`."""
        y = rotate_blocks(y1, self.r_out.to(y1.dtype))
        return y if self.out_diag is None else y * self.out_diag.to(y.dtype)

    def _product(self, x2: torch.Tensor, act: ActQuant, group=None, compiling: bool = False) -> torch.Tensor:
        if self.qweight is not None:
            scale = self.a_scale if act.scheme in ("static-channel", "static-tensor") else None
            prepared = None
            if group is not None:
                prepared = group.traced_prepared(x2, act, scale) if compiling else group.prepared(x2, act, scale)
            return quantized_matmul(x2, self.qweight, act, scale, prepared=prepared)
        x3 = x2 if act.scheme == "none" else fake_quantize(x2, act, self.a_scale if act.scheme.startswith("static") else None)
        return nn.functional.linear(x3.to(x2.dtype), self.w2.to(x2.dtype))  # fake_quantize computes in float32

    def _require_calibrated(self, compiling: bool) -> None:
        if self.config.needs_calibration and not (self._calibrated if compiling else bool(self.calibrated)):
            raise RuntimeError(
                f"layer {self.name or '(unnamed)'} quantizes activations (A{self.config.act_bits}) but was never "
                "calibrated: run batches inside `with interop.calibrate(model):` first"
            )

    def _fuses(self, x: torch.Tensor) -> bool:
        """Whether this call takes `_fused_input`: integer activations, float32 on the CPU, no pre-rotation, float32
        transform buffers, and the compiled helpers on and built."""
        return self._fusable and x.dtype == torch.float32 and x.device.type == "cpu" and compiled_helpers_on()

    def _fused_input(self, x: torch.Tensor, act_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., in) float32 -> (xq (T, in) int8, s_t (T, 1) float32): `rotate_input` and `kernels.quantize_tokens`
        in one C pass (`interop.native.transform_quantize`; the `duquant::transform_quantize` op under
        `torch.compile`). Its x2 is summed in another order than torch's matmul, so a code may differ by one
        step from the unfused path's where x2 / s_t lies within float32 roundoff of a rounding tie."""
        act = self.act
        args = (x.reshape(-1, self.in_features), self.perm, self.in_diag, self.r_in, act.scheme == "dynamic-token",
                act.traced_clip, act.qa, act_scale)
        if torch.compiler.is_compiling():
            from interop.custom_ops import transform_quantize as op

            return op(*args)
        return native.transform_quantize(*args)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A copy (`copy.deepcopy`, which restores state through here) is another layer: it gets its own
        `duquant::layer_call` handle."""
        super().__setstate__(state)
        self._handle = register_layer(self)

    def _layer_product(self, x: torch.Tensor, compiling: bool) -> torch.Tensor:
        """float32 x (..., in) -> y (..., out): `_fused_input` and the product in one call (`interop.layer_product`),
        for per-token codes of an input no other layer shares. Under `torch.compile` one op, `duquant::layer_call`,
        which names the layer by its handle; under `torch.export` `duquant::layer_mm`, which takes its tensors."""
        w, act = self.qweight, self.act
        x2 = x.reshape(-1, self.in_features)
        if compiling and not torch.compiler.is_exporting():
            from interop.custom_ops import layer_call

            y = layer_call(x2, self._handle, w.out_features)
        elif compiling:
            from interop.custom_ops import layer_mm

            y = layer_mm(x2, self.perm, self.in_diag, self.r_in, w.qdata, w.scales, w.in_features, w.out_features, w.bits,
                         w.group_size or 0, w.layout, path_spec(w, torch.float32), act.bits, act.traced_clip)
        else:
            y = layer_product(x2, self.perm, self.in_diag, self.r_in, act, w)
        return y.reshape(*x.shape[:-1], w.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name or 'DuQuantLinear'}: input must have last dimension {self.in_features}; got shape {tuple(x.shape)}")
        cfg = self.config
        group, compiling = self.input_group, torch.compiler.is_compiling()
        act = self.act
        if self._stat_batches < 0 and self._fuses(x):  # the transform and the activation codes in one C pass
            self._require_calibrated(compiling)
            if group is None and act.scheme == "dynamic-token":
                y = self._layer_product(x, compiling)
            else:
                scale = self.a_scale if act.scheme == "static-tensor" else None
                prepared = self._fused_input(x, scale) if group is None else group.fused(self, x, scale)
                y = quantized_matmul(x, self.qweight, act, scale, prepared=prepared)
        else:
            if group is None:
                x2 = self.rotate_input(x)
            else:
                x2 = group.traced(self, x) if compiling else group.rotated(x)
            if self._stat_batches >= 0:
                self._record(x2)
                act = ActQuant()  # calibration runs with float activations
            else:
                self._require_calibrated(compiling)
            y = self._product(x2, act, group, compiling)
        if group is not None:
            group.traced_read() if compiling else group.read()
        if cfg.rotate_rows and cfg.row_rot_mode == "restore":
            y = self.restore_output(y)
        return y if self.b_eff is None else y + self.b_eff.to(y.dtype)
