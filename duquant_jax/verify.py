"""Per-layer verdicts on the quantized layer itself, for every configuration the packer writes.

`explain_pack` judges one pack against the float64 reference path
(`reference.pack_weight(w, config, stats)`) in two parts:

The transform (permutation, diagonal factors, rotations): equal to the reference's,
orthogonal, and exact (the unquantized forward equals x Wᵀ). For SPEC's "svd" family
rotations are unique only on well-separated blocks, and SPEC's canonical sign rule
makes each column's largest-magnitude entry positive: when a column's two largest
|entries| are nearly equal, float32 and float64 may disagree on which is largest, and
the whole column comes out with the other sign. Both are exact SVD rotations, so
every column that is a *near tie* is allowed either sign; a flip at a column that is
not a near tie is a real disagreement and fails. The other families' transforms are
deterministic (from the seed, or fitted on the statistics) and are compared whole.

The quantized weight, in the basis the pack's own transform gives (`own_w2`, float64):
  - scales: the reference's step 7 (MSE grid or min-max per row/group) on that basis;
    a scale must be within SCALE_RTOL of the reference's choice, or of another grid
    candidate whose squared error ties the best within SCALE_TIE;
  - codes: each code against the value the reference rounds it from, with the pack's
    scales: `W2 / s` for round-to-nearest; for GPTQ the float64 error feedback of the
    pack's own earlier codes (`forced_gptq_ratio`), so that float32 and float64 never
    drift apart. A code may be off that value by at most 0.5 + ROUND_TOL (a rounding
    tie), and >= CODES_SAME of them must round to exactly the pack's code;
  - the weight-quantized forward's error against x Wᵀ, at most WQ_RATIO times the
    reference pack's plus WQ_SLACK.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from duquant_jax import reference
from duquant_jax.config import DuQuantConfig, qmax
from duquant_jax.equivalence import (
    CODES_IDENTICAL,
    FORWARD_TOL,
    ORTHO_TOL,
    ROT_TOL,
    Report,
    max_ortho_err,
    rel_err,
    separated_blocks,
)
from duquant_jax.packed import Pack
from duquant_jax.quantize import scale_alphas
from duquant_jax.reference import options
from duquant_jax.stats import LayerStats

# Two paths that each meet SPEC's rotation bound (|R - R_ref| <= ROT_TOL entry-wise)
# can disagree on which entry is largest only when the two largest |entries|
# differ by at most 2 * ROT_TOL: such a column is a near tie.
NEAR_TIE = 2 * ROT_TOL
SAME_LINE = 0.99  # |cos| between a column and the reference's above which they are one line, up to sign

# The quantized layer's bounds, with what intact packs measured (random 256x512 and 2048x2048 layers with SPEC and
# every preset; all-MiniLM-L6-v2's blocks 0 and 5 with w4a16 and w4a4 on real statistics):
SCALE_RTOL = 1e-4  # |s - s_ref| / s_ref per row/group; measured <= 9.1e-7
SCALE_TIE = 1e-3  # grid candidates whose squared error is within this fraction of the best's tie it
ROUND_TOL = {"rtn": 1e-3, "gptq": 0.05}  # |q - z| <= 0.5 + this; measured excess <= 1.5e-5 (rtn), <= 1.1e-3 (gptq)
CODES_SAME = CODES_IDENTICAL  # share of codes equal to round(z); measured >= 99.993%
W2_TOL = 1e-5  # unquantized weights: max |W2 - W2_ref| / max |W2_ref|
WQ_RATIO, WQ_SLACK = 1.02, 1e-4  # weight-quantized forward error <= WQ_RATIO * the reference's + WQ_SLACK; measured 0.998-1.0006
WQ_ROWS = 64  # rows of N(0, 1) inputs the forward errors are measured on


def tie_margins(r) -> np.ndarray:
    """r: (n, b, b) stacked rotations -> (n, b): per column, |largest entry| - |second largest|."""
    a = np.sort(np.abs(np.asarray(r, np.float64)), axis=-2)
    return a[..., -1, :] - a[..., -2, :]


def sign_flips(got, want) -> np.ndarray:
    """got, want: (n, b, b) -> (n, b) bool: columns of `got` that are `want`'s with the other sign."""
    cos = np.einsum("kic,kic->kc", np.asarray(got, np.float64), np.asarray(want, np.float64))
    return cos <= -SAME_LINE


def align_signs(got, flips: np.ndarray) -> np.ndarray:
    """`got` (n, b, b) with the columns marked in `flips` (n, b) negated."""
    return np.where(flips[:, None, :], -np.asarray(got), np.asarray(got))


@dataclasses.dataclass(frozen=True)
class SignReport:
    """Rotation columns (input and output, over every block) against the reference's."""

    columns: int
    near_ties: int  # reference columns whose two largest |entries| differ by <= NEAR_TIE
    flips: int  # columns whose sign differs from the reference's
    flips_at_ties: int  # of those, near ties (the rest are real disagreements)


@dataclasses.dataclass(frozen=True)
class Quantized:
    """The quantized weight against the float64 reference's steps 7-8 on the pack's own basis.

    scale_err: max over rows/groups of |s - s_ref| / s_ref, s_ref the reference's choice or a tied candidate.
    scale_ties: rows/groups whose scale is a tied candidate other than the reference's choice.
    round_err: max |q - clip(z)| over codes, z the value the reference rounds each code from
      (unquantized weights: max |W2 - W2_ref| / max |W2_ref|).
    round_tol: the bound on round_err (0.5 + ROUND_TOL[weight_method], or W2_TOL).
    codes_same: share of codes equal to round(clip(z)).
    wq_err: (pack, reference pack): ‖y_q - x Wᵀ‖/‖x Wᵀ‖ of each one's weight-quantized forward
      (activations unquantized), in float64.
    """

    scale_err: float
    scale_ties: int
    round_err: float
    round_tol: float
    codes_same: float
    wq_err: tuple[float, float]

    @property
    def wq_ok(self) -> bool:
        return self.wq_err[0] <= WQ_RATIO * self.wq_err[1] + WQ_SLACK

    @property
    def ok(self) -> bool:
        return (
            self.scale_err <= SCALE_RTOL and self.round_err <= self.round_tol and self.codes_same >= CODES_SAME and self.wq_ok
        )


@dataclasses.dataclass(frozen=True)
class Explained:
    """One layer against the float64 reference.

    spec: the transform as stored against the reference's (`rot_err` includes the
      diagonal factors), and codes as stored against the reference's (information).
    aligned: the same after giving the reference's signs to the flipped columns (svd
      family; codes recomputed from those rotations where `pack_with_rotations` applies);
      equal to `spec` without flips.
    signs: how many columns were near ties and how many flipped.
    quantized: the scales, codes and weight-quantized forward (see `Quantized`).
    """

    spec: Report
    aligned: Report
    signs: SignReport
    quantized: Quantized

    @property
    def quantized_err(self) -> tuple[float, float]:
        return self.quantized.wq_err

    @property
    def transform_ok(self) -> bool:
        """Permutation, orthogonality, rotations (near ties either sign) and exact forward within bounds."""
        a = self.aligned
        return (
            a.perm_identical
            and a.ortho_err <= ORTHO_TOL
            and a.rot_err <= ROT_TOL
            and a.exact_forward_err <= FORWARD_TOL
            and self.signs.flips == self.signs.flips_at_ties
        )

    @property
    def ok(self) -> bool:
        """The transform and the quantized weight within their bounds."""
        return self.transform_ok and self.quantized.ok


def own_w2(pack: Pack, w) -> np.ndarray:
    """w: (out, in) -> W2 (out, in) float64: `w` in the basis the pack's codes live in, from the
    pack's own transform (`x2 W1ᵀ = x Wᵀ`, `W2 = diag(r_out) diag(out_diag) W1`)."""
    inverse = pack.replace(in_diag=None if pack.in_diag is None else 1.0 / np.asarray(pack.in_diag, np.float64))
    w2 = reference.rotate_input(inverse, np.asarray(w, np.float64))
    if not pack.config.rotate_rows:
        return w2
    if pack.out_diag is not None:
        w2 = np.asarray(pack.out_diag, np.float64)[:, None] * w2
    return options.rotate_blocks(w2.T, np.swapaxes(np.asarray(pack.r_out, np.float64), -1, -2)).T


def _grouped(w2: np.ndarray, group_size: int | None) -> np.ndarray:
    """(out, in) -> (out, groups, size), a short last group padded with zeros."""
    out, n = w2.shape
    size = n if group_size is None else group_size
    groups = -(-n // size)
    return np.pad(w2, ((0, 0), (0, groups * size - n))).reshape(out, groups, size)


def scale_check(w_scale, w2: np.ndarray, config: DuQuantConfig) -> tuple[float, int]:
    """w_scale: (out,) or (out, groups); w2: (out, in) float64 -> (max relative distance to an accepted
    candidate, how many rows/groups took a tied candidate other than the best)."""
    g = _grouped(w2, config.weight_group_size)
    qm = qmax(config.weight_bits)
    base = np.maximum(np.abs(g).max(axis=-1) / qm, 1e-8)  # (out, groups)
    alphas = scale_alphas(config.scale_method)
    cands = np.stack([base / a for a in alphas], axis=-1)  # (out, groups, k)
    errs = np.stack([np.mean((np.clip(np.round(g / c[..., None]), -qm - 1, qm) * c[..., None] - g) ** 2, axis=-1)
                     for c in np.moveaxis(cands, -1, 0)], axis=-1)  # a handful of candidates, not a loop over blocks
    best = errs.argmin(axis=-1)  # first on a tie, as step 7
    tied = errs <= errs.min(axis=-1, keepdims=True) * (1 + SCALE_TIE)
    s = np.asarray(w_scale, np.float64).reshape(base.shape)
    dist = np.where(tied, np.abs(s[..., None] - cands) / cands, np.inf)
    nearest = dist.argmin(axis=-1)
    return float(dist.min(axis=-1).max()), int(np.sum(nearest != best))


def forced_gptq_ratio(w2: np.ndarray, h: np.ndarray, w_scale, codes, config: DuQuantConfig, order=None) -> np.ndarray:
    """The float64 GPTQ of `reference.gptq.gptq_rounding`, with the given `codes` (out, in) in place
    of its own roundings: (out, in) the value `w / s` each code is rounded from, given the error
    feedback of the codes before it. w2: (out, in), h: (in, in) in the codes' basis; `order` (in,):
    the rounding order (default: the identity, or descending diag(h) with act_order)."""
    return forced_gptq(w2, h, w_scale, codes, config, order)[0]


def forced_gptq(w2: np.ndarray, h: np.ndarray, w_scale, codes, config: DuQuantConfig, order=None) -> tuple[np.ndarray, np.ndarray]:
    """`forced_gptq_ratio`, and (out, in) the weights each scale was fitted to: with
    `gptq_static_groups=False` each group's columns as they stood when the rounding reached the
    group's first column; else `w2`."""
    from duquant_jax.reference.gptq import column_scales, hinv_factor

    W = np.array(w2, np.float64)
    out, n = W.shape
    S = column_scales(w_scale, out, n, config.weight_group_size)
    W[:, np.diag(h) == 0] = 0
    if order is None:
        order, Hinv = hinv_factor(h, damp=config.gptq_damp, act_order=config.gptq_act_order)
    else:
        order = np.asarray(order)
        Hinv = hinv_factor(np.asarray(h)[order][:, order], damp=config.gptq_damp)[1]
    W, S, Q = W[:, order], S[:, order], np.asarray(codes, np.float64)[:, order]
    R = np.zeros_like(W)
    fitted_to = np.array(w2, np.float64)
    group = None if config.gptq_static_groups else config.weight_group_size  # (no act_order: order is the identity)
    block = config.gptq_block
    for i1 in range(0, n, block):  # the reference's lazy blocks, column by column inside
        i2 = min(i1 + block, n)
        W1, Err1 = W[:, i1:i2].copy(), np.zeros((out, i2 - i1))
        for i in range(i2 - i1):
            if group and (i1 + i) % group == 0:
                fitted_to[:, i1 + i : i1 + i + group] = W1[:, i : i + group]
            R[:, i1 + i] = W1[:, i] / S[:, i1 + i]
            Err1[:, i] = (W1[:, i] - Q[:, i1 + i] * S[:, i1 + i]) / Hinv[i1 + i, i1 + i]
            W1[:, i:] -= np.outer(Err1[:, i], Hinv[i1 + i, i1 + i : i2])
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return R[:, np.argsort(order)], fitted_to


def packer_order(got: Pack, xtx) -> np.ndarray | None:
    """The rounding order the float32 packer takes for `got`: descending diag(Tᵀ XᵀX T) as it computes
    it, ties by index (None without act_order). Columns whose diagonals tie within float32's
    precision may come in another order than float64's; the order is the packer's to choose."""
    if not got.config.gptq_act_order:
        return None
    import jax.numpy as jnp

    from duquant_jax.gptq import gptq_factor
    from duquant_jax.pack import hessian_in_basis

    f32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32)  # noqa: E731
    h2 = hessian_in_basis(xtx, jnp.asarray(got.perm, jnp.int32), f32(got.r_in), f32(got.in_diag), f32(got.r_pre))
    return np.asarray(gptq_factor(h2, damp=got.config.gptq_damp, act_order=True).order)


def code_ratio(got: Pack, w2: np.ndarray, stats: LayerStats | None) -> tuple[np.ndarray, np.ndarray]:
    """(out, in) float64: the value the reference rounds each of `got`'s codes from, with `got`'s scales;
    and (out, in) the weights the scales are fitted to (`w2`, or for GPTQ fitting scales while rounding,
    each group as the rounding reached it)."""
    cfg = got.config
    if cfg.needs_xtx:
        t = reference.transform_matrix(got.in_features, got.perm, got.r_in, got.in_diag, got.r_pre)
        h2 = t.T @ np.asarray(stats.xtx, np.float64) @ t
        return forced_gptq(w2, h2, got.w_scale, got.w_codes, cfg, packer_order(got, stats.xtx))
    return w2 / options.code_scales(got.w_scale, got.in_features, cfg.weight_group_size), w2


def _wq_err(pack: Pack, x: np.ndarray, exact: np.ndarray) -> float:
    """The weight-quantized forward's error (activations unquantized, rows restored), in float64."""
    cfg = pack.config.replace(act_bits=16, row_rot_mode="restore" if pack.config.rotate_rows else pack.config.row_rot_mode)
    return rel_err(reference.forward(pack.replace(config=cfg, a_scale=None), x), exact)


def check_quantized(got: Pack, want: Pack, w, stats: LayerStats | None = None, seed: int = 0) -> Quantized:
    """`got` (NumPy arrays) against the reference's steps 7-8 on its own basis, and its forward
    error against `want`'s (the reference pack of `w: (out, in)`)."""
    cfg = got.config
    w2 = own_w2(got, w)
    x = np.random.default_rng(seed + 1).standard_normal((WQ_ROWS, w2.shape[1]))
    exact = x @ np.asarray(w, np.float64).T
    wq = (_wq_err(got, x, exact), _wq_err(want, x, exact))
    if not cfg.quantize_weights:
        err = float(np.abs(np.asarray(got.w_codes, np.float64) - w2).max() / max(np.abs(w2).max(), 1e-30))
        scale_err = float(np.abs(np.asarray(got.w_scale, np.float64) - 1).max())
        return Quantized(scale_err, 0, err, W2_TOL, 1.0, wq)
    ratio, fitted_to = code_ratio(got, w2, stats)
    scale_err, ties = scale_check(got.w_scale, fitted_to, cfg)
    qm = qmax(cfg.weight_bits)
    z = np.clip(ratio, -qm - 1, qm)
    q = np.asarray(got.w_codes, np.float64)
    return Quantized(
        scale_err=scale_err,
        scale_ties=ties,
        round_err=float(np.abs(q - z).max()),
        round_tol=0.5 + ROUND_TOL[cfg.weight_method],
        codes_same=float(np.mean(np.round(z) == q)),
        wq_err=wq,
    )


def _diag_err(got: Pack, want: Pack) -> float:
    """max of in_diag's relative and out_diag's absolute difference to the reference's; inf when one lacks it."""
    errs = [0.0]
    for field, relative in (("in_diag", True), ("out_diag", False)):
        g, r = getattr(got, field), getattr(want, field)
        if (g is None) != (r is None):
            return float("inf")
        if g is not None:
            r = np.asarray(r, np.float64)
            errs.append(float((np.abs(np.asarray(g, np.float64) - r) / (np.abs(r) if relative else 1.0)).max()))
    return max(errs)


def _rot_err(got: Pack, want: Pack, w, r_in, r_out) -> tuple[float, float]:
    """(max |R - R_ref| entry-wise, share of blocks compared): the svd family over its well-separated
    blocks (of the smoothed weight), the other families over every rotation, r_pre included."""
    cfg = got.config
    pairs = [(r_in, want.r_in), (r_out, want.r_out)] + ([(got.r_pre, want.r_pre)] if cfg.rotation != "svd" else [])
    if any((g is None) != (r is None) for g, r in pairs):
        return float("inf"), 1.0
    if cfg.rotation != "svd":
        diffs = [np.abs(np.asarray(g, np.float64) - r).max() for g, r in pairs if g is not None and np.shape(g) == np.shape(r)]
        shapes_ok = all(np.shape(g) == np.shape(r) for g, r in pairs)
        return (float(max(diffs, default=0.0)) if shapes_ok else float("inf")), 1.0
    w_eff = np.asarray(w, np.float64) if want.in_diag is None else np.asarray(w, np.float64) / np.asarray(want.in_diag)
    sep_in, sep_out = separated_blocks(w_eff, want)
    rot = [np.abs(r_in[k] - want.r_in[k]).max() for k in np.flatnonzero(sep_in)]
    rot += [np.abs(r_out[k] - want.r_out[k]).max() for k in np.flatnonzero(sep_out)]
    return float(max(rot, default=0.0)), (sum(sep_in) + sum(sep_out)) / (len(sep_in) + len(sep_out))


def transform_report(got: Pack, want: Pack, w, r_in=None, r_out=None, codes=None, seed: int = 0) -> Report:
    """`got`'s transform (with `r_in`/`r_out` in place of its own, e.g. sign-aligned) and `codes`
    (default its own) against the reference pack `want` of `w: (out, in)`; NumPy arrays."""
    r_in = got.r_in if r_in is None else r_in
    r_out = got.r_out if r_out is None else r_out
    codes = got.w_codes if codes is None else codes
    rot_err, separated = _rot_err(got, want, w, r_in, r_out)
    rotations = [r for r in (got.r_pre, r_in, r_out) if r is not None]
    codes_same, codes_diff = 1.0, 0
    if got.config.quantize_weights:
        diff = np.abs(np.asarray(codes, np.int64) - np.asarray(want.w_codes, np.int64))
        codes_same, codes_diff = float(np.mean(diff == 0)), int(diff.max())
    exact_cfg = got.config.replace(weight_bits=16, act_bits=16, weight_group_size=None,
                                   row_rot_mode="restore" if got.config.rotate_rows else got.config.row_rot_mode)
    exact = got.replace(r_in=r_in, r_out=r_out, config=exact_cfg, a_scale=None)
    exact = exact.replace(w_codes=own_w2(exact, w), w_scale=np.ones(got.out_features))
    x = np.random.default_rng(seed).standard_normal((16, got.in_features))
    return Report(
        perm_identical=bool(np.array_equal(got.perm, want.perm)),
        ortho_err=max((max_ortho_err(r) for r in rotations), default=0.0),
        rot_err=max(rot_err, _diag_err(got, want)),
        separated=separated,
        codes_identical=codes_same,
        codes_max_diff=codes_diff,
        exact_forward_err=rel_err(reference.forward(exact, x), x @ np.asarray(w, np.float64).T),
    )


def _signs(got: Pack, want: Pack) -> tuple[SignReport, list[np.ndarray]]:
    """The svd family's rotation columns against the reference's; other families have none to judge."""
    if got.config.rotation != "svd":
        return SignReport(0, 0, 0, 0), []
    pairs = [(got.r_in, want.r_in)] + ([(got.r_out, want.r_out)] if got.r_out is not None else [])
    flips = [sign_flips(g, r) for g, r in pairs]
    ties = [tie_margins(r) <= NEAR_TIE for _, r in pairs]
    report = SignReport(
        columns=sum(f.size for f in flips),
        near_ties=int(sum(t.sum() for t in ties)),
        flips=int(sum(f.sum() for f in flips)),
        flips_at_ties=int(sum((f & t).sum() for f, t in zip(flips, ties))),
    )
    return report, flips


def _aligned(got: Pack, want: Pack, w: np.ndarray, flips: list[np.ndarray], spec: Report, seed: int) -> Report:
    """`spec` after giving the reference's signs to the flipped columns (codes recomputed by
    `pack_with_rotations` where it applies: rtn, no smoothing)."""
    from duquant_jax.pack import pack_with_rotations

    if not any(f.any() for f in flips):
        return spec
    r_in = align_signs(got.r_in, flips[0])
    r_out = align_signs(got.r_out, flips[1]) if got.r_out is not None else None
    cfg = got.config
    codes = None
    if cfg.weight_method == "rtn" and cfg.smooth_alpha is None:
        codes = np.asarray(pack_with_rotations(w, got.perm, r_in, r_out, cfg).w_codes)
    return transform_report(got, want, w, r_in, r_out, codes, seed)


def missing_stats(layer: str, config: DuQuantConfig) -> str:
    """The one-line error for `duquant verify` of a layer whose config needs statistics it was not given."""
    needs = [n for n, on in (("smooth_alpha", config.smooth_alpha is not None), ('rotation "duquant"', config.rotation == "duquant"),
                             ('weight_method "gptq"', config.needs_xtx)) if on]
    what = "XᵀX" if config.needs_xtx else "per-channel activation maxima"
    return (f"layer {layer}: its config ({' and '.join(needs)}) needs the activation statistics it was packed with ({what}) "
            "for the float64 reference to re-pack it: pass the file given to `duquant pack --stats` as `duquant verify --stats PATH`")


def explain_pack(pack: Pack, w, seed: int = 0, stats: LayerStats | None = None, want: Pack | None = None) -> Explained:
    """Checks `pack` (made from `w: (out, in)`, with `stats` when its config needs them) against
    the reference path, explaining sign ties; see the module docstring. `want`: the reference
    pack `reference.pack_weight(w, pack.config, stats)`, when already computed."""
    w = np.asarray(w, np.float32)
    want = reference.pack_weight(w, pack.config, stats) if want is None else want
    got = jax.tree.map(np.asarray, pack)
    spec = transform_report(got, want, w, seed=seed)
    signs, flips = _signs(got, want)
    aligned = _aligned(got, want, w, flips, spec, seed)
    return Explained(spec=spec, aligned=aligned, signs=signs, quantized=check_quantized(got, want, w, stats, seed))


HEADER = (
    f"{'layer':<48} {'perm':>4} {'ortho':>7} {'rot':>7} {'fwd':>7} {'scale':>7} {'round':>7} {'q=':>8} "
    f"{'Wq err':>7} {'vs ref':>7}  {'sep':>4} {'codes=':>8} {'≡±sign':>8} {'flips/ties':>10}  result"
)


def row(name: str, e: Explained) -> str:
    """One line of the verify table (see `LEGEND`)."""
    s, a, q = e.spec, e.aligned, e.quantized
    flips = f"{e.signs.flips}/{e.signs.near_ties}" if e.signs.columns else "-"
    sep = f"{s.separated:.0%}" if e.signs.columns else "-"
    return (
        f"{name:<48} {'ok' if s.perm_identical else 'DIFF':>4} {s.ortho_err:7.1e} {a.rot_err:7.1e} "
        f"{s.exact_forward_err:7.1e} {q.scale_err:7.1e} {q.round_err:7.4f} {q.codes_same:8.3%} "
        f"{q.wq_err[0]:7.4f} {_change(*q.wq_err):>7}  {sep:>4} {s.codes_identical:8.3%} "
        f"{a.codes_identical:8.3%} {flips:>10}  {'PASS' if e.ok else 'FAIL'}"
    )


def _change(got: float, want: float) -> str:
    return f"{(got - want) / want:+.2%}" if want > 1e-12 else "-"


LEGEND = f"""\
Judged; a layer PASSes when every one is within its bound.
The transform: perm: identical to the reference's; ortho: max |RᵀR - I| (<= {ORTHO_TOL:g}); rot: max |R - R_ref|, and
  in_diag (relative) and out_diag against the reference's (<= {ROT_TOL:g}; svd family: over the blocks whose singular
  values are well separated, near-tie columns up to sign); fwd: the unquantized forward vs x Wᵀ in float64 (<= {FORWARD_TOL:g}).
The quantized weight, against the float64 reference's step 7 (scales) and 8 (rounding) on the pack's own basis:
  scale: max |s - s_ref|/s_ref per row/group, s_ref the reference's MSE-grid (or min-max) choice, or a grid candidate
  whose squared error ties the best within {SCALE_TIE:g} (<= {SCALE_RTOL:g});
  round: max |q - z| over codes, z the value the reference rounds the code from with the pack's scales (GPTQ: after
  the float64 error feedback of the pack's own earlier codes, in the packer's order), <= 0.5 + {ROUND_TOL['rtn']:g} (rtn),
  0.5 + {ROUND_TOL['gptq']:g} (gptq): codes differ only at rounding ties (unquantized: max |W2 - W2_ref|/max |W2_ref| <= {W2_TOL:g});
  q=: codes equal to round(z) (>= {CODES_SAME:.1%});
  Wq err: the weight-quantized forward's error vs x Wᵀ (activations unquantized), and its change against the
  reference pack's (<= {WQ_RATIO:g}x the reference's + {WQ_SLACK:g}).
Information: sep: share of svd blocks that are well separated; codes=: codes identical to the reference pack's as
  stored (GPTQ's drift apart once one differs); ≡±sign: the same after giving the reference's signs to the flipped
  columns; flips/ties: rotation columns whose sign differs from the reference's / near ties, columns whose two largest
  |entries| differ by <= {NEAR_TIE:g}, where float32 and float64 may pick a different largest entry, so that SPEC's
  sign rule flips the whole column."""


def summary(results: dict[str, Explained]) -> str:
    """The closing lines: verdict, and why codes differ where they do."""
    flips = sum(e.signs.flips for e in results.values())
    ties = sum(e.signs.near_ties for e in results.values())
    cols = sum(e.signs.columns for e in results.values())
    bad = sum(e.signs.flips - e.signs.flips_at_ties for e in results.values())
    lines = [f"{sum(e.ok for e in results.values())}/{len(results)} layers within SPEC's bounds and the quantized layer's"]
    quant_bad = [n for n, e in results.items() if not e.quantized.ok]
    if quant_bad:
        names = ", ".join(quant_bad[:3]) + (" ..." if len(quant_bad) > 3 else "")
        lines.append(f"{len(quant_bad)} layers' scales, codes or quantized forward disagree with the reference's: {names}")
    if flips:
        lines.append(
            f"{flips} of {cols} rotation columns came out with the other sign than the float64 reference's, "
            f"{flips - bad} of them at near ties ({ties} near ties in all)"
            + (f" and {bad} not: a real disagreement" if bad else "")
            + ". Both signs are exact rotations (see fwd), but the codes that depend on a flipped column differ: "
            "compare codes by ≡±sign."
        )
    elif ties:
        lines.append(f"{ties} of {cols} rotation columns were near ties; none flipped, so codes compare as stored.")
    return "\n".join(lines)
