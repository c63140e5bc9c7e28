"""Quantized formats, the quantized linear module, and the converter."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from localmix.cli.main import app
from localmix.quant import QuantLinear, quantize_tensor
from localmix.quant import kernels as kernels_module
from localmix.quant.convert import SHAPES_KEY, ConvertError, Settings, check_settings, convert
from localmix.quant.formats import (
    DEFAULT_METHOD,
    QuantError,
    fit_groups,
    int4_codes,
    pack_int4,
    padded_shape,
    relative_error,
    unpack_int4,
)
from localmix.quant.kernels import ENV_SWITCH, cpu_features, cpu_kernels, unavailable_reason
from localmix.quant.linear import QuantExpert

import localmix
from benchmarks.common import minilm_matrices
from tests.helpers import save_reference, tiny_mixtral_config


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("method", ["rtn", "mse", "wmse"])
def test_round_trip(group_size, method):
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    q = quantize_tensor(w, bits=4, group_size=group_size, method=method)
    deq = q.dequantize()
    assert deq.shape == w.shape and deq.dtype == w.dtype
    err = relative_error(w, q)
    assert 0.03 < err < 0.13  # 4 bits of a Gaussian: about 0.08-0.11
    # codes are exact: re-quantizing the dequantized weight is (nearly) a fixed point
    assert relative_error(deq, quantize_tensor(deq, 4, group_size, "rtn")) < err / 3


def test_bits_per_weight():
    w = torch.randn(64, 512)
    for g, bpw in [(32, 5.0), (64, 4.5), (128, 4.25)]:
        q = quantize_tensor(w, group_size=g)
        assert q.bits_per_weight == bpw and q.nbytes == 64 * 512 * bpw / 8
    assert quantize_tensor(w, bits=8).bits_per_weight == 8 + 16 / 512


def test_stored_layout_is_the_documented_one():
    """The 4-bit layout written on disk, spelled out (quant.formats' docstring): the same bytes
    on every machine, whatever layout a kernel there prefers."""
    codes = torch.randint(0, 16, (64, 256), dtype=torch.uint8, generator=torch.Generator())
    packed = pack_int4(codes)
    assert packed.shape == (64, 128) and packed.dtype == torch.uint8
    tiles = packed.view(2, 256, 16)  # (tile, column, byte)
    for t, k, i in [(0, 0, 0), (1, 5, 15), (0, 255, 7), (1, 128, 3)]:
        assert (
            int(tiles[t, k, i]) == int(codes[32 * t + i, k]) | int(codes[32 * t + i + 16, k]) << 4
        )
    assert torch.equal(unpack_int4(packed), codes)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(30, 100), (33, 200), (305, 384), (64, 70)])
def test_any_shape_is_stored_padded(bits, shape):
    n, k = shape
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n)).bfloat16()
    q = quantize_tensor(w, bits=bits, group_size=64)
    n_p, k_p = padded_shape(n, k, bits, 64)
    assert n_p % 32 == 0 and k_p % (64 if bits == 4 else 32) == 0 and n_p >= n and k_p >= k
    assert q.shape == (n, k) and q.qweight.shape == (n_p, k_p // 2 if bits == 4 else k_p)
    assert q.dequantize().shape == (n, k)
    exact = dataclasses.replace(q, dtype=torch.float32)  # no rounding of the result to bf16
    assert q.error == pytest.approx(relative_error(w, exact), rel=1e-3)  # on real entries only
    assert q.error < (0.12 if bits == 4 else 0.01)
    if bits == 4:  # padded rows are exactly zero
        padded = dataclasses.replace(q, shape=(n_p, k_p)).dequantize()
        assert not padded[n:].any()


def test_bad_shapes_and_settings():
    with pytest.raises(QuantError, match="non-empty 2-D"):
        quantize_tensor(torch.randn(0, 64))
    with pytest.raises(QuantError, match="group size"):
        quantize_tensor(torch.randn(64, 256), group_size=48)
    with pytest.raises(QuantError, match="method"):
        quantize_tensor(torch.randn(64, 256), method="gptq")


def quant_layer(w: torch.Tensor, bits: int, group_size: int = 64) -> QuantLinear:
    q = quantize_tensor(w, bits=bits, group_size=group_size)
    layer = QuantLinear(w.shape[1], w.shape[0], bits=bits, group_size=group_size)
    layer.qweight, layer.scales_zeros = q.qweight, q.scales_zeros
    return layer


def check_against_dequantized(layer: QuantLinear) -> None:
    """Every path of `layer` (1 to 200 rows: localmix's kernels take them all, PyTorch's a few,
    and the dequantize path the rest; float32, bfloat16 and float16 activations) against the
    product with its dequantized weight."""
    gen = torch.Generator().manual_seed(layer.out_features)
    ref_w = layer.quantized(torch.float32).dequantize()
    for rows in (1, 3, 40, 200):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(rows, layer.in_features, generator=gen).to(dtype)
            expected = x.float() @ ref_w.t()
            got = layer(x)
            assert got.dtype == dtype and got.shape == (rows, layer.out_features)
            err = float((got.float() - expected).abs().max() / expected.abs().max())
            assert err < (1e-5 if dtype == torch.float32 else 0.02), (rows, dtype, err)


@pytest.mark.parametrize("own_kernels", ["1", "0"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(128, 256), (100, 200)])
def test_quant_linear_kernels_match_dequantized(bits, own_kernels, shape, monkeypatch):
    """localmix's kernels, or PyTorch's on a layout PyTorch packed on this machine."""
    monkeypatch.setenv(ENV_SWITCH, own_kernels)
    check_against_dequantized(quant_layer(torch.randn(*shape).bfloat16(), bits))


PYTORCH_KERNELS_CHECK = """
import torch
from tests.test_quant import check_against_dequantized, quant_layer
print(torch.backends.cpu.get_cpu_capability())
for bits in (4, 8):
    for shape in ((96, 256), (100, 200)):
        check_against_dequantized(quant_layer(torch.randn(*shape).bfloat16(), bits))
"""


def test_pytorch_kernels_right_under_every_dispatch_this_cpu_has(tmp_path):
    """PyTorch's CPU int4 kernel wants a different layout under each of its dispatch levels
    (scalar, AVX2, AVX-512). ATEN_CPU_CAPABILITY picks the level in a fresh process, so each
    one this CPU can run is checked here, whichever CPU runs the suite."""
    levels = ["default", "avx2"] + (["avx512"] if "avx512bw" in cpu_features() else [])
    root = Path(__file__).resolve().parents[1]
    for level in levels:
        env = dict(os.environ, ATEN_CPU_CAPABILITY=level, **{ENV_SWITCH: "0"})
        r = subprocess.run(
            [sys.executable, "-c", PYTORCH_KERNELS_CHECK],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, (level, r.stderr[-3000:])
        assert r.stdout.split()[0] == level.upper(), r.stdout


def int8_activations(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x rounded as the kernels round 16-bit activations: int8 codes per group of columns,
    scaled by the group's max |x| / 127 (float32 arithmetic, ties to even)."""
    groups = x.float().view(x.shape[0], -1, group_size)
    amax = groups.abs().amax(-1, keepdim=True)
    dx = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return (torch.round(groups / dx) * dx).view(x.shape)


def int4_reference(x: torch.Tensor, q, group_size: int) -> torch.Tensor:
    """Float64 sum of (code - 8) * scale * x' + zero * x over each group, x' the int8-rounded
    activations for 16-bit x (x itself for float32): what the 4-bit kernel computes."""
    n, k = q.shape
    codes = unpack_int4(q.qweight).double().view(n, k // group_size, group_size)
    scale = q.scales_zeros[..., 0].double().t()[..., None]  # (out, groups, 1)
    zero = q.scales_zeros[..., 1].double().t()  # (out, groups)
    centered = ((codes - 8) * scale).view(n, k)
    xr = x.double() if x.dtype == torch.float32 else int8_activations(x, group_size).double()
    xsum = x.double().view(x.shape[0], -1, group_size).sum(-1)  # (rows, groups)
    return xr @ centered.t() + xsum @ zero.t()


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_own_cpu_kernels_compute_what_they_promise(group_size):
    """localmix's AVX2 kernels against float64 math: 1..5 rows (the one- and two-row float paths
    and a remainder), bf16 activations (rounded to int8 per weight group in the 4-bit kernel,
    per 32 columns in the 8-bit one) and fp32 ones (exact), float32 summation and bf16 rounding
    of the result the only differences."""
    kernels = cpu_kernels()
    assert kernels is not None, unavailable_reason()  # CI machines have AVX2 and a compiler
    gen = torch.Generator().manual_seed(group_size)
    w = torch.randn(96, 384, generator=gen).bfloat16()
    q4, q8 = quantize_tensor(w, group_size=group_size), quantize_tensor(w, bits=8)
    w8 = dataclasses.replace(q8, dtype=torch.float32).dequantize().double()

    def rounded(x, block):  # the 8-bit kernel rounds 16-bit activations per 32 columns
        return x.double() if x.dtype == torch.float32 else int8_activations(x, block).double()

    for rows in (1, 2, 5):
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(rows, 384, generator=gen).to(dtype)
            for got, expected in [
                (
                    kernels.int4_mm(x, q4.qweight, q4.scales_zeros, group_size),
                    int4_reference(x, q4, group_size),
                ),
                (kernels.int8_mm(x, q8.qweight, q8.scales_zeros), rounded(x, 32) @ w8.t()),
            ]:
                assert got.dtype == dtype and got.shape == (rows, 96)
                tol = 1e-5 if dtype == torch.float32 else 2**-8
                atol = tol * float(expected.abs().max())
                torch.testing.assert_close(got.double(), expected, rtol=tol, atol=atol)
    # the 8-bit kernel over a width that is not a multiple of its 64-column step
    w = torch.randn(96, 416, generator=gen).bfloat16()
    q8 = quantize_tensor(w, bits=8)
    w8 = dataclasses.replace(q8, dtype=torch.float32).dequantize().double()
    for rows in (1, 3):
        x = torch.randn(rows, 416, generator=gen).bfloat16()
        expected = rounded(x, 32) @ w8.t()
        got = kernels.int8_mm(x, q8.qweight, q8.scales_zeros).double()
        torch.testing.assert_close(
            got, expected, rtol=2**-8, atol=2**-8 * float(expected.abs().max())
        )
    # and the int8 rounding of 16-bit activations stays small against the exact product
    x = torch.randn(1, 384, generator=gen).bfloat16()
    exact = x.double() @ dataclasses.replace(q4, dtype=torch.float32).dequantize().double().t()
    got = kernels.int4_mm(x, q4.qweight, q4.scales_zeros, group_size).double()
    assert (got - exact).norm() < 0.015 * exact.norm()
    with pytest.raises(RuntimeError, match="activations"):
        kernels.int4_mm(torch.randn(1, 100), q4.qweight, q4.scales_zeros, group_size)


@pytest.mark.parametrize("method", ["wmse", "mse"])
def test_kernel_fit_is_the_python_fit(method, monkeypatch):
    """The converter fits scales in C++ where localmix's kernels exist; the PyTorch version
    stays as the reference and the fallback. Summation order may differ, so a rare group may
    round to a different bf16 scale; the fit's quality may not."""
    mats = minilm_matrices()[:8]
    groups = torch.cat([w.float().reshape(-1, 64) for w in mats])
    fast = fit_groups(groups, method)
    monkeypatch.setenv(ENV_SWITCH, "0")
    slow = fit_groups(groups, method)
    same = ((fast[0] == slow[0]) & (fast[1] == slow[1])).float().mean()
    assert same > 0.999, same

    def error(scale, zero):
        return float(((int4_codes(groups, scale, zero) - 8) * scale + zero - groups).norm())

    assert abs(error(*fast) - error(*slow)) < 1e-4 * error(*slow)


def test_kernels_that_cannot_be_built_say_why(tmp_path, monkeypatch):
    """A failed build (no compiler, a broken toolchain) or a CPU without AVX2 gives no module
    and a reason, never an exception; QuantLinear then runs PyTorch's kernels (tested above
    with the kernels switched off). Separate build names keep the real build untouched."""
    broken = tmp_path / "broken.cpp"
    broken.write_text("#error no compiler here\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    module, why = kernels_module.build(broken, "localmix_test_broken")
    assert module is None and why.startswith("could not be built")


def test_a_build_killed_outright_does_not_block_the_next(tmp_path):
    """A build killed outright leaves PyTorch's `lock` file, on which every later build would
    wait without end; the next build clears it and goes on (here, to a broken source's quick
    failure). Run in a child process, so that a regression times out instead of hanging."""
    broken = tmp_path / "broken.cpp"
    broken.write_text("#error no compiler here\n")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    name = "localmix_test_stale_lock"
    code = (
        "import sys; from localmix.quant import kernels\n"
        f"lock = kernels.build_directory({name!r}) / 'lock'\n"
        "lock.parent.mkdir(parents=True); lock.touch()  # what a killed build leaves\n"
        f"module, why = kernels.build(__import__('pathlib').Path({str(broken)!r}), {name!r})\n"
        "print(module is None, why.startswith('could not be built'), lock.exists())\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True", "False"]


def test_kernels_are_chosen_by_the_cpu_that_runs_them(monkeypatch):
    """The features are read from the CPU at run time: on one without AVX2 and FMA the built
    module is not used (loading it could execute instructions the CPU lacks), the reason says
    what is missing, and products stay right on PyTorch's kernels."""
    assert cpu_kernels() is not None
    assert "avx2" in kernels_module.describe() and "fma" in kernels_module.describe()
    monkeypatch.setattr(kernels_module, "cpu_features", lambda: frozenset({"sse2", "avx"}))
    assert cpu_kernels() is None
    assert unavailable_reason() == "the CPU lacks AVX2 and FMA"
    assert kernels_module.describe().startswith("PyTorch int4/int8 kernels")
    check_against_dequantized(quant_layer(torch.randn(64, 128).bfloat16(), 4))


def quant_linear(w: torch.Tensor, bits: int = 4) -> QuantLinear:
    q = quantize_tensor(w, bits=bits, group_size=32)
    layer = QuantLinear(w.shape[1], w.shape[0], bits=bits, group_size=32)
    layer.qweight, layer.scales_zeros = q.qweight, q.scales_zeros
    return layer


def test_fused_expert_equals_three_products(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    w1, w3 = (quant_linear(torch.randn(192, 128, generator=gen)) for _ in range(2))
    w2 = quant_linear(torch.randn(128, 192, generator=gen))
    expert = QuantExpert(w1, w2, w3)
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 0.03)]:
        x = torch.randn(3, 128, generator=gen).to(dtype)
        fused = expert(x)
        assert expert.chosen is QuantExpert.fused and fused.dtype == dtype
        separate = w2(torch.nn.functional.silu(w1(x).float()) * w3(x).float())
        assert (fused.float() - separate.float()).abs().max() < tol * separate.abs().max()
    # not applicable: an 8-bit layer in the chain, or localmix's kernels switched off
    assert not QuantExpert.fits(w1, quant_linear(torch.randn(128, 192), bits=8), w3)
    monkeypatch.setenv(ENV_SWITCH, "0")
    expert = QuantExpert(w1, w2, w3)
    expert(x)
    assert expert.chosen is not QuantExpert.fused


def test_optimised_methods_beat_round_to_nearest_on_trained_weights():
    mats = minilm_matrices()
    assert len(mats) >= 30

    def mean_error(method):
        return sum(relative_error(w, quantize_tensor(w, method=method)) for w in mats) / len(mats)

    rtn, mse, wmse = mean_error("rtn"), mean_error("mse"), mean_error(DEFAULT_METHOD)
    # measured: rtn 0.0937, mse 0.0864, wmse (the default) 0.0882; HQQ reaches 0.0897
    assert DEFAULT_METHOD == "wmse"
    assert mse < wmse < rtn - 0.004, (mse, wmse, rtn)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("src")
    save_reference(
        path,
        tiny_mixtral_config(experts=4, hidden=128, intermediate=256),
        max_shard_size="300KB",
        dtype=torch.bfloat16,
    )
    return path


def tree(path: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(path.iterdir())
        if p.is_file() and p.name not in ("localmix.json", ".localmix-progress.json")
    }


def test_converted_model_loads_and_stays_close(source, tmp_path):
    manifest = convert(source, tmp_path / "q")
    assert manifest["format_version"] == 2 and manifest["quantization"]["group_size"] == 64
    assert set(manifest["source"]["files"]) == {p.name for p in source.glob("*.safetensors")}
    assert all(len(f["sha256"]) == 64 for f in manifest["source"]["files"].values())
    assert 0 < manifest["error_summary"]["expert_mean_relative_error"] < 0.12
    q = localmix.load(tmp_path / "q", device="cpu")
    ref = localmix.load(source, device="cpu")
    layer = q.model.layers[0].block_sparse_moe.experts[1].w1
    assert isinstance(layer, QuantLinear) and layer.qweight.dtype == torch.uint8
    # the default trunk: attention and head in 8 bits (by measurement, bench_nano)
    assert manifest["quantization"]["attn"] == "int8"
    assert manifest["quantization"]["lm_head"] == "int8"
    for trunk in (q.model.layers[0].self_attn.q_proj, q.model.lm_head):
        assert isinstance(trunk, QuantLinear) and trunk.bits == 8
    ids = list(range(3, 40))
    lq, lr = q.logits(ids), ref.logits(ids)
    kl = torch.nn.functional.kl_div(
        lq.log_softmax(-1), lr.log_softmax(-1), log_target=True, reduction="batchmean"
    )
    assert kl < 0.05
    assert q.complete("x", max_tokens=5, temperature=0).generated_tokens == 5
    # the quantized files keep each expert's tensors adjacent
    from localmix.quant.safetensors_io import read_header

    names = []
    for shard in sorted((tmp_path / "q").glob("model-*.safetensors")):
        infos, _ = read_header(shard)
        names += [i.name for i in sorted(infos.values(), key=lambda i: i.start)]
    for i, n in enumerate(names):
        if n.endswith("experts.0.w1.qweight"):
            base = n.removesuffix("w1.qweight")
            assert names[i : i + 6] == [
                base + s
                for s in (
                    "w1.qweight",
                    "w1.scales_zeros",
                    "w3.qweight",
                    "w3.scales_zeros",
                    "w2.qweight",
                    "w2.scales_zeros",
                )
            ]
            break
    else:
        raise AssertionError("no expert found")


def test_own_kernels_and_pytorchs_give_the_same_logits(source, tmp_path, monkeypatch):
    convert(source, tmp_path / "q", Settings(attn="int8", method="rtn"))
    q = localmix.load(tmp_path / "q", device="cpu", dtype="bf16")
    assert q.kernels().startswith("localmix AVX2+FMA kernels")
    assert localmix.load(source, device="cpu").kernels() == ""  # nothing quantized
    ids = list(range(3, 11))  # 8 rows: every quantized matmul takes a kernel path
    ours = q.logits(ids).float()
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert q.kernels().startswith("PyTorch int4/int8 kernels")
    theirs = q.logits(ids).float()
    assert (ours - theirs).abs().max() < 0.03 * theirs.abs().max()


def test_a_model_of_any_shape_converts_and_runs(tmp_path, monkeypatch):
    """Widths that are multiples of neither 32 nor the group size (hidden 72, experts of 100, a
    vocabulary of 2000 rows under an 8-bit head): stored padded, run unpadded, and as close to
    the unquantized model as an aligned one."""
    src = tmp_path / "odd"
    config = tiny_mixtral_config(hidden=72, intermediate=100, heads=4)
    save_reference(src, config, dtype=torch.bfloat16)
    manifest = convert(src, tmp_path / "q", Settings(attn="int8", lm_head="int8"))
    assert manifest["format_version"] == 2
    from localmix.quant.safetensors_io import read_header

    infos, meta = read_header(next((tmp_path / "q").glob("model-*.safetensors")))
    shapes = json.loads(meta[SHAPES_KEY])
    assert shapes["model.layers.0.block_sparse_moe.experts.0.w2"] == [72, 100]
    assert infos["model.layers.0.block_sparse_moe.experts.0.w2.qweight"].shape == (96, 64)
    assert shapes["lm_head"] == [2000, 72]
    assert infos["lm_head.qweight"].shape == (2016, 96)
    q = localmix.load(tmp_path / "q", device="cpu")
    ref = localmix.load(src, device="cpu")
    ids = list(range(3, 40))
    for own in ("1", "0"):
        monkeypatch.setenv(ENV_SWITCH, own)
        lq, lr = q.logits(ids), ref.logits(ids)
        assert lq.shape == lr.shape == (len(ids), 2000)
        kl = torch.nn.functional.kl_div(
            lq.log_softmax(-1), lr.log_softmax(-1), log_target=True, reduction="batchmean"
        )
        assert kl < 0.05, (own, kl)


def test_version_1_models_load_as_they_are(source, tmp_path):
    """Version 1 stored the same layout without padding (every shape it took was aligned), so a
    model quantized by an older localmix loads unchanged and computes the same logits."""
    convert(source, tmp_path / "q", Settings(method="rtn"))
    ids = list(range(3, 20))
    now = localmix.load(tmp_path / "q", device="cpu").logits(ids)
    manifest_path = tmp_path / "q" / "localmix.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 1
    manifest["quantization"]["layout"] = "int4-cpu-tiled32"
    manifest_path.write_text(json.dumps(manifest))
    assert torch.equal(localmix.load(tmp_path / "q", device="cpu").logits(ids), now)


def test_trunk_format_options(source, tmp_path):
    """Attention and head as asked: 16-bit kept as nn.Linear, 4-bit grouped, 8-bit."""
    convert(source, tmp_path / "q", Settings(attn="bf16", lm_head="int4", method="rtn"))
    q = localmix.load(tmp_path / "q", device="cpu")
    assert not isinstance(q.model.layers[0].self_attn.q_proj, QuantLinear)
    assert isinstance(q.model.lm_head, QuantLinear) and q.model.lm_head.bits == 4
    assert q.complete("x", max_tokens=3, temperature=0).generated_tokens == 3
    convert(source, tmp_path / "q4", Settings(attn="int4", lm_head="int8", method="rtn"))
    q = localmix.load(tmp_path / "q4", device="cpu")
    assert q.model.layers[0].self_attn.o_proj.bits == 4 and q.model.lm_head.bits == 8
    assert q.complete("x", max_tokens=3, temperature=0).generated_tokens == 3
    with pytest.raises(ConvertError, match="bf16, int8, int4"):
        check_settings(Settings(attn="int2"))


def test_resume_after_crash_is_byte_identical(source, tmp_path, monkeypatch):
    import localmix.quant.convert as conv

    calls = {"n": 0, "crash_at": None}
    real = conv.quantize_tensor

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == calls["crash_at"]:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(conv, "quantize_tensor", crashing)
    clean = tmp_path / "clean"
    convert(source, clean, Settings(method="rtn"))
    calls["crash_at"] = calls["n"] + calls["n"] * 3 // 4  # in the last shard of the next run

    crashed = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        convert(source, crashed, Settings(method="rtn"))
    assert not (crashed / "localmix.json").exists()
    progress_file = json.loads((crashed / ".localmix-progress.json").read_text())
    assert len(progress_file["shards"]) >= 1  # some shards finished before the crash
    assert not list(crashed.glob(".*.tmp"))
    with pytest.raises(localmix.LocalmixError, match="unfinished quantization"):
        localmix.load(crashed, device="cpu")
    monkeypatch.setattr(conv, "quantize_tensor", real)
    progress = []
    convert(source, crashed, Settings(method="rtn"), progress=lambda d, t, w: progress.append(w))
    assert any("already done" in w for w in progress)
    assert tree(crashed) == tree(clean)


def test_truncated_source_is_refused_and_nothing_written(source, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    victim = sorted(source.glob("*.safetensors"))[1].name
    for p in source.iterdir():
        data = p.read_bytes()
        (broken / p.name).write_bytes(data[:-64] if p.name == victim else data)
    before = {p.name: p.read_bytes() for p in broken.iterdir()}
    with pytest.raises(ConvertError, match=f"{victim}: corrupt or truncated"):
        convert(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert {p.name: p.read_bytes() for p in broken.iterdir()} == before


def test_foreign_destination_is_refused(source, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match="not a localmix conversion"):
        convert(source, foreign)
    other = tmp_path / "other"
    convert(source, other, Settings(method="rtn"))
    with pytest.raises(ConvertError, match="different model or settings"):
        convert(source, other, Settings(method="rtn", group_size=32))
    assert (foreign / "notes.txt").read_text() == "mine"


def test_quantize_command(source, tmp_path):
    from typer.testing import CliRunner

    r = CliRunner().invoke(
        app,
        ["quantize", str(source), str(tmp_path / "cq"), "--method", "rtn", "--group-size", "128"],
    )
    assert r.exit_code == 0, r.output
    assert "relative error mean" in r.stderr
    manifest = json.loads((tmp_path / "cq" / "localmix.json").read_text())
    assert manifest["quantization"]["group_size"] == 128
