"""Fixtures shared by the API tests: the in-process API and its seeded jobs."""

from tests.api.in_process import api, seeded  # noqa: F401  (fixtures)
