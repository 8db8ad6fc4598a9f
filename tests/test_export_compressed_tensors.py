"""interop.export: compressed-tensors export, import back bit for bit, refusals, and compressed-tensors' own reading.

Small toy models (seeded); the compressed-tensors checks skip without the package.
Bounds: the import reproduces outputs exactly (torch.equal); compressed-tensors'
decompressed weights equal our codes * scales exactly; its forward (transform hook,
weight-only) is within 1e-5 of ours per element relative to |x3_row| |W_row| on the
float32 paths; with int8 activations it also differs by its activation rounding
(scale absmax/127.5 against our absmax/127), bounded by |x3_ct - x3_ours| |W_row|.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import interop
from duquant_jax import DuQuantConfig
from interop.export.compressed_tensors import (
    ExportError,
    check_plain_loadable,
    export_compressed_tensors,
    import_compressed_tensors,
    online_transforms,
    pack_int32,
    unpack_int32,
)
from interop.kernels import kernel_options

TOY = {"model_type": "toy"}


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(256, 128)
        self.b = nn.Linear(128, 256, bias=False)
        self.head = nn.Linear(256, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def _quantized(config: DuQuantConfig, seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    model = Toy().eval()
    keep = lambda name, m: name != "head"  # noqa: E731
    stats = None
    if config.needs_stats:
        with interop.observe(model, keep, xtx=config.needs_xtx) as stats:
            model(torch.randn(64, 256))
    interop.quantize_(model, config, keep, progress=False, stats=stats)
    if config.needs_calibration:
        with interop.calibrate(model):
            model(torch.randn(64, 256))
    return model


def _fresh() -> Toy:
    torch.manual_seed(123)
    return Toy().eval()


CONFIGS = {
    "w8a8-none-permuted": DuQuantConfig.preset("w8a8", rotation="none"),
    "w8a8-hadamard": DuQuantConfig.preset("w8a8"),
    "w8a8-hadamard-nopermute": DuQuantConfig.preset("w8a8", enable_permute=False),
    "w4a16-g128-hadamard": DuQuantConfig.preset("w4a16", weight_method="rtn"),
    "w4a16-g64-none": DuQuantConfig.preset("w4a16", weight_method="rtn", rotation="none", enable_permute=False, weight_group_size=64),
    "w4a8-channel-none": DuQuantConfig(weight_bits=4, act_bits=8, rotation="none", row_rot_mode="none", act_scheme="dynamic-token"),
    "w8a8-static-tensor-none": DuQuantConfig.preset("w8a8", rotation="none", act_scheme="static-tensor"),
    "w8a8-duquant-nopermute": DuQuantConfig.preset("w8a8", rotation="duquant", enable_permute=False, block_size=64),
}


def test_pack_int32_round_trip_and_layout():
    gen = torch.Generator().manual_seed(0)
    for bits, n in ((4, 72), (4, 64), (8, 40)):
        lo = -(2 ** (bits - 1))
        codes = torch.randint(lo, -lo, (5, n), generator=gen, dtype=torch.int8)
        packed = pack_int32(codes, bits)
        assert packed.dtype == torch.int32 and packed.shape == (5, -(-n * bits // 32))
        assert torch.equal(unpack_int32(packed, bits, n), codes)
    codes = torch.arange(-8, 0, dtype=torch.int8).reshape(1, 8)  # offset codes 0..7, low nibble first
    assert int(pack_int32(codes, 4)[0, 0]) == 0x76543210


@pytest.mark.parametrize("label", sorted(CONFIGS))
def test_round_trip_is_bit_exact(tmp_path, label):
    config = CONFIGS[label]
    model = _quantized(config)
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    export_compressed_tensors(model, tmp_path, float_config=TOY)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["ignore"] == ["head"]
    assert bool(online_transforms(tmp_path)) == config.rotate_inputs
    back = import_compressed_tensors(_fresh(), tmp_path)
    with torch.no_grad():
        got = back(x)
    assert torch.equal(got, want)


def test_formats_and_shapes(tmp_path):
    from safetensors.torch import load_file

    export_compressed_tensors(_quantized(CONFIGS["w4a16-g64-none"]), tmp_path / "w4", float_config=TOY)
    export_compressed_tensors(_quantized(CONFIGS["w8a8-none-permuted"]), tmp_path / "w8", float_config=TOY)
    w4 = load_file(str(tmp_path / "w4" / "model.safetensors"))
    w8 = load_file(str(tmp_path / "w8" / "model.safetensors"))
    assert w4["a.weight_packed"].shape == (128, 32) and w4["a.weight_packed"].dtype == torch.int32
    assert w4["a.weight_scale"].shape == (128, 4) and w4["a.weight_shape"].tolist() == [128, 256]
    assert w8["a.weight"].dtype == torch.int8 and w8["a.weight_scale"].shape == (128, 1)
    assert torch.equal(w8["head.weight"], _quantized(CONFIGS["w8a8-none-permuted"]).head.weight)
    for d, fmt in (("w4", "pack-quantized"), ("w8", "int-quantized")):
        assert json.loads((tmp_path / d / "config.json").read_text())["quantization_config"]["format"] == fmt


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(act_scheme="static-channel"), "act_scheme"),
        (dict(act_scheme="dynamic-group"), "act_scheme"),
        (dict(act_clip=0.9), "act_clip"),
        (dict(row_rot_mode="restore"), "row_rot_mode"),
        (dict(rotation="none", weight_bits=4, weight_group_size=64, weight_method="rtn"), "enable_permute"),
        (dict(weight_bits=6), "weight_bits"),
    ],
)
def test_inexpressible_configs_are_refused(tmp_path, overrides, field):
    model = _quantized(DuQuantConfig.preset("w8a8", **overrides))
    with pytest.raises(ExportError, match=field):
        export_compressed_tensors(model, tmp_path, float_config=TOY)


# What each preset does on export (README, "Export to compressed-tensors"): None exports, else the field named.
PRESET_EXPORT = {"w8a8": None, "w4a16": None, "w4a8": None, "w4a4": "act_scheme", "SPEC default": "act_scheme"}


@pytest.mark.parametrize("label", sorted(PRESET_EXPORT))
def test_every_preset_exports_or_is_refused_naming_the_field(tmp_path, label):
    from duquant_jax.config import PRESETS

    assert set(PRESET_EXPORT) - {"SPEC default"} == set(PRESETS)  # a new preset must be added here
    config = DuQuantConfig() if label == "SPEC default" else DuQuantConfig.preset(label)
    model = _quantized(config)
    field = PRESET_EXPORT[label]
    if field is not None:
        with pytest.raises(ExportError, match=field):
            export_compressed_tensors(model, tmp_path, float_config=TOY)
        assert not (tmp_path / "config.json").exists()  # nothing written half-way
        return
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(2))
    export_compressed_tensors(model, tmp_path, float_config=TOY)
    back = import_compressed_tensors(_fresh(), tmp_path)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_shared_block_is_stored_with_head_dim(tmp_path):
    export_compressed_tensors(_quantized(CONFIGS["w8a8-duquant-nopermute"]), tmp_path, float_config=TOY)
    groups = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["transform_config"]["config_groups"]
    assert {g["head_dim"] for g in groups.values()} == {64}


def test_rotated_export_is_refused_for_plain_loaders(tmp_path):
    export_compressed_tensors(_quantized(CONFIGS["w8a8-hadamard"]), tmp_path / "rot", float_config=TOY)
    export_compressed_tensors(_quantized(CONFIGS["w8a8-none-permuted"]), tmp_path / "plain", float_config=TOY)
    with pytest.raises(ExportError, match="transform_config"):
        check_plain_loadable(tmp_path / "rot")
    check_plain_loadable(tmp_path / "plain")


def _row_bound(x3: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(T, out): |x3_t| |W_i| per output element."""
    return x3.norm(dim=1, keepdim=True) * weight.norm(dim=1)[None]


@pytest.mark.parametrize(
    "label", ["w8a8-none-permuted", "w8a8-hadamard", "w4a16-g128-hadamard", "w4a16-g64-none", "w4a8-channel-none", "w8a8-duquant-nopermute"]
)
def test_compressed_tensors_reads_our_export(tmp_path, label):
    pytest.importorskip("compressed_tensors")
    from interop.export.reference import ct_linears

    config = CONFIGS[label]
    model = _quantized(config)
    export_compressed_tensors(model, tmp_path, float_config=TOY)
    ct = ct_linears(tmp_path)
    gen = torch.Generator().manual_seed(2)
    for name, linear in ct.items():
        ours = model.get_submodule(name)
        w_hat = ours.qweight.dequantize()  # (out, in) in the rotated, permuted basis
        x = torch.randn(16, ours.in_features, generator=gen)
        with torch.no_grad(), kernel_options(precision="float32"):
            y, y_ct = ours(x), linear(x)
            x2 = ours.rotate_input(x)
        if not config.rotate_inputs:  # exported with un-permuted code columns
            w_hat = w_hat[:, torch.argsort(ours.perm)]
            x2 = x
        assert torch.equal(linear.weight.float(), w_hat)  # decompression is exact
        bound = _row_bound(x2, w_hat)
        if config.quantize_acts:  # compressed-tensors rounds activations with absmax/127.5
            step = x2.abs().amax(dim=1, keepdim=True) * (1 / 127 + 1 / 127.5) / 2
            bound = 1e-5 * bound + step.squeeze(1)[:, None] * (x2.shape[1] ** 0.5) * w_hat.norm(dim=1)[None]
        else:
            bound = 1e-5 * bound
        assert ((y - y_ct).abs() <= bound).all(), name


def test_export_from_a_saved_directory(tmp_path):
    from interop.export import export_compressed_tensors_from_saved

    model = _quantized(CONFIGS["w8a8-hadamard-nopermute"])
    interop.save_quantized(model, tmp_path / "saved")
    export_compressed_tensors_from_saved(tmp_path / "saved", _fresh(), tmp_path / "ct", float_config=TOY)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(import_compressed_tensors(_fresh(), tmp_path / "ct")(x), model(x))
