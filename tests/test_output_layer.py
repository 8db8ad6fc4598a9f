"""interop.output_layer: the output layer quantized weight-only, the tied input embedding reading its codes.

Small random Gemma-3 (transformers, nothing downloaded; its embedding is scaled and tied to lm_head).
Bounds: embedding rows equal the head's dequantized rows exactly (torch.equal) in every code
layout; a saved model reloads bit-identically and stores the matrix once.
"""

from __future__ import annotations

import pytest
import torch

from interop import load_quantized, save_quantized
from interop.output_layer import QuantizedEmbedding, quantize_output_layer
from interop.qweight import _VARIANTS, QuantizedWeight, _int4pack_rows, _to_int4pack
from interop.saved_checks import SavedModelError

transformers = pytest.importorskip("transformers")


def _gemma(vocab: int = 96) -> torch.nn.Module:
    cfg = transformers.Gemma3TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=64, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(cfg).eval()


def _ids(vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", _VARIANTS)
@pytest.mark.parametrize("out", [176, 256])
def test_int4pack_row_gather_equals_the_whole_decode(variant, out):
    from interop.qweight import _from_int4pack

    codes = torch.randint(-8, 8, (out, 64), generator=torch.Generator().manual_seed(out), dtype=torch.int8)
    packed = _to_int4pack(codes, variant)
    assert torch.equal(_from_int4pack(packed, variant), codes)
    ids = torch.tensor([0, 1, 31, 32, 63, 64, 127, 128, out - 17, out - 2, out - 1, 5, 5])
    assert torch.equal(_int4pack_rows(packed, variant, ids), codes[ids])


@pytest.mark.parametrize("layout, bits, group", [("int8", 8, None), ("nibbles", 4, 16), ("int4pack", 4, 32), ("nibbles", 4, None)])
def test_weight_rows_equal_the_dequantized_rows(layout, bits, group):
    gen = torch.Generator().manual_seed(2)
    q = 2 ** (bits - 1)
    codes = torch.randint(-q, q, (176, 64), generator=gen, dtype=torch.int8)
    scales = torch.rand(176, 1 if group is None else 64 // group, generator=gen) + 0.1
    w = QuantizedWeight(codes, scales[:, 0] if group is None else scales, bits=bits, group_size=group, layout=layout)
    if w.layout != layout:
        pytest.skip(f"layout {layout} unavailable here")
    ids = torch.randint(0, 176, (40,), generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(w.rows(ids, dtype), w.dequantize(dtype)[ids])
    with pytest.raises(IndexError, match="0..175"):
        w.rows(torch.tensor([176]))


@pytest.mark.parametrize("bits, group, act_bits", [(8, None, 16), (4, 32, 16), (4, 32, 8), (8, None, 8)])
def test_tied_embedding_reads_the_head_codes_and_logits_stay_close(bits, group, act_bits):
    """Also with the head's input quantized to int8 per token (`act_bits=8`): the integer products run it, and the
    embedding still gathers the same codes (in the "panels" layout where `layout="auto"` picks it)."""
    ref, model = _gemma(), _gemma()
    new = quantize_output_layer(model, bits, group, act_bits=act_bits)
    assert set(new) == {"lm_head", "model.embed_tokens"}
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, QuantizedEmbedding) and emb.head is head
    ids = _ids()
    with torch.no_grad():
        want = head.qweight.dequantize()[ids] * ref.model.embed_tokens.embed_scale
        assert torch.equal(emb(ids), want.to(emb(ids).dtype))
        got, float_logits = model(ids).logits, ref(ids).logits
    rel = float((got - float_logits).norm() / float_logits.norm())
    assert rel < (0.02 if bits == 8 else 0.15), rel
    assert "model.embed_tokens.weight" not in model.state_dict()
    assert head.act.scheme == ("none" if act_bits == 16 else "dynamic-token")


def test_tied_embedding_follows_the_model_dtype():
    """`.to(bfloat16)` of a model quantized in float32 gives bfloat16 embedding rows (as an nn.Embedding would), so
    the whole model computes in bfloat16; the rows are the float32 rows rounded once; `.float()` turns back."""
    model = _gemma()
    quantize_output_layer(model, 4, 32)
    ids = _ids()
    with torch.no_grad():
        rows32 = model.model.embed_tokens(ids)
        model.to(torch.bfloat16)
        emb = model.model.embed_tokens
        assert emb.dtype == torch.bfloat16 and emb(ids).dtype == torch.bfloat16
        hidden = model.model(input_ids=ids).last_hidden_state
        assert hidden.dtype == torch.bfloat16 and model(ids).logits.dtype == torch.bfloat16
        # W_hat rows in bfloat16, times the scale that .to() rounded to bfloat16
        want = (model.lm_head.qweight.dequantize()[ids].to(torch.bfloat16) * emb.embed_scale.to(torch.bfloat16))
        assert torch.equal(emb(ids), want)
        assert (emb(ids).float() - rows32).abs().max() <= 2 ** -7 * rows32.abs().max()
        model.float()
        assert emb.dtype == torch.float32 and torch.equal(emb(ids), rows32)


@pytest.mark.parametrize("act_bits", [16, 8])
def test_saved_model_stores_the_tied_matrix_once_and_reloads_bit_identically(tmp_path, act_bits):
    model = _gemma(vocab=2048)
    quantize_output_layer(model, 4, 32, act_bits=act_bits)
    save_quantized(model, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.qweight.codes" in keys and not any(k.startswith("model.embed_tokens") for k in keys)
    back = load_quantized(_gemma(vocab=2048), tmp_path)
    assert isinstance(back.model.embed_tokens, QuantizedEmbedding) and back.model.embed_tokens.head is back.lm_head
    assert back.lm_head.config.act_bits == act_bits and back.lm_head.qweight.layout == model.lm_head.qweight.layout
    ids = _ids(2048)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    "tied, message",
    [
        ({"model.embed_tokens": "model.layers.0.mlp.up_proj"}, "no quantized layer of the save"),
        ({"model.norm": "lm_head"}, "not an nn.Embedding"),
        ({"model.embed_tokens": 3}, "must map embedding names"),
    ],
)
def test_a_bad_tie_in_the_record_is_refused_naming_it(tmp_path, tied, message):
    import json

    from interop.serialize import _tie_embeddings

    model = _gemma()
    quantize_output_layer(model, 8)
    save_quantized(model, tmp_path)
    record = json.loads((tmp_path / "duquant_quantized.json").read_text())
    assert record["tied_embeddings"] == {"model.embed_tokens": "lm_head"}
    fresh = _gemma()
    with pytest.raises(SavedModelError, match=message):
        _tie_embeddings(fresh, {**record, "tied_embeddings": tied}, tmp_path / "duquant_quantized.json")


def test_untied_output_layer_leaves_the_embedding_alone():
    model = _gemma()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie
    new = quantize_output_layer(model, 8)
    assert set(new) == {"lm_head"} and isinstance(model.model.embed_tokens, torch.nn.Embedding)


def test_bad_bits_and_rotated_heads_are_refused():
    from duquant_jax import DuQuantConfig
    from interop import quantize_
    from interop.output_layer import check_tieable

    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        quantize_output_layer(_gemma(), 6)
    with pytest.raises(ValueError, match=r"act_bits must be 16 \(float activations\) or 8 \(int8 per token\); got 4"):
        quantize_output_layer(_gemma(), 4, 32, act_bits=4)
    with pytest.raises(ValueError, match="act_bits must be 16"):
        quantize_(_gemma(), DuQuantConfig.preset("w8a8"), lambda n, m: False, progress=False, output_layer=8, output_layer_act_bits=12)
    model = _gemma()
    quantize_(model, DuQuantConfig.preset("w8a8"), lambda n, m: n == "lm_head", progress=False)
    with pytest.raises(ValueError, match="rotated or smoothed"):
        check_tieable(model.lm_head, "lm_head")


def test_quantize_output_layer_option_keeps_the_main_config_off_the_head():
    from duquant_jax import DuQuantConfig
    from interop import quantize_

    model = _gemma()
    with pytest.warns(UserWarning, match="no XᵀX statistics for the output layer 'lm_head'"):
        new = quantize_(model, DuQuantConfig.preset("w8a8"), None, progress=False, output_layer=4)
    assert model.lm_head.config.rotation == "none" and model.lm_head.config.weight_bits == 4
    assert model.lm_head.config.weight_group_size == 32 and model.lm_head.config.weight_method == "rtn"
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert model.model.layers[0].mlp.up_proj.config.rotation == "hadamard" and "model.layers.0.mlp.up_proj" in new
    assert model.lm_head.config.act_bits == 16 and model.lm_head.act.scheme == "none"


def test_quantize_output_layer_act_bits_quantizes_the_head_input_per_token():
    """`output_layer_act_bits=8`: the head's input is quantized to int8 per token (its logits equal those of the
    weight-only head fed the fake-quantized input), and the embedding still reads the same codes."""
    from duquant_jax import DuQuantConfig
    from interop import quantize_
    from interop.kernels import ActQuant, fake_quantize

    model = _gemma()
    with pytest.warns(UserWarning, match="no XᵀX statistics"):
        quantize_(model, DuQuantConfig.preset("w8a8"), None, progress=False, output_layer=4, output_layer_act_bits=8)
    head = model.lm_head
    assert head.config.act_bits == 8 and head.config.act_scheme == "dynamic-token" and head.act.integer
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding) and model.model.embed_tokens.head is head
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = fake_quantize(x, ActQuant("dynamic-token", 8)) @ head.qweight.dequantize().t()
        got = head(x)
    assert float((got - want).abs().max()) <= 2e-2 * float(want.abs().max())  # the bfloat16 paths' bound, whichever runs


def _observed_head(model, xtx: bool = True):
    from interop import observe

    with observe(model, lambda n, m: n.endswith("q_proj"), xtx=xtx, output_layer=True) as stats, torch.no_grad():
        for seed in range(3):
            model(torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(10 + seed)))
    return stats


def test_observe_output_layer_records_the_head_with_its_xtx_whatever_the_filter():
    stats = _observed_head(_gemma(), xtx=False)
    assert set(stats) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "lm_head"}
    assert stats["lm_head"].xtx is not None and stats["lm_head"].xtx.shape == (64, 64)
    assert stats["lm_head"].tokens == 3 * 2 * 24
    assert stats["model.layers.0.self_attn.q_proj"].xtx is None  # xtx=False still holds for the filter's layers


def test_quantize_output_layer_4_rounds_an_observed_head_with_gptq_in_groups_of_32():
    """`output_layer=4` with the head observed: GPTQ g32, the same codes as quantize_output_layer's, and a
    smaller output error on the observed inputs than rounding to nearest (bound: GPTQ's error below RTN's)."""
    import warnings

    from duquant_jax import DuQuantConfig
    from interop import quantize_
    from interop.output_layer import INT4_GROUP_SIZE

    model = _gemma()
    stats = _observed_head(model)
    w = model.lm_head.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="output_layer=4: no XᵀX")  # no "rounded to nearest" warning
        quantize_(model, DuQuantConfig.preset("w4a8"), lambda n, m: n.endswith("q_proj"), progress=False,
                  stats=stats, output_layer=4)
    head = model.lm_head
    assert (head.config.weight_group_size, head.config.weight_method) == (INT4_GROUP_SIZE, "gptq")
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    alone = _gemma()
    quantize_output_layer(alone, 4, INT4_GROUP_SIZE, method="gptq", stats=stats)
    assert torch.equal(alone.lm_head.qweight.dequantize(torch.float32), head.qweight.dequantize(torch.float32))
    rtn = _gemma()
    quantize_output_layer(rtn, 4, INT4_GROUP_SIZE)
    xtx = torch.from_numpy(stats["lm_head"].xtx).double()

    def err(m):  # trace(D XᵀX Dᵀ), D = W_hat - W: the squared output error summed over the observed tokens
        d = m.lm_head.qweight.dequantize(torch.float32).double() - w.double()
        return float(torch.einsum("ij,jk,ik->", d, xtx, d))

    assert err(model) < 0.9 * err(rtn)


def test_a_fresh_process_without_jax_reloads_the_tied_model_bit_identically(tmp_path):
    """In a subprocess (a native-kernel crash fails this test, not the run), with JAX made unimportable."""
    import subprocess
    import sys

    from interop.kernels import freeze_paths

    model = _gemma(vocab=2048)
    quantize_output_layer(model, 4, 32)
    freeze_paths(model)  # the kernel choices travel with the save: no re-measuring in the new process
    save_quantized(model, tmp_path / "saved")
    ids = _ids(2048)
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "want.pt")
    script = f"""
import sys
sys.modules["jax"] = None  # any import of JAX fails
sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
import torch
from test_output_layer import _gemma
from interop import load_quantized
want = torch.load({str(tmp_path / "want.pt")!r})
model = load_quantized(_gemma(vocab=2048), {str(tmp_path / "saved")!r})
with torch.no_grad():
    got = model(want["ids"]).logits
print("EQUAL" if torch.equal(got, want["logits"]) else "DIFFERENT", "jax" in sys.modules and sys.modules["jax"] is not None)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["EQUAL", "False"], proc.stdout


def test_export_refuses_a_tied_quantized_output_layer(tmp_path):
    from duquant_jax import DuQuantConfig
    from interop import quantize_
    from interop.export import ExportError, export_compressed_tensors

    model = _gemma()
    quantize_(model, DuQuantConfig.preset("w8a8", rotation="none"), lambda n, m: "layers." in n, progress=False, output_layer=8)
    with pytest.raises(ExportError, match="model.embed_tokens"):
        export_compressed_tensors(model, tmp_path)
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("bits, group, act_bits", [(8, None, 16), (4, 32, 16), (4, 32, 8)])
def test_fullgraph_compile_of_a_tied_model_matches_eager_and_checks_ids(bits, group, act_bits):
    from interop.kernels import freeze_paths

    model = _gemma()
    quantize_output_layer(model, bits, group, act_bits=act_bits)
    freeze_paths(model)
    ids = _ids()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        want, got = model(ids).logits, compiled(ids).logits
        assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
        bad = ids.clone()
        bad[0, 0] = 96  # the vocabulary has 96 words
        with pytest.raises(RuntimeError, match=r"row ids must be in 0\.\.95"):
            compiled(bad)
