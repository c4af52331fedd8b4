"""Accounts: a table built and altered in steps, an index, and seed rows.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    accounts = op.create_table(
        "accounts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(50)),
    )
    op.add_column("accounts", sa.Column("balance", sa.Numeric(12, 2), server_default="0",
                                        nullable=False))
    op.alter_column("accounts", "name", type_=sa.Text, nullable=True)
    op.bulk_insert(accounts, [{"id": 1, "name": "alice"}, {"id": 2, "name": "bob"}])
    op.alter_column("accounts", "name", nullable=False)
    op.create_index("accounts_name_idx", "accounts", ["name"], unique=True)


def downgrade() -> None:
    op.drop_index("accounts_name_idx", table_name="accounts")
    op.drop_table("accounts")
