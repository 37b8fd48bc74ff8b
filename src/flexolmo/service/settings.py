"""The consortium service's settings: one home for each default of `flexolmo coordinator` and its library.

The service's functions (`publish`, `create_app`, `Worker`, `set_policy`, `registry.initialise`) take these
values as arguments whose defaults come from here, and `cli/coordinator.py` generates its flags from these
fields, so the command and the Python API cannot disagree. This module imports nothing from the service: it is
its ground.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class ServiceSettings(BaseModel):
    """Where the consortium's state lives, how the service listens, and how its jobs are leased."""

    model_config = ConfigDict(extra="forbid")

    db: str = Field("sqlite:///flexolmo-consortium.db",
                    description="database URL (SQLAlchemy): a SQLite file, or postgresql+psycopg://USER@HOST:PORT/DB")
    store: str = Field("consortium-store", description="package store: a directory, or s3://BUCKET/PREFIX "
                                                       "(credentials from the AWS_* environment)")
    store_endpoint: str | None = Field(None, description="the S3-compatible service's URL for an s3:// store "
                                                         "(default: AWS)")
    work_dir: Path | None = Field(None, description="local directory for uploads in progress, scratch space and "
                                                    "published versions (default: the --store directory; "
                                                    "consortium-work with an s3:// store)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8700, ge=1, le=65535, description="port to listen on")
    workers: int = Field(1, ge=0, description="admission workers in this process (0: only `coordinator worker` "
                                              "processes admit)")
    lease_seconds: float = Field(30.0, gt=0, allow_inf_nan=False,
                                 description="how long a job or publication is held without renewal before "
                                             "another process may take it over (its holder is presumed dead)")
    top_k: int = Field(2, ge=1, description="experts active per token in a published version")

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.lease_seconds)


DEFAULTS = ServiceSettings()
LEASE = DEFAULTS.lease
DEFAULT_TOP_K = DEFAULTS.top_k
