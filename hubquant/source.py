"""The source checkpoint: a resolved local folder plus the facts every later stage needs.

Only the Phi family is supported (``phi``, ``phi3``, ``phimoe`` model types, and the vision models
whose language model one format can carry with its picture encoder: see :mod:`hubquant.vision`). Everything is read
from the files themselves — ``config.json``, the safetensors headers, the tokenizer files, the
model card — without loading weights, so a bad source fails in milliseconds, before any work.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hubquant.errors import SourceError, UnsupportedModelError
from hubquant.vision import BUILT_VISION, parts, vision_architecture, vision_refusal

#: model_type → the architectures of that type hubquant supports.
SUPPORTED_MODEL_TYPES: dict[str, tuple[str, ...]] = {
    "phi": ("PhiForCausalLM",),
    "phi3": ("Phi3ForCausalLM",),
    "phimoe": ("PhiMoEForCausalLM", "PhimoeForCausalLM"),
}
#: Why llama.cpp and mlx-lm compute PhiMoE differently (measured on a tiny Phi-3.5-MoE-shaped checkpoint:
#: swapping the reference's routing for theirs takes the unquantized KL from 4.5e-2 to 7.6e-5 for llama.cpp).
PHIMOE_ROUTING_DIFFERS = (
    "{runtime} routes each token to the top-2 experts weighted by a softmax over those two (weights "
    "summing to 1), while PhiMoE's reference routing (sparsemixer) weights each chosen expert by a "
    "softmax over only the experts within 2×router_jitter_noise of it, so a clear winner gets a weight "
    "near 1 and the pair's weights need not sum to 1."
)
#: A Hub model id (``namespace/name``): the one pattern every module uses.
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# Files at most this size are hashed whole for the fingerprint; larger ones by name, size, mtime
# and (for safetensors) their header, so fingerprinting a 14B checkpoint takes milliseconds.
_HASH_WHOLE_LIMIT = 16 << 20

_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


@dataclass(frozen=True)
class SourceModel:
    """A checkpoint resolved to a local folder, with its Phi-family facts.

    Attributes:
        path: the local folder (a Hub snapshot or the user's folder).
        source_id: what the user named (folder path or Hub id).
        revision: the Hub commit sha, or None for a local folder.
        fingerprint: sha256 identifying the contents (used for caching).
        architecture: e.g. ``Phi3ForCausalLM``.
        model_type: ``phi``, ``phi3`` or ``phimoe``.
        parameter_count: number of weights, from the safetensors headers.
        dtype: the dtype most weights are stored in (``bfloat16`` …).
        tokenizer_style: ``sentencepiece`` (Phi-3 style) or ``bpe`` (byte-level, Phi-2/Phi-4 style).
        chat_template: the Jinja chat template, if any.
        license: the licence id from the model card, if any.
        config: the parsed ``config.json``.
    """

    path: Path
    source_id: str
    revision: str | None
    fingerprint: str
    architecture: str
    model_type: str
    parameter_count: int
    dtype: str
    tokenizer_style: str
    chat_template: str | None
    license: str | None
    config: dict[str, Any] = field(repr=False, compare=False)
    weight_files: tuple[str, ...] = field(default=(), repr=False)
    #: A vision model's parts with their parameter counts (None for a text model; see :mod:`hubquant.vision`).
    vision_parts: dict[str, int] | None = field(default=None, compare=False)

    @property
    def is_vision(self) -> bool:
        return self.vision_parts is not None

    @property
    def language_parameters(self) -> int:
        """Parameters of the language model alone (all of them for a text model): what a variant's
        bits per weight divide by, the picture encoder shipping in files of its own."""
        if self.vision_parts is None:
            return self.parameter_count
        return self.vision_parts.get("language model", 0) + self.vision_parts.get("LoRA adapters", 0)

    @property
    def name(self) -> str:
        """The model's short name, used in file and repo names (``Phi-3.5-mini-instruct``)."""
        if HUB_ID_PATTERN.match(self.source_id) and not Path(self.source_id).exists():
            return self.source_id.split("/")[-1]
        return self.path.name

    def facts(self) -> dict[str, Any]:
        """The facts recorded in manifests (and later in MLflow params and cards)."""
        return {
            "id": self.source_id,
            "path": str(self.path),
            "name": self.name,
            "revision": self.revision,
            "fingerprint": self.fingerprint,
            "architecture": self.architecture,
            "model_type": self.model_type,
            "parameter_count": self.parameter_count,
            "dtype": self.dtype,
            "tokenizer_style": self.tokenizer_style,
            "license": self.license,
            **({"vision_parts": self.vision_parts} if self.vision_parts is not None else {}),
        }


def causal_lm_class(source: SourceModel) -> Any:
    """The transformers class that loads the source's language model: a vision model's is a Phi-3 (its
    vision tensors are left unread), whatever model_type its config declares."""
    if source.is_vision:
        from transformers import Phi3ForCausalLM

        return Phi3ForCausalLM
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SourceError(
            f"{what} {path} is not valid JSON ({exc})", path=path, hint="re-download or re-save the checkpoint"
        ) from None
    if not isinstance(data, dict):
        raise SourceError(
            f"{what} {path} is not a JSON object", path=path, hint="re-download or re-save the checkpoint"
        )
    return data


def _download(repo_id: str, revision: str | None) -> tuple[Path, str | None]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id=repo_id, revision=revision))
    except RepositoryNotFoundError:
        raise SourceError(
            f"Hub repository {repo_id} not found (or it is private/gated)",
            path=repo_id,
            hint="check the id, or log in with 'hf auth login' for gated models",
        ) from None
    except LocalEntryNotFoundError:
        raise SourceError(
            f"cannot reach the Hugging Face Hub to download {repo_id} and it is not in the local cache",
            path=repo_id,
            hint="connect to the Hub once, or pass a local folder instead",
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise SourceError(
            f"cannot download {repo_id}: {exc}", path=repo_id, hint="check the id and revision, or pass a local folder"
        ) from None
    # Snapshots live in .../snapshots/<commit sha>/
    commit = folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else revision
    return folder, commit


def safetensors_header(path: Path) -> dict[str, Any]:
    """Read and check the header of one safetensors file without touching the weights.

    Raises:
        SourceError: truncated file, bad header, or data that does not match the header.
    """
    size = path.stat().st_size
    hint = "the file is damaged or incomplete: download or save the checkpoint again"
    try:
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                raise SourceError(f"{path.name} is not a safetensors file (only {size} bytes)", path=path, hint=hint)
            (length,) = struct.unpack("<Q", raw)
            if length > min(size - 8, 100 << 20):
                raise SourceError(f"{path.name} has a corrupt safetensors header", path=path, hint=hint)
            header = json.loads(handle.read(length))
    except (ValueError, UnicodeDecodeError):
        raise SourceError(f"{path.name} has a corrupt safetensors header", path=path, hint=hint) from None
    if not isinstance(header, dict):
        raise SourceError(f"{path.name} has a corrupt safetensors header", path=path, hint=hint)
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise SourceError(f"{path.name}: tensor {name} has no valid data_offsets", path=path, hint=hint) from None
    if 8 + length + end != size:
        raise SourceError(
            f"{path.name} is truncated or corrupt: its header describes {8 + length + end} bytes, the file has {size}",
            path=path,
            hint=hint,
        )
    return header


def _tokenizer_facts(folder: Path) -> tuple[str, str | None]:
    config_path = folder / "tokenizer_config.json"
    has_json = (folder / "tokenizer.json").is_file()
    has_model = (folder / "tokenizer.model").is_file()
    if not config_path.is_file() or not (has_json or has_model):
        missing = [
            n
            for n, ok in (
                ("tokenizer_config.json", config_path.is_file()),
                ("tokenizer.json or tokenizer.model", has_json or has_model),
            )
            if not ok
        ]
        raise SourceError(
            f"{folder} has no tokenizer: missing {', '.join(missing)}",
            path=folder,
            hint="copy the tokenizer files of the original model into the folder "
            "(tokenizer_config.json with tokenizer.json and/or tokenizer.model)",
        )
    tok_config = _read_json(config_path, "tokenizer config")
    template = tok_config.get("chat_template")
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if isinstance(template, list):  # several named templates: keep the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    tok_class = str(tok_config.get("tokenizer_class", ""))
    if has_model or tok_class.startswith(("LlamaTokenizer", "T5Tokenizer")):
        style = "sentencepiece"
    else:
        style = "bpe"
    return style, template


def _licence(folder: Path) -> str | None:
    readme = folder / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        match = re.match(r"^---\s*\n(.*?)\n---", text, re.S)
        if match:
            import yaml

            try:
                meta = yaml.safe_load(match.group(1)) or {}
            except yaml.YAMLError:
                meta = {}
            if isinstance(meta, dict) and meta.get("license"):
                return str(meta["license"])
    return None


def _fingerprint(folder: Path, headers: dict[str, dict[str, Any]]) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts):
        stat = path.stat()
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        if stat.st_size <= _HASH_WHOLE_LIMIT:
            digest.update(path.read_bytes())
        else:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
            if path.name in headers:
                digest.update(json.dumps(headers[path.name], sort_keys=True).encode())
    return digest.hexdigest()


def _local_folder(source_id: str, revision: str | None) -> tuple[Path, str | None]:
    """The folder of a local path or a Hub id (downloaded), and the Hub commit when it is one."""
    local = Path(source_id).expanduser()
    if local.exists():
        if not local.is_dir():
            raise SourceError(
                f"source {local} is a file; expected a model folder",
                path=local,
                hint="pass the folder that holds config.json and the *.safetensors files",
            )
        return local.resolve(), None
    if HUB_ID_PATTERN.match(source_id):
        return _download(source_id, revision)
    raise SourceError(
        f"source {source_id} is neither an existing folder nor a Hub id (namespace/name)",
        path=source_id,
        hint="check the path, or use a Hub id like microsoft/Phi-3.5-mini-instruct",
    )


def _phi_config(folder: Path) -> tuple[dict[str, Any], str, str]:
    """The config, model type and architecture of a supported Phi checkpoint."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SourceError(
            f"{folder} has no config.json",
            path=folder,
            hint="pass the folder of a Hugging Face checkpoint (config.json, *.safetensors, tokenizer)",
        )
    config = _read_json(config_path, "config")
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    vision = vision_architecture(config)
    if vision in BUILT_VISION:  # its language model is a Phi-3 (see hubquant.vision)
        return config, "phi3", vision
    if vision:  # its parts from the headers alone, then what to run instead
        raise vision_refusal(folder.name, config, (safetensors_header(p) for p in _weight_paths(folder)))
    supported = ", ".join(f"{a} ({t})" for t, archs in SUPPORTED_MODEL_TYPES.items() for a in archs)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{folder.name} is a '{model_type}' model ({', '.join(architectures) or 'no architecture'}); "
            "hubquant supports the Microsoft Phi family only",
            path=folder,
            hint=f"use a checkpoint of one of: {supported}",
        )
    architecture = architectures[0] if architectures else SUPPORTED_MODEL_TYPES[model_type][0]
    if architecture not in SUPPORTED_MODEL_TYPES[model_type]:
        raise UnsupportedModelError(
            f"{folder.name} declares architecture {architecture}, which hubquant does not support",
            path=folder,
            hint=f"use a checkpoint of one of: {supported}",
        )
    return config, model_type, architecture


def _weight_paths(folder: Path) -> list[Path]:
    """The safetensors files of the checkpoint (every shard its index lists)."""
    weight_paths = sorted(folder.glob("*.safetensors"))
    if not weight_paths:
        other = sorted(p.name for p in folder.glob("*.bin")) or sorted(p.name for p in folder.glob("*.pt"))
        raise SourceError(
            f"{folder} has no *.safetensors weights" + (f" (found {', '.join(other)})" if other else ""),
            path=folder,
            hint="save the model with save_pretrained(..., safe_serialization=True)",
        )
    index_path = folder / "model.safetensors.index.json"
    if not index_path.is_file():
        return weight_paths
    wanted = sorted(set((_read_json(index_path, "weight index").get("weight_map") or {}).values()))
    missing = [name for name in wanted if not (folder / name).is_file()]
    if missing:
        raise SourceError(
            f"{folder} is missing weight shards: {', '.join(missing)}",
            path=folder,
            hint="download the checkpoint again; every shard listed in the index is needed",
        )
    return [folder / name for name in wanted]


def header_tensors(headers: Iterable[Mapping[str, Any]]) -> Iterator[tuple[Mapping[str, Any], int]]:
    """Every tensor of some safetensors headers (``__metadata__`` skipped) with its number of elements."""
    for header in headers:
        for name, info in header.items():
            if name != "__metadata__":
                yield info, math.prod(int(dim) for dim in info.get("shape", []))


def _count(headers: dict[str, dict[str, Any]]) -> tuple[int, str | None]:
    """Parameter count and the dtype most weights are stored in, from the safetensors headers."""
    count = 0
    dtypes: Counter[str] = Counter()
    for info, numel in header_tensors(headers.values()):
        count += numel
        dtypes[_SAFETENSORS_DTYPES.get(info.get("dtype", ""), str(info.get("dtype")).lower())] += numel
    return count, dtypes.most_common(1)[0][0] if dtypes else None


def resolve_source(source: str | Path, *, revision: str | None = None) -> SourceModel:
    """Resolve a local folder or a Hub id to a :class:`SourceModel`, checking it is usable.

    Args:
        source: a local folder, or a Hub id such as ``microsoft/Phi-3.5-mini-instruct``.
        revision: a Hub branch, tag or commit (ignored for local folders).

    Raises:
        SourceError: the folder is missing, or its config, weights or tokenizer are unusable.
        UnsupportedModelError: the checkpoint is not a supported Phi model.
    """
    source_id = str(source)
    folder, commit = _local_folder(source_id, revision)
    config, model_type, architecture = _phi_config(folder)
    weight_paths = _weight_paths(folder)
    headers = {p.name: safetensors_header(p) for p in weight_paths}
    count, dtype = _count(headers)
    style, template = _tokenizer_facts(folder)
    return SourceModel(
        path=folder,
        source_id=source_id,
        revision=commit,
        fingerprint=_fingerprint(folder, headers),
        architecture=architecture,
        model_type=model_type,
        parameter_count=count,
        dtype=dtype or str(config.get("dtype") or config.get("torch_dtype")),
        tokenizer_style=style,
        chat_template=template,
        license=_licence(folder),
        config=config,
        weight_files=tuple(p.name for p in weight_paths),
        vision_parts=parts(headers.values()) if architecture in BUILT_VISION else None,
    )
