"""MLflow entry points for hubquant; this package depends on hubquant, never the reverse.

- ``mlflow.run_context_provider`` → :class:`mlflow_plugin.context.GitHubActionsRunContext`: every
  run started inside GitHub Actions gets the workflow's repository, job, run URL, sha, ref, actor.
- ``mlflow.deployments`` targets ``huggingface`` and ``hf`` → :mod:`mlflow_plugin.deployments`:
  ``mlflow deployments create -t huggingface --name NS/REPO -m runs:/RUN_ID/…`` publishes the
  variant a hubquant run logged, with its model card, through :mod:`hubquant.hub`.

Both modules import hubquant's heavy parts only when used, so a missing optional extra can never
stop MLflow from starting.
"""
