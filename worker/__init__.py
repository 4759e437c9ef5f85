"""Celery workers: thin tasks over core.pipeline and core.inference.engine."""
