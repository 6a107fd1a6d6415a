"""experiments: composite indexes (run_id, commit) and (run_id, parent_commit)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 12:00:00

Every result whose parent is no longer head asks for its parent commit's accepted runs, and the proposer's
history reads what was tried on head. Without these, SQLite answered the first by scanning every keep of the
run and the second by scanning every experiment of it: at 300 000 experiments they were a fifth of the
engine's CPU (bench/scheduler_scale.py --prefill).
"""
from typing import Sequence, Union

from alembic import op


revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_index('ix_experiments_run_id_commit', 'experiments', ['run_id', 'commit'], unique=False)
    op.create_index('ix_experiments_run_id_parent_commit', 'experiments', ['run_id', 'parent_commit'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_experiments_run_id_parent_commit', table_name='experiments')
    op.drop_index('ix_experiments_run_id_commit', table_name='experiments')
