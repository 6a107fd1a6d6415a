"""experiments: the (run_id, commit) index becomes (run_id, commit, device_name)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 17:00:00

A commit's accepted runs on one hardware class (loop/hardware.py runs_on, asked for every result) filter on
run_id, commit and device_name. With an index of two columns for each of (run_id, commit) and
(run_id, device_name), SQLite (no statistics) took the device_name one: on a fleet of one class that reads
every experiment of the run, for every result. With device_name third in the commit index, the commit's
rows are found directly. The index still serves every query on (run_id, commit) alone.
"""
from typing import Sequence, Union

from alembic import op


revision: str = '0008'
down_revision: Union[str, Sequence[str], None] = '0007'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_index('ix_experiments_run_id_commit_device_name', 'experiments', ['run_id', 'commit', 'device_name'],
                    unique=False)
    op.drop_index('ix_experiments_run_id_commit', table_name='experiments')


def downgrade() -> None:
    op.create_index('ix_experiments_run_id_commit', 'experiments', ['run_id', 'commit'], unique=False)
    op.drop_index('ix_experiments_run_id_commit_device_name', table_name='experiments')
