"""hardware classes: experiments.device_name and .hardware, runs.class_sigma

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 09:00:00

Every result names the hardware it trained on (result.json's device_name), and the rule compares like with
like: head's reference and the noise floor are kept per hardware class (loop/hardware.py). `hardware` is the
class a paired run must train on. Existing rows get "" (class unknown) and {} (no per-class σ yet: the run's
σ stands in).
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0006'
down_revision: Union[str, Sequence[str], None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('experiments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('device_name', sa.String(), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('hardware', sa.String(), nullable=False, server_default=''))
        batch_op.create_index('ix_experiments_run_id_device_name', ['run_id', 'device_name'], unique=False)
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('class_sigma', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_column('class_sigma')
    with op.batch_alter_table('experiments', schema=None) as batch_op:
        batch_op.drop_index('ix_experiments_run_id_device_name')
        batch_op.drop_column('hardware')
        batch_op.drop_column('device_name')
