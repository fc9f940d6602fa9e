"""model promotions (the promoted version per name, and its history), schedules and their runs

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _fk(table: str, ondelete: str) -> sa.ForeignKey:
    return sa.ForeignKey(f"{table}.id", ondelete=ondelete)


def upgrade() -> None:
    op.create_table(
        "promoted_models",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("model_id", sa.Integer(), _fk("models", "CASCADE"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "promotions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("model_id", sa.Integer(), _fk("models", "CASCADE"), nullable=False),
        sa.Column("previous_id", sa.Integer(), _fk("models", "SET NULL"), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_by", sa.Integer(), nullable=True),
        sa.Column("job_id", sa.Integer(), _fk("jobs", "SET NULL"), nullable=True),
        sa.Column("undone", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_promotions_name", "promotions", ["name"])
    op.create_table(
        "schedules",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("cron", sa.String(128), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("labeled", sa.Integer(), nullable=False),
        sa.Column("unlabeled", sa.Integer(), nullable=False),
        sa.Column("eval", sa.Integer(), nullable=False),
        sa.Column("pipeline", sa.JSON(), nullable=False),
        sa.Column("min_new_images", sa.Integer(), nullable=False),
        sa.Column("promotion", sa.JSON(), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "schedule_runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("schedule_id", sa.Integer(), _fk("schedules", "CASCADE"), nullable=False),
        sa.Column("slot", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("job_id", sa.Integer(), _fk("jobs", "SET NULL"), nullable=True),
        sa.Column("teacher_id", sa.Integer(), _fk("models", "SET NULL"), nullable=True),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("new_images", sa.Integer(), nullable=False),
        sa.Column("images_upto", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("schedule_id", "slot", name="uq_schedule_run_slot"),
    )
    op.create_index("ix_schedule_runs_schedule_id", "schedule_runs", ["schedule_id"])


def downgrade() -> None:
    op.drop_index("ix_schedule_runs_schedule_id", "schedule_runs")
    op.drop_table("schedule_runs")
    op.drop_table("schedules")
    op.drop_index("ix_promotions_name", "promotions")
    op.drop_table("promotions")
    op.drop_table("promoted_models")
