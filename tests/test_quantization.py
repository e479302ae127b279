"""Int8 weights (thl_np.quant, docs/QUANTIZATION.md): the scheme's math, the file format, loading
memory-mapped, the exact semantics (a quantized model is the float model with W = s·q, on the plain path
bit for bit), the fast path against the plain path end to end, and the commands (quantize, info, eval
--compare, convert)."""
import json
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from thl_np import THLConfig, THLModel
from thl_np.cli import main
from thl_np.errors import ConfigError, InputError, WeightsError
from thl_np.io.safetensors import list_tensors, read_safetensors, write_safetensors
from thl_np.model import dequantize_model, quantize_model
from thl_np.quant import SCHEMES, dequantize, quantize_matrix, scheme_config
from thl_np.quant.params import QuantizedParams

SCHEME_NAMES = list(SCHEMES)


def small_config(dtype="float64", **overrides) -> THLConfig:
    kw = dict(vocab_size=97, embedding_dim=16, hidden_dim=16, num_tiers=3, tier_dims=[8, 12, 16],
              tier_timescales=[1, 2, 4], local_window=4, memory_slots=10, memory_dim=12, query_dim=6,
              value_dim=8, num_heads=2, head_dim=5, read_topk=3, write_rate=0.5, dtype=dtype)
    kw.update(overrides)
    return THLConfig(**kw)


def wide_config(dtype="float32") -> THLConfig:
    """Rows wider than 32 columns, so block-32 scales make several groups (and a partial one: 70 = 2·32 + 6)."""
    return small_config(dtype, vocab_size=259, embedding_dim=70, hidden_dim=70, tier_dims=[40, 48, 70],
                        memory_dim=64, value_dim=36, num_heads=4, head_dim=10, query_dim=16)


# ---------------------------------------------------------------------------------------------------
# The scheme's math
# ---------------------------------------------------------------------------------------------------
# magnitudes float32 scales can carry (a group below float32's range is stored as zeros)
matrices = hnp.arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(1, 80)),
                      elements=st.one_of(st.just(0.0), st.floats(1e-20, 1e4), st.floats(-1e4, -1e-20)))


@given(W=matrices, block=st.sampled_from([None, 1, 5, 32]))
def test_quantize_rounds_to_the_nearest_grid_point(W, block):
    """|q| ≤ 127, s = max |group| / 127 (in float32), and each weight is within half a step of s·q."""
    q, s = quantize_matrix(W, block)
    b = W.shape[1] if block is None else block
    assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (W.shape[0], -(-W.shape[1] // b))
    assert np.abs(q.astype(int)).max() <= 127
    s_full = np.repeat(s.astype(np.float64), b, axis=1)[:, :W.shape[1]]
    amax = np.abs(np.pad(W, ((0, 0), (0, s.shape[1] * b - W.shape[1])))).reshape(W.shape[0], -1, b).max(axis=2)
    np.testing.assert_array_equal(s, (amax / 127).astype(np.float32))
    err = np.abs(W - s_full * q)
    assert np.all(err <= s_full / 2 * (1 + 1e-6) + 1e-300), float((err - s_full / 2).max())


@given(W=matrices, block=st.sampled_from([None, 5, 32]))
def test_requantizing_a_dequantized_matrix_gives_it_back(W, block):
    """s·q lies on its own grid: quantizing it again gives the same q and s (the format is stable)."""
    q, s = quantize_matrix(W, block)
    q2, s2 = quantize_matrix(dequantize(q, s, block, np.float64), block)
    np.testing.assert_array_equal(q2, q)
    np.testing.assert_array_equal(s2, s)


def test_dequantize_is_the_correctly_rounded_product():
    """float64: s·q exactly; float32: s·q rounded once (the product of a float32 and an int8 is exact in
    float64, so rounding that gives the reference)."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((7, 70)) * 3
    for block in (None, 32):
        q, s = quantize_matrix(W, block)
        exact = np.repeat(s.astype(np.float64), 70 if block is None else 32, axis=1)[:, :70] * q
        np.testing.assert_array_equal(dequantize(q, s, block, np.float64), exact)
        np.testing.assert_array_equal(dequantize(q, s, block, np.float32), exact.astype(np.float32))


def test_quantize_refuses_non_finite_weights():
    W = np.ones((2, 3))
    W[1, 2] = np.nan
    with pytest.raises(WeightsError, match="NaN or infinity"):
        quantize_matrix(W, None)


def test_an_all_zero_row_has_scale_zero():
    q, s = quantize_matrix(np.zeros((2, 4)), None)
    assert not q.any() and not s.any()


@pytest.mark.parametrize("value, problem", [
    ("int8", "must be an object"), ({"method": "int4", "block_size": None}, "not supported"),
    ({"method": "int8", "block_size": 0}, "positive integer"), ({"method": "int8", "block_size": True}, "positive"),
    ({"method": "int8", "block_size": None, "x": 1}, "unknown key"),
])
def test_config_refuses_a_bad_quantization(value, problem):
    with pytest.raises(ConfigError, match=problem):
        small_config(quantization=value)


def test_a_float_config_json_is_unchanged():
    """config.json gains "quantization" only for a quantized model."""
    c = small_config()
    assert "quantization" not in c.to_dict() and "quantization" not in c.to_json()
    q = c.replace(quantization=scheme_config("int8"))
    assert q.to_dict()["quantization"] == {"method": "int8", "block_size": None}
    assert THLConfig.from_dict(json.loads(q.to_json())) == q
    assert scheme_config("int8-block32") == {"method": "int8", "block_size": 32}
    with pytest.raises(ConfigError, match="not known"):
        scheme_config("int4")


# ---------------------------------------------------------------------------------------------------
# Exact semantics: the plain path on W = s·q
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_a_quantized_model_is_the_float_model_with_dequantized_weights(scheme):
    """The plain path of a quantized model equals, bit for bit, the plain path of the float model whose
    weights are s·q (dequantize_model), logits and state, with and without training-mode routing; and
    its gradients are that float model's."""
    from thl_np.model import value_and_grad

    model = THLModel(wide_config("float64"), seed=0)
    qmodel = quantize_model(model, scheme)
    fmodel = dequantize_model(qmodel)
    assert fmodel.config.quantization is None and isinstance(qmodel.params, QuantizedParams)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 259, size=(2, 11))
    U = rng.random((11, 2, 4, 10))
    for gumbel in (None, U):
        a, sa = qmodel(ids, gumbel_uniform=gumbel, path="plain")
        b, sb = fmodel(ids, gumbel_uniform=gumbel, path="plain")
        np.testing.assert_array_equal(a, b)
        for key, x in sa.arrays().items():
            np.testing.assert_array_equal(x, sb.arrays()[key], err_msg=key)
    la, ga = value_and_grad(qmodel, ids[:, :-1], ids[:, 1:], path="plain")
    lb, gb = value_and_grad(fmodel, ids[:, :-1], ids[:, 1:], path="plain")
    assert la == lb and all(np.array_equal(ga[k], gb[k]) for k in gb)
    # the quantized weights differ from the float ones (else this test would prove nothing)
    assert not np.array_equal(fmodel.params["output_head.weight"], model.params["output_head.weight"])


def test_what_is_quantized_and_what_stays_float():
    qmodel = quantize_model(THLModel(small_config(), seed=0))
    P = qmodel.params
    for name in P:
        assert P.is_quantized(name) == (P[name].ndim == 2), name
    assert P.tensor("layer_norm.weight").dtype == np.float64 and P.tensor("output_head.bias").dtype == np.float64
    assert "int8-row weights" in repr(qmodel)


def test_plain_step_never_holds_the_whole_float_model():
    """The plain step dequantizes per module (provider protocol) and the embedding per row: reading the
    whole embedding table never happens in a step."""
    qmodel = quantize_model(THLModel(wide_config(), seed=0))
    emb = qmodel.params.tensor("embedding.weight")
    calls = []
    original = type(emb).dense
    type(emb).dense = lambda self, dtype: calls.append(self.name) or original(self, dtype)
    try:
        qmodel.forward_step([1, 2], path="plain")
    finally:
        type(emb).dense = original
    assert "embedding.weight" not in calls and "output_head.weight" in calls
    assert len(calls) == len(set(calls)), "each weight dequantized once per step"


def test_weights_are_fixed():
    qmodel = quantize_model(THLModel(small_config(), seed=0))
    with pytest.raises(InputError, match="quantize it afterwards"):
        qmodel.params["output_head.bias"] = np.zeros(97)
    with pytest.raises(InputError, match="already quantized"):
        quantize_model(qmodel)


def test_a_quantized_config_quantizes_fresh_weights():
    c = small_config(quantization=scheme_config("int8-block32"))
    model = THLModel(c, seed=3)
    assert isinstance(model.params, QuantizedParams) and model.params.block_size == 32
    expected = quantize_model(THLModel(small_config(), seed=3), "int8-block32")
    np.testing.assert_array_equal(model.params.tensor("router.W_q.weight").q,
                                  expected.params.tensor("router.W_q.weight").q)
    with pytest.raises(WeightsError, match="make them agree"):
        THLModel(small_config(quantization=scheme_config("int8-row")), params=model.params)


# ---------------------------------------------------------------------------------------------------
# The fast path against the plain path
# ---------------------------------------------------------------------------------------------------
TOL = {"float64": 1e-10, "float32": 1e-5}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("scheme", SCHEME_NAMES)
@pytest.mark.parametrize("B", [1, 3, 9, 70])
def test_fast_path_equals_plain_path(B, scheme, dtype):
    """Every int8 route of the decoder (batch 1: GEMV; 3: small-batch tiles; 9: the packed head in two
    chunks; 70: above SMALL_BATCH, blocks dequantized into BLAS) over a prompt and then single steps."""
    qmodel = quantize_model(THLModel(wide_config(dtype), seed=2), scheme)
    rng = np.random.default_rng(B)
    ids = rng.integers(0, 259, size=(B, 13))
    plain, s_plain = qmodel(ids, path="plain")
    fast, s_fast = qmodel(ids, path="fast")
    scale = max(1.0, float(np.abs(plain).max()))
    assert float(np.abs(fast - plain).max()) <= TOL[dtype] * scale
    for _ in range(4):
        tok = rng.integers(0, 259, size=B)
        lp, s_plain = qmodel.forward_step(tok, s_plain, path="plain")
        lf, s_fast = qmodel.forward_step(tok, s_fast, path="fast")
        assert float(np.abs(lf - lp).max()) <= TOL[dtype] * scale
    for key, x in s_plain.arrays().items():
        np.testing.assert_allclose(np.asarray(s_fast.arrays()[key], np.float64), x, atol=TOL[dtype] * 10, rtol=0,
                                   err_msg=key)


def test_decoder_keeps_int8_and_is_reused():
    """The decoder reads the int8 values (no float copy of a quantized matrix) and is handed over between
    steps like a float model's."""
    from thl_np.fast.int8 import Q8Matrix

    qmodel = quantize_model(THLModel(small_config("float32"), seed=0))
    dec = qmodel.decoder()
    assert isinstance(dec.W_o, Q8Matrix) and isinstance(dec.W_qkv, Q8Matrix) and isinstance(dec.emb, Q8Matrix)
    assert dec.W_o.q.base is not None or dec.W_o.q is qmodel.params.tensor("output_head.weight").q
    _, s = qmodel.forward_step([1])
    cached = s.decoder
    _, s = qmodel.forward_step([2], s)   # the first state is dropped: its session becomes the spare
    _, s = qmodel.forward_step([3], s)
    assert s.decoder is cached


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_save_and_load_round_trip(tmp_path, scheme):
    """Tensor names and dtypes as docs/QUANTIZATION.md says; from_pretrained memory-maps the int8 values and
    gives the same logits; saving the loaded model again writes the same tensors."""
    qmodel = quantize_model(THLModel(wide_config(), seed=1), scheme)
    qmodel.save_pretrained(tmp_path / "a")
    infos = {t.name: t for t in list_tensors(tmp_path / "a" / "model.safetensors")}
    assert infos["output_head.weight"].dtype == "I8" and infos["output_head.weight_scale"].dtype == "F32"
    G = 1 if scheme == "int8-row" else 5  # Σ d_k = 158 columns: 4 groups of 32 and one of 30
    assert infos["output_head.weight_scale"].shape == (259, G)
    assert infos["layer_norm.weight"].dtype == "F32" and "layer_norm.weight_scale" not in infos
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["quantization"] == scheme_config(scheme)
    loaded = THLModel.from_pretrained(tmp_path / "a")
    q = loaded.params.tensor("output_head.weight").q
    assert not q.flags.owndata and not q.flags.writeable  # a view into the file's mapping
    ids = np.arange(20).reshape(2, 10)
    np.testing.assert_array_equal(loaded(ids)[0], qmodel(ids)[0])
    loaded.save_pretrained(tmp_path / "b")
    a, _ = read_safetensors(tmp_path / "a" / "model.safetensors")
    b, _ = read_safetensors(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_save_with_a_storage_dtype_keeps_scales_float32(tmp_path):
    qmodel = quantize_model(THLModel(small_config("float32"), seed=1))
    qmodel.save_pretrained(tmp_path, dtype="float16")
    infos = {t.name: t.dtype for t in list_tensors(tmp_path / "model.safetensors")}
    assert infos["layer_norm.weight"] == "F16" and infos["embedding.weight_scale"] == "F32"
    assert infos["embedding.weight"] == "I8"
    THLModel.from_pretrained(tmp_path)  # loads


def test_load_in_another_compute_dtype(tmp_path):
    qmodel = quantize_model(THLModel(small_config("float32"), seed=1))
    qmodel.save_pretrained(tmp_path)
    m64 = THLModel.from_pretrained(tmp_path, dtype="float64")
    assert m64.dtype == np.float64 and m64.params["output_head.weight"].dtype == np.float64
    t = qmodel.params.tensor("router.W_q.weight")   # float64: s·q exactly (float32 rounds it)
    np.testing.assert_array_equal(m64.params["router.W_q.weight"], t.scale.astype(np.float64) * t.q)


def _rewrite(path, change):
    tensors, meta = read_safetensors(path, mmap=False)
    change(tensors)
    write_safetensors(path, tensors, metadata=meta)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.__setitem__("writer.W_w.weight_scale", np.full_like(t["writer.W_w.weight_scale"], np.inf)),
     "non-finite scale"),
    (lambda t: t["router.W_q.weight_scale"].__setitem__((3, 0), np.nan), "non-finite scale"),
    (lambda t: t["layer_norm.bias"].__setitem__(0, np.nan), "non-finite"),
    (lambda t: t.pop("output_head.weight_scale"), "has no scales"),
    (lambda t: t.__setitem__("output_head.weight_scale", np.ones((97, 2), np.float32)), "with shape \\[97, 1\\]"),
    (lambda t: t.__setitem__("output_head.weight_scale", np.ones((97, 1), np.float64)), "float32"),
    (lambda t: t.__setitem__("layer_norm.bias_scale", np.ones((1, 1), np.float32)), "must be int8"),
    (lambda t: t.__setitem__("extra", np.ones(2, np.float32)), "unexpected tensor extra"),
    (lambda t: t.update({"layer_norm.bias": np.ones(36, np.int8),
                         "layer_norm.bias_scale": np.ones((36, 1), np.float32)}), "only matrices"),
    (lambda t: t.__setitem__("layer_norm.bias", np.ones(36, np.int32)), "dtype int32"),
])
def test_a_damaged_quantized_file_is_refused_at_load(tmp_path, change, message):
    quantize_model(THLModel(small_config("float32"), seed=1)).save_pretrained(tmp_path)
    _rewrite(tmp_path / "model.safetensors", change)
    with pytest.raises(WeightsError, match=message):
        THLModel.from_pretrained(tmp_path)


def test_int8_tensors_need_a_quantized_config(tmp_path):
    quantize_model(THLModel(small_config("float32"), seed=1)).save_pretrained(tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    del c["quantization"]
    (tmp_path / "config.json").write_text(json.dumps(c))
    with pytest.raises(WeightsError):
        THLModel.from_pretrained(tmp_path)


def test_a_partly_quantized_file_loads(tmp_path):
    """A port may quantize only some matrices: the rest stay float and every path still agrees."""
    qmodel = quantize_model(THLModel(wide_config(), seed=4))
    qmodel.save_pretrained(tmp_path)
    full = THLModel(wide_config(), seed=4)

    def unquantize(t):
        for name in ("router.W_k.weight", "tiers.cells.0.W_z.weight", "output_head.weight"):
            t.pop(name + "_scale")
            t[name] = full.params[name]
    _rewrite(tmp_path / "model.safetensors", unquantize)
    model = THLModel.from_pretrained(tmp_path)
    assert not model.params.is_quantized("output_head.weight") and model.params.is_quantized("embedding.weight")
    ids = np.arange(24).reshape(3, 8)
    plain, _ = model(ids, path="plain")
    fast, _ = model(ids, path="fast")
    assert float(np.abs(fast - plain).max()) <= 1e-5 * max(1.0, float(np.abs(plain).max()))


# ---------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------
def test_cli_scheme_choices_match_the_library():
    from thl_np.cli.quant import SCHEME_CHOICES

    assert list(SCHEME_CHOICES) == ["int8", *SCHEMES]


def test_quantize_info_and_generate_commands(tmp_path, capsys):
    src, out = tmp_path / "float", tmp_path / "int8"
    THLModel(small_config("float32", vocab_size=259), seed=0).save_pretrained(src)
    assert main(["quantize", "--model", str(src), "--out", str(out), "--scheme", "int8-block32"]) == 0
    text = capsys.readouterr().out
    assert "int8-block32 weights" in text and "x the float32 size" in text
    assert main(["quantize", "--model", str(src), "--out", str(out)]) == 1          # not empty: refused
    assert "--force" in capsys.readouterr().err
    assert main(["info", "--model", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["quantization"] == {"method": "int8", "block_size": 32}
    q = info["quantization"]
    assert q["scheme"] == "int8-block32" and q["int8_tensors"] == 19 and q["stored_bytes"] == info["weights_file"][
        "bytes"] - (os.path.getsize(out / "model.safetensors") - q["stored_bytes"])
    assert main(["info", "--model", str(out)]) == 0
    assert "quantization: int8-block32" in capsys.readouterr().out
    assert main(["info", "--model", str(src), "--json"]) == 0
    assert "quantization" not in json.loads(capsys.readouterr().out)
    assert main(["generate", "--model", str(out), "--max-length", "5", "--seed", "0", "abc"]) == 0
    assert main(["quantize", "--model", str(out), "--out", str(tmp_path / "again")]) == 1
    assert "already quantized" in capsys.readouterr().err


def test_eval_compare(tmp_path, capsys):
    """Both bits per byte, the difference and the KL: a model against itself gives 0 and 100% agreement; against
    its int8 copy, the figures of compare_models (which the JSON carries)."""
    from thl_np.eval.compare import compare_models

    src, out = tmp_path / "float", tmp_path / "int8"
    model = THLModel(small_config("float32", vocab_size=259), seed=0)
    model.save_pretrained(src)
    quantize_model(model).save_pretrained(out)
    data = tmp_path / "text.txt"
    data.write_bytes(b"def f(x):\n    return x + 1\n" * 20)
    assert main(["eval", "--model", str(src), "--data", str(data), "--compare", str(src), "--json"]) == 0
    same = json.loads(capsys.readouterr().out)["compare"]
    assert same["mean_kl_nats"] == pytest.approx(0.0, abs=1e-12) and same["same_top_byte"] == 1.0
    assert same["bits_per_byte_difference"] == 0.0
    assert main(["eval", "--model", str(src), "--data", str(data), "--compare", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    direct = compare_models(model, THLModel.from_pretrained(out), data.read_bytes())
    assert res["bits_per_byte"] == pytest.approx(direct["bits_per_byte"], rel=1e-12)
    assert res["compare"]["mean_kl_nats"] == pytest.approx(direct["compare"]["mean_kl_nats"], rel=1e-9)
    assert 0 < res["compare"]["mean_kl_nats"] < 0.1
    assert main(["eval", "--model", str(src), "--data", str(data), "--compare", str(out)]) == 0
    text = capsys.readouterr().out
    assert "difference (compare - model)" in text and "mean KL(model || compare)" in text
    assert main(["eval", "--model", str(src), "--compare", str(out), "--passkey"]) == 2   # needs --data


def test_eval_compare_refuses_another_vocabulary(tmp_path):
    from thl_np.eval.compare import compare_models

    with pytest.raises(InputError, match="different vocabularies"):
        compare_models(THLModel(small_config(), seed=0), THLModel(small_config(vocab_size=98), seed=0), b"abcdefgh")


def test_convert_round_trips_a_quantized_folder(tmp_path):
    """`thl-np convert` of an int8 folder keeps its int8 values and float32 scales bit for bit (float tensors
    take --dtype); the result loads and computes what the source computes (write_rate is set to 1.0 as for
    every conversion, so the source here has 1.0 already)."""
    src, out = tmp_path / "int8", tmp_path / "converted"
    qmodel = quantize_model(THLModel(small_config("float32", write_rate=1.0), seed=5), "int8-block32")
    qmodel.save_pretrained(src)
    assert main(["convert", str(src), str(out), "--dtype", "float16"]) == 0
    a, _ = read_safetensors(src / "model.safetensors")
    b, _ = read_safetensors(out / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        if a[name].dtype == np.int8 or name.endswith("_scale"):
            assert b[name].dtype == a[name].dtype and np.array_equal(a[name], b[name]), name
        else:
            assert b[name].dtype == np.float16, name
    loaded = THLModel.from_pretrained(out)
    assert loaded.config.quantization == qmodel.config.quantization
    name = "router.W_k.weight"
    np.testing.assert_array_equal(loaded.params.tensor(name).q, qmodel.params.tensor(name).q)


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_decode_bytes_per_step_counts_the_stored_int8_bytes(scheme):
    """The int8 bound's bytes: each matrix a step reads as stored (int8 values and float32 scales, from the
    quantized model itself), biases in the compute dtype, tiers by their clocks; the state scan as in float."""
    from thl_np.eval.bench import decode_bytes_per_step

    c = wide_config("float32")
    qp = quantize_model(THLModel(c, seed=0), scheme).params

    def stored(*names):
        return sum(qp.tensor(n).nbytes for n in names)
    got = decode_bytes_per_step(c, 3, 4, scheme_config(scheme))
    assert got["output_head"] == stored("output_head.weight", "output_head.bias")
    assert got["router"] == stored("router.W_q.weight", "router.W_k.weight", "router.W_v.weight")
    assert got["writer"] == stored("writer.W_w.weight", "writer.W_w.bias")
    assert got["local_attn"] == stored("local_attn.q.weight", "local_attn.k.weight", "local_attn.v.weight")
    tiers = sum(stored(*[f"tiers.cells.{k}.{g}.{p}" for g in ("W_z", "W_r", "W_h") for p in ("weight", "bias")])
                / tau for k, tau in enumerate(c.tier_timescales))
    assert got["tiers"] == pytest.approx(tiers)
    assert got["state_scan"] == decode_bytes_per_step(c, 3, 4)["state_scan"]


def test_bench_measures_int8_beside_float32(capsys):
    """`thl-np bench` decodes the int8 copy in the same run: its tokens/s, its own bound (int8 bytes ÷ the same
    GEMV bandwidth), the ratio to it and the speed-up over float32, consistent with each other."""
    from thl_np.eval.bench import decode_bytes_per_step

    code = main(["bench", "--dim", "16", "--memory-slots", "8", "--decode-steps", "3", "--prompt-len", "4",
                 "--no-train", "--int8", "int8-block32", "--json"])
    out, text = capsys.readouterr()
    assert code == 0
    figures = json.loads(out)
    assert figures["int8_scheme"] == "int8-block32" and figures["int8_prompt_tok_s"] > 0
    c = THLConfig(dim=16, memory_slots=8)
    for B in (1, 8):
        assert f"int8 (int8-block32) decode batch {B}:" in text
        tps, bound = figures[f"int8_decode_b{B}_tok_s"], figures[f"int8_decode_b{B}_bound_tok_s"]
        need = decode_bytes_per_step(c, B, 4, scheme_config("int8-block32"))["total"]
        assert bound == pytest.approx(B * figures["gemv_bandwidth_GBps"] * 1e9 / need)
        assert figures[f"int8_decode_b{B}_ratio_to_bound"] == pytest.approx(tps / bound)
        assert figures[f"int8_decode_b{B}_speedup"] == pytest.approx(tps / figures[f"decode_b{B}_tok_s"])
        assert figures[f"int8_decode_b{B}_bound_tok_s"] > figures[f"decode_b{B}_bound_tok_s"]
