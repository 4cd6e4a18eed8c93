"""MLflow entry points for hubquant (GitHub Actions run context, Hugging Face deployment target).

Empty until the MLflow plugin issue lands; it depends on hubquant, never the reverse.
"""
