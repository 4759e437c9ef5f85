"""Answering questions from a job's model: the engine, batching, backends and the Celery task."""
