import pytest

from duquant_jax import DuQuantConfig


def test_defaults_follow_spec():
    cfg = DuQuantConfig()
    assert (cfg.weight_bits, cfg.act_bits, cfg.block_size, cfg.block_out_size) == (4, 8, 16, None)
    assert cfg.out_block_size == 16
    assert cfg.enable_permute and cfg.lambda_smooth == 0.15
    assert (cfg.act_percentile, cfg.calib_batches, cfg.row_rot_mode) == (99.9, 32, "restore")
    assert cfg.rotation_method == "qr-svd"


@pytest.mark.parametrize(
    "field, value",
    [
        ("weight_bits", 1),
        ("weight_bits", 9),
        ("weight_bits", 4.0),
        ("act_bits", 12),
        ("block_size", 0),
        ("block_out_size", -3),
        ("row_rot_mode", "rotate"),
        ("rotation_method", "qr"),
        ("act_percentile", 0.0),
        ("act_percentile", 100.5),
        ("lambda_smooth", 1.5),
        ("calib_batches", 0),
        ("enable_permute", "yes"),
    ],
)
def test_invalid_settings_name_field_and_value(field, value):
    with pytest.raises(ValueError) as e:
        DuQuantConfig(**{field: value})
    assert field in str(e.value) and repr(value) in str(e.value)


@pytest.mark.parametrize("bits", [0, 16, 2, 8])
def test_bits_accept_spec_values(bits):
    assert DuQuantConfig(weight_bits=bits, act_bits=bits).weight_bits == bits


def test_config_round_trips_through_json_and_rejects_unknown_keys():
    cfg = DuQuantConfig(weight_bits=8, block_out_size=32, row_rot_mode="propagate")
    assert DuQuantConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="bogus"):
        DuQuantConfig.from_dict({"bogus": 1})


def test_config_is_hashable_and_frozen():
    cfg = DuQuantConfig()
    assert hash(cfg) == hash(DuQuantConfig())
    with pytest.raises(Exception):
        cfg.block_size = 8  # type: ignore[misc]
