"""quantize_sequential: each block calibrated on the outputs of the blocks already quantized.

Checked against a literal reference loop on a small random Gemma-3 (transformers, nothing downloaded):
for block k, observe the whole model (blocks < k already quantized) and quantize block k.
"""

from __future__ import annotations

import pytest
import torch

from duquant_jax import DuQuantConfig
from interop import name_filter, observe, quantize_
from interop.sequential import find_blocks, quantize_sequential
from interop.shared_input import input_groups

transformers = pytest.importorskip("transformers")

LINEARS = r"(q|k|v|o|gate|up|down)_proj$"


def _gemma() -> torch.nn.Module:
    cfg = transformers.Gemma3TextConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(cfg).eval()


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 96, (2, 24), generator=gen) for _ in range(3)]


def _reference(model, config) -> None:
    """The literal loop: per block, a full-model observe pass on the batches, then quantize that block."""
    for prefix, _ in find_blocks(model):
        only = name_filter(include=rf"^{prefix}\..*{LINEARS}")
        stats = None
        if config.needs_stats:
            with observe(model, only, xtx=config.needs_xtx) as stats, torch.no_grad():
                for b in _batches():
                    model(b)
        quantize_(model, config, only, progress=False, stats=stats)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "layers." in k}


def test_blocks_are_the_decoder_layers():
    names = [n for n, _ in find_blocks(_gemma())]
    assert names == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert [n for n, _ in find_blocks(_gemma(), r"model\.layers\.[02]")] == ["model.layers.0", "model.layers.2"]


@pytest.mark.parametrize("preset", ["w4a8", "w8a8"])
def test_sequential_equals_the_block_by_block_reference_loop(preset):
    config = DuQuantConfig.preset(preset)
    seq, ref = _gemma(), _gemma()
    replaced = quantize_sequential(seq, config, _batches(), name_filter(include=LINEARS), progress=False)
    _reference(ref, config)
    assert len(replaced) == 21 and all(name.startswith("model.layers.") for name in replaced)
    a, b = _state(seq), _state(ref)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    x = _batches()[0]
    with torch.no_grad():
        assert torch.equal(seq(x).logits, ref(x).logits)


def test_later_blocks_see_the_quantized_outputs_not_the_float_ones():
    """With GPTQ, one-pass statistics (float inputs everywhere) give other codes from block 1 on."""
    config = DuQuantConfig.preset("w4a8")
    seq, one = _gemma(), _gemma()
    quantize_sequential(seq, config, _batches(), name_filter(include=LINEARS), progress=False)
    with observe(one, name_filter(include=LINEARS), xtx=True) as stats, torch.no_grad():
        for b in _batches():
            one(b)
    quantize_(one, config, name_filter(include=LINEARS), progress=False, stats=stats)
    a, b = _state(seq), _state(one)
    block0 = [k for k in a if k.startswith("model.layers.0.") and k.endswith("qweight.codes")]
    later = [k for k in a if k.startswith("model.layers.2.") and k.endswith("qweight.codes")]
    assert all(torch.equal(a[k], b[k]) for k in block0)  # block 0 sees float inputs either way
    assert any(not torch.equal(a[k], b[k]) for k in later)


def test_static_activation_schemes_are_calibrated_per_block():
    model = _gemma()
    quantize_sequential(model, DuQuantConfig(), _batches(), name_filter(include=r"mlp\.(gate|up)_proj$"), progress=False)
    layers = [m for n, m in model.named_modules() if n.endswith(("gate_proj", "up_proj"))]
    assert len(layers) == 6 and all(bool(m.calibrated) for m in layers)
    with torch.no_grad():
        assert torch.isfinite(model(_batches()[0]).logits).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(blocks=r"nothing\.\d+"), "no module name of the model fully matches blocks="),
        (dict(blocks="("), "blocks must be a valid regex"),
        (dict(batches=[]), "at least one calibration batch"),
        (dict(config="w4a8"), "config must be a DuQuantConfig"),
    ],
)
def test_bad_arguments_are_named_errors(kwargs, match):
    args = dict(config=DuQuantConfig.preset("w8a8"), batches=_batches())
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        quantize_sequential(_gemma(), args["config"], args["batches"], progress=False, **{k: v for k, v in kwargs.items() if k == "blocks"})


@pytest.mark.parametrize("groups", [None, "auto"], ids=["per-layer", "input-groups"])
def test_from_a_checkpoint_equals_the_in_memory_run_and_loads(tmp_path, groups):
    """A meta-device model, one block's float weights at a time, written shard by shard: the saved model
    loads with load_quantized and equals quantize_sequential of the float model bit for bit."""
    accelerate = pytest.importorskip("accelerate")
    from interop import load_quantized
    from interop.sequential_checkpoint import quantize_checkpoint_sequential

    config = DuQuantConfig.preset("w4a8")
    float_model = _gemma()
    float_model.save_pretrained(tmp_path / "ckpt")  # safetensors; the tied output layer is not stored
    with accelerate.init_empty_weights():
        meta = transformers.Gemma3ForCausalLM(float_model.config).eval()
    quantize_checkpoint_sequential(meta, tmp_path / "ckpt", tmp_path / "out", config, _batches(), name_filter(include=LINEARS), progress=False,
                                   input_groups=groups)
    quantize_sequential(float_model, config, _batches(), name_filter(include=LINEARS), progress=False, input_groups=groups)
    loaded = load_quantized(_gemma(), tmp_path / "out")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert input_groups(loaded) == input_groups(float_model) and len(input_groups(loaded)) == (6 if groups else 0)  # q/k/v, gate/up x 3
    x = _batches()[0]
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, float_model(x).logits)


@pytest.mark.parametrize(("preset", "groups"), [("w4a8", None), ("w4a16", None), ("w4a8", "auto")])
def test_duquant_pack_with_the_sequential_statistics_equals_the_sequential_model(tmp_path, preset, groups):
    """The JAX route: `quantize_sequential(stats_path=...)` writes the statistics each block was quantized with;
    `duquant pack --stats` on the float checkpoint then gives the same layers (outputs bit-identical)."""
    from safetensors.torch import save_file

    from duquant_jax.cli import main
    from interop import from_pack_dir

    config = DuQuantConfig.preset(preset)
    float_model, seq = _gemma(), _gemma()
    save_file({k: v.contiguous() for k, v in float_model.state_dict().items() if "layers." in k}, str(tmp_path / "ckpt.safetensors"))
    quantize_sequential(seq, config, _batches(), name_filter(include=LINEARS), progress=False, stats_path=tmp_path / "stats.safetensors",
                        input_groups=groups)
    rc = main(["pack", str(tmp_path / "ckpt.safetensors"), "--out", str(tmp_path / "packs"), "--preset", preset,
               "--include", LINEARS.replace("$", r"\.weight$"), "--stats", str(tmp_path / "stats.safetensors"),
               *(["--input-groups"] if groups else [])])
    assert rc == 0
    replaced = from_pack_dir(float_model, tmp_path / "packs", progress=False)
    assert len(replaced) == 21
    assert input_groups(float_model) == input_groups(seq) and len(input_groups(seq)) == (6 if groups else 0)  # packed and linked as groups
    x = _batches()[0]
    with torch.no_grad():
        assert torch.equal(float_model(x).logits, seq(x).logits)


def test_stats_path_without_statistics_to_write_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="stats_path"):
        quantize_sequential(_gemma(), DuQuantConfig(), _batches(), name_filter(include=LINEARS), progress=False, stats_path=tmp_path / "s")
