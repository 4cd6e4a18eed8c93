"""Publishing: the real huggingface_hub client against the loopback Hub server in hub_server.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from hub_server import HubServer

NAMESPACE = "alice"
REPOS = {
    f"{NAMESPACE}/tiny-phi3-GGUF",
    f"{NAMESPACE}/tiny-phi3-onnx",
    f"{NAMESPACE}/tiny-phi3-int4-ov",
    f"{NAMESPACE}/tiny-phi3-4bit",
}
BASE = "hubquant-tests/tiny-phi3"


@pytest.fixture(scope="module")
def four_formats(tiny_phi3: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One tiny variant per format, evaluated (so the cards carry figures)."""
    out = tmp_path_factory.mktemp("hub-artifacts")
    # The fixture's folder name is the model name in repo names: keep it 'tiny-phi3'.
    model = out / "tiny-phi3"
    shutil.copytree(tiny_phi3, model)
    recipe = out / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "source": str(model),
                "output": str(out / "variants"),
                "variants": [
                    {"format": "gguf", "precision": "Q8_0"},
                    {"format": "onnx", "precision": "int4"},
                    {"format": "openvino", "precision": "int4"},
                    {"format": "mlx", "precision": "4bit"},
                ],
            }
        )
    )
    code, stdout, err = run_cli("quantize", "--recipe", str(recipe), "--json", "--no-track")
    assert code == 0, err
    paths = [Path(a["path"]) for a in json.loads(stdout)]
    code, _, err = run_cli(
        # test_fidelity's settings: the session's shared reference cache already holds this model's
        # reference and its four runtimes' floors at them.
        "eval",
        *map(str, paths),
        *("--context", "64", "--max-windows", "3", "--prompt-tokens", "16", "--gen-tokens", "4"),
        "--no-track",
    )
    assert code == 0, err
    return paths


def _push(*args: str) -> tuple[int, str, str]:
    return run_cli("push", *args, "--base-model", BASE, "--no-track")


def _json_push(*args: str) -> dict:
    code, out, err = _push(*args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_publish_four_formats_then_republish_nothing(
    four_formats: list[Path], hub: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from huggingface_hub import HfApi, ModelCard

    token = hub.add_user(NAMESPACE)
    # Dry run first (no token): what it stages is what the real push then sends.
    staged = _json_push(*map(str, four_formats), "--namespace", NAMESPACE, "--stage-dir", str(tmp_path / "stage"))
    assert staged["dry_run"] and {r["repo_id"] for r in staged["repos"]} == REPOS
    assert not hub.state.repos, "a dry run talks to nobody"

    monkeypatch.setenv("HF_TOKEN", token)
    published = _json_push(*map(str, four_formats))
    assert not published["dry_run"] and {r["repo_id"] for r in published["repos"]} == REPOS
    for repo in published["repos"]:
        files = set(hub.files(repo["repo_id"])) - {".gitattributes"}
        stage = tmp_path / "stage" / repo["repo_id"] / "files"
        assert files == {p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file()}, repo["repo_id"]
        assert len(hub.commits(repo["repo_id"])) == 2, "one commit per repo, all files at once"
    gguf = hub.files(f"{NAMESPACE}/tiny-phi3-GGUF")
    assert "tiny-phi3-Q8_0.gguf" in gguf and "hubquant-tradeoff.png" in gguf
    assert any(p.startswith("cpu-int4-rtn-block-32-acc-level-4/") for p in hub.files(f"{NAMESPACE}/tiny-phi3-onnx"))
    assert "openvino_tokenizer.xml" in hub.files(f"{NAMESPACE}/tiny-phi3-int4-ov")

    # The card round-trips through the client and its metadata is what the Hub expects.
    card = ModelCard.load(f"{NAMESPACE}/tiny-phi3-GGUF")
    data = card.data.to_dict()
    assert data["base_model"] == BASE and data["base_model_relation"] == "quantized"
    assert data["library_name"] == "gguf" and data["pipeline_tag"] == "text-generation" and data["license"] == "mit"
    assert {"gguf", "hubquant", "phi3", "q8_0"} <= set(data["tags"])
    assert data["model-index"][0]["results"][0]["metrics"][0]["type"] == "perplexity"
    # Offline validation: the client parses model-index back into EvalResults, and it sent the
    # README to the (loopback) validate-yaml endpoint before uploading anything.
    assert card.data.eval_results and card.data.eval_results[0].metric_type == "perplexity"
    assert any(path == "/api/validate-yaml" for _, path, _ in hub.calls)
    assert f"{NAMESPACE}/tiny-phi3-onnx" in card.text and "llama-cpp-python" in card.text
    libraries = {r: ModelCard.load(r).data.library_name for r in REPOS}
    assert libraries == {
        f"{NAMESPACE}/tiny-phi3-GGUF": "gguf",
        f"{NAMESPACE}/tiny-phi3-onnx": "onnxruntime-genai",
        f"{NAMESPACE}/tiny-phi3-int4-ov": "openvino",
        f"{NAMESPACE}/tiny-phi3-4bit": "mlx",
    }
    collection = next(iter(hub.state.collections.values()))
    assert {item["id"] for item in collection["items"]} == REPOS
    assert HfApi().model_info(f"{NAMESPACE}/tiny-phi3-4bit").card_data.library_name == "mlx"

    # Identical re-publish: nothing uploaded, no commit, and it says so.
    before = len(hub.calls)
    code, out, err = _push(*map(str, four_formats))
    assert code == 0, err
    assert out.count("up to date, nothing uploaded") == 4
    assert not any(m == "PUT" or "/commit/" in p for m, p, _ in hub.calls[before:])
    assert all(len(hub.commits(r)) == 2 for r in REPOS)

    # A changed card re-uploads only the card.
    before = len(hub.calls)
    code, out, err = run_cli("push", *map(str, four_formats), "--base-model", "hubquant-tests/other-base", "--no-track")
    assert code == 0, err
    assert not any(m == "PUT" for m, _, _ in hub.calls[before:]), "no LFS upload for a card change"
    for repo in REPOS:
        assert len(hub.commits(repo)) == 3
    assert "hubquant-tests/other-base" in hub.files(f"{NAMESPACE}/tiny-phi3-GGUF")["README.md"].decode()

    # The token never reaches a card, a record or the output.
    for repo in REPOS:
        for content in hub.files(repo).values():
            assert token.encode() not in content
    assert token not in out + err


def test_errors_leave_the_repo_as_it_was(
    four_formats: list[Path], hub: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gguf = str(next(p for p in four_formats if p.name.startswith("gguf-")))
    # No token: a dry run, said so.
    code, out, err = _push(gguf, "--stage-dir", str(tmp_path / "s"))
    assert code == 0 and "no token" in out and not hub.state.repos, out + err
    # An unknown token, a read-only token, a namespace the user cannot write to.
    monkeypatch.setenv("HF_TOKEN", "hf_notarealtokenatall0000")
    code, _, err = _push(gguf, "--namespace", NAMESPACE)
    assert code == 1 and "rejected the token" in err and "hf_notarealtoken" not in err, err
    monkeypatch.setenv("HF_TOKEN", hub.add_user("reader", role="read"))
    code, _, err = _push(gguf, "--namespace", "reader")
    assert code == 1 and "read-only" in err, err
    token = hub.add_user(NAMESPACE, orgs=("phi-org",))
    monkeypatch.setenv("HF_TOKEN", token)
    code, _, err = _push(gguf, "--repo-id", "bob/tiny-phi3-GGUF")
    assert code == 1 and "cannot write to the namespace 'bob'" in err and "alice, phi-org" in err, err
    assert "Traceback" not in err and not hub.state.repos

    # The commit fails every time: an error naming what to do; the repo holds only its first commit.
    hub.fail("POST", r"/commit/", status=500, times=10)
    code, _, err = _push(gguf, "--namespace", "phi-org")
    assert code == 1 and "run the same command again" in err and "Traceback" not in err, err
    repo = "phi-org/tiny-phi3-GGUF"
    assert hub.commits(repo) == ["initial commit"] and set(hub.files(repo)) == {".gitattributes"}
    uploaded = hub.uploaded_bytes()
    # Re-running finishes the job without sending the LFS file again.
    hub.state.failures.clear()
    before = len(hub.calls)
    code, _, err = _push(gguf, "--namespace", "phi-org")
    assert code == 0, err
    assert not any(m == "PUT" for m, _, _ in hub.calls[before:]), "the Hub already held the GGUF file"
    assert len(hub.commits(repo)) == 2 and "tiny-phi3-Q8_0.gguf" in hub.files(repo)
    assert uploaded > 0

    # A dropped connection during one commit is retried: exactly one commit lands.
    onnx = str(next(p for p in four_formats if p.name.startswith("onnx-")))
    hub.fail("POST", r"/commit/", status=599, times=1)
    code, _, err = _push(onnx, "--namespace", "phi-org")
    assert code == 0 and "retrying" in err, err
    assert len(hub.commits("phi-org/tiny-phi3-onnx")) == 2


def test_create_pr_and_revision(four_formats: list[Path], hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", hub.add_user(NAMESPACE))
    gguf = str(next(p for p in four_formats if p.name.startswith("gguf-")))
    result = _json_push(gguf, "--create-pr")
    repo = f"{NAMESPACE}/tiny-phi3-GGUF"
    assert result["repos"][0]["pr_url"].endswith("/discussions/1")
    assert set(hub.files(repo)) == {".gitattributes"}, "main untouched until the PR is merged"
    assert "tiny-phi3-Q8_0.gguf" in hub.files(repo, "refs/pr/1")
    code, _, err = _push(gguf, "--revision", "no-such-branch")
    assert code == 1 and "Traceback" not in err, err


def test_cards_and_commits_reach_mlflow(
    tiny_phi3: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Push records hf.repo_id / hf.commit / hf.url on the variant's run, and the card names the run."""
    from mlflow import MlflowClient

    monkeypatch.setenv("HF_TOKEN", hub.add_user(NAMESPACE))
    code, stdout, err = run_cli(
        "quantize", str(tiny_phi3), "--precision", "Q8_0", "--output", str(tmp_path / "o"), "--json"
    )
    assert code == 0, err
    artifact = json.loads(stdout)[0]["path"]
    code, _, err = run_cli("push", "--run", _run_of(artifact), "--base-model", BASE, "--no-collection")
    assert code == 0, err
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(_run_of(artifact))
    assert run.data.tags["hf.repo_id"] == f"{NAMESPACE}/tiny-phi3-GGUF"
    assert len(run.data.tags["hf.commit"]) == 40 and run.data.tags["hf.url"].startswith(hub.url)
    card = hub.files(f"{NAMESPACE}/tiny-phi3-GGUF")["README.md"].decode()
    assert run.info.run_id in card


def _run_of(artifact: str) -> str:
    from hubquant import tracking

    manifest = json.loads((Path(artifact) / "manifest.json").read_text())
    return tracking.variant_runs(tracking.tracking_uri(), [manifest["cache_key"]])[manifest["cache_key"]]


def test_a_lost_answer_a_concurrent_writer_and_a_refusal_never_duplicate_or_overwrite(
    four_formats: list[Path], hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib
    import urllib.error
    import urllib.request

    monkeypatch.setenv("HF_TOKEN", hub.add_user(NAMESPACE, orgs=("phi-org",)))
    by_format = {p.name.split("-")[0]: str(p) for p in four_formats}

    # The commit is applied, then its answer is lost: the retry finds it instead of committing again.
    hub.fail("POST", r"/commit/", status=598, times=1)
    code, _, err = _push(by_format["gguf"])
    assert code == 0 and "landed although its answer was lost" in err, err
    assert len(hub.commits(f"{NAMESPACE}/tiny-phi3-GGUF")) == 2, hub.commits(f"{NAMESPACE}/tiny-phi3-GGUF")

    # The same with --create-pr: one pull request, not two.
    hub.fail("POST", r"/commit/", status=598, times=1)
    result = _json_push(by_format["onnx"], "--create-pr")
    assert hub.pull_requests(f"{NAMESPACE}/tiny-phi3-onnx") == ["refs/pr/1"]
    assert result["repos"][0]["pr_url"].endswith("/discussions/1"), result

    # Someone commits between hubquant's listing and its commit, adding a file and changing one that
    # hubquant's plan took as unchanged: the Hub refuses the commit (412), hubquant plans again on the
    # new head, so the repo ends with hubquant's files as they are and the other writer's new file.
    repo = f"{NAMESPACE}/tiny-phi3-int4-ov"
    code, _, err = _push(by_format["openvino"])
    assert code == 0, err
    model_xml = Path(by_format["openvino"]) / "openvino_model.xml"
    assert hub.files(repo)["openvino_model.xml"] == model_xml.read_bytes()
    changes = {"NOTES.md": b"hi", "openvino_model.xml": b"<net/>"}
    hub.before("POST", rf"/api/models/{repo}/commit/", lambda server: server.commit_directly(repo, changes))
    # Another base model changes only the card, so the first plan sends README.md alone.
    code, _, err = run_cli("push", by_format["openvino"], "--base-model", "hubquant-tests/other-base", "--no-track")
    assert code == 0 and "planning again on the new head" in err, err
    assert hub.commits(repo)[2] == "another writer" and len(hub.commits(repo)) == 4, hub.commits(repo)
    assert hub.files(repo)["NOTES.md"] == b"hi", "the other writer's file survives"
    assert hub.files(repo)["openvino_model.xml"] == model_xml.read_bytes(), "not a mix of two writers' files"
    assert "hubquant-tests/other-base" in hub.files(repo)["README.md"].decode()

    # A refusal (4xx) is reported with the Hub's words and never retried.
    before = len(hub.calls)
    hub.fail("POST", r"/commit/", status=422, times=5, message="Your README.md card metadata is invalid")
    code, _, err = _push(by_format["mlx"])
    commits = [c for c in hub.calls[before:] if c[0] == "POST" and "/commit/" in c[1]]
    assert code == 1 and "card metadata is invalid" in err and "could not reach" not in err, err
    assert len(commits) == 1 and "retrying" not in err, commits
    hub.state.failures.clear()

    # LFS is authorised per repo: a file held for one repo is uploaded again to another, and an
    # upload link that was not signed for the repo is refused.
    puts = sum(1 for c in hub.calls if c[0] == "PUT")
    code, _, err = _push(by_format["gguf"], "--namespace", "phi-org")
    assert code == 0, err
    assert sum(1 for c in hub.calls if c[0] == "PUT") > puts, "the GGUF file was uploaded to phi-org's repo too"
    assert (
        hub.files("phi-org/tiny-phi3-GGUF")["tiny-phi3-Q8_0.gguf"]
        == hub.files(f"{NAMESPACE}/tiny-phi3-GGUF")["tiny-phi3-Q8_0.gguf"]
    )
    data = b"not signed"
    request = urllib.request.Request(f"{hub.url}/lfs-upload/{hashlib.sha256(data).hexdigest()}", data, method="PUT")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403
