"""What frame interpolation and long-video prediction share (Video LDM's masked
conditioning, model/masked.py): the text-to-video UNet widened to also take the known
frames' latents and their mask (C + C + 1 input channels, new ones at zero), trained
with condition dropout (the unconditional side of context guidance). Each kind says
which frames a training clip shows the model: `known_mask(batch, num_frames, generator)`,
a (B, T) mask (interpolation: the key frames; prediction: 0-2 leading frames)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from model.tasks.text_to_video import TextToVideo

if TYPE_CHECKING:
    pass


class KnownFramesTask(TextToVideo):
    finetune = True
    generation_fields = ("context_guidance",)
    samples_from_data = True

    def check(self, config) -> None:
        super().check(config)
        if config.strategy != "full":
            raise ValueError("known frames need strategy full: the UNet's new input channels (conv_in) must train")

    def input_channels(self, latent_channels: int) -> int:
        from model.masked import input_channels

        return input_channels(latent_channels)

    def prepare_unet(self, unet, config, init_from):
        from model.networks import widen_input

        return widen_input(unet, self.input_channels(unet.config.out_channels))

    def network(self, unet):
        from model.masked import MaskedVideoNetwork

        return MaskedVideoNetwork(unet)

    def training_inputs(self, model, batch, latents, generator):
        from model.masked import training_condition

        cond = self.condition(model, batch, generator)
        dropout = model.config.cond_dropout if model.training else 0.0
        mask = self.known_mask(latents.shape[0], latents.shape[1], generator)
        return latents, cond | training_condition(latents, mask, dropout, generator)
