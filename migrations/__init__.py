"""Alembic migrations of the job store (shipped as a package so installed copies find them)."""
