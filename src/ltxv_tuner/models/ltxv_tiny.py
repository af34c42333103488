"""`model_source: tiny` - a small randomly initialised LTXV of the real architecture, built offline.

Same classes and compression as the real model (32x spatial / 8x temporal VAE with 128 latent channels,
0.9.5-style VAE blocks, LTXV transformer, T5 encoder + tokenizer, the LTXV flow-match scheduler), only
narrower and shallower. Built from a fixed seed, so every process and every run gets identical weights.
"""

from __future__ import annotations

import json

import torch

TINY_SEED = 1234
TINY_TEXT_DIM = 32

# A few sentences the tiny tokenizer's vocabulary is learnt from (offline; no hub).
_CORPUS = [
    "a red ball bouncing on a wooden floor",
    "a blue square sliding across a green field",
    "a person walking through a park on a sunny day",
    "waves rolling onto a sandy beach at sunset",
    "a cat jumping over a fence in slow motion",
    "smooth camera pan over a city skyline at night",
    "squish effect: a soft object is squeezed and pops back",
    "colorful gradients moving left to right, circles and stripes",
]


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    # The trained Unigram model carries (piece, log-prob) pairs: exactly what T5Tokenizer takes. The trainer lists
    # pieces of equal score in a different order in each process (a hash map inside), which would give the same
    # caption other token ids in another process: order them by score, then by piece.
    pairs = [(piece, float(score)) for piece, score in json.loads(tok.to_str())["model"]["vocab"]]
    special = pairs[:3]  # <pad>, </s>, <unk> at ids 0, 1, 2 as trained
    vocab = special + sorted(pairs[3:], key=lambda ps: (-ps[1], ps[0]))
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_tiny_text_encoder():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(TINY_SEED + 1)
    cfg = T5Config(
        vocab_size=128,
        d_model=TINY_TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
    )
    return T5EncoderModel(cfg).eval()


# The 0.9.5+ VAE structure (LTXV_FACTS.md) with the widths left out: the tiny VAE and test VAEs share it.
VAE_095_KWARGS = dict(
    decoder_block_out_channels=(16, 32, 64),
    decoder_layers_per_block=(1, 1, 1, 1),
    down_block_types=("LTXVideo095DownBlock3D",) * 4,
    downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
    spatio_temporal_scaling=(True,) * 4,
    decoder_spatio_temporal_scaling=(True,) * 3,
    decoder_inject_noise=(False,) * 4,
    upsample_residual=(True,) * 3,
    upsample_factor=(2, 2, 2),
    timestep_conditioning=True,
    patch_size=4,
    latent_channels=128,
    # diffusers derives 64x/16x from these block settings; the real (and these) VAEs compress 32x/8x.
    spatial_compression_ratio=32,
    temporal_compression_ratio=8,
)


def build_tiny_vae():
    from diffusers import AutoencoderKLLTXVideo

    torch.manual_seed(TINY_SEED + 2)
    return AutoencoderKLLTXVideo(
        block_out_channels=(8, 16, 32, 64, 128), layers_per_block=(1, 1, 1, 1, 1), **VAE_095_KWARGS
    ).eval()


TINY_TRANSFORMER_CONFIG = dict(
    in_channels=128,
    out_channels=128,
    num_attention_heads=2,
    attention_head_dim=16,
    cross_attention_dim=32,
    num_layers=2,
    caption_channels=TINY_TEXT_DIM,
)


def build_tiny_transformer():
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(TINY_SEED + 3)
    return LTXVideoTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
