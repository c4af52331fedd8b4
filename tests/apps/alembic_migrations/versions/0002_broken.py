"""A migration that fails half-way: its new table and column must not survive.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("audit_log", sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("what", sa.Text))
    op.add_column("accounts", sa.Column("note", sa.Text))
    op.execute("UPDATE accounts SET note = 'x' || (1 / (id - id))")  # division by zero


def downgrade() -> None:
    op.drop_column("accounts", "note")
    op.drop_table("audit_log")
