"""Per-layer activation clip search (interop.act_clip): the grid's argmin is set, saved and reloaded."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")

from interop import load_quantized, quantize_, save_quantized, search_act_clip  # noqa: E402
from interop.act_clip import DEFAULT_GRID, set_act_clip  # noqa: E402
from interop.kernels import ActQuant  # noqa: E402
from interop.linear import DuQuantLinear  # noqa: E402

from duquant_jax import DuQuantConfig  # noqa: E402

CONFIG = DuQuantConfig(weight_bits=4, act_bits=4, rotation="hadamard", block_size=16, act_scheme="dynamic-token", act_clip=1.0)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32))


def _batches(seed: int = 1, n: int = 4, spikes: bool = True) -> list[torch.Tensor]:
    """Token batches (16, 64); with `spikes`, a few tokens carry one channel 40x the rest."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(16, 64, generator=g)
        if spikes:
            x[::5, 3] *= 40.0
        out.append(x)
    return out


def test_search_sets_each_layer_to_the_grid_argmin_of_its_own_output_error():
    model = _model()
    quantize_(model, CONFIG, progress=False)
    batches = _batches()
    first = model[0]
    x2 = first.rotate_input(torch.cat(batches)).reshape(-1, 64).float()  # every token: 64 <= max_tokens
    ref = first._product(x2, ActQuant())
    errors = {c: float(((first._product(x2, ActQuant("dynamic-token", 4, c)) - ref) ** 2).sum()) for c in DEFAULT_GRID}
    chosen = search_act_clip(model, batches)
    assert set(chosen) == {"0", "2"}
    assert chosen["0"] == min(errors, key=errors.get)
    assert all(model[int(n)].config.act_clip == c and model[int(n)].act.clip == c for n, c in chosen.items())
    assert errors[chosen["0"]] <= errors[1.0]


def test_spiky_tokens_get_a_clip_below_one():
    model = _model()
    quantize_(model, CONFIG, progress=False)
    chosen = search_act_clip(model, _batches(spikes=True))
    assert chosen["0"] < 1.0  # bounded: 4-bit codes of a token dominated by one channel lose the rest unless clipped


def test_clips_are_saved_and_reloaded_bit_identically(tmp_path):
    model = _model()
    quantize_(model, CONFIG, progress=False)
    chosen = search_act_clip(model, _batches(), grid=(1.0, 0.8, 0.6))
    save_quantized(model, tmp_path / "m")
    back = load_quantized(_model(seed=5), tmp_path / "m")
    assert {n: back[int(n)].config.act_clip for n in chosen} == chosen
    x = _batches(seed=9, n=1)[0]
    assert torch.equal(back(x), model(x))


def test_bad_arguments_are_refused_naming_them():
    model = _model()
    quantize_(model, CONFIG, progress=False)
    with pytest.raises(ValueError, match="grid is empty"):
        search_act_clip(model, _batches(), grid=())
    with pytest.raises(ValueError, match=r"grid values must be numbers in \(0, 1\]; got 1.5"):
        search_act_clip(model, _batches(), grid=(1.0, 1.5))
    with pytest.raises(ValueError, match="max_tokens must be a positive int; got 0"):
        search_act_clip(model, _batches(), max_tokens=0)
    with pytest.raises(ValueError, match="no batch reached"):
        search_act_clip(model, [])
    plain = _model()
    quantize_(plain, dataclasses.replace(CONFIG, act_bits=16), progress=False)
    with pytest.raises(ValueError, match="no DuQuantLinear with quantized dynamic activations"):
        search_act_clip(plain, _batches())
    with pytest.raises(ValueError, match="act_clip applies to quantized dynamic activations"):
        set_act_clip(plain[0], 0.9)
    with pytest.raises(ValueError, match="act_clip"):
        set_act_clip(model[0], 1.5)  # the config's own check


def test_sampled_tokens_are_seeded_and_bounded():
    model = _model()
    quantize_(model, CONFIG, progress=False)
    a = search_act_clip(model, _batches(n=8), max_tokens=24, seed=3)
    again = _model()
    quantize_(again, CONFIG, progress=False)
    assert search_act_clip(again, _batches(n=8), max_tokens=24, seed=3) == a
    assert isinstance(model[0], DuQuantLinear)
