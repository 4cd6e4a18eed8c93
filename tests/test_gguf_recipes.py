"""GGUF as the best publishers make it: tensor-type recipes, split files, the importance matrix shipped.

Every file here comes from the real converter and ``llama_model_quantize``; types are read back with
the converter's own ``gguf`` reader, splits are loaded by llama.cpp, uploads go through the real
``huggingface_hub`` client to the loopback Hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from hubquant import __version__
from hubquant.artifact import load_artifact
from hubquant.exporters.gguf import GGUFRunner
from hubquant.exporters.gguf_imatrix import compute_imatrix, read_imatrix
from hubquant.source import resolve_source
from hubquant.tiny import build_tiny_phi

from conftest import run_cli
from hub_server import HubServer

pytestmark = pytest.mark.slow

NAMESPACE = "alice"


def _types(artifact_dir: Path) -> dict[str, str]:
    """Every tensor's type over all of a variant's model files (shards included)."""
    artifact = load_artifact(artifact_dir)
    types: dict[str, str] = {}
    for entry in artifact.model_files:
        types.update({t.name: t.tensor_type.name for t in gguf.GGUFReader(artifact_dir / entry.path).tensors})
    return types


def _tensors(path: Path) -> list[str]:
    return [t.name for t in gguf.GGUFReader(path).tensors]


def _quantize(model: Path, out: Path, *precisions: str, options: tuple[str, ...] = ()) -> dict[str, Path]:
    args = ["quantize", str(model), "--output", str(out), "--no-track", "--json"]
    for precision in precisions:
        args += ["--precision", precision]
    for option in options:
        args += ["--option", option]
    code, stdout, err = run_cli(*args)
    assert code == 0, err
    return {entry["precision"]: Path(entry["path"]) for entry in json.loads(stdout)}


def _evaluate(*paths: Path) -> None:
    code, _, err = run_cli(
        "eval", *map(str, paths), "--context", "64", "--max-windows", "2", "--gen-tokens", "4", "--no-track"
    )
    assert code == 0, err


def _stage(paths: list[Path], stage: Path) -> Path:
    code, _, err = run_cli(
        "push", *map(str, paths), "--namespace", NAMESPACE, "--stage-dir", str(stage), "--no-track", "--json"
    )
    assert code == 0, err
    (repo,) = stage.glob(f"{NAMESPACE}/*-GGUF")
    return repo


@pytest.fixture(scope="module")
def recipes(untrained_phi3: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Plain Q4_K_M, the Q4_K_L preset and Q4_K_M with one regex override, from one intermediate."""
    out = tmp_path_factory.mktemp("recipes")
    plain = _quantize(untrained_phi3, out, "Q4_K_M", "Q4_K_L")
    override = _quantize(untrained_phi3, out, "Q4_K_M", options=(r"tensor_types=blk\.1\.ffn_down=Q8_0",))
    _evaluate(plain["Q4_K_M"], plain["Q4_K_L"])
    return {"Q4_K_M": plain["Q4_K_M"], "Q4_K_L": plain["Q4_K_L"], "override": override["Q4_K_M"]}


def test_l_preset_has_q8_0_embeddings_and_output_and_says_so(recipes: dict[str, Path], tmp_path: Path) -> None:
    base, large = _types(recipes["Q4_K_M"]), _types(recipes["Q4_K_L"])
    assert large["token_embd.weight"] == "Q8_0" and large["output.weight"] == "Q8_0"
    assert base["token_embd.weight"] != "Q8_0" and base["output.weight"] != "Q8_0", base
    # Everything else is the base type's own choice.
    others = set(base) - {"token_embd.weight", "output.weight"}
    assert {name: large[name] for name in others} == {name: base[name] for name in others}
    assert recipes["Q4_K_L"].name == "gguf-Q4_K_L"
    manifest = load_artifact(recipes["Q4_K_L"]).manifest
    assert [f.path for f in manifest.files if f.role == "model"] == ["untrained-phi3-Q4_K_L.gguf"]
    assert manifest.settings["tensor_types"] == ["token_embd.weight → Q8_0", "output.weight → Q8_0"]
    assert "llama.cpp" in manifest.tools and "commit" in manifest.tools["llama.cpp"]
    fields = gguf.GGUFReader(recipes["Q4_K_L"] / "untrained-phi3-Q4_K_L.gguf").fields
    assert fields["general.quantized_by"].contents() == f"hubquant {__version__}"

    repo = _stage([recipes["Q4_K_M"], recipes["Q4_K_L"]], tmp_path / "stage")
    card = (repo / "files" / "README.md").read_text()
    assert "| Q4_K_L | `untrained-phi3-Q4_K_L.gguf` |" in card and "| Q4_K_M | `untrained-phi3-Q4_K_M.gguf` |" in card
    assert "- **Q4_K_L**: Q4_K_M with Q8_0 embeddings and output; tensor types: token_embd.weight → Q8_0" in card
    assert "llama.cpp ggml" in card, "the llama.cpp build is in the provenance"


def test_a_regex_override_changes_exactly_the_matched_tensors(recipes: dict[str, Path]) -> None:
    base, changed = _types(recipes["Q4_K_M"]), _types(recipes["override"])
    differing = {name for name in base if base[name] != changed[name]}
    assert differing == {"blk.1.ffn_down.weight"} and changed["blk.1.ffn_down.weight"] == "Q8_0"
    assert base["blk.0.ffn_down.weight"] == changed["blk.0.ffn_down.weight"] != "Q8_0"
    # A separate variant: its own folder and file, so it never replaces the plain Q4_K_M.
    assert recipes["override"] != recipes["Q4_K_M"] and "-tt" in recipes["override"].name


def test_tied_embeddings_rule_and_conflict(tmp_path: Path) -> None:
    tied = build_tiny_phi(tmp_path / "tied-phi3", style="phi3", steps=0, tie_embeddings=True)
    out = _quantize(tied, tmp_path / "out", "Q4_K_L", options=("output_tensor_type=Q8_0",))
    types = _types(out["Q4_K_L"])
    assert "output.weight" not in types and types["token_embd.weight"] == "Q8_0"
    assert load_artifact(out["Q4_K_L"]).manifest.settings["tensor_types"] == [
        "token_embd.weight (also the output: tied embeddings) → Q8_0"
    ]
    # Only the output type given: it is the shared tensor's type.
    only_output = _quantize(tied, tmp_path / "out2", "Q4_K_M", options=("output_tensor_type=Q6_K",))
    assert _types(only_output["Q4_K_M"])["token_embd.weight"] == "Q6_K"
    # Two different types for the one shared tensor: refused, naming both and the fix.
    code, _, err = run_cli(
        "quantize",
        str(tied),
        "--precision",
        "Q4_K_M",
        "--option",
        "token_embedding_type=Q8_0",
        "--option",
        "output_tensor_type=Q6_K",
        "--output",
        str(tmp_path / "out3"),
        "--no-track",
    )
    assert code == 1 and "ties its output to its token embeddings" in err and "Traceback" not in err, err
    assert "same type" in err


def test_recipe_options_refused_up_front(untrained_phi3: Path, tmp_path: Path) -> None:
    cases = [
        (("--precision", "F16", "--option", "token_embedding_type=Q8_0"), "comes from llama.cpp's converter"),
        (("--precision", "Q4_K_L", "--option", "output_tensor_type=Q6_K"), "use Q4_K_M with"),
        (("--precision", "Q4_K_M", "--option", "tensor_types=ffn_down"), "is not REGEX=TYPE"),
        (("--precision", "Q4_K_M", "--option", "tensor_types=ffn_(=Q8_0"), "does not compile"),
        (("--precision", "Q4_K_M", "--option", "token_embedding_type=Q9_9"), "not a llama.cpp tensor type"),
        (("--precision", "Q4_K_M", "--option", "split_max_size=lots"), "split_max_size"),
    ]
    for args, expected in cases:
        code, _, err = run_cli("quantize", str(untrained_phi3), *args, "--output", str(tmp_path / "o"), "--no-track")
        assert code == 1 and expected in err and "Traceback" not in err, (args, err)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_formats_lists_the_presets() -> None:
    code, out, err = run_cli("formats")
    assert code == 0, err
    for name in ("Q2_K_L", "Q3_K_XL", "Q4_K_L", "Q5_K_L", "Q6_K_L"):
        assert name in out
    assert "Q4_K_M with Q8_0 embeddings and output" in out
    for option in ("token_embedding_type", "output_tensor_type", "tensor_types", "split_max_size"):
        assert option in out


def test_split_variants_load_from_the_first_shard_and_upload_each_shard_once(
    untrained_phi3: Path, tmp_path: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = _quantize(untrained_phi3, tmp_path / "whole", "F16", "Q8_0")
    split = _quantize(untrained_phi3, tmp_path / "split", "F16", "Q8_0", options=("split_max_size=1M",))
    for precision in ("F16", "Q8_0"):
        artifact = load_artifact(split[precision])
        shards = [f.path for f in artifact.model_files]
        count = len(shards)
        assert count > 1, shards
        assert shards == [f"untrained-phi3-{precision}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
        assert artifact.manifest.settings["shards"] == shards
        for entry in artifact.model_files:  # within the limit, unless one tensor alone is above it
            assert entry.size <= 1_000_000 or len(_tensors(split[precision] / entry.path)) == 1, entry
        assert _types(split[precision]) == _types(whole[precision])
        # llama.cpp loads the model from its first shard and computes the same logits.
        ids = list(range(3, 67))
        unsplit = GGUFRunner(next(whole[precision].glob("*.gguf")), context_length=64).logits(ids)
        loaded = GGUFRunner(split[precision] / shards[0], context_length=64).logits(ids)
        np.testing.assert_array_equal(loaded, unsplit)

    _evaluate(split["F16"], split["Q8_0"])
    repo = _stage([split["F16"], split["Q8_0"]], tmp_path / "stage")
    card = (repo / "files" / "README.md").read_text()
    q8 = [f.path for f in load_artifact(split["Q8_0"]).model_files]
    assert f"| Q8_0 | `{q8[0]}` |" in card, "one row per variant, at its first shard"
    assert f"split into {len(q8)} files" in card and all(f"`{name}`" in card for name in q8)
    assert "additional_files=" in card, "the llama-cpp-python snippet names the other shards"

    monkeypatch.setenv("HF_TOKEN", hub.add_user(NAMESPACE))
    code, out, err = run_cli("push", str(split["F16"]), str(split["Q8_0"]), "--namespace", NAMESPACE, "--no-track")
    assert code == 0, err
    repo_id = f"{NAMESPACE}/untrained-phi3-GGUF"
    files = hub.files(repo_id)
    assert len(hub.commits(repo_id)) == 2, "every shard in one commit"
    for folder in (split["F16"], split["Q8_0"]):
        for entry in load_artifact(folder).model_files:
            assert files[entry.path] == (folder / entry.path).read_bytes()
            upload = f"/lfs-upload/{entry.sha256}"
            uploads = [c for c in hub.state.calls if c[0] == "PUT" and c[1].startswith(upload)]
            assert len(uploads) == 1, (entry.path, uploads)


def test_importance_matrix_ships_with_its_calibration_identity(untrained_phi3: Path, tmp_path: Path) -> None:
    out = _quantize(untrained_phi3, tmp_path / "out", "Q4_K_M", "Q4_K_L", options=("imatrix=true",))
    for folder in out.values():
        artifact = load_artifact(folder)
        roles = {f.path: f.role for f in artifact.files}
        assert roles["imatrix.gguf"] == "calibration"
        assert artifact.size_bytes == sum(f.size for f in artifact.files if f.path != "imatrix.gguf")
        identity = artifact.manifest.settings["imatrix"]
        assert identity["text"] == "hubquant built-in calibration.txt", identity
        assert len(identity["sha256"]) == 64 and identity["tokens"] > 0
    # The file is what llama_model_quantize was given: the same means as the matrix computed again.
    matrix = compute_imatrix(resolve_source(str(untrained_phi3)), calibration_text=None, context=identity["context"])
    stored = read_imatrix(out["Q4_K_M"] / "imatrix.gguf")
    expected = matrix.means()
    assert set(stored) == set(expected)
    for name in expected:
        np.testing.assert_allclose(stored[name], expected[name], rtol=1e-6)
    assert matrix.sha256 == identity["sha256"] and matrix.tokens == identity["tokens"]

    repo = _stage(list(out.values()), tmp_path / "stage")
    staged = repo / "files"
    assert (staged / "imatrix.gguf").read_bytes() == (out["Q4_K_M"] / "imatrix.gguf").read_bytes()
    card = (staged / "README.md").read_text()
    assert f"sha256 `{identity['sha256'][:12]}`" in card and f"{identity['tokens']} tokens" in card
    assert "importance matrix `imatrix.gguf` computed on" in card
