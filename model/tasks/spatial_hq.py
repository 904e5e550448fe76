"""Image-only spatial finetune (VideoCrafter2): after video training, only the spatial
layers train, on a high-quality image set (each image a one-frame clip run with the
temporal branches off); the temporal layers, which hold the motion, stay unchanged.
"""

from __future__ import annotations

from model.tasks.base import MOTION_SPEED_ERROR, Evaluation, Metric
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
    training_data = "s3://vdm/images/high-quality/"  # the image set; evaluated on the video data against it
    training_data_is_reference = True
    # The spatial finetune must not cost motion: the gate refuses a candidate whose speed
    # error is more than 0.05 (5 % of the data's speed) worse than the champion's.
    guard = MOTION_SPEED_ERROR
    guard_tolerance = 0.05
    metric = Metric(
        "saturation_gap",
        "minimize",
        "gap between the generated foregrounds' saturation and the image set's (the image-quality proxy); "
        "motion_speed_error guards the motion",
    )

    def check(self, config) -> None:
        if config.data != "images" or config.strategy != "spatial":
            raise ValueError("the spatial-hq finetune trains the spatial layers only (strategy: spatial) on images")

    def evaluate(self, model, shards, *, clips, steps, reference=None, prompts=None) -> Evaluation:
        """The default motion evaluation on the video data `shards` (motion_speed_error guards
        the motion), and the same samples' foreground saturation against the image set
        `reference`'s (model/spatial.py: `evaluate_palette`)."""
        from model.spatial import evaluate_palette

        if not reference:
            raise ValueError("a spatial-hq model is evaluated against its image set: give the reference shards")
        motion = super().evaluate(model, shards, clips=clips, steps=steps, prompts=prompts)
        palette = evaluate_palette(model, shards, reference, motion.samples, clips=clips)
        metrics = {self.metric.name: palette["saturation_gap"]} | motion.metrics
        metrics |= {k: v for k, v in palette.items() if k != "saturation_gap"}
        details = motion.details | {"image_quality": palette}
        return Evaluation(metrics, details, motion.samples, motion.references, motion.prompts)


TASKS = (SpatialHighQuality(),)
