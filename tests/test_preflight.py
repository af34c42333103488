"""Preflight: token counts per bucket and the direction of each memory option's effect."""

from __future__ import annotations

import pytest

from ltxv_tuner.config import validate_config
from ltxv_tuner.models.ltxv import count_params, sequence_length, transformer_config
from ltxv_tuner.preflight import estimate_memory, report


def _cfg(**training):
    return validate_config(
        {
            "dataset": {"data_folder": "x", "resolution_buckets": [[768, 768, 97], [512, 512, 49]]},
            "lora": {"rank": 128, "alpha": 128},
            "training": training,
        }
    )


def test_sequence_length_matches_the_vae_compression():
    assert sequence_length(768, 768, 97) == 7488
    assert sequence_length(512, 512, 49) == 1792
    assert sequence_length(128, 96, 17) == 4 * 3 * 3


def test_13b_parameter_count_and_memory_options():
    tcfg = transformer_config("LTXV_13B_097_DEV")
    n = count_params(tcfg)
    assert 12.5e9 < n < 13.5e9
    plain = estimate_memory(_cfg(), tcfg, [768, 768, 97], n)
    ckpt = estimate_memory(_cfg(enable_gradient_checkpointing=True), tcfg, [768, 768, 97], n)
    assert plain.tokens == 7488
    assert 24 < plain.weights_gib < 25  # bf16 weights of 13B
    assert ckpt.activations_gib < plain.activations_gib / 5
    small = estimate_memory(_cfg(enable_gradient_checkpointing=True), tcfg, [512, 512, 49], n)
    assert small.total_gib < ckpt.total_gib


def test_report_prints_one_line_per_bucket():
    lines = report(_cfg(), transformer_config("LTXV_2B_0.9.6_DEV"))
    assert len(lines) == 2
    assert "768x768x97: 7488 tokens" in lines[0] and "GiB" in lines[0]
    assert report(_cfg(), None)[1].endswith("512x512x49: 1792 tokens")


def test_no_gpu_is_said_before_any_work_with_what_it_means(monkeypatch):
    import torch

    from ltxv_tuner.preflight import report_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tiny = validate_config(
        {"dataset": {"data_folder": "x"}, "model": {"model_source": "tiny"}, "training": {"mixed_precision_mode": "no"}}
    )
    (line,) = report_device(tiny)
    assert line.startswith("preflight: no GPU: training on the CPU") and "fine for the tiny test model" in line

    real = validate_config(
        {"dataset": {"data_folder": "x"}, "training": {"distributed": True, "mixed_precision_mode": "bf16"}}
    )
    lines = report_device(real)
    assert "a real LTXV model takes minutes to hours per step" in lines[0] and "docs/TRAINING.md#setup" in lines[0]
    assert any("bf16 on a CPU" in line for line in lines)
    assert any("training.num_processes null: one CPU process" in line for line in lines)
    two = validate_config({"dataset": {"data_folder": "x"}, "training": {"distributed": True, "num_processes": 2}})
    assert not any("one CPU process" in line for line in report_device(two))


@pytest.mark.parametrize("version", ["tiny", "LTXV_13B_097_DEV", "LTXV_2B_0.9.5", "LTXV_2B_0.9.1"])
def test_parameter_count_by_arithmetic_equals_the_model_diffusers_builds(version):
    import torch
    from diffusers import LTXVideoTransformer3DModel

    from ltxv_tuner.models.ltxv_tiny import TINY_TRANSFORMER_CONFIG

    tcfg = dict(TINY_TRANSFORMER_CONFIG) if version == "tiny" else transformer_config(version)
    with torch.device("meta"):
        model = LTXVideoTransformer3DModel(**tcfg)
    assert count_params(tcfg) == sum(p.numel() for p in model.parameters())
