"""The base of a vendor's system settings model (`Provider.settings_model`).

A system entry in a policy is the keys every system has (`vendor`, `url`, `credentials`, ...) plus the
settings of the vendor it names: `validate` checks those with the vendor's model, strictly (YAML already gives
typed values), and reports each problem at its `file:line:col`. A validator raises `ValueError` with a
plain-words reason; the policy loader prints it as it is.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class VendorSettings(BaseModel):
    """Settings every vendor takes; a vendor's model adds its own."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    # The largest answer accepted from the vendor, in MiB counted after decompression (default 64).
    max_answer_mb: Annotated[int, Field(ge=1, le=4096)] | None = None
