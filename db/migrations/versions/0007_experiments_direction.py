"""experiments: direction (the research direction of program.md a proposal was asked for)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 09:00:00

The swarm (issue 19) spreads concurrent Claude requests over the research directions program.md names; each
experiment records the one it was asked for, so the digest can count keeps per direction. "" for experiments
made before, by the offline proposer, or when program.md names no directions.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


revision: str = '0007'
down_revision: Union[str, Sequence[str], None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('experiments') as batch:
        batch.add_column(sa.Column('direction', sa.String(), nullable=False, server_default=''))


def downgrade() -> None:
    with op.batch_alter_table('experiments') as batch:
        batch.drop_column('direction')
