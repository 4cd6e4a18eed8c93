"""ONNX Runtime GenAI: the builder run for real, loaded and generated with onnxruntime-genai."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hubquant.exporters.onnx import ONNXRunner
from hubquant.source import resolve_source
from hubquant.stats import kl_divergence
from hubquant.stats import runner_perplexity as perplexity
from hubquant.text import read_text, token_windows, tokenize
from hubquant.torch_runner import TorchRunner

from conftest import quantize_json, run_cli

pytestmark = pytest.mark.slow
CONTEXT = 256


def _build(model: Path, out: Path, *precisions: str, options: tuple[str, ...] = ()) -> list[dict]:
    return quantize_json(model, out, "onnx", *precisions, options=options)


def _generate(path: Path, steps: int = 6) -> tuple[list[int], list[int]]:
    """Greedy generation in onnxruntime-genai: (prompt ids, the new ids only — never the prompt)."""
    import onnxruntime_genai as og

    model = og.Model(str(path))
    tokenizer = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=64, do_sample=False)
    generator = og.Generator(model, params)
    prompt = [int(i) for i in tokenizer.encode("A list keeps items")]
    generator.append_tokens(prompt)
    for _ in range(steps):
        if generator.is_done():
            break
        generator.generate_next_token()
    return prompt, [int(i) for i in generator.get_sequence(0)[len(prompt) :]]


def _torch_greedy(model: Path, prompt: list[int], steps: int) -> list[int]:
    reference, ids = TorchRunner(resolve_source(model)), list(prompt)
    for _ in range(steps):
        ids.append(int(reference.logits(ids)[-1].argmax()))
    return ids[len(prompt) :]


def _generates(path: Path, model: Path) -> None:
    """The variant generates new tokens; the unquantized one exactly PyTorch's greedy continuation."""
    prompt, new = _generate(path)
    assert new, f"{path.name} generated nothing"
    if path.name.endswith("fp32"):
        assert new == _torch_greedy(model, prompt, len(new)), path.name


def _kl_and_ppl(model: Path, artifact: Path) -> tuple[float, float, float]:
    source = resolve_source(model)
    windows = token_windows(tokenize(source, read_text(None)), CONTEXT)
    reference, runner = TorchRunner(source), ONNXRunner(artifact, context_length=CONTEXT)
    kl = float(np.concatenate([kl_divergence(reference.logits(w), runner.logits(w)) for w in windows]).mean())
    return perplexity(reference, windows), perplexity(runner, windows), kl


def test_phi3_style_cpu_variants(tiny_phi3: Path, tmp_path: Path) -> None:
    built = _build(tiny_phi3, tmp_path / "a", "int4", "int8", "fp32")
    built += _build(tiny_phi3, tmp_path / "a", "int4", options=("--option", "block_size=128"))
    paths = {Path(a["path"]).name: Path(a["path"]) for a in built}
    assert set(paths) == {
        "onnx-cpu-int4-rtn-block-32-acc-level-4",
        "onnx-cpu-int8-rtn-block-32-acc-level-4",
        "onnx-cpu-fp32",
        "onnx-cpu-int4-rtn-block-128-acc-level-4",
    }
    for path in paths.values():
        assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= {
            p.name for p in path.iterdir()
        }
        assert "<|user|>" in (path / "chat_template.jinja").read_text()
        _generates(path, tiny_phi3)
    ref, fp32, kl_fp32 = _kl_and_ppl(tiny_phi3, paths["onnx-cpu-fp32"])
    assert abs(fp32 - ref) / ref < 0.001 and kl_fp32 < 1e-6
    _, _, kl_int8 = _kl_and_ppl(tiny_phi3, paths["onnx-cpu-int8-rtn-block-32-acc-level-4"])
    _, _, kl_int4 = _kl_and_ppl(tiny_phi3, paths["onnx-cpu-int4-rtn-block-32-acc-level-4"])
    assert kl_fp32 < kl_int8 < kl_int4


@pytest.mark.parametrize("style", ["phi4", "phi4mini"])
def test_phi4_style_and_long_rope(style: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Byte-level BPE; and the Phi-4-mini shape: tied embeddings, partial rotary, 128k long-rope."""
    model = request.getfixturevalue(f"tiny_{style}")
    built = _build(model, tmp_path / "b", "int4", "int8", "fp32")
    built += _build(model, tmp_path / "b", "int4", options=("--option", "block_size=128"))
    assert len({a["path"] for a in built}) == 4
    for artifact in built:
        _generates(Path(artifact["path"]), model)
    fp32 = Path(built[2]["path"])
    ref, value, _ = _kl_and_ppl(model, fp32)
    assert abs(value - ref) / ref < 0.001, (ref, value)
    if style == "phi4mini":
        config = json.loads((fp32 / "genai_config.json").read_text())
        assert config["model"]["context_length"] == 131072
        assert "type" not in json.loads((model / "config.json").read_text())["rope_parameters"], "source untouched"


def test_gpu_target_builds(untrained_phi3: Path, tmp_path: Path) -> None:
    built = _build(untrained_phi3, tmp_path / "d", "fp16", options=("--option", "target=cuda"))
    path = Path(built[0]["path"])
    assert path.name == "onnx-cuda-fp16"
    config = json.loads((path / "genai_config.json").read_text())
    assert "cuda" in json.dumps(config["model"]["decoder"]["session_options"]).lower()
    code, _, err = run_cli("eval", str(path), "--no-track")
    assert code == 1 and "built for cuda" in err


def test_formats_lists_targets_and_options() -> None:
    code, out, _ = run_cli("formats")
    assert code == 0
    section = out[out.index("onnx:") :]
    for needle in (
        "targets",
        "cpu",
        "int4, int8, fp32",
        "cuda",
        "block_size",
        "accuracy_level",
        "algo",
        "quantize_lm_head",
        "default 32",
    ):
        assert needle in section, needle


def test_invalid_combinations_and_builder_failure(untrained_phi3: Path, tmp_path: Path) -> None:
    out = tmp_path / "e"
    code, _, err = run_cli(
        "quantize", str(untrained_phi3), "--format", "onnx", "--precision", "fp16", "--output", str(out), "--no-track"
    )
    assert code == 1 and "cannot run on the cpu target" in err and "cuda/fp16" in err
    code, _, err = run_cli(
        "quantize",
        str(untrained_phi3),
        "--format",
        "onnx",
        "--precision",
        "int4",
        "--option",
        "int4_block_size=32",
        "--output",
        str(out),
        "--no-track",
    )
    assert code == 1 and "no option 'int4_block_size'" in err and "block_size" in err
    code, _, err = run_cli(
        "quantize",
        str(untrained_phi3),
        "--format",
        "onnx",
        "--precision",
        "fp32",
        "--option",
        "block_size=64",
        "--output",
        str(out),
        "--no-track",
    )
    assert code == 1 and "only applies to int4/int8" in err
    # The builder itself refuses: shared embeddings on a model whose embeddings are not tied.
    code, _, err = run_cli(
        "quantize",
        str(untrained_phi3),
        "--format",
        "onnx",
        "--precision",
        "int4",
        "--option",
        "shared_embeddings=true",
        "--output",
        str(out),
        "--no-track",
    )
    assert code == 1 and "Traceback" not in err and "builder failed" in err and "shared_embeddings" in err
    assert not out.exists()


def _matmul_weights(path: Path) -> dict[str, bytes]:
    """Every MatMulNBits node's (weight, scales) bytes, keyed by node path, whatever the initializers' names."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            weight, scales = (numpy_helper.to_array(inits[n], base_dir=str(path)) for n in node.input[1:3])
            found[node.name.rsplit("/", 1)[0]] = weight.tobytes() + scales.tobytes()
    return found


@pytest.mark.parametrize("style,options", [("phi3", ("symmetric=false",)), ("phi4mini", ())])
def test_prequantized_route_matches_direct(
    style: str, options: tuple[str, ...], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The low-memory route (a checkpoint quantized tensor by tensor with ORT's own functions, read by the
    builder's olive loader) gives the same MatMulNBits bytes and the same logits as the builder's direct route."""
    model = request.getfixturevalue(f"tiny_{style}")
    flags = tuple(f for o in options for f in ("--option", o))
    [pre] = _build(model, tmp_path / "pre", "int4", options=(*flags, "--option", "route=prequantized"))
    [direct] = _build(model, tmp_path / "direct", "int4", options=(*flags, "--option", "route=direct"))
    manifest = json.loads((Path(pre["path"]) / "manifest.json").read_text())
    assert manifest["settings"]["route"] == "prequantized"
    assert not list((tmp_path / "pre").rglob("prequantized-*")), "the prequantized checkpoint is deleted"
    a, b = _matmul_weights(Path(direct["path"])), _matmul_weights(Path(pre["path"]))
    assert len(a) >= 9 and a.keys() == b.keys()
    if not options:  # symmetric: only the fused q/k/v carry the zero point MatMulNBits otherwise implies
        import onnx

        graph = onnx.load(str(Path(pre["path"]) / "model.onnx"), load_external_data=False).graph
        with_zeros = {n.name.rsplit("/", 1)[0] for n in graph.node if n.op_type == "MatMulNBits" and len(n.input) > 3}
        assert with_zeros and all("qkv_proj" in name for name in with_zeros), with_zeros
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    windows = token_windows(tokenize(resolve_source(model), read_text(None)), 64)[:2]
    first, second = (
        ONNXRunner(Path(direct["path"]), context_length=64),
        ONNXRunner(Path(pre["path"]), context_length=64),
    )
    for window in windows:
        assert np.array_equal(first.logits(window), second.logits(window))


def test_prequantized_route_refused_where_it_does_not_apply(tiny_phi3: Path, tmp_path: Path) -> None:
    code, _, err = run_cli(
        "quantize",
        str(tiny_phi3),
        "--format",
        "onnx",
        "--precision",
        "int4",
        "--option",
        "route=prequantized",
        "--option",
        "algo=default",
        "--output",
        str(tmp_path / "x"),
        "--no-track",
    )
    assert code == 1 and "prequantized ONNX route does not apply" in err and "MLAS" in err and "Traceback" not in err


def test_builder_skips_its_quantizer_pass_when_every_matmul_is_prequantized(tiny_phi3: Path, tmp_path: Path) -> None:
    """With the LM head prequantized too, the builder's whole-graph quantizer pass (a second copy of every
    weight) has nothing left to do: hubquant's launcher skips it, and the saved model is the one the
    builder's own pass writes — the same weight file byte for byte, the same nodes."""
    import os
    import subprocess

    import onnx

    from hubquant.child import python_module
    from hubquant.exporters.onnx_prequant import write_prequantized

    summary = write_prequantized(
        tiny_phi3, tmp_path / "pre", bits=4, block_size=32, symmetric=True, algo="rtn", lm_head=True, log=print
    )
    assert summary["lm_head"] and summary["tensors_quantized"] == 9  # 2 layers × 4 projections + the LM head
    logs, graphs = {}, {}
    for name, switch in (("lean", "0"), ("full", "1")):
        out = tmp_path / name
        command = python_module(
            "hubquant._launch", "onnxruntime_genai.models.builder", "-i", str(tmp_path / "pre"), "-o", str(out)
        )
        command += ["-p", "int4", "-e", "cpu", "-c", str(tmp_path / f"cache-{name}"), "--extra_options"]
        command += ["block_size=32", "algo_config=rtn", "is_symmetric=true", "accuracy_level=4"]
        env = {**os.environ, "HUBQUANT_ONNX_FULL_PASS": switch}
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert result.returncode == 0, result.stderr[-2000:]
        logs[name] = result.stdout + result.stderr
        graphs[name] = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert "skipping the builder's whole-graph quantizer pass" in logs["lean"]
    assert "skipping" not in logs["full"] and "quantization of model with RTN" in logs["full"]
    assert (tmp_path / "lean" / "model.onnx.data").read_bytes() == (tmp_path / "full" / "model.onnx.data").read_bytes()
    for field in ("node", "initializer", "input", "output", "value_info"):  # the same graph, maybe sorted otherwise
        lean, full = (sorted(p.SerializeToString() for p in getattr(graphs[k], field)) for k in ("lean", "full"))
        assert lean == full, field
    assert sum(n.op_type == "MatMulNBits" for n in graphs["lean"].node) == 11  # 2 × (qkv, o, gate, up, down) + head


@pytest.mark.parametrize("symmetric,algo", [(True, "rtn"), (False, "rtn"), (False, "k_quant")])
def test_prequantizing_in_row_chunks_gives_the_bytes_of_one_call(symmetric: bool, algo: str, tmp_path: Path) -> None:
    """A large weight (Phi-4's LM head) is read and quantized a few rows at a time: the same bytes as the
    whole weight at once, also where a chunk ends mid-way through the rows."""
    from safetensors.numpy import save_file

    from hubquant.exporters.onnx_prequant import _quantize_entry, _Settings
    from hubquant.safetensors_io import read_header

    weight = np.random.default_rng(7).standard_normal((45, 128)).astype(np.float16)
    save_file({"lm_head.weight": weight}, str(tmp_path / "w.safetensors"))
    (entry,) = read_header(tmp_path / "w.safetensors")[0]
    settings = _Settings(bits=4, block_size=32, symmetric=symmetric, algo=algo, zeros=not symmetric, config={})
    whole = _quantize_entry(tmp_path / "w.safetensors", entry, settings, chunk_elements=45 * 128)
    chunked = _quantize_entry(tmp_path / "w.safetensors", entry, settings, chunk_elements=7 * 128)
    assert whole[0].shape == (45, 64) and whole[1].shape == (45, 4)
    for one, parts in zip(whole, chunked, strict=True):
        assert (one is None and parts is None) or one.tobytes() == parts.tobytes()
