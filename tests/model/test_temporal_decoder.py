"""The temporal-decoder finetune's mechanism: the image VAE converts to diffusers'
AutoencoderKLTemporalDecoder starting equal to its image decoder (exactly where
diffusers' structure allows, the measured gap where it does not), only the decoder
trains (the encoder stays bit-identical), the 3D patch discriminator sees across
frames, the flicker metric reads what it should, and the model's codec decodes whole
clips with the temporal decoder after save and load."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder

from components.sample_data.render import moving_shapes
from model.conditioning import LatentCodec
from model.data import ClipSpec
from model.temporal_decoder import (
    TEMPORAL_PARAMETER,
    PatchDiscriminator3D,
    TemporalDecoderConfig,
    TemporalDecoderTrainer,
    decode_frames,
    decoding_metrics,
    flicker,
    named_config,
    temporal_vae,
    train_temporal_decoder,
    validation_loss,
)


def _image_vae(layers_per_block: int) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=layers_per_block,
        norm_num_groups=32,
    ).eval()


def _latents(frames: int = 4) -> torch.Tensor:
    return torch.randn(2, frames, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def test_conversion_is_exact_when_the_vae_structure_maps_and_post_quant_conv_has_no_bias():
    vae = _image_vae(layers_per_block=2)  # SD's VAE has 2: its mid block maps one to one
    with torch.no_grad():
        vae.post_quant_conv.bias.zero_()
    temporal, dropped = temporal_vae(vae)
    assert isinstance(temporal, AutoencoderKLTemporalDecoder) and dropped == []
    latents = _latents()
    with torch.no_grad():
        difference = (decode_frames(vae, latents) - decode_frames(temporal, latents)).abs().max()
    assert difference < 1e-4, difference
    for name, value in vae.state_dict().items():  # encoder and quant_conv copied bit for bit
        if name.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(value, temporal.state_dict()[name]), name


def test_conversion_gaps_are_the_folded_bias_at_the_border_and_the_tiny_mid_block():
    vae = _image_vae(layers_per_block=2)
    temporal, _ = temporal_vae(vae)
    latents = _latents()
    with torch.no_grad():
        # conv_in(post_quant_conv(z)) folded into one convolution: exact inside the latent
        image_in = vae.decoder.conv_in(vae.post_quant_conv(latents.flatten(0, 1)))
        temporal_in = temporal.decoder.conv_in(latents.flatten(0, 1))
    inside = (image_in - temporal_in)[..., 1:-1, 1:-1].abs().max()
    border = (image_in - temporal_in).abs().max()
    assert inside < 1e-5 and border > 1e-3, (inside, border)
    # layers_per_block=1: diffusers' temporal mid block has one res block and no attention
    _, dropped = temporal_vae(_image_vae(layers_per_block=1))
    assert {d.split(".spatial_res_block")[0] for d in dropped} == {"decoder.mid_block.resnets.1"}


def test_a_training_step_moves_the_decoder_and_its_temporal_layers_only():
    vae = LatentCodec.tiny().vae
    temporal, _ = temporal_vae(vae)
    before = {k: v.clone() for k, v in temporal.state_dict().items()}
    trainer = TemporalDecoderTrainer(temporal, TemporalDecoderConfig(adversarial_start=0, lr=1e-3))
    video = torch.rand(1, 3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    metrics = trainer.step(video, torch.Generator().manual_seed(0))
    assert {"l1", "generator_loss", "discriminator_loss"} <= set(metrics)
    after = temporal.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("decoder.") for k in changed)
    assert any(TEMPORAL_PARAMETER.search(k) for k in changed)  # the zero-initialised layers learn
    assert not any(p.requires_grad for p in temporal.encoder.parameters())


def test_the_discriminator_scores_patches_across_neighbouring_frames():
    discriminator = PatchDiscriminator3D(width=8)
    video = torch.zeros(2, 6, 3, 32, 32, requires_grad=True)
    logits = discriminator(video)
    assert logits.shape == (2, 1, 6, 4, 4)
    logits[:, :, 3].sum().backward()  # frame 3's scores depend on frames 2 and 4, not only 3
    reach = video.grad.abs().sum(dim=(0, 2, 3, 4))
    assert reach[2] > 0 and reach[3] > 0 and reach[4] > 0


def test_flicker_is_the_frame_to_frame_change_the_decoder_adds():
    truth = torch.linspace(-1, 1, 8).view(1, 8, 1, 1, 1).expand(1, 8, 3, 4, 4)  # a steady fade
    assert flicker(truth, truth) == 0.0
    assert flicker(truth + 0.3, truth) == pytest.approx(0.0, abs=1e-6)  # a constant offset does not flicker
    alternating = torch.tensor([0.1, -0.1] * 4).view(1, 8, 1, 1, 1)
    assert flicker(truth + alternating, truth) == pytest.approx(0.2)


def test_the_codec_decodes_clips_with_the_temporal_decoder_after_save_and_load(tmp_path):
    temporal, _ = temporal_vae(LatentCodec.tiny().vae)
    with torch.no_grad():
        temporal.decoder.time_conv_out.weight[:, :, 0] += 0.1  # frame t now sees frame t-1
    temporal.save_pretrained(tmp_path / "vae")
    codec = LatentCodec.from_folder(tmp_path / "vae")
    assert isinstance(codec.vae, AutoencoderKLTemporalDecoder)
    latents = _latents(frames=4)
    clip = codec.decode(latents)
    single = codec.decode(latents[:, 2:3])  # a frame decoded alone differs from in its clip
    assert clip.shape == (2, 4, 3, 32, 32) and not torch.allclose(clip[:, 2:3], single)


def test_named_config_and_bad_configs():
    assert named_config("tiny").clip.num_frames == 8
    with pytest.raises(ValueError, match="no config"):
        named_config("nonexistent")
    with pytest.raises(ValueError, match="unknown temporal-decoder config fields"):
        TemporalDecoderConfig.from_dict({"stage": "temporal-decoder", "unet": "tiny"})
    with pytest.raises(ValueError, match="at least 2 frames"):
        TemporalDecoderConfig.from_dict({"clip": {"num_frames": 1}})
    # YAML 1.1 reads 2e-4 as a string: a number all the same; a value of the wrong kind names its field.
    assert TemporalDecoderConfig.from_dict({"lr": "2e-4", "clip": {"num_frames": "4"}}).lr == 2e-4
    with pytest.raises(ValueError, match=r"config clip.fps: 'fast' is not valid"):
        TemporalDecoderConfig.from_dict({"clip": {"fps": "fast"}})
    with pytest.raises(ValueError, match=r"config trainable: 'all' is not valid \(Input should be 'decoder' or"):
        TemporalDecoderConfig.from_dict({"trainable": "all"})


def _static_discs(seed: int, clips: int, frames: int = 4, size: int = 16) -> torch.Tensor:
    videos = [
        moving_shapes(frames, size, size, num_shapes=1, max_speed=0.0, radius_range=(3, 5), seed=seed + i)
        for i in range(clips)
    ]
    return torch.stack([torch.from_numpy(v.frames).permute(0, 3, 1, 2).float() / 127.5 - 1 for v in videos])


def test_a_short_finetune_decodes_static_clips_with_less_flicker_than_the_image_decoder():
    """Static discs (true frame-to-frame change: zero) whose per-frame latents carry
    independent noise, as a sampler's do: the image decoder turns the noise into flicker;
    a few steps of the temporal layers (spatial ones frozen, so the comparison is fair)
    learn to make the frames agree, without reconstructing worse. The VAE is the seeded
    random tiny one: a trained VAE costs minutes here (the evidence script trains one)."""
    noise = 0.5
    train, held_out = _static_discs(0, 8), _static_discs(1000, 4)
    vae = LatentCodec.tiny().vae
    temporal, _ = temporal_vae(vae)
    config = TemporalDecoderConfig(
        clip=ClipSpec(4, 8.0, 16, 16), max_steps=8, lr=3e-3, latent_noise=noise, adversarial_start=8,
        trainable="temporal",
    )  # fmt: skip
    spatial = {k: v.clone() for k, v in temporal.decoder.state_dict().items() if not TEMPORAL_PARAMETER.search(k)}
    generator = torch.Generator().manual_seed(1)
    batches = (train[torch.randint(0, len(train), (2,), generator=generator)] for _ in iter(int, 1))
    logged: dict[int, dict] = {}
    trainer = TemporalDecoderTrainer(temporal, config)
    train_temporal_decoder(
        trainer, batches, validation=held_out, on_log=lambda step, m: logged.setdefault(step, {}).update(m)
    )
    validated = {step: m["val_loss"] for step, m in logged.items() if "val_loss" in m}
    assert sorted(validated) == [0, 8]  # the start, and the end (validate_every: 10)
    assert validated[8] < validated[0], validated
    assert validation_loss(temporal, held_out, config)["val_loss"] == validated[8]  # fixed noise: deterministic
    image = decoding_metrics(vae, held_out, latent_noise=noise)
    finetuned = decoding_metrics(temporal, held_out, latent_noise=noise)
    assert finetuned["flicker"] < 0.9 * image["flicker"], (image, finetuned)
    assert finetuned["l1"] <= image["l1"], (image, finetuned)
    assert all(torch.equal(v, temporal.decoder.state_dict()[k]) for k, v in spatial.items())


def test_an_image_to_video_model_with_a_temporal_decoder_exports_and_imports_it(tmp_path):
    from model import svd
    from model.stages import VideoDiffusion
    from model.stages import named_config as stage_config

    model = VideoDiffusion.create(stage_config("tiny", "i2v"))
    temporal, _ = temporal_vae(model.codec.vae)
    with torch.no_grad():
        temporal.decoder.time_conv_out.weight[:, :, 0] += 0.1  # decoding a clip is not decoding its frames
    model.codec = LatentCodec(temporal)
    folder = svd.export_svd(model, tmp_path / "svd")
    again = VideoDiffusion.create(stage_config("tiny", "i2v"), init_from=folder)
    assert isinstance(again.codec.vae, AutoencoderKLTemporalDecoder)
    latents = _latents(frames=4)
    torch.testing.assert_close(again.codec.decode(latents), model.codec.decode(latents), atol=1e-5, rtol=0)


def test_a_resumed_finetune_continues_the_same_run(tmp_path):
    clips = [torch.rand(1, 3, 3, 16, 16, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(2)]
    config = TemporalDecoderConfig(
        clip=ClipSpec(3, 8.0, 16, 16), max_steps=2, adversarial_start=0, lr=1e-3, checkpoint_every=1
    )

    def trainer() -> TemporalDecoderTrainer:
        return TemporalDecoderTrainer(temporal_vae(LatentCodec.tiny().vae)[0], config)

    whole = trainer()  # checkpoints after step 1, then runs on
    train_temporal_decoder(whole, iter(clips), on_checkpoint=lambda step: whole.save(tmp_path / f"{step}"))
    resumed = trainer()
    resumed.load(tmp_path / "1")
    assert resumed.state.step == 1 and resumed.state.data_position == 1
    train_temporal_decoder(resumed, iter(clips[resumed.state.data_position :]))
    for name, value in whole.vae.state_dict().items():
        torch.testing.assert_close(resumed.vae.state_dict()[name], value, atol=1e-6, rtol=0, msg=name)
    for name, value in whole.discriminator.state_dict().items():
        torch.testing.assert_close(resumed.discriminator.state_dict()[name], value, atol=1e-6, rtol=0, msg=name)
