"""A saved quantized model's record is covered by the shards' checksums, every layer's tensors are
cross-checked against its configuration, and the shards, their index and the record must agree.

Each damage is written with valid per-tensor checksums (`rewrite_shard`), so that the check named in
the test, not the CRC of the bytes, is what catches it.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from duquant_jax import DuQuantConfig
from duquant_jax.integrity import checksum_metadata, text_digest
from interop import load_quantized, name_filter, observe, quantize_, save_quantized
from interop.linear import DuQuantLinear
from interop.serialize import CONFIG_FILE, INDEX_FILE, RECORD_DIGEST_KEY, SavedModelError, _tensor_digest
from reload_kernel_check import LayerBank, inputs

SPECS = [("a", 256, 128, True), ("b", 256, 128, False), ("c", 128, 64, True)]
PRESETS = {"a": "w8a8", "b": "w4a8", "c": "w4a16"}


def _model() -> LayerBank:
    bank = LayerBank(SPECS)
    with observe(bank, xtx=True) as stats, torch.no_grad():
        for k, (name, n_in, _, _) in enumerate(SPECS):
            bank.layers[name](inputs(n_in, 64, seed=k))
    for name, preset in PRESETS.items():
        quantize_(bank, DuQuantConfig.preset(preset), name_filter(include=rf"^layers\.{name}$"), progress=False, stats=stats)
    return bank


@pytest.fixture(scope="module")
def model() -> LayerBank:
    return _model()


def _outputs(bank) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {name: layer(inputs(layer.in_features, 9, seed=5)) for name, layer in bank.layers.items()}


def rewrite_shard(path, change) -> None:
    """Rewrites a shard through `change(tensors, metadata)` with fresh, valid checksums."""
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    change(tensors, meta)
    meta.pop("checksums", None)
    meta["checksums"] = checksum_metadata({k: _tensor_digest(t) for k, t in tensors.items()}, meta)
    save_file(tensors, str(path), metadata=meta)


def _edit_record(path, change) -> None:
    record = json.loads((path / CONFIG_FILE).read_text())
    change(record)
    (path / CONFIG_FILE).write_text(json.dumps(record, indent=1))


def test_saved_presets_reload_bit_identical(model, tmp_path):
    save_quantized(model, tmp_path)
    loaded = load_quantized(LayerBank(SPECS), tmp_path)
    want, got = _outputs(model), _outputs(loaded)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_changed_record_value_is_refused(model, tmp_path):
    """The issue's case: act_bits 8 -> 0 loaded the layer as A16 without a word."""
    save_quantized(model, tmp_path)
    _edit_record(tmp_path, lambda r: r["layers"]["layers.a"]["config"].update(act_bits=0))
    with pytest.raises(SavedModelError, match=r"duquant_quantized.json does not match the digest its shards recorded"):
        load_quantized(LayerBank(SPECS), tmp_path)


def test_claiming_format_1_does_not_skip_the_record_digest(model, tmp_path):
    save_quantized(model, tmp_path)
    _edit_record(tmp_path, lambda r: (r.update(format_version=1), r["layers"]["layers.a"]["config"].update(act_bits=0)))
    with pytest.raises(SavedModelError, match="does not match the digest"):
        load_quantized(LayerBank(SPECS), tmp_path)


def test_format_1_saves_without_a_record_digest_still_load(model, tmp_path):
    save_quantized(model, tmp_path)
    rewrite_shard(tmp_path / "model.safetensors", lambda t, m: m.pop(RECORD_DIGEST_KEY))
    _edit_record(tmp_path, lambda r: r.update(format_version=1))
    loaded = load_quantized(LayerBank(SPECS), tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(loaded).values(), _outputs(model).values()))


def test_a_shard_of_another_save_is_refused(model, tmp_path):
    save_quantized(model, tmp_path / "one")
    other = _model()
    other.layers.c.bias = None  # another record: one bias less
    save_quantized(other, tmp_path / "two")
    (tmp_path / "two" / "model.safetensors").replace(tmp_path / "one" / "model.safetensors")
    with pytest.raises(SavedModelError, match="the record was changed or the shard belongs to another save"):
        load_quantized(LayerBank(SPECS), tmp_path / "one")


@pytest.mark.parametrize(
    "layer, change, field",
    [
        ("b", dict(weight_bits=8), "qweight.codes"),  # nibbles stored, int8 codes claimed
        ("b", dict(weight_group_size=64), "w_scale"),  # scales of groups of 128, groups of 64 claimed
        ("a", dict(act_scheme="static-tensor"), "a_scale"),  # a per-channel a_scale, one scale claimed
        ("a", dict(block_size=64), "r_in"),  # Hadamard blocks of 128 stored, 64 claimed
        ("c", dict(rotation="svd"), "in_diag"),  # Hadamard signs stored, an SVD family without them claimed
    ],
)
def test_a_configuration_that_does_not_match_its_tensors_is_refused_by_layer_and_field(tmp_path, layer, change, field):
    """Record and digest agree (the save itself is inconsistent): the cross-check names layer and field."""
    bank = _model()
    m = bank.layers[layer]
    assert isinstance(m, DuQuantLinear)
    m.config = m.config.replace(**change)
    save_quantized(bank, tmp_path)
    with pytest.raises(SavedModelError, match=rf"layer 'layers\.{layer}'.*{field}"):
        load_quantized(LayerBank(SPECS), tmp_path)


@pytest.mark.parametrize(
    "key, tensor, match",
    [
        ("layers.a.perm", lambda t: t.flip(0).contiguous().clone().fill_(3), "is not a permutation"),
        ("layers.b.qweight.scales", lambda t: t.clone().fill_(float("nan")), "holds NaN or Inf"),
        ("layers.b.qweight.scales", lambda t: -t, "negative scales"),
        ("layers.a.qweight.codes", lambda t: t.to(torch.int16), r"is torch.int16 .* stores torch.int8"),
        ("layers.c.in_diag", lambda t: t[:-1].clone(), r"shape \(127,\)"),
    ],
)
def test_tensors_with_bad_values_or_types_are_refused_by_name(model, tmp_path, key, tensor, match):
    save_quantized(model, tmp_path)
    rewrite_shard(tmp_path / "model.safetensors", lambda t, m: t.update({key: tensor(t[key])}))
    with pytest.raises(SavedModelError, match=match):
        load_quantized(LayerBank(SPECS), tmp_path)


def test_a_tensor_in_two_shards_is_an_error_not_an_override(model, tmp_path):
    save_quantized(model, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    files = sorted(set(index.values()))
    assert len(files) >= 3
    key = next(k for k, f in index.items() if f == files[0])
    with safe_open(str(tmp_path / files[0]), "pt") as f:
        copy = f.get_tensor(key) * 2
    rewrite_shard(tmp_path / files[1], lambda t, m: t.update({key: copy}))
    with pytest.raises(SavedModelError, match=rf"tensor '{key}' is in two shards"):
        load_quantized(LayerBank(SPECS), tmp_path)


def test_the_index_of_a_sharded_save_must_match_its_shards(model, tmp_path):
    save_quantized(model, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = next(f for f in files if f != index["weight_map"][key])
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(SavedModelError, match="does not match the shards"):
        load_quantized(LayerBank(SPECS), tmp_path)
    (tmp_path / INDEX_FILE).unlink()
    with pytest.raises(SavedModelError, match=f"{INDEX_FILE} is missing"):
        load_quantized(LayerBank(SPECS), tmp_path)


def _edit_record_consistently(path, change) -> None:
    """Edits the record and records its new digest in the shard: a save that is consistent but wrong."""
    _edit_record(path, change)
    digest = text_digest((path / CONFIG_FILE).read_text())
    rewrite_shard(path / "model.safetensors", lambda t, m: m.update({RECORD_DIGEST_KEY: digest}))


@pytest.mark.parametrize("alias, match", [("layers.zz.weight", "not a tensor of the model"), ("layers.a.bias", "saved as a tensor too")])
def test_aliases_must_name_tensors_of_the_model(model, tmp_path, alias, match):
    save_quantized(model, tmp_path)
    _edit_record_consistently(tmp_path, lambda r: r.update(aliases={alias: "layers.a.perm"}))
    with pytest.raises(SavedModelError, match=match):
        load_quantized(LayerBank(SPECS), tmp_path)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda r: r["layers"]["layers.a"].update(in_features=True), "in_features and out_features must be ints"),
        (lambda r: r["layers"]["layers.a"].update(dtype="int8"), "dtype must be one of"),
        (lambda r: r["layers"]["layers.a"]["shapes"].update(extra=[1]), "field 'extra' is not stored"),
        (lambda r: r["layers"].update({"layers": r["layers"]["layers.a"]}), "layer 'layers' .*no linear there"),
        (lambda r: r.update(files=["model.safetensors", "model.safetensors"]), "distinct shard names"),
    ],
)
def test_records_that_do_not_fit_the_model_are_refused_by_name(model, tmp_path, change, match):
    save_quantized(model, tmp_path)
    _edit_record_consistently(tmp_path, change)
    with pytest.raises(SavedModelError, match=match):
        load_quantized(LayerBank(SPECS), tmp_path)


def test_loaded_weight_state_sits_in_aligned_storage(model, tmp_path):
    from interop import native

    save_quantized(model, tmp_path)
    loaded = load_quantized(LayerBank(SPECS), tmp_path)
    for layer in loaded.layers.values():
        assert native.is_aligned(layer.qweight.qdata) and native.is_aligned(layer.qweight.scales)


class Normed(LayerBank):
    """The bank with two untied norms beside it."""

    def __init__(self, specs):
        super().__init__(specs)
        self.norm_a, self.norm_b = torch.nn.LayerNorm(8), torch.nn.LayerNorm(8)


def test_an_alias_the_model_does_not_tie_is_refused(tmp_path):
    bank = Normed(SPECS)
    quantize_(bank, DuQuantConfig.preset("w8a8"), name_filter(include=r"^layers\.a$"), progress=False)
    save_quantized(bank, tmp_path)
    rewrite_shard(tmp_path / "model.safetensors", lambda t, m: t.pop("norm_b.weight"))
    _edit_record_consistently(tmp_path, lambda r: r.update(aliases={"norm_b.weight": "norm_a.weight"}))
    with pytest.raises(SavedModelError, match="the model does not tie these tensors"):
        load_quantized(Normed(SPECS), tmp_path)


def test_codes_outside_a_narrower_claimed_width_are_refused(tmp_path):
    """4-bit nibbles claimed as 2-bit codes (record and digest consistent): the codes' range names the tensor."""
    bank = _model()
    bank.layers.b.config = bank.layers.b.config.replace(weight_bits=2)
    save_quantized(bank, tmp_path)
    with pytest.raises(SavedModelError, match=r"layers\.b\.qweight\.codes.*2-bit codes must lie in \[-2, 1\]"):
        load_quantized(LayerBank(SPECS), tmp_path)


def test_a_dynamic_layer_claiming_calibrated_scales_is_refused(model, tmp_path):
    save_quantized(model, tmp_path)
    rewrite_shard(tmp_path / "model.safetensors", lambda t, m: t.update({"layers.a.calibrated": torch.tensor(True)}))
    with pytest.raises(SavedModelError, match=r"layers\.a\.a_scale' holds calibrated scales"):
        load_quantized(LayerBank(SPECS), tmp_path)


def test_the_index_total_size_must_match_the_shards(model, tmp_path):
    save_quantized(model, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    index["metadata"]["total_size"] = 0
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(SavedModelError, match="total_size is 0"):
        load_quantized(LayerBank(SPECS), tmp_path)
