"""The source in PyTorch, computed in float32 on CPU: the reference every variant is compared with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hubquant.exporters.base import Runner

if TYPE_CHECKING:
    import numpy as np

    from hubquant.source import SourceModel


def available_memory() -> int | None:
    """Bytes the system can still give (``MemAvailable``), None where /proc/meminfo is absent."""
    from hubquant.planner import meminfo

    return meminfo("MemAvailable")


def reference_weights(source: SourceModel, requested: str = "auto") -> tuple[str, str]:
    """How the reference holds its weights, and why: ``fp32`` or ``source`` (the checkpoint's dtype).

    The reference always computes in float32. ``fp32`` widens every weight once (4 bytes per
    parameter: 15.3 GB for Phi-3.5-mini); ``source`` keeps the linear layers' weights as stored
    (2 bytes for bf16) and widens each one as its layer runs. Widening bf16/f16 to float32 is
    exact, so both give the same logits; ``source`` costs the widening on every forward pass.
    ``auto`` takes fp32 when it fits in 80% of the memory available now.
    """
    if requested != "auto":
        return requested, "asked for"
    if source.dtype == "float32":
        return "fp32", "the checkpoint is float32"
    need = source.parameter_count * 4 * 1.1
    free = available_memory()
    if free is None or need <= 0.8 * free:
        return "fp32", f"a float32 copy ({need / 2**30:.1f} GiB) fits in memory"
    return "source", (
        f"a float32 copy ({need / 2**30:.1f} GiB) would not fit in 80% of the "
        f"{free / 2**30:.1f} GiB available; weights stay {source.dtype}, computed in float32"
    )


class TorchRunner(Runner):
    """The unquantized source in PyTorch, computed in float32 on CPU: the reference every variant is
    compared with. ``weights`` says how it holds the weights (see :func:`reference_weights`)."""

    def __init__(self, source: SourceModel, *, weights: str = "fp32") -> None:
        import torch

        from hubquant.source import causal_lm_class

        self._torch = torch
        model_class = causal_lm_class(source)
        if weights == "source" and source.dtype in ("bfloat16", "float16"):
            self._model = model_class.from_pretrained(source.path, dtype=getattr(torch, source.dtype))
            _widen_all_but_linear_weights(self._model)
        else:
            self._model = model_class.from_pretrained(source.path, dtype=torch.float32)
        self._model.eval()
        self._past: Any = None

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        with self._torch.inference_mode():
            out = self._model(input_ids=self._torch.tensor([list(ids)])).logits[0]
        return out.float().numpy()

    def prefill(self, ids: Sequence[int], *, room: int) -> int:
        return self._next(self._torch.tensor([list(ids)]), None)

    def step(self, token: int) -> int:
        return self._next(self._torch.tensor([[token]]), self._past)

    def _next(self, ids: Any, past: Any) -> int:
        with self._torch.inference_mode():
            out = self._model(input_ids=ids, past_key_values=past, use_cache=True)
        self._past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def close(self) -> None:
        del self._model


def _widen_all_but_linear_weights(model: Any) -> None:
    """float32 activations everywhere; linear weights stay 16-bit and are widened as each layer runs."""
    import functools

    import torch

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    narrow = {id(m.weight) for m in linears} - embedded  # a weight tied to an embedding is widened once
    for parameter in model.parameters():
        if id(parameter) not in narrow and parameter.is_floating_point():
            parameter.data = parameter.data.float()
    for buffer in model.buffers():
        if buffer.is_floating_point():
            buffer.data = buffer.data.float()

    def forward(module: Any, x: Any) -> Any:
        bias = None if module.bias is None else module.bias.float()
        return torch.nn.functional.linear(x, module.weight.float(), bias)

    for module in linears:
        module.forward = functools.partial(forward, module)
    model.config.dtype = torch.float32
