"""The converter's hyperparameters, read in a child: ``python -m hubquant.exporters.gguf_hparams MODEL OUT``.

llama.cpp's converter reads a model's configuration with ``AutoConfig.from_pretrained(…).to_dict()``
(``ModelBase.load_hparams``). For a Phi model that import chain — the config class pulls in
transformers' docstring helpers, the auto model mapping, generation utilities and through them
torch's compiler stack, and whatever those find installed (sympy, pandas, scikit-learn, accelerate…)
— adds ~0.22 GiB to the converting process, which then stays while the tensors are converted (the
conversion's peak) and while hubquant waits for llama.cpp's quantizer child. This child runs the
converter's own ``load_hparams`` and hands the dict back (pickled, so tuples and keys stay what they
were); the converter is then given ``hparams=`` and never imports any of it. OUT holds ``None`` when
the child could not read them; the converter then reads them itself, as before.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hubquant  # noqa: F401 - its import work-arounds first (hubquant._compat)
from hubquant.child import hand_back, python_module, stop
from hubquant.paths import child_environment

if TYPE_CHECKING:
    from hubquant.source import SourceModel

log = logging.getLogger(__name__)


@contextlib.contextmanager
def hparams_from_child(source: SourceModel, output: Path) -> Iterator[Callable[[], dict[str, Any] | None]]:
    """Start :mod:`hubquant.exporters.gguf_hparams` (the converter's ``load_hparams`` in a child, so its
    ~0.22 GiB of transformers imports never enter this process); yield what waits for its answer
    (None: the converter reads them itself). The child is stopped when the block ends early. A process
    that imported transformers' model classes already (an in-process evaluation, a test) gains nothing:
    the converter reads them itself there."""
    if "transformers.models.auto.modeling_auto" in sys.modules:  # this process holds those imports already
        yield lambda: None
        return
    out = output.with_name(f".{output.stem}-hparams.pkl")
    command = python_module("hubquant.exporters.gguf_hparams", str(source.path), str(out))
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_environment())

    def answer() -> dict[str, Any] | None:
        child.wait()
        hparams = pickle.loads(out.read_bytes()) if out.is_file() else None  # our own child's, in our folder
        log.debug("gguf: converter hyperparameters %s", "read in a child" if hparams else "left to the converter")
        return hparams

    try:
        yield answer
    finally:
        stop(child)
        out.unlink(missing_ok=True)
        out.with_suffix(".tmp").unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    model, out = Path(argv[0]), Path(argv[1])
    try:
        from conversion.base import ModelBase

        hparams = ModelBase.load_hparams(model, False)
    except Exception:  # noqa: BLE001 - the converter will read (or fail to read) them itself
        hparams = None
    hand_back(out, pickle.dumps(hparams))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
