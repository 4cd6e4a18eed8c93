"""The importance matrix: what llama.cpp's ``llama-imatrix`` collects, computed with PyTorch, and its file.

:func:`compute_imatrix` sums x² per input column of every linear layer over the calibration text;
``llama_model_quantize`` takes the per-column means (:meth:`ImportanceMatrix.means`).
:func:`write_imatrix` saves it as ``llama-imatrix`` does (``imatrix.gguf``: ``general.type = imatrix``,
per tensor ``NAME.in_sum2`` and ``NAME.counts``), so a published variant ships the matrix it was
quantized with and anyone can quantize again from it with ``llama-quantize --imatrix``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from hubquant.source import SourceModel


@dataclass
class ImportanceMatrix:
    """Sums of x² per input column of every linear layer (GGUF tensor name → float64 array), the
    number of tokens each saw, and the calibration text they came from."""

    sums: dict[str, "np.ndarray"]
    counts: dict[str, int]
    text: str  # the built-in text's name or the file's name
    sha256: str
    tokens: int
    windows: int
    context: int

    def means(self) -> dict[str, "np.ndarray"]:
        """What llama_model_quantize takes: the per-column mean of x²."""
        import numpy as np

        return {name: (self.sums[name] / self.counts[name]).astype(np.float32) for name in self.sums}

    def identity(self, file: str) -> dict[str, Any]:
        """What the manifest and the card say of it."""
        return {
            "file": file,
            "text": self.text,
            "sha256": self.sha256,
            "tokens": self.tokens,
            "windows": self.windows,
            "context": self.context,
        }


def write_imatrix(matrix: ImportanceMatrix, path: Path) -> Path:
    """Save the matrix as ``llama-imatrix`` writes ``imatrix.gguf``: ``general.type = imatrix``, the
    dataset, chunk count and size, and per tensor ``NAME.in_sum2`` (sums of x²) and ``NAME.counts``."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, arch="imatrix")
    writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes none
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", [matrix.text])
    writer.add_uint32("imatrix.chunk_count", matrix.windows)
    writer.add_uint32("imatrix.chunk_size", matrix.context)
    for name in sorted(matrix.sums):
        writer.add_tensor(f"{name}.in_sum2", np.asarray(matrix.sums[name], dtype=np.float32).reshape(1, -1))
        writer.add_tensor(f"{name}.counts", np.array([[matrix.counts[name]]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_imatrix(path: Path) -> dict[str, "np.ndarray"]:
    """The per-column means stored in an ``imatrix.gguf`` (``in_sum2 / counts``), by GGUF tensor name."""
    import gguf
    import numpy as np

    tensors = {t.name: np.array(t.data, dtype=np.float64) for t in gguf.GGUFReader(path).tensors}
    return {
        name.removesuffix(".in_sum2"): (data / tensors[name.removesuffix(".in_sum2") + ".counts"].item()).ravel()
        for name, data in tensors.items()
        if name.endswith(".in_sum2")
    }


def compute_imatrix(source: "SourceModel", *, calibration_text: str | None, context: int) -> ImportanceMatrix:
    """Sum of x² per column at the input of every linear layer, keyed by GGUF tensor name.

    This is what llama.cpp's ``llama-imatrix`` collects (it runs the GGUF model; we run the
    PyTorch one over the same text, whose means agree to cosine ≥ 0.9999).

    Raises:
        ExportError: the calibration text is too short for one window.
    """
    import hashlib

    import gguf
    import torch
    from conversion import ModelType, get_model_architecture, get_model_class

    from hubquant.source import causal_lm_class
    from hubquant.text import BUILTIN_CALIBRATION_TEXT, calibration_windows, read_text

    windows = calibration_windows(source.path, calibration_text, context)
    content = read_text(calibration_text, builtin=BUILTIN_CALIBRATION_TEXT)
    model_arch = get_model_class(get_model_architecture(source.config, ModelType.TEXT)).model_arch
    n_layers = int(source.config.get("num_hidden_layers") or source.config.get("n_layer"))
    names = gguf.get_tensor_name_map(model_arch, n_layers)
    model = causal_lm_class(source).from_pretrained(source.path, dtype=torch.float32)
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def collect(name: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            gguf_name = names.get_name(module_name)
            if gguf_name:
                handles.append(module.register_forward_pre_hook(collect(gguf_name + ".weight")))
    try:
        with torch.inference_mode():
            for window in windows:
                model(input_ids=torch.tensor([window]))
    finally:
        for handle in handles:
            handle.remove()
    del model
    return ImportanceMatrix(
        sums={name: total.numpy() for name, total in sums.items()},
        counts=counts,
        text=Path(calibration_text).name if calibration_text else f"hubquant built-in {BUILTIN_CALIBRATION_TEXT}",
        sha256=hashlib.sha256(content.encode("utf-8")).hexdigest(),
        tokens=sum(len(window) for window in windows),
        windows=len(windows),
        context=context,
    )
