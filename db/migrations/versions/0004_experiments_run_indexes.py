"""experiments: composite indexes (run_id, ast_hash) and (run_id, status)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21 19:20:00

The duplicate check (one per proposal) and the queue read (one per round of filling slots) filter on the
run and one more column. With only single-column indexes SQLite picks run_id's and scans every experiment
of the run, so both slowed down in proportion to the run's length.
"""
from typing import Sequence, Union

from alembic import op


revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_index('ix_experiments_run_id_ast_hash', 'experiments', ['run_id', 'ast_hash'], unique=False)
    op.create_index('ix_experiments_run_id_status', 'experiments', ['run_id', 'status'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_experiments_run_id_status', table_name='experiments')
    op.drop_index('ix_experiments_run_id_ast_hash', table_name='experiments')
