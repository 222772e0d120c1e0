"""Adaptation to a site's new product, and the self-contained adapted model that scores its images.

``adapt(checkpoint, support_images, steps)`` runs the inner loop on the K good images, fits the NIW
posterior, calibrates the decision threshold for a target false-positive rate (the meta-learned prior
on normal images' log-statistic, conditioned on the support's shift covariate or not as the
checkpoint's rule for that K says, updated by leave-one-out on the support) and returns a ``SiteModel``. As in
meta-training, the inner loop's loss is evaluated on a fixed random subset of patch positions (the
checkpoint's ``inner_positions``, 128 by default), which is what the meta-learned initialisation and
step size were trained with; on the full grid the inner loop costs several times more for a gradient
of nearly the same direction (cosine about 0.85 on synthetic data). The time of each stage is
recorded in the model's info.

A ``SiteModel`` saves as a folder: ``model.pt`` (tensors only, read with ``weights_only=True``) and
``meta.json`` (backbone, image size, threshold, calibration, support hashes, the checkpoint's hash and
the sha256 of ``model.pt``). It loads without any training state; a corrupt or foreign artifact is
refused with an error naming the file.

Scoring modes: ``resize`` scores the whole image resized to the model's ``image_size``; ``tile`` scores
an image larger than one tile as overlapping tiles of ``image_size`` on the backbone's stride grid
(``tiling.plan_tiles``), stitches the tiles' Mahalanobis grids into one grid of the image's own size and
takes the image statistic over all of it; the anomaly map is then at the image's own size. In tile mode
every tile of every support image is a support view for the posterior fit and the calibration.

A region of interest (``tiling.RegionOfInterest``) zeroes the map outside it and restricts the image
statistic, the leave-one-out statistics and the shift covariate to the patch cells inside it (tiles of
the support mostly outside it are not fitted). A rectangle is saved in ``meta.json``, a mask as
``roi.png`` beside ``model.pt``, hashed the same way.

Support augmentation (``data.augment``) adds views of each support image before the fit; the
calibration's leave-one-out leaves out every view (and every tile) of one original image together and
scores only the original, as a test image would be scored.

The code is split by concept: ``site_adapt`` (adaptation), ``site_support`` (support views and their
layout), ``site_model`` (the model and its scoring) and ``site_artifact`` (save and load); the public
names are importable from here.
"""

from __future__ import annotations

from bayprano.platform.model.site_adapt import adapt, adapt_features
from bayprano.platform.model.site_artifact import ARTIFACT_FORMAT, ARTIFACT_KIND, ROI_MASK_FILE
from bayprano.platform.model.site_model import ImageResult, SiteModel
from bayprano.platform.model.site_support import inner_views
from bayprano.platform.model.tiling import DEFAULT_SCORING, DEFAULT_TILE_OVERLAP, SCORING_MODES

__all__ = [
    "ARTIFACT_FORMAT",
    "ARTIFACT_KIND",
    "DEFAULT_SCORING",
    "DEFAULT_TILE_OVERLAP",
    "ROI_MASK_FILE",
    "SCORING_MODES",
    "ImageResult",
    "SiteModel",
    "adapt",
    "adapt_features",
    "inner_views",
]
