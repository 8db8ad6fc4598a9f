"""Per-layer verdicts that explain themselves: SPEC's bounds, and code agreement modulo sign ties.

SPEC's canonical sign rule makes each rotation column's largest-magnitude entry
positive. When a column's two largest |entries| are nearly equal, float32 and
float64 may disagree on which is largest, and the whole column comes out with
the other sign. Both are exact SVD rotations: the forward is the same, but
the codes that depend on that column differ (an input-rotation column negates
a column of codes; an output-rotation column remixes its block's rows).

`explain_pack` therefore judges a layer on what matters: the permutation, the
orthogonality, the rotations and the exact forward against the float64
reference, with every column that is a *near tie* allowed either sign, and it
compares codes after giving the reference's signs to the flipped columns. A
flip at a column that is not a near tie is a real disagreement and fails.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from duquant_jax import reference
from duquant_jax.equivalence import ROT_TOL, Report, compare, rel_err
from duquant_jax.packed import Pack

# Two paths that each meet SPEC's rotation bound (|R - R_ref| <= ROT_TOL entry-wise)
# can disagree on which entry is largest only when the two largest |entries|
# differ by at most 2 * ROT_TOL: such a column is a near tie.
NEAR_TIE = 2 * ROT_TOL
SAME_LINE = 0.99  # |cos| between a column and the reference's above which they are one line, up to sign


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
class Explained:
    """One layer against the float64 reference.

    spec: SPEC's table applied literally to the pack as stored.
    aligned: the same after giving the reference's signs to the flipped columns
      (codes recomputed from those rotations); equal to `spec` without flips.
    signs: how many columns were near ties and how many flipped.
    quantized_err: (pack, reference pack): ‖y_q - x Wᵀ‖/‖x Wᵀ‖ of each one's weight-quantized
      forward (activations unquantized), in float64; for information, SPEC has no bound on it.
    """

    spec: Report
    aligned: Report
    signs: SignReport
    quantized_err: tuple[float, float]

    @property
    def ok(self) -> bool:
        """SPEC's bounds, with near-tie columns allowed either sign, and no other flip."""
        return self.aligned.ok and self.signs.flips == self.signs.flips_at_ties


def explain_pack(pack: Pack, w, seed: int = 0) -> Explained:
    """Checks `pack` (made from `w: (out, in)`) against the reference path, explaining sign ties."""
    from duquant_jax.pack import pack_with_rotations

    w = np.asarray(w, np.float32)
    cfg = pack.config
    want = reference.pack_weight(w, cfg)
    spec = compare(pack, want, w, seed)
    got = jax.tree.map(np.asarray, pack)
    pairs = [(got.r_in, want.r_in)] + ([(got.r_out, want.r_out)] if got.r_out is not None else [])
    flips = [sign_flips(g, r) for g, r in pairs]
    ties = [tie_margins(r) <= NEAR_TIE for _, r in pairs]
    signs = SignReport(
        columns=sum(f.size for f in flips),
        near_ties=int(sum(t.sum() for t in ties)),
        flips=int(sum(f.sum() for f in flips)),
        flips_at_ties=int(sum((f & t).sum() for f, t in zip(flips, ties))),
    )
    aligned = spec
    if signs.flips and cfg.rotation == "svd" and cfg.weight_method == "rtn" and cfg.smooth_alpha is None:
        r_in = align_signs(got.r_in, flips[0])
        r_out = align_signs(got.r_out, flips[1]) if got.r_out is not None else None
        aligned = compare(pack_with_rotations(w, got.perm, r_in, r_out, cfg), want, w, seed)
    q_err = (0.0, 0.0)
    if cfg.quantize_weights:
        plain = cfg.replace(act_bits=16)
        x = np.random.default_rng(seed + 1).standard_normal((16, w.shape[1])).astype(np.float32)
        exact = x.astype(np.float64) @ w.astype(np.float64).T
        q_err = (
            rel_err(reference.forward(got.replace(config=plain, a_scale=None), x), exact),
            rel_err(reference.forward(want.replace(config=plain), x), exact),
        )
    return Explained(spec=spec, aligned=aligned, signs=signs, quantized_err=q_err)


HEADER = (
    f"{'layer':<48} {'perm':>4} {'ortho':>8} {'sep':>4} {'rot':>8} {'fwd':>8} {'Wq err':>7} {'vs ref':>7} "
    f"{'codes=':>8} {'≡±sign':>8} {'max|dQ|':>7} {'flips/ties':>10}  result"
)


def row(name: str, e: Explained) -> str:
    """One line of the verify table (see `LEGEND`)."""
    s, a = e.spec, e.aligned
    return (
        f"{name:<48} {'ok' if s.perm_identical else 'DIFF':>4} {s.ortho_err:8.1e} {s.separated:4.0%} {a.rot_err:8.1e} "
        f"{s.exact_forward_err:8.1e} {e.quantized_err[0]:7.4f} {_change(*e.quantized_err):>7} "
        f"{s.codes_identical:8.3%} {a.codes_identical:8.3%} "
        f"{a.codes_max_diff:7d} {f'{e.signs.flips}/{e.signs.near_ties}':>10}  {'PASS' if e.ok else 'FAIL'}"
    )


def _change(got: float, want: float) -> str:
    return f"{(got - want) / want:+.2%}" if want else "-"


LEGEND = f"""\
perm: identical to the reference's; ortho: max |RᵀR - I| (<= 1e-5); sep: share of blocks whose singular values
are well separated; rot: max |R - R_ref| over those blocks (0 when none), near-tie columns compared up to sign
(<= 1e-4); fwd: unquantized forward vs x Wᵀ in float64 (<= 1e-5); Wq err: the weight-quantized forward's error
vs x Wᵀ, and its change against the reference pack's (information only); codes=: codes identical to the
reference's as stored; ≡±sign: the same after giving the reference's signs to the flipped columns, and max|dQ| the
largest difference left (SPEC, where sep is 100%: >= 99.9% and <= 1); flips/ties: rotation columns whose sign
differs from the reference's / near ties, columns whose two largest |entries| differ by <= {NEAR_TIE:g}, where
float32 and float64 may pick a different largest entry, so that SPEC's sign rule flips the whole column."""


def summary(results: dict[str, Explained]) -> str:
    """The closing lines: verdict, and why codes differ where they do."""
    flips = sum(e.signs.flips for e in results.values())
    ties = sum(e.signs.near_ties for e in results.values())
    cols = sum(e.signs.columns for e in results.values())
    bad = sum(e.signs.flips - e.signs.flips_at_ties for e in results.values())
    lines = [f"{sum(e.ok for e in results.values())}/{len(results)} layers within SPEC's bounds"]
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
