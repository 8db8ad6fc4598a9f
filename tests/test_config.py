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


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(weight_group_size=None), "weight_group_size to divide gptq_block; got weight_group_size=None, gptq_block=128"),
        (dict(weight_group_size=48), "weight_group_size to divide gptq_block; got weight_group_size=48, gptq_block=128"),
        (dict(gptq_block=96), "weight_group_size to divide gptq_block; got weight_group_size=64, gptq_block=96"),
        (dict(gptq_act_order=True), "needs gptq_act_order=False"),
        (dict(gptq_static_groups="no"), "gptq_static_groups must be a bool; got 'no'"),
    ],
)
def test_gptq_fitting_scales_rejects_groups_it_cannot_fit(changes, message):
    base = dict(weight_method="gptq", gptq_static_groups=False, weight_group_size=64)
    assert not DuQuantConfig(**base).gptq_static_groups
    with pytest.raises(ValueError) as e:
        DuQuantConfig(**{**base, **changes})
    assert message in str(e.value)


def test_a_config_dict_written_before_gptq_static_groups_loads_with_static_groups():
    old = DuQuantConfig.preset("w4a16").to_dict()
    del old["gptq_static_groups"]
    assert DuQuantConfig.from_dict(old) == DuQuantConfig.preset("w4a16") and DuQuantConfig.from_dict(old).gptq_static_groups
    fitted = DuQuantConfig.preset("w4a8", gptq_static_groups=False)
    assert DuQuantConfig.from_json(fitted.to_json()) == fitted
