"""Image-only spatial finetune (VideoCrafter2): after video training, only the spatial
layers train, on a high-quality image set (each image a one-frame clip run with the
temporal branches off); the temporal layers, which hold the motion, stay unchanged.
"""

from __future__ import annotations

from model.tasks.base import Metric
from model.tasks.text_to_video import TextToVideo


class SpatialHighQuality(TextToVideo):
    name = "spatial-hq"
    title = "image-only spatial finetune (VideoCrafter2): spatial layers on high-quality images"
    description = (
        "Image-only spatial finetune (VideoCrafter2): only the spatial layers train, on a high-quality image set "
        "(--data: WebDataset shards of images); the temporal layers, and with them the motion, stay as they were. "
        "--init-from a trained video model."
    )
    finetune = True
    registered_name = "vdm-spatial-hq"
    metric = Metric(
        "saturation_gap",
        "minimize",
        "gap between the generated foregrounds' saturation and the image set's (the image-quality proxy); "
        "motion_speed_error guards the motion",
    )

    def check(self, config) -> None:
        if config.data != "images" or config.strategy != "spatial":
            raise ValueError("the spatial-hq finetune trains the spatial layers only (strategy: spatial) on images")


TASKS = (SpatialHighQuality(),)
