"""confirm runs: experiments.confirms_id

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21 16:06:15.102030

A nullable column (existing rows are no confirm runs), its index, and the self-referencing foreign key
named so the downgrade can drop it.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('experiments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('confirms_id', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_experiments_confirms_id'), ['confirms_id'], unique=False)
        batch_op.create_foreign_key('fk_experiments_confirms_id', 'experiments', ['confirms_id'], ['id'])


def downgrade() -> None:
    with op.batch_alter_table('experiments', schema=None) as batch_op:
        batch_op.drop_constraint('fk_experiments_confirms_id', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_experiments_confirms_id'))
        batch_op.drop_column('confirms_id')
