"""Alembic migrations of the tables in db/models.py (run through db/migrate.py; no alembic.ini)."""
