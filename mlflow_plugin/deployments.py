"""``mlflow deployments … -t huggingface`` (alias ``hf``): publish a hubquant variant to the Hub.

A "deployment" is a Hub model repo (its name is ``NAMESPACE/REPO``); the model URI names the
MLflow run hubquant logged for the variant (``runs:/RUN_ID/…``, or ``models:/MODEL_ID`` for its
LoggedModel). Publishing goes through :func:`hubquant.publishing.push_artifacts` — the same code as
``hubquant push`` — so the repo gets its model card and the run its ``hf.*`` tags.
"""

from __future__ import annotations

from typing import Any

from mlflow.deployments import BaseDeploymentClient
from mlflow.exceptions import MlflowException

CONFIG_KEYS = {
    "private": "true/false — create the repo as private (default false)",
    "create_pr": "true/false — open a pull request instead of committing to the branch (default false)",
    "revision": "branch to commit to (default main)",
    "base_model": "Hub id of the source model for the card (default: the source the run recorded)",
    "confirm": "delete only: must equal the repo name, so a repo is never deleted by accident",
}

TARGET_HELP = (
    """Target: huggingface (alias: hf) — publishes variants built by hubquant to the Hugging Face Hub.

Target URI: 'huggingface' or 'huggingface:/NAMESPACE' (the namespace 'list' looks in; default: the
token's user). Token: HF_TOKEN or 'hf auth login'; endpoint: HF_ENDPOINT. Runs are read from
MLFLOW_TRACKING_URI.

  mlflow deployments create -t huggingface --name my-org/Phi-3.5-mini-instruct-GGUF -m runs:/RUN_ID/manifest.json
  mlflow deployments update -t huggingface --name my-org/Phi-3.5-mini-instruct-GGUF -m runs:/RUN_ID/manifest.json
  mlflow deployments get    -t huggingface --name my-org/Phi-3.5-mini-instruct-GGUF
  mlflow deployments list   -t huggingface:/my-org
  mlflow deployments delete -t huggingface --name my-org/Phi-3.5-mini-instruct-GGUF \\
      -C confirm=my-org/Phi-3.5-mini-instruct-GGUF

Config keys (-C key=value):
"""
    + "\n".join(f"  {key}: {text}" for key, text in CONFIG_KEYS.items())
    + """

predict, explain and run_local are not supported: the models run in their own runtimes
(llama.cpp, onnxruntime-genai, OpenVINO, MLX) — see each repo's model card.
"""
)


def _flag(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _fail(message: str) -> MlflowException:
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class HuggingFaceDeploymentClient(BaseDeploymentClient):
    def __init__(self, target_uri: str) -> None:
        super().__init__(target_uri)
        _, _, rest = target_uri.partition(":")
        self.namespace = rest.strip("/") or None

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _token() -> str:
        from huggingface_hub import get_token

        token = get_token()
        if not token:
            raise _fail("no Hugging Face token: set HF_TOKEN (or run 'hf auth login') with write access")
        return token

    @staticmethod
    def _api(token: str | None = None) -> Any:
        from huggingface_hub import HfApi

        from hubquant.repos import hub_endpoint

        return HfApi(endpoint=hub_endpoint(), token=token)

    @staticmethod
    def _run_id(model_uri: str) -> str:
        import mlflow

        if model_uri.startswith("runs:/"):
            run_id = model_uri[len("runs:/") :].split("/")[0]
            if run_id:
                return run_id
        if model_uri.startswith("models:/"):
            model = mlflow.MlflowClient().get_logged_model(model_uri[len("models:/") :].split("/")[0])
            if model.source_run_id:
                return model.source_run_id
        raise _fail(f"model URI '{model_uri}' does not name a hubquant run: use runs:/RUN_ID/… or models:/MODEL_ID")

    def _publish(self, name: str, model_uri: str, config: dict[str, Any] | None) -> dict[str, Any]:
        import mlflow

        from hubquant.artifact import load_artifact
        from hubquant.errors import HubquantError
        from hubquant.publishing import PushSettings, push_artifacts
        from hubquant.tracking import artifact_path_of_run

        config = dict(config or {})
        unknown = sorted(set(config) - set(CONFIG_KEYS) - {"confirm"})
        if unknown:
            raise _fail(f"unknown config key(s) {unknown}; known: {sorted(CONFIG_KEYS)}")
        if "/" not in name:
            raise _fail(f"deployment name '{name}' must be NAMESPACE/REPO")
        token = self._token()
        try:
            artifact = load_artifact(artifact_path_of_run(mlflow.get_tracking_uri(), self._run_id(model_uri)))
            settings = PushSettings(
                repo_id=name,
                private=_flag(config.get("private", False)),
                create_pr=_flag(config.get("create_pr", False)),
                revision=config.get("revision"),
                base_model=config.get("base_model"),
                collection=False,
            )
            outcome = push_artifacts([artifact], settings, token=token)
        except HubquantError as exc:
            raise _fail(f"{exc.message}{' — ' + exc.hint if exc.hint else ''}") from None
        result = outcome.results[0]
        return {
            "name": name,
            "url": result.url,
            "commit": result.commit,
            "commit_url": result.commit_url,
            "pr_url": result.pr_url,
            "uploaded_files": len(result.uploaded),
            "unchanged_files": len(result.unchanged),
            "flavor": artifact.format,
            "variant": artifact.path.name,
        }

    # -- the deployments API -------------------------------------------------------------------
    def create_deployment(self, name, model_uri, flavor=None, config=None, endpoint=None):  # noqa: ANN001, ANN201
        return self._publish(name, model_uri, config)

    def update_deployment(self, name, model_uri=None, flavor=None, config=None, endpoint=None):  # noqa: ANN001, ANN201
        if not model_uri:
            raise _fail("update needs -m runs:/RUN_ID/… (the variant to publish again)")
        return self._publish(name, model_uri, config)

    def delete_deployment(self, name, config=None, endpoint=None):  # noqa: ANN001, ANN201
        if (config or {}).get("confirm") != name:
            raise _fail(f"deleting {name} removes the Hub repo: repeat its name with -C confirm={name}")
        try:
            self._api(self._token()).delete_repo(name)
        except Exception as exc:  # noqa: BLE001
            from hubquant.hub import translate_error
            from hubquant.repos import hub_endpoint

            raise _fail(
                translate_error(exc, repo_id=name, endpoint=hub_endpoint(), stage_name="deleting").message
            ) from None
        return None

    def list_deployments(self, endpoint=None):  # noqa: ANN001, ANN201
        api = self._api(self._token_or_none())
        namespace = self.namespace or (api.whoami()["name"] if api.token else None)
        if not namespace:
            raise _fail("list needs a namespace: -t huggingface:/NAMESPACE, or a token")
        return [
            {"name": model.id, "private": model.private, "tags": list(model.tags or [])}
            for model in api.list_models(author=namespace, filter="hubquant")
        ]

    def get_deployment(self, name, endpoint=None):  # noqa: ANN001, ANN201
        try:
            info = self._api(self._token_or_none()).model_info(name)
        except Exception as exc:  # noqa: BLE001
            from hubquant.hub import translate_error
            from hubquant.repos import hub_endpoint

            raise _fail(
                translate_error(exc, repo_id=name, endpoint=hub_endpoint(), stage_name="reading").message
            ) from None
        card = info.card_data.to_dict() if info.card_data else {}
        return {
            "name": info.id,
            "sha": info.sha,
            "private": info.private,
            "library_name": card.get("library_name"),
            "base_model": card.get("base_model"),
            "tags": list(info.tags or []),
            "files": sorted(s.rfilename for s in info.siblings or []),
        }

    @staticmethod
    def _token_or_none() -> str | None:
        from huggingface_hub import get_token

        return get_token()

    def predict(self, deployment_name=None, inputs=None, endpoint=None):  # noqa: ANN001, ANN201
        raise _fail(
            "predict is not supported by the huggingface target: run the model with its runtime "
            "(see the repo's model card)"
        )

    def explain(self, deployment_name=None, df=None, endpoint=None):  # noqa: ANN001, ANN201
        raise _fail("explain is not supported by the huggingface target")


def run_local(target, name, model_uri, flavor=None, config=None):  # noqa: ANN001, ANN201
    raise _fail(
        "run_local is not supported by the huggingface target: download the repo and run it with "
        "llama.cpp, onnxruntime-genai, OpenVINO or mlx-lm (see its model card)"
    )


def target_help() -> str:
    return TARGET_HELP
