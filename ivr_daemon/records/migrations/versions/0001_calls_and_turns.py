"""calls and turns

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "calls",
        sa.Column("uuid", sa.String(128), nullable=False),
        sa.Column("agent", sa.String(64)),
        sa.Column("caller_number", sa.String(64)),
        sa.Column("variables", sa.JSON(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("answered_at", sa.DateTime()),
        sa.Column("ended_at", sa.DateTime()),
        sa.Column("hangup_cause", sa.String(64)),
        sa.Column("transferred_to", sa.String(64)),
        sa.PrimaryKeyConstraint("uuid", name="pk_calls"),
    )
    op.create_index("ix_calls_started_at", "calls", ["started_at"])
    op.create_index("ix_calls_agent_started_at", "calls", ["agent", "started_at"])
    op.create_table(
        "turns",
        sa.Column("call_uuid", sa.String(128), nullable=False),
        sa.Column("turn_index", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("transcript", sa.Text(), nullable=False),
        sa.Column("reply", sa.Text(), nullable=False),
        sa.Column("heard", sa.Text(), nullable=False),
        sa.Column("interrupted", sa.Boolean(), nullable=False),
        sa.Column("used_fallback", sa.Boolean(), nullable=False),
        sa.Column("llm_ms", sa.Float()),
        sa.Column("tts_ms", sa.Float()),
        sa.Column("first_audio_ms", sa.Float()),
        sa.Column("tool_calls", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["call_uuid"], ["calls.uuid"], name="fk_turns_call_uuid_calls"),
        sa.PrimaryKeyConstraint("call_uuid", "turn_index", name="pk_turns"),
    )


def downgrade() -> None:
    op.drop_table("turns")
    op.drop_index("ix_calls_agent_started_at", table_name="calls")
    op.drop_index("ix_calls_started_at", table_name="calls")
    op.drop_table("calls")
