"""`model_source: tiny-ltx2` - a small randomly initialised LTX-2 of the real architecture, built offline.

The same classes as LTX-2.0 in diffusers: the audio-video transformer (video + audio streams, cross-modal attention,
split RoPE), the text connectors with their aggregate projection, the video VAE (128 latent channels, 32x spatial /
8x temporal), the audio VAE (stereo 16 kHz mel, 64 bins, 8 latent channels, 4x time / 4x mel), the vocoder, a Gemma 3
text encoder (all hidden states stacked) and an offline Gemma tokenizer (left padding, BOS). Only narrower and
shallower. Built from fixed seeds: every process and every run gets identical weights.
"""

from __future__ import annotations

import torch

TINY_SEED = 2026
GEMMA_HIDDEN = 32  # the tiny Gemma's hidden size (= connectors' caption_channels)
GEMMA_LAYERS = 2  # -> 3 hidden states stacked (embeddings + each layer)

_CORPUS_WORDS = (
    "a the red blue green ball square stripes sunset bouncing sliding moving across over on in of with and "
    "click tone beep noise sound music loud soft slow fast camera pan light dark sky sea field wooden floor "
    "person walking cat dog city night day water waves beach gradient circles left right up down"
).split()

TRANSFORMER_CONFIG = dict(
    in_channels=128,
    out_channels=128,
    patch_size=1,
    patch_size_t=1,
    num_attention_heads=2,
    attention_head_dim=16,
    cross_attention_dim=32,
    vae_scale_factors=(8, 32, 32),
    audio_in_channels=128,
    audio_out_channels=128,
    audio_num_attention_heads=2,
    audio_attention_head_dim=8,
    audio_cross_attention_dim=16,
    num_layers=2,
    caption_channels=GEMMA_HIDDEN,
    rope_type="split",
    rope_double_precision=True,
)

CONNECTORS_CONFIG = dict(
    caption_channels=GEMMA_HIDDEN,
    text_proj_in_factor=GEMMA_LAYERS + 1,
    video_connector_num_attention_heads=2,
    video_connector_attention_head_dim=16,
    video_connector_num_layers=1,
    video_connector_num_learnable_registers=8,
    audio_connector_num_attention_heads=2,
    audio_connector_attention_head_dim=16,
    audio_connector_num_layers=1,
    audio_connector_num_learnable_registers=8,
    connector_rope_base_seq_len=64,
    rope_type="split",
    rope_double_precision=True,
)

# LTX-2's video VAE structure (patch 4, spatial/temporal/spatiotemporal downsampling -> 32x / 8x), narrow widths.
VIDEO_VAE_CONFIG = dict(
    latent_channels=128,
    block_out_channels=(8, 16, 32, 64),
    down_block_types=("LTX2VideoDownBlock3D",) * 4,
    decoder_block_out_channels=(16, 32, 64),
    layers_per_block=(1, 1, 1, 1, 1),
    decoder_layers_per_block=(1, 1, 1, 1),
    spatio_temporal_scaling=(True, True, True, True),
    decoder_spatio_temporal_scaling=(True, True, True),
    decoder_inject_noise=(False, False, False, False),
    downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
    upsample_type=("spatiotemporal", "spatiotemporal", "spatiotemporal"),
    upsample_residual=(True, True, True),
    upsample_factor=(2, 2, 2),
    patch_size=4,
    patch_size_t=1,
    spatial_compression_ratio=32,
    temporal_compression_ratio=8,
)

AUDIO_VAE_CONFIG = dict(
    base_channels=128,  # = latent_channels * mel_bins / 4 (the audio VAE's own constraint)
    output_channels=2,
    ch_mult=(1, 1, 1),
    num_res_blocks=1,
    in_channels=2,
    latent_channels=8,
    mel_bins=64,
    sample_rate=16000,
    mel_hop_length=160,
)

VOCODER_CONFIG = dict(
    in_channels=128,  # = audio VAE output channels x mel bins / ... as LTX-2: 2 x 64
    hidden_channels=32,
    out_channels=2,
    upsample_kernel_sizes=[16, 15, 8, 4, 4],
    upsample_factors=[6, 5, 2, 2, 2],
    resnet_kernel_sizes=[3],
    resnet_dilations=[[1]],
    output_sampling_rate=24000,
)

GEMMA_CONFIG = dict(
    text_config=dict(
        vocab_size=len(_CORPUS_WORDS) + 16,
        hidden_size=GEMMA_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=GEMMA_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        sliding_window=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    ),
    vision_config=dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16
    ),  # fmt: skip
    mm_tokens_per_image=4,
)


def _seeded(offset: int):
    torch.manual_seed(TINY_SEED + offset)


def build_transformer():
    from diffusers import LTX2VideoTransformer3DModel

    _seeded(1)
    return LTX2VideoTransformer3DModel(**TRANSFORMER_CONFIG).eval()


def build_connectors():
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    _seeded(2)
    return LTX2TextConnectors(**CONNECTORS_CONFIG).eval()


def build_video_vae():
    from diffusers import AutoencoderKLLTX2Video

    _seeded(3)
    vae = AutoencoderKLLTX2Video(**VIDEO_VAE_CONFIG).eval()
    # Per-channel latent statistics as a real VAE carries them (random ones would be 0/1: not a useful test).
    g = torch.Generator().manual_seed(TINY_SEED + 30)
    vae.latents_mean.copy_(torch.randn(128, generator=g) * 0.1)
    vae.latents_std.copy_(torch.rand(128, generator=g) * 0.5 + 0.75)
    return vae


def build_audio_vae():
    from diffusers import AutoencoderKLLTX2Audio

    _seeded(4)
    vae = AutoencoderKLLTX2Audio(**AUDIO_VAE_CONFIG).eval()
    g = torch.Generator().manual_seed(TINY_SEED + 40)
    vae.latents_mean.copy_(torch.randn(vae.latents_mean.shape, generator=g) * 0.1)
    vae.latents_std.copy_(torch.rand(vae.latents_std.shape, generator=g) * 0.5 + 0.75)
    return vae


def build_vocoder():
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    _seeded(5)
    return LTX2Vocoder(**VOCODER_CONFIG).eval()


def build_text_encoder():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    _seeded(6)
    return Gemma3ForConditionalGeneration(Gemma3Config(**GEMMA_CONFIG)).eval()


def build_tokenizer():
    """A word-level Gemma tokenizer over a fixed vocabulary (no hub): BOS first, left padding as LTX-2 prompts."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import GemmaTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(_CORPUS_WORDS)) + list(".,:;!?'-"))}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.normalizer = normalizers.Lowercase()
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = GemmaTokenizerFast(
        tokenizer_object=words, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        add_bos_token=True, add_eos_token=False,
    )  # fmt: skip
    tok.padding_side = "left"
    return tok


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
        max_image_seq_len=4096, shift_terminal=0.1,
    )  # fmt: skip
