"""hubquant: quantize Microsoft Phi checkpoints into every runtime's format, measure and publish them.

The package root stays import-light: ``hubquant --help`` must not pull in torch, transformers,
llama.cpp, openvino, onnxruntime or mlx. Heavy libraries are imported inside the exporter that uses them.
"""

__version__ = "0.1.0"
