"""Request, response and error bodies of the HTTP API, as pydantic models (they also make the OpenAPI docs)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Error(_Body):
    """Every error: a stable machine-readable code and a message naming what was wrong."""

    code: str = Field(examples=["unknown_site"])
    message: str = Field(examples=["unknown site 'plant-9'"])


class ImageIn(_Body):
    name: Optional[str] = Field(None, description="a label echoed back in the result (e.g. the file name)")
    data: str = Field(description="the encoded image file (PNG, JPEG, BMP or TIFF), base64")


class ScoreRequest(_Body):
    images: list[ImageIn] = Field(min_length=1)


class ImageScore(_Body):
    name: Optional[str] = None
    status: Literal["ok", "error"] = Field(
        "ok",
        description="error: this image was refused or could not be scored (see error); the request's other images were",
    )
    error: Optional[Error] = None
    score: Optional[float] = Field(None, description="image statistic: largest patch Mahalanobis distance over d")
    p_value: Optional[float] = None
    threshold: Optional[float] = None
    decision: Optional[Literal["normal", "anomalous", "review"]] = None
    uncertainty: Optional[float] = Field(None, description="0 = certain, 1 = a coin flip")
    model_version: str
    latency_ms: float = Field(description="time on the server from receiving the request to this result")
    map: Optional[str] = Field(
        None,
        description="with ?map=png a heatmap overlay PNG, with ?map=mask a binary mask PNG at the threshold; base64",
    )
    map_format: Optional[Literal["png", "mask"]] = None


class ScoreResponse(_Body):
    site: str
    model_version: str
    results: list[ImageScore]


class AdaptRequest(_Body):
    images: Optional[list[ImageIn]] = Field(None, description="the K good images, base64")
    folder: Optional[str] = Field(
        None, description="a folder of good images under the site's storage, relative to <site_storage>/<site>/"
    )
    steps: Optional[int] = Field(None, ge=0, le=10, description="inner-loop steps (default: the checkpoint's)")
    target_fpr: float = Field(0.05, gt=0, lt=1)


class VersionOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    site: str
    version: str
    published: Optional[str] = None
    created: Optional[str] = None
    support_size: Optional[int] = None
    checkpoint_sha256: Optional[str] = None
    threshold: Optional[float] = None
    target_fpr: Optional[float] = None
    metrics: dict = Field(default_factory=dict)
    current: bool = False


class AdaptResponse(_Body):
    site: str
    version: VersionOut
    adapt_seconds: float


class SiteSummary(_Body):
    site: str
    current: Optional[str]
    versions: int
    threshold: Optional[float]


class SiteList(_Body):
    sites: list[SiteSummary]


class SiteDetail(_Body):
    site: str
    created: Optional[str]
    current: Optional[str]
    versions: list[VersionOut]


class Health(_Body):
    status: Literal["ok", "not ready"]


class ReviewItem(_Body):
    id: str
    site: str
    created: str
    score: Optional[float] = None
    p_value: Optional[float] = None
    threshold: Optional[float] = None
    decision: Optional[str] = None
    uncertainty: Optional[float] = None
    model_version: Optional[str] = None
    label: Optional[Literal["good", "defective"]] = None
    labelled: Optional[str] = None
    added_ns: Optional[int] = Field(None, description="when it was queued, in ns since the epoch (the order of items)")
    thumbnail: Optional[str] = Field(None, description="a PNG thumbnail of the image, base64")


class ReviewList(_Body):
    site: str
    items: list[ReviewItem] = Field(description="least certain first")


class LabelRequest(_Body):
    label: Literal["good", "defective"]
