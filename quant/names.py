"""Tensor names: a Hugging Face Mixtral checkpoint's, and localmix's own module paths.

A checkpoint nests the trunk under `model.` (`model.layers.3.self_attn.q_proj.weight`,
`model.layers.3.block_sparse_moe.experts.5.w1.weight`) and keeps the output head outside it
(`lm_head.weight`); localmix's modules have the same paths without `model.`. A quantized
weight `NAME.weight` is stored as `NAME.qweight` and `NAME.scales_zeros`.

Every name the converter, the export, the loader and the offloader build or parse is built or
parsed here. No PyTorch: the model store reads names without it.
"""

from __future__ import annotations

import re

PREFIX = "model."  # the trunk's, in the checkpoint
HEAD = "lm_head"
HEAD_WEIGHT = "lm_head.weight"
EMBEDDING = "embed_tokens.weight"  # local; the checkpoint's is PREFIX + EMBEDDING
_EXPERT = r"model\.layers\.\d+\.block_sparse_moe\.experts\.\d+"
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
# Any tensor of an expert: its layer and expert numbers.
EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.")
# An expert's weight matrix: the expert (`model.layers.L.block_sparse_moe.experts.E`) and which.
EXPERT_WEIGHT_RE = re.compile(rf"^({_EXPERT})\.(w[123])\.weight$")
# An expert matrix's stored 4-bit codes: the matrix (`...experts.E.w1`).
EXPERT_QWEIGHT_RE = re.compile(rf"^({_EXPERT}\.w[123])\.qweight$")
ATTN_RE = re.compile(r"^model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight$")
HEAD_RE = re.compile(r"^lm_head\.weight$")
IGNORED_RE = re.compile(r"\.rotary_emb\.inv_freq$")  # a buffer older checkpoints saved
EXPERT_MATRICES = ("w1", "w3", "w2")  # gate, up, down: the order they are stored in
QWEIGHT = ".qweight"
SCALES_ZEROS = ".scales_zeros"
QUANTIZED_SUFFIXES = (QWEIGHT, SCALES_ZEROS)
TRUNK_PARTS = ("embeddings", "attention", "router", "norms", "output head")


def local_name(hf_name: str) -> str:
    """Our module path for a checkpoint tensor name (the checkpoint nests the trunk in `model.`)."""
    return hf_name.removeprefix(PREFIX)


def checkpoint_name(local: str) -> str:
    """The checkpoint's name of a local tensor name (the inverse of `local_name`)."""
    return local if local.startswith(HEAD) else PREFIX + local


def hf_name(local: str) -> str:
    """The checkpoint's name of a local module's weight."""
    return checkpoint_name(local) + ".weight"


def expert_weights(expert: str) -> list[str]:
    """The weight names of an expert (`model.layers.L.block_sparse_moe.experts.E`), in the
    order they are stored."""
    return [f"{expert}.{w}.weight" for w in EXPERT_MATRICES]


def quantized_base(name: str) -> str:
    """`NAME` of a weight `NAME.weight` or a stored `NAME.qweight` / `NAME.scales_zeros`."""
    for suffix in (".weight", *QUANTIZED_SUFFIXES):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def trunk_part(local: str) -> str | None:
    """Which of the TRUNK_PARTS a local parameter or buffer belongs to, None for an expert's
    or the rotary embedding's."""
    if ".experts." in local or local.startswith("rotary"):
        return None
    if local.startswith("embed_tokens"):
        return "embeddings"
    if ".self_attn." in local:
        return "attention"
    if ".gate." in local:
        return "router"
    if local.startswith(HEAD):
        return "output head"
    return "norms"
