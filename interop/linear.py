"""`DuQuantLinear`: SPEC's forward in PyTorch, from a pack made in JAX."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from duquant_jax import DuQuantConfig, Pack, pack_weight
from duquant_jax.config import qmax
from duquant_jax.stats import LayerStats

STATIC_EPS = 1e-6  # duquant_jax.activations
DYNAMIC_EPS = 1e-8
from interop.dlpack import jax_to_torch, torch_to_jax


def _as_tensor(a: Any) -> torch.Tensor:
    """A JAX array through DLPack (no copy on CPU); a NumPy array through torch.from_numpy."""
    if isinstance(a, torch.Tensor):
        return a
    if hasattr(a, "__dlpack__") and not hasattr(a, "__array_interface__"):
        return jax_to_torch(a)
    return torch.from_numpy(a.copy() if not a.flags.writeable else a)


def _rotate_columns(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x: (..., C), r: (n, B, B) -> `x diag(r)` (..., C): pad, one batched einsum, truncate.
    With n == 1 and C a multiple of B, the one matrix serves every block."""
    n, size, _ = r.shape
    c = x.shape[-1]
    if n == 1 and c % size == 0:
        return (x.reshape(*x.shape[:-1], c // size, size) @ r[0]).reshape(x.shape)
    if n * size != c:
        x = nn.functional.pad(x, (0, n * size - c))
    y = torch.einsum("...nb,nbc->...nc", x.reshape(*x.shape[:-1], n, size), r)
    return y.reshape(*x.shape[:-1], n * size)[..., :c]


def _code_scales(w_scale: torch.Tensor, n: int, config: DuQuantConfig) -> torch.Tensor:
    """(out,) or (out, groups) -> each code's scale: (out, 1) or (out, n)."""
    if w_scale.dim() == 1:
        return w_scale[:, None]
    return w_scale.repeat_interleave(config.weight_group_size, dim=1)[:, :n]


def abs_percentile(x2: torch.Tensor, q: float) -> torch.Tensor:
    """x2: (..., in) -> (in,) the q-th percentile of |x2| over all tokens, NumPy's linear method."""
    v = x2.detach().abs().reshape(-1, x2.shape[-1]).float().sort(dim=0).values
    pos = q / 100.0 * (v.shape[0] - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


class DuQuantLinear(nn.Module):
    """A DuQuant-packed linear layer (SPEC "Forward pass").

    Buffers (all in `state_dict`): `perm (in,)`, `r_in (n_in, B, B)`,
    `r_out (n_out, Bo, Bo)` (absent with row_rot_mode "none"), `w_codes (out, in)`,
    `w_scale (out,)`, `a_scale (in,)` and `calibrated` (a bool).

    Derived, non-persistent buffers, computed once and again only when the module
    is moved or loaded: `r_in_t` (each `R_in` block transposed), `w_eff` (out, in)
    and `b_eff` (out,). `w_eff` is the dequantized weight `Q * s`, with "restore"'s
    output rotation folded in (`y1 diag(R_out) = x3 (diag(R_out)^T W_hat)^T`), and
    `b_eff` the bias, rotated by `R_out` for "propagate"; so the forward is one
    gather, one batched block product, the fake quantization and one `linear`.
    """

    def __init__(self, pack: Pack, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None, name: str = ""):
        super().__init__()
        self.config: DuQuantConfig = pack.config
        self.in_features, self.out_features = pack.in_features, pack.out_features
        self.name = name
        dtype = dtype or torch.float32
        self.register_buffer("perm", _as_tensor(pack.perm).to(torch.int64))
        for field in ("in_diag", "r_pre", "r_in", "r_out", "out_diag"):
            value = getattr(pack, field)
            self.register_buffer(field, None if value is None else _as_tensor(value).to(dtype))
        codes = _as_tensor(pack.w_codes)
        self.register_buffer("w_codes", codes if codes.dtype == torch.int8 else codes.to(dtype))
        self.register_buffer("w_scale", _as_tensor(pack.w_scale).to(dtype))
        calibrated = pack.a_scale is not None
        n_scales = 1 if self.config.act_scheme == "static-tensor" else self.in_features
        a_scale = _as_tensor(pack.a_scale).to(dtype) if calibrated else torch.zeros(n_scales, dtype=dtype)
        self.register_buffer("a_scale", a_scale)
        self.register_buffer("calibrated", torch.tensor(calibrated))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().to(dtype), requires_grad=False)
        for derived in ("r_in_t", "w_eff", "b_eff"):
            self.register_buffer(derived, None, persistent=False)
        self._stats: torch.Tensor | None = None
        self._stat_batches = -1  # -1: not calibrating
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh_weight())
        self._refresh_weight()

    # -- construction -------------------------------------------------------
    @classmethod
    def from_pack(cls, pack: Pack, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None, name: str = "") -> DuQuantLinear:
        """From a Pack (JAX arrays arrive through DLPack without copies on CPU)."""
        return cls(pack, bias=bias, dtype=dtype, name=name)

    @classmethod
    def from_file(cls, path, layer: str, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> DuQuantLinear:
        """From layer `layer` of a pack file written by `duquant_jax.io.save_packs`."""
        from duquant_jax.io import load_packs

        return cls(load_packs(path, [layer])[layer], bias=bias, dtype=dtype, name=layer)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, config: DuQuantConfig = DuQuantConfig(), name: str = "", stats: LayerStats | None = None
    ) -> DuQuantLinear:
        """Packs `linear.weight` with the JAX path and carries the result over.
        `stats`: the layer's input statistics, for configs that need them (`interop.observe`)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear; got {type(linear).__name__}")
        pack = pack_weight(torch_to_jax(linear.weight.detach()), config, stats, name=name)
        dtype = linear.weight.dtype if linear.weight.dtype.is_floating_point else torch.float32
        return cls(pack, bias=linear.bias, dtype=dtype, name=name).to(linear.weight.device)

    # -- state ---------------------------------------------------------------
    def _refresh_weight(self) -> None:
        """Recomputes the derived buffers (in float32, then the module's dtype)."""
        dtype = self.w_scale.dtype
        w_hat = self.w_codes.float() * _code_scales(self.w_scale.float(), self.in_features, self.config)
        bias = None if self.bias is None else self.bias.detach().float()
        sign = None if self.out_diag is None else self.out_diag.float()
        if self.config.rotate_rows and self.config.row_rot_mode == "restore":
            # y = (y1 diag(r_out)) * sign = x3 (sign * diag(r_out)ᵀ W_hat)ᵀ
            w_hat = _rotate_columns(w_hat.T, self.r_out.float()).T
            if sign is not None:
                w_hat = w_hat * sign[:, None]
        elif self.config.rotate_rows and self.config.row_rot_mode == "propagate" and bias is not None:
            bias = _rotate_columns(bias if sign is None else bias * sign, self.r_out.float().transpose(-1, -2))
        self.w_eff = w_hat.to(dtype).contiguous()
        self.b_eff = None if bias is None else bias.to(dtype)
        self.r_in_t = None if self.r_in is None else self.r_in.transpose(-1, -2).contiguous()

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .bfloat16() ...
        out = super()._apply(fn, recurse)
        self._refresh_weight()
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
            s = torch.clamp(stats / qmax(self.config.act_bits), min=STATIC_EPS)
            self.a_scale.copy_(s.to(self.a_scale.dtype))
            self.calibrated.fill_(True)
        return True

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
            x = _rotate_columns(x, self.r_pre.to(x.dtype))
        xt = x.reshape(-1, n_in).t().contiguous().index_select(0, self.perm)  # (in, T)
        if self.r_in_t is None:
            return xt.t().reshape(*lead, n_in)
        n, size, _ = self.r_in_t.shape
        tokens = xt.shape[1]
        r = self.r_in_t.to(x.dtype)
        if n == 1:
            x2t = (r[0] @ xt.view(n_in // size, size, tokens)).view(n_in, tokens)
            return x2t.t().reshape(*lead, n_in)
        if n * size != n_in:
            xt = nn.functional.pad(xt, (0, 0, 0, n * size - n_in))
        x2t = torch.bmm(r, xt.view(n, size, tokens)).view(n * size, tokens)
        return x2t[:n_in].t().reshape(*lead, n_in)

    # -- forward -------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name or 'DuQuantLinear'}: input must have last dimension {self.in_features}; got shape {tuple(x.shape)}")
        cfg = self.config
        x2 = self.rotate_input(x)
        if self._stat_batches >= 0:
            if self._stat_batches < cfg.calib_batches:
                if not torch.isfinite(x2).all():
                    raise ValueError(f"{self.name or 'DuQuantLinear'}: calibration batch {self._stat_batches} holds NaN/Inf")
                p = abs_percentile(x2, cfg.act_percentile)
                self._stats = p if self._stats is None else torch.maximum(self._stats, p)
                self._stat_batches += 1
        elif cfg.quantize_acts:
            qa = qmax(cfg.act_bits)
            if cfg.act_scheme == "dynamic-token":
                s = torch.clamp(cfg.act_clip * x2.abs().amax(dim=-1, keepdim=True) / qa, min=DYNAMIC_EPS)
            elif not bool(self.calibrated):
                raise RuntimeError(
                    f"layer {self.name or '(unnamed)'} quantizes activations (A{cfg.act_bits}) but was never "
                    "calibrated: run batches inside `with interop.calibrate(model):` first"
                )
            else:
                s = self.a_scale.to(x2.dtype)
            x2 = torch.clamp(torch.round(x2 / s), -qa - 1, qa) * s
        b = None if self.b_eff is None else self.b_eff.to(x2.dtype)
        return nn.functional.linear(x2, self.w_eff.to(x2.dtype), b)
