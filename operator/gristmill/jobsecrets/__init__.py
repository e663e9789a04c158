"""Kubernetes Secrets for jobs: reading the ones a job declares, and masking their values.

Nothing here imports the Kubernetes client at import time: a job pod's runner imports
the masking, and starts faster without it.
"""
