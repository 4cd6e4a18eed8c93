"""Tensor-type recipes for GGUF: which llama.cpp type each tensor gets beyond the file type's own choice.

llama-quantize lets a publisher choose the token-embedding type (``--token-embedding-type``), the
output tensor's type (``--output-tensor-type``) and ordered ``regex=TYPE`` overrides per tensor
(``--tensor-type``); ``llama_model_quantize`` takes the same three through its parameters
(``token_embedding_type``, ``output_tensor_type``, ``tt_overrides``). hubquant passes them there and
never rewrites a tensor itself.

The "_L" family that GGUF publishers use (bartowski, lmstudio-community) is a K-quant with the token
embeddings and the output in Q8_0: :data:`PRESETS` names them as those publishers do, each with its
own file name and card row.

Tied embeddings (Phi-4-mini): there is no ``output.weight``; ``token_embd.weight`` is the output too.
llama.cpp then gives that one tensor the token-embedding type when one is set, else the output type.
hubquant applies the one that is set to the shared tensor, and refuses two different ones, since
one of them could only be ignored (:func:`resolve_for_model`).

Nothing here imports llama.cpp: recipes are checked before any work starts.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from hubquant.errors import ExportError, RecipeError

#: Tensor types llama.cpp quantizes to (``ggml_type`` names), for the per-tensor options.
TENSOR_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q6_K",
    "Q5_K",
    "Q5_0",
    "Q5_1",
    "Q4_K",
    "Q4_0",
    "Q4_1",
    "Q3_K",
    "Q2_K",
    "IQ4_XS",
    "IQ4_NL",
    "IQ3_S",
    "IQ3_XXS",
    "IQ2_S",
    "IQ2_XS",
    "IQ2_XXS",
    "IQ1_M",
    "IQ1_S",
    "TQ2_0",
    "TQ1_0",
)

#: Every type llama_model_quantize writes, with llama-quantize's own descriptions.
QUANTIZE_TYPES = {
    "Q4_0": "4.5 bpw legacy",
    "Q4_1": "5.0 bpw legacy",
    "Q5_0": "5.5 bpw legacy",
    "Q5_1": "6.0 bpw legacy",
    "Q2_K": "2.96 bpw K-quant",
    "Q2_K_S": "2.96 bpw K-quant (needs imatrix)",
    "Q3_K_S": "3.41 bpw K-quant",
    "Q3_K_M": "3.74 bpw K-quant",
    "Q3_K_L": "4.03 bpw K-quant",
    "Q4_K_S": "4.37 bpw K-quant",
    "Q4_K_M": "4.58 bpw K-quant (the usual default)",
    "Q5_K_S": "5.21 bpw K-quant",
    "Q5_K_M": "5.33 bpw K-quant",
    "Q6_K": "6.56 bpw K-quant",
    "IQ1_S": "1.56 bpw (needs imatrix)",
    "IQ1_M": "1.75 bpw (needs imatrix)",
    "IQ2_XXS": "2.06 bpw (needs imatrix)",
    "IQ2_XS": "2.31 bpw (needs imatrix)",
    "IQ2_S": "2.5 bpw (needs imatrix)",
    "IQ2_M": "2.7 bpw (needs imatrix)",
    "IQ3_XXS": "3.06 bpw (needs imatrix)",
    "IQ3_XS": "3.3 bpw (needs imatrix)",
    "IQ3_S": "3.44 bpw",
    "IQ3_M": "3.66 bpw",
    "IQ4_NL": "4.50 bpw non-linear",
    "IQ4_XS": "4.25 bpw non-linear",
    "TQ1_0": "1.69 bpw ternary",
    "TQ2_0": "2.06 bpw ternary",
}
#: Types whose tensors llama.cpp refuses to quantize without an importance matrix.
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"})
#: Types built from 256-wide super-blocks; rows of other widths silently fall back to legacy types.
SUPERBLOCK_TYPES = frozenset(t for t in QUANTIZE_TYPES if "_K" in t or t.startswith(("IQ", "TQ"))) - {"IQ4_NL"}

TOKEN_EMBEDDING = "token_embd.weight"
OUTPUT = "output.weight"


@dataclass(frozen=True)
class Preset:
    """A named file type: a llama.cpp file type plus the token-embedding and output types."""

    base: str
    token_embedding_type: str
    output_tensor_type: str
    description: str


#: The "_L"/"_XL" names GGUF publishers use: Q8_0 embeddings and output on top of a K-quant.
PRESETS = {
    "Q2_K_L": Preset("Q2_K", "Q8_0", "Q8_0", "Q2_K with Q8_0 embeddings and output"),
    "Q3_K_XL": Preset("Q3_K_L", "Q8_0", "Q8_0", "Q3_K_L with Q8_0 embeddings and output"),
    "Q4_K_L": Preset("Q4_K_M", "Q8_0", "Q8_0", "Q4_K_M with Q8_0 embeddings and output"),
    "Q5_K_L": Preset("Q5_K_M", "Q8_0", "Q8_0", "Q5_K_M with Q8_0 embeddings and output"),
    "Q6_K_L": Preset("Q6_K", "Q8_0", "Q8_0", "Q6_K with Q8_0 embeddings and output"),
}


def file_type(precision: str) -> str:
    """The llama.cpp file type a precision is quantized with (a preset's base, else itself)."""
    preset = PRESETS.get(precision)
    return preset.base if preset else precision


def tensor_type(value: str, *, key: str) -> str:
    """A ggml type name, upper-cased.

    Raises:
        RecipeError: not a type llama.cpp quantizes tensors to.
    """
    name = value.strip().upper()
    if name not in TENSOR_TYPES:
        raise RecipeError(f"'{value}' is not a llama.cpp tensor type", key=key, allowed=list(TENSOR_TYPES))
    return name


def parse_overrides(value: Any) -> list[str]:
    """``tensor_types`` as an ordered list of ``REGEX=TYPE`` (a string may hold several, comma-separated).

    Raises:
        RecipeError: an entry without ``=``, a regex that does not compile, or an unknown type.
    """
    if value is None:
        return []
    entries = [part for part in value.split(",")] if isinstance(value, str) else list(value)
    parsed = []
    for entry in entries:
        pattern, sep, kind = str(entry).strip().rpartition("=")
        if not sep or not pattern:
            raise RecipeError(
                f"tensor type override '{entry}' is not REGEX=TYPE",
                key="options.tensor_types",
                hint="write e.g. --option tensor_types='attn_v=Q8_0,ffn_down=Q6_K' (llama-quantize's --tensor-type)",
            )
        try:
            re.compile(pattern)
        except re.error as exc:
            raise RecipeError(
                f"tensor type override '{entry}': the regex does not compile ({exc})", key="options.tensor_types"
            ) from None
        parsed.append(f"{pattern}={tensor_type(kind, key='options.tensor_types')}")
    return parsed


def recipe_tag(options: dict[str, Any], precision: str) -> str:
    """A short name for type choices beyond the precision's own (``tt1a2b3c``), or ''.

    Two variants of one file type with different tensor types need different folders and file names.
    """
    preset = PRESETS.get(precision)
    chosen = {
        "token_embedding_type": options.get("token_embedding_type"),
        "output_tensor_type": options.get("output_tensor_type"),
        "tensor_types": list(options.get("tensor_types") or []),
    }
    if preset:
        if chosen["token_embedding_type"] == preset.token_embedding_type:
            chosen["token_embedding_type"] = None
        if chosen["output_tensor_type"] == preset.output_tensor_type:
            chosen["output_tensor_type"] = None
    if not any(chosen.values()):
        return ""
    digest = hashlib.sha256(repr(sorted(chosen.items())).encode()).hexdigest()[:6]
    return f"tt{digest}"


@dataclass
class TensorTypes:
    """The types asked of llama_model_quantize for one variant, resolved against the model's tensors."""

    token_embedding_type: str | None = None
    output_tensor_type: str | None = None
    overrides: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def of(cls, precision: str, options: dict[str, Any]) -> TensorTypes:
        preset = PRESETS.get(precision)
        return cls(
            token_embedding_type=options.get("token_embedding_type") or (preset and preset.token_embedding_type),
            output_tensor_type=options.get("output_tensor_type") or (preset and preset.output_tensor_type),
            overrides=[tuple(entry.rsplit("=", 1)) for entry in options.get("tensor_types") or []],  # type: ignore[misc]
        )

    def __bool__(self) -> bool:
        return bool(self.token_embedding_type or self.output_tensor_type or self.overrides)

    def resolve_for_model(self, tensor_names: set[str], *, precision: str) -> TensorTypes:
        """These types as they apply to a model's tensors (tied embeddings: one tensor for both).

        Raises:
            ExportError: a tied model given two different types for its one shared tensor.
        """
        if OUTPUT in tensor_names or not self.output_tensor_type:
            return self
        embedding, output = self.token_embedding_type, self.output_tensor_type
        if embedding and embedding != output:
            raise ExportError(
                f"this model ties its output to its token embeddings ({TOKEN_EMBEDDING} is both), so it cannot "
                f"have token_embedding_type={embedding} and output_tensor_type={output}",
                format="gguf",
                precision=precision,
                hint="give the two the same type, or set only one of them",
            )
        return TensorTypes(token_embedding_type=output, output_tensor_type=None, overrides=self.overrides)

    def chooses(self, name: str) -> bool:
        """Whether these choices set the type of tensor ``name``."""
        if name == TOKEN_EMBEDDING and self.token_embedding_type or name == OUTPUT and self.output_tensor_type:
            return True
        return any(re.search(pattern, name) for pattern, _ in self.overrides)

    def describe(self, *, tied: bool) -> list[str]:
        """What each choice does, in words (for the card and the manifest)."""
        lines = []
        if self.token_embedding_type:
            shared = " (also the output: tied embeddings)" if tied else ""
            lines.append(f"{TOKEN_EMBEDDING}{shared} → {self.token_embedding_type}")
        if self.output_tensor_type:
            lines.append(f"{OUTPUT} → {self.output_tensor_type}")
        lines += [f"tensors matching /{pattern}/ → {kind}" for pattern, kind in self.overrides]
        return lines


def check_tensor_types(precision: str, options: dict[str, Any], *, converter: bool) -> None:
    """Refuse per-tensor types the variant cannot take (``converter``: its type comes from the converter).

    Raises:
        RecipeError: per-tensor options on a converter type, or a preset's own type contradicted.
    """
    chosen = [key for key in ("token_embedding_type", "output_tensor_type", "tensor_types") if options.get(key)]
    if chosen and converter:
        raise RecipeError(
            f"{chosen[0]} applies to types made by llama_model_quantize; {precision} comes from llama.cpp's "
            "converter, which writes every tensor in one type",
            key=f"options.{chosen[0]}",
            hint="choose a quantized type (Q4_K_M, Q6_K …), or drop the per-tensor options",
        )
    preset = PRESETS.get(precision)
    for key in ("token_embedding_type", "output_tensor_type"):
        value = options.get(key)
        if preset and value and value != getattr(preset, key):
            raise RecipeError(
                f"{precision} sets {key}={getattr(preset, key)}; it cannot also be {value}",
                key=f"options.{key}",
                hint=f"use {preset.base} with --option {key}={value} instead",
            )


def describe_settings(precision: str, settings: dict[str, Any]) -> list[str]:
    """A variant's card notes from its manifest settings: preset, tensor types, shards, importance matrix."""
    notes = [PRESETS[precision].description] if precision in PRESETS else []
    if settings.get("tensor_types"):
        notes.append("tensor types: " + "; ".join(settings["tensor_types"]))
    shards = settings.get("shards") or []
    if len(shards) > 1:
        listed = ", ".join(f"`{name}`" for name in shards)
        notes.append(f"split into {len(shards)} files (llama.cpp loads them from the first): {listed}")
    matrix = settings.get("imatrix")
    if matrix:
        notes.append(
            f"importance matrix `{matrix['file']}` computed on {matrix['text']} (sha256 `{matrix['sha256'][:12]}`, "
            f"{matrix['tokens']} tokens in {matrix['windows']} windows of {matrix['context']})"
        )
    return notes
