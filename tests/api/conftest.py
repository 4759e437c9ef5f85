"""Fixtures shared by the API tests."""

from tests.api.test_api import api  # noqa: F401  (the in-process API fixture)
