"""Text-to-image (Stage I) and text-to-video (Stages II and III): the pretraining stages.

Stage I trains a text-to-image UNet on frames as images (or on an image set); Stage II
inflates it with temporal layers and trains on curated clips; Stage III continues on
high-quality clips at a higher resolution. Generated from a prompt (`generate`).
"""

from __future__ import annotations

from model.tasks.base import Task


class TextToImage(Task):
    name = "image"
    title = "Stage I: text-to-image pretraining on frames (or an SD 2.1 UNet to start from)"
    description = "Stage I: a text-to-image UNet (SD 2.1's layout) trained on the clips' frames as images."
    finetune = False
    video = False
    registered_name = "vdm-text-to-image"

    def check(self, config) -> None:
        if config.strategy != "full":
            raise ValueError("Stage I trains the whole image UNet (strategy: full)")
        if config.data == "orbits":
            raise ValueError("orbit data trains the multi-view finetune only (stage: multiview)")

    def network(self, unet):
        from model.networks import ImageNetwork

        return ImageNetwork(unet)

    def condition(self, model, batch, generator):
        return model.text_condition(batch, generator, micro_conditioning=False)

    def training_inputs(self, model, batch, latents, generator):
        cond = self.condition(model, batch, generator)
        frames = latents.shape[1]  # frames train as images, each with its clip's caption
        return latents.flatten(0, 1), {"text": cond["text"].repeat_interleave(frames, dim=0)}


class TextToVideo(Task):
    name = "video"
    title = "Stage II: text-to-video pretraining (temporal layers inserted into Stage I)"
    description = "Stage II: the Stage I UNet inflated with temporal layers, trained on curated clips."
    finetune = False
    endpoint = "text_to_video"
    registered_name = "vdm-text-to-video"


class HighQuality(TextToVideo):
    name = "hq"
    title = "Stage III: high-quality text-to-video finetuning"
    description = "Stage III: the Stage II model continued on high-quality clips at a higher resolution."


TASKS = (TextToImage(), TextToVideo(), HighQuality())
