"""`localmix export`: the exported checkpoint read back by compressed-tensors' own dequantizer and
run by transformers, against localmix's weights and logits; and what the export refuses.

What the export changes, and so the tolerances here: compressed-tensors holds an integer zero
point where localmix's is a float. Each group moves to a grid through 0.0 whose root-mean-square
difference from localmix's group is at most half the group's scale (quant.export); the weights
themselves come out as `(code - zero_point) * scale`, rounded to the scale's dtype by the
dequantizer, bit for bit as quant.export computes them.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from localmix.cli.main import app
from localmix.quant.convert import convert
from localmix.quant.export import RECORD, export, integer_zero_point, localmix_parts
from localmix.quant.formats import QuantError, QuantizedTensor
from localmix.quant.manifest import MANIFEST, PROGRESS, SHAPES_KEY, Settings, plan_bits
from localmix.quant.names import EXPERT_WEIGHT_RE
from safetensors import safe_open
from typer.testing import CliRunner

import localmix
from localmix.demo import nano_path
from tests.helpers import save_reference, tiny_mixtral_config

pytest.importorskip("compressed_tensors")
from compressed_tensors.entrypoints.convert import (  # noqa: E402
    CompressedTensorsDequantizer,
    convert_checkpoint,
)

runner = CliRunner()


def decompress(exported, out):
    """compressed-tensors' own reader: the exported directory dequantized to a float32
    Hugging Face checkpoint in `out`, on the CPU; returns its tensors."""
    dequantizer = CompressedTensorsDequantizer(exported, dtype=torch.float32)
    convert_checkpoint(exported, out, dequantizer, max_workers=1, device="cpu")
    return read_tensors(out)


def read_tensors(folder):
    tensors, shapes = {}, {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            shapes.update(json.loads((f.metadata() or {}).get(SHAPES_KEY, "{}")))
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors, shapes


def localmix_weights(quantized):
    """Every expert weight as a QuantizedTensor, and every other tensor of a converted model
    (a quantized attention projection or head dequantized, as the export writes it)."""
    settings = Settings.of(json.loads((quantized / MANIFEST).read_text())["quantization"])
    tensors, shapes = read_tensors(quantized)
    experts, others = {}, {}
    for name, t in tensors.items():
        if name.endswith(".qweight"):
            base = name.removesuffix(".qweight")
            bits = plan_bits(f"{base}.weight", settings)
            q = QuantizedTensor(
                t,
                tensors[f"{base}.scales_zeros"],
                tuple(shapes[base]),
                torch.bfloat16,
                bits,
                settings.group_size if bits == 4 else 0,
                "",
            )
            if EXPERT_WEIGHT_RE.match(f"{base}.weight"):
                experts[f"{base}.weight"] = q
            else:
                others[f"{base}.weight"] = q.dequantize()
        elif not name.endswith(".scales_zeros"):
            others[name] = t
    return experts, others


def check_weights(quantized, dense):
    """Every decompressed weight against localmix's; returns the mean relative change."""
    experts, others = localmix_weights(quantized)
    assert set(dense) == set(experts) | set(others)
    for name, t in others.items():  # the trunk stays as localmix keeps it, bit for bit
        assert torch.equal(dense[name], t.float()), name
    changes = []
    for name, q in experts.items():
        got = dense[name]
        iz = integer_zero_point(q)
        # exactly what the export says the weight is, rounded to the scale's dtype
        assert torch.equal(got, iz.dequantize().to(iz.scale.dtype).float()), name
        ours = q.dequantize().float()  # localmix's dequantize(), in the model's bf16
        _, scale, _ = localmix_parts(q)
        n, k = q.shape
        # per group: root-mean-square difference at most half the scale (with bf16 rounding)
        diff = (got - ours).view(n, -1, q.group_size)
        rms = diff.pow(2).mean(-1).sqrt()
        bound = scale / 2 + ours.abs().view(n, -1, q.group_size).amax(-1) * 2**-7
        assert bool((rms <= bound).all()), name
        changes.append(float(torch.linalg.norm(got - ours) / torch.linalg.norm(ours)))
    return sum(changes) / len(changes)


def transformers_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def drift(a, b):
    """Mean KL(a || b) of the next-token distributions, per token."""
    pa, pb = a.log_softmax(-1), b.log_softmax(-1)
    return float((pa.exp() * (pa - pb)).sum(-1).mean())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    save_reference(root / "src", tiny_mixtral_config(), dtype=torch.bfloat16)
    return root


@pytest.mark.parametrize("group_size", [32, 64])
def test_tiny_export_read_by_compressed_tensors_and_transformers(tiny, tmp_path, group_size):
    quantized = tmp_path / "q"
    convert(tiny / "src", quantized, Settings(group_size=group_size))
    record = export(quantized, tmp_path / "ct")
    out = tmp_path / "ct"
    assert record["format"] == "compressed-tensors"
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert weights["group_size"] == group_size and weights["symmetric"] is False
    assert json.loads((out / RECORD).read_text())["expert_change"] == record["expert_change"]
    packed, _ = read_tensors(out)
    w1 = "model.layers.0.block_sparse_moe.experts.0.w1"
    assert packed[f"{w1}.weight_packed"].dtype == torch.int32
    assert packed[f"{w1}.weight_packed"].shape == (128, 64 // 8)
    assert packed[f"{w1}.weight_scale"].shape == (128, 64 // group_size)
    assert packed[f"{w1}.weight_zero_point"].shape == (128 // 8, 64 // group_size)
    assert packed[f"{w1}.weight_shape"].tolist() == [128, 64]

    dense, _ = decompress(out, tmp_path / "dense")
    change = check_weights(quantized, dense)
    assert 0 < change < 0.12 and abs(change - record["expert_change"]["mean_relative"]) < 1e-3

    ids = list(range(3, 60))
    ref = transformers_logits(tiny / "src", ids)
    ours = localmix.load(quantized, device="cpu").logits(ids)
    theirs = transformers_logits(tmp_path / "dense", ids)
    # The export moves the model about as much as 4-bit quantization moved it (1.4-1.8x here)
    assert drift(ours, theirs) < 2.5 * drift(ref, ours)


def test_exported_tokenizer_loads_in_transformers(tiny, tmp_path):
    pytest.importorskip("google.protobuf")  # transformers reads tokenizer.model through it
    from transformers import AutoTokenizer

    convert(tiny / "src", tmp_path / "q", Settings(method="rtn"))
    export(tmp_path / "q", tmp_path / "ct")
    text = "def read_config(path):\n    return path"
    theirs = AutoTokenizer.from_pretrained(tmp_path / "ct")
    ours = localmix.load(tmp_path / "q", device="cpu").tokenizer
    assert theirs(text)["input_ids"] == ours.encode(text, bos=True)


@pytest.mark.slow
@pytest.mark.skipif(
    not (nano_path() / "model.safetensors").exists(), reason="nano weights not in this checkout"
)
def test_nano_export_read_by_compressed_tensors_and_transformers(tmp_path):
    quantized = tmp_path / "q"
    convert(nano_path(), quantized, Settings(group_size=64, method="rtn"))
    record = export(quantized, tmp_path / "ct")
    dense, _ = decompress(tmp_path / "ct", tmp_path / "dense")
    change = check_weights(quantized, dense)
    assert 0 < change < 0.12 and record["expert_change"]["tensors"] == 6 * 8 * 3

    text = (nano_path() / "heldout.txt").read_text()[20000:22000]
    engine = localmix.load(quantized, device="cpu")
    ids = engine.tokenizer.encode(text, bos=True)[:256]
    ref = localmix.load(nano_path(), device="cpu").logits(ids)
    ours = engine.logits(ids)
    theirs = transformers_logits(tmp_path / "dense", ids)
    # measured: the export's drift 0.7x the quantization's, 98% of next tokens unchanged
    assert drift(ours, theirs) < 2 * drift(ref, ours)
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() > 0.9


@pytest.fixture(scope="module")
def quantized(tiny):
    convert(tiny / "src", tiny / "q", Settings(method="rtn"))
    return tiny / "q"


def cli(*args):
    return runner.invoke(app, ["export", *map(str, args)])


def refused(result, words):
    assert result.exit_code == 1, result.output
    assert words in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_exports_and_prints_the_change(quantized, tmp_path):
    r = cli(quantized, tmp_path / "out", "--format", "compressed-tensors")
    assert r.exit_code == 0, r.output
    assert "compressed-tensors" in r.stderr and "vllm serve" in r.stderr
    assert (tmp_path / "out" / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_refusals(tiny, quantized, tmp_path):
    refused(cli(tiny / "src", tmp_path / "a"), "not a localmix-quantized model")
    refused(cli(quantized, tmp_path / "b", "--format", "awq"), "unknown format")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    refused(cli(quantized, tmp_path / "full"), "not empty")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert cli(quantized, tmp_path / "empty").exit_code == 0  # an empty directory is fine

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / PROGRESS).write_text("{}")
    refused(cli(unfinished, tmp_path / "c"), "unfinished quantization")
    for settings, words in (
        (Settings(group_size=128, method="rtn"), "whole groups"),  # hidden size 64
    ):
        src = tmp_path / f"q-{settings.attn}-{settings.lm_head}-{settings.group_size}"
        convert(tiny / "src", src, settings)
        refused(cli(src, tmp_path / "d"), words)
        assert not (tmp_path / "d").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("attn, lm_head", [("int8", "int8"), ("int4", "bf16"), ("bf16", "int4")])
def test_a_quantized_trunk_is_exported_as_it_dequantizes(tiny, tmp_path, attn, lm_head):
    """Attention and head quantized by localmix go out in bfloat16, each exactly the weight
    localmix computes with (vLLM reads only the experts quantized); compressed-tensors reads
    the whole export back."""
    quantized = tmp_path / "q"
    convert(tiny / "src", quantized, Settings(attn=attn, lm_head=lm_head, method="rtn"))
    export(quantized, tmp_path / "ct")
    dense, _ = decompress(tmp_path / "ct", tmp_path / "dense")
    check_weights(quantized, dense)
    written, _ = read_tensors(tmp_path / "ct")
    trunk = [n for n in written if ".self_attn." in n or n.startswith("lm_head")]
    assert trunk and all(n.endswith(".weight") for n in trunk)  # no packed trunk tensor
    assert all(written[n].dtype == torch.bfloat16 for n in trunk)


def test_a_failed_export_leaves_nothing(quantized, tmp_path, monkeypatch):
    import localmix.quant.export as export_module

    def broken(path, tensors, metadata):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "write_file", broken)
    with pytest.raises(QuantError, match="No space left"):
        export(quantized, tmp_path / "out")
    assert os.listdir(tmp_path) == []
