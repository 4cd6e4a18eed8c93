"""hubquant: quantize Microsoft Phi checkpoints into every runtime's format, measure and publish them.

The package root stays import-light: ``hubquant --help`` must not pull in torch, transformers,
llama.cpp, openvino, onnxruntime or mlx. Heavy libraries are imported inside the exporter that uses them.
"""

from hubquant._compat import hide_broken_torchvision as _hide_broken_torchvision

__version__ = "0.1.0"

_hide_broken_torchvision()
