"""Skip the ONNX builder's whole-graph quantizer pass when it has nothing left to quantize.

onnxruntime-genai 0.18's builder saves an int4/int8 model through ``Model.to_nbits``: it serialises
the whole graph to a protobuf (``ir.to_proto``, a second copy of every weight), runs ONNX Runtime's
MatMulNBits quantizer over it, and parses the result back (``ir.from_proto``). Fed hubquant's
prequantized checkpoint with the LM head quantized too (:mod:`hubquant.exporters.onnx_prequant`),
every MatMul is already a ``MatMulNBits``: the pass quantizes nothing, and what it returns is the
graph it was given, after holding it twice. That second copy is the builder's peak: 5.6 GiB of
anonymous memory at the Phi-3.5-mini shape and more than 20 GiB at Phi-4's.

:func:`install` wraps ``to_nbits`` so that, when no node is left for the quantizer (no MatMul or
Gather of the quantized op types with a constant weight outside ``nodes_to_exclude``), on a CPU
target and without per-node overrides, it returns the graph itself. In every other case the
builder's own pass runs unchanged. ``tests/test_onnx.py`` checks that the route's MatMulNBits
bytes and logits equal the builder's direct route. ``HUBQUANT_ONNX_FULL_PASS=1`` turns it off.
"""

from __future__ import annotations

import os
from typing import Any

#: The weight input of each op type the quantizer takes.
WEIGHT_INPUT = {"MatMul": 1, "Gather": 0}


def pending_nodes(builder: Any) -> list[str]:
    """Names of the nodes the builder's quantizer pass would quantize."""
    attrs = builder.quant_attrs
    op_types = set(attrs["op_types_to_quantize"])
    excluded = set(attrs["nodes_to_exclude"])
    pending = []
    for node in builder.model.graph:
        index = WEIGHT_INPUT.get(node.op_type)
        if node.op_type not in op_types or index is None or node.name in excluded:
            continue
        inputs = node.inputs
        if len(inputs) > index and inputs[index] is not None and inputs[index].const_value is not None:
            pending.append(node.name)
    return pending


def nothing_to_quantize(builder: Any) -> bool:
    """True when the builder's ``to_nbits`` would return its graph unchanged."""
    overrides = getattr(builder, "exact_quant_override_names", None) or getattr(builder, "exact_quant_overrides", None)
    if builder.ep != "cpu" or overrides or getattr(builder, "int4_customized_weight_config", None):
        return False
    return not pending_nodes(builder)


def install() -> bool:
    """Wrap the builder's ``Model.to_nbits`` (once); False when turned off or the builder is absent."""
    if os.environ.get("HUBQUANT_ONNX_FULL_PASS") == "1":
        return False
    try:
        import onnxruntime_genai.models  # noqa: F401 - puts the builder's folder on sys.path

        # The builder script imports its classes as the top-level package ``builders``, a module
        # apart from ``onnxruntime_genai.models.builders``: patch the one it runs.
        from builders.base import Model  # type: ignore[import-not-found]
    except ImportError:
        return False
    original = Model.to_nbits
    if getattr(original, "_hubquant_lean", False):
        return True

    def to_nbits(self: Any) -> Any:
        if nothing_to_quantize(self):
            print("hubquant: every MatMul is prequantized; skipping the builder's whole-graph quantizer pass")
            return self.model
        return original(self)

    to_nbits._hubquant_lean = True  # type: ignore[attr-defined]
    Model.to_nbits = to_nbits
    return True
