"""job plans (stages of units), skipped images, datasets and their images, registered models

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("plan", sa.JSON(), nullable=False, server_default="[]"))
        batch.add_column(sa.Column("skipped", sa.JSON(), nullable=False, server_default="[]"))
        batch.add_column(sa.Column("created_by", sa.Integer(), nullable=True))
        batch.drop_column("finalize_claimed")
    with op.batch_alter_table("shards") as batch:
        batch.add_column(sa.Column("stage", sa.String(64), nullable=False, server_default="infer"))
        batch.add_column(sa.Column("queue", sa.String(16), nullable=False, server_default="gpu"))
        batch.add_column(sa.Column("done", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("claimed_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("finished_at", sa.Float(), nullable=True))
        batch.drop_constraint("uq_shard_job_index", type_="unique")
        batch.create_unique_constraint("uq_shard_job_stage_index", ["job_id", "stage", "index"])
    op.create_table(
        "datasets",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("annotations_key", sa.String(512), nullable=True),
        sa.Column("stats", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "dataset_id", sa.Integer(), sa.ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("name", sa.String(512), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(512), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("dataset_id", "name", name="uq_image_dataset_name"),
        sa.UniqueConstraint("dataset_id", "sha256", name="uq_image_dataset_sha256"),
    )
    op.create_index("ix_images_dataset_id", "images", ["dataset_id"])
    op.create_index("ix_images_sha256", "images", ["sha256"])
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(512), nullable=False, unique=True),
        sa.Column("backend", sa.String(32), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True),
        sa.Column("parent_id", sa.Integer(), sa.ForeignKey("models.id", ondelete="SET NULL"), nullable=True),
        sa.Column("datasets", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("info", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("name", "version", name="uq_model_name_version"),
    )
    op.create_index("ix_models_name", "models", ["name"])


def downgrade() -> None:
    op.drop_index("ix_models_name", "models")
    op.drop_table("models")
    op.drop_index("ix_images_sha256", "images")
    op.drop_index("ix_images_dataset_id", "images")
    op.drop_table("images")
    op.drop_table("datasets")
    with op.batch_alter_table("shards") as batch:
        batch.drop_constraint("uq_shard_job_stage_index", type_="unique")
        batch.create_unique_constraint("uq_shard_job_index", ["job_id", "index"])
        batch.drop_column("finished_at")
        batch.drop_column("claimed_at")
        batch.drop_column("done")
        batch.drop_column("queue")
        batch.drop_column("stage")
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("finalize_claimed", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.drop_column("created_by")
        batch.drop_column("skipped")
        batch.drop_column("plan")
