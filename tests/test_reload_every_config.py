"""Every layer configuration the presets and the option table can produce: saved, loaded in a fresh
process (no JAX), every kernel path the tuner may try run on 1, 7, 64 and 300 tokens against the oracle.

The issue this guards: a model saved with the presets and loaded in a new process died with SIGSEGV in
`torch._weight_int8pack_mm`, because tensors read from safetensors sit at unaligned offsets. The check
runs in a subprocess, so that a crash fails the test instead of the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from duquant_jax import DuQuantConfig
from interop import calibrate, name_filter, observe, quantize_, save_quantized
from reload_kernel_check import LayerBank, inputs

HERE = os.path.dirname(os.path.abspath(__file__))
BIG, ODD, SHORT = (256, 128), (96, 48), (72, 40)  # (in, out): int4pack-able; nibble tails; in % 16 != 0

# (name, config, (in, out), bias): each preset, and every value of every option at least once
CONFIGS = [
    ("spec", DuQuantConfig(), BIG, True),
    ("spec_odd", DuQuantConfig(), ODD, False),
    *[(f"preset_{p}", DuQuantConfig.preset(p), BIG, p == "w8a8") for p in ("w8a8", "w4a8", "w4a16", "w4a4")],
    *[(f"preset_{p}_odd", DuQuantConfig.preset(p), ODD, True) for p in ("w8a8", "w4a8")],
    ("preset_w8a8_short", DuQuantConfig.preset("w8a8"), SHORT, False),
    ("hadamard_w8_restore", DuQuantConfig(weight_bits=8, rotation="hadamard", block_size=64, act_scheme="dynamic-token"), BIG, True),
    ("hadamard_g32_tensor_propagate", DuQuantConfig(rotation="hadamard", block_size=32, weight_group_size=32, act_scheme="static-tensor", row_rot_mode="propagate"), BIG, True),
    ("duquant_w4", DuQuantConfig(rotation="duquant", block_size=32, act_scheme="dynamic-token", row_rot_mode="none"), BIG, False),
    ("none_w8_tensor", DuQuantConfig(weight_bits=8, rotation="none", act_scheme="static-tensor"), ODD, True),
    ("svd_minmax_rows_none", DuQuantConfig(scale_method="minmax", row_rot_mode="none", act_scheme="dynamic-token"), BIG, False),
    ("w3_g64", DuQuantConfig(weight_bits=3, rotation="hadamard", block_size=128, weight_group_size=64, act_scheme="dynamic-token", row_rot_mode="none"), BIG, False),
    ("w2_a8", DuQuantConfig(weight_bits=2, rotation="hadamard", block_size=128, act_scheme="dynamic-token", row_rot_mode="none"), BIG, False),
    ("w6_a6_clip", DuQuantConfig(weight_bits=6, act_bits=6, rotation="hadamard", block_size=16, act_scheme="dynamic-token", act_clip=0.9, row_rot_mode="none"), SHORT, True),
    ("w16_a8_tensor", DuQuantConfig(weight_bits=16, rotation="hadamard", block_size=64, act_scheme="static-tensor", row_rot_mode="none"), BIG, False),
    ("w8_a4", DuQuantConfig(weight_bits=8, act_bits=4, rotation="hadamard", block_size=128, act_scheme="dynamic-token", row_rot_mode="none"), BIG, False),
    ("gptq_order_w8_svd", DuQuantConfig(weight_bits=8, weight_method="gptq", gptq_act_order=True, act_scheme="dynamic-token", row_rot_mode="none"), BIG, True),
    ("gptq_fitted_groups_w4_g32", DuQuantConfig(weight_method="gptq", gptq_static_groups=False, weight_group_size=32, rotation="hadamard",
                                                block_size=64, act_scheme="dynamic-token", row_rot_mode="none"), BIG, False),
    ("smooth_none_w4_g128", DuQuantConfig(rotation="none", smooth_alpha=0.5, weight_group_size=128, act_scheme="dynamic-token"), BIG, False),
    ("w4_a16_g128", DuQuantConfig(rotation="hadamard", block_size=128, weight_group_size=128, act_bits=16, row_rot_mode="none"), ODD, False),
    # weight-only 8-bit per row: the int8 layout and torch's int8pack kernel whatever the CPU (integer-activation
    # layers take the "panels" layout where int8 dot products are emulated)
    ("w8_a16_rows", DuQuantConfig(weight_bits=8, act_bits=16, rotation="hadamard", block_size=128, row_rot_mode="none"), BIG, False),
    ("w4_a4_act_groups", DuQuantConfig(rotation="hadamard", block_size=128, weight_group_size=128, act_bits=4,
                                       act_scheme="dynamic-group", act_group_size=96, row_rot_mode="none"), BIG, True),
]
SPECS = [(name, shape[0], shape[1], bias) for name, _, shape, bias in CONFIGS]


def _quantized_bank() -> LayerBank:
    bank = LayerBank(SPECS)
    with observe(bank, xtx=True) as stats, torch.no_grad():
        for k, (name, n_in, _, _) in enumerate(SPECS):
            bank.layers[name](inputs(n_in, 64, seed=k))
    for name, config, _, _ in CONFIGS:
        quantize_(bank, config, name_filter(include=rf"^layers\.{name}$"), progress=False, stats=stats)
    with calibrate(bank), torch.no_grad():
        for k, (name, n_in, _, _) in enumerate(SPECS):
            bank.layers[name](inputs(n_in, 64, seed=k))
    return bank


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """(the bank before saving, what the fresh process measured)."""
    path = tmp_path_factory.mktemp("bank")
    bank = _quantized_bank()
    save_quantized(bank, path / "saved")
    (path / "saved" / "specs.json").write_text(json.dumps(SPECS))
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "reload_kernel_check.py"), str(path / "saved"), str(path / "out.json")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.path.dirname(HERE)])},
    )
    assert proc.returncode == 0, f"the fresh process failed (return code {proc.returncode}):\n{proc.stderr[-3000:]}"
    return bank, json.loads((path / "out.json").read_text())


def test_every_config_and_kernel_path_runs_in_a_fresh_process_within_the_oracle_bounds(reloaded):
    _, got = reloaded
    assert not got["jax_imported"]
    assert set(got["results"]) == {f"layers.{n}" for n, *_ in CONFIGS}
    bad = [(layer, r) for layer, rows in got["results"].items() for r in rows if not r["err"] <= r["tol"]]
    assert not bad, bad[:5]


def test_the_native_kernels_are_among_the_paths_tried(reloaded):
    """The crash-prone paths really ran on loaded (formerly unaligned) state: int8pack and int4pack both, and the
    compiled integer product where this machine's integer-activation layers take its "panels" layout."""
    from interop.kernel_tuning import int8_dot_native
    from interop.qweight import panels_unavailable

    _, got = reloaded
    tried = {r["path"] for rows in got["results"].values() for r in rows}
    assert {"int-mm", "int8pack", "int4pack", "dequant-bf16", "fake-quant"} <= tried
    if panels_unavailable(128, 256, 4, torch.device("cpu")) is None and not int8_dot_native():
        assert "c-int8" in tried


def test_reloaded_outputs_are_bit_identical_to_the_saved_model(reloaded):
    from interop.kernels import kernel_options

    bank, got = reloaded
    with torch.no_grad(), kernel_options(path="fake-quant"):
        for name, layer in bank.layers.items():
            want = layer(inputs(layer.in_features, 5, seed=99))
            assert torch.equal(torch.tensor(got["fixed"][name]), want), name
