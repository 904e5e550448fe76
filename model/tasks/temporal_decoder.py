"""Temporal VAE decoder (SVD's AutoencoderKLTemporalDecoder): the model's image decoder
gets temporal layers and is finetuned on clips (reconstruction, frame-change error and a
3D patch discriminator) so decoded frames do not flicker; the encoder and the UNet stay.
It trains the VAE, not the UNet, with its own config and loop (model/temporal_decoder.py);
the result is the model it started from with the new `vae/`, so it keeps that model's
kind for sampling and serving."""

from __future__ import annotations

from model.tasks.base import Task


class TemporalDecoder(Task):
    name = "temporal-decoder"
    title = "the VAE decoder made temporal (SVD's video decoder): decoded frames do not flicker"
    description = (
        "Temporal VAE decoder (SVD's AutoencoderKLTemporalDecoder): the model's image decoder gets temporal layers "
        "and is finetuned on clips (reconstruction + 3D patch discriminator) so decoded frames do not flicker; the "
        "encoder and the UNet are unchanged. The result is the --init-from model folder with the new vae/."
    )
    trains = "vae"
    # A new version of the model it decodes for.
    registered_name = "vdm-text-to-video"


TASKS = (TemporalDecoder(),)
