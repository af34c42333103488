"""The YAML schema: every shipped config loads, bad ones are rejected with the path and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ltxv_tuner.config import config_reference_markdown, load_config, parse_override, validate_config
from ltxv_tuner.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        validate_config(raw)
    return e.value.problems


def _base(**sections) -> dict:
    raw = {"dataset": {"data_folder": "data"}}
    for k, v in sections.items():
        raw[k] = v
    return raw


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path: Path):
    cfg = load_config(path)
    # The resolved config round-trips through YAML to the same values.
    assert validate_config(yaml.safe_load(cfg.to_yaml())) == cfg


def test_seed_guide_keys_are_accepted():
    raw = {
        "dataset": {
            "data_folder": "data/videos",
            "resolution_buckets": [[768, 768, 97], [512, 512, 49]],
            "id_token": "SQUISH",
            "preprocessing": {"batch_size": 2, "num_workers": 4, "vae_tiling": True, "decode_videos": True},
        },
        "training": {
            "distributed": True,
            "num_processes": 4,
            "learning_rate": 2e-4,
            "steps": 1500,
            "batch_size": 1,
            "gradient_accumulation_steps": 1,
            "mixed_precision_mode": "bf16",
            "enable_gradient_checkpointing": True,
        },
        "model": {"model_source": "LTXV_13B_097_DEV", "training_mode": "lora"},
        "lora": {"rank": 128, "alpha": 128, "dropout": 0.0, "target_modules": ["to_k", "to_q", "to_v", "to_out.0"]},
        "checkpoints": {"interval": 250, "keep_last_n": 3, "auto_convert_to_comfy": True},
        "validation": {"interval": None, "video_dims": [256, 256, 25], "inference_steps": 20},
        "output_dir": "outputs",
        "seed": 42,
    }
    cfg = validate_config(raw)
    assert cfg.dataset.preprocessing.num_workers == 4
    assert cfg.training.learning_rate == 2e-4
    assert cfg.validation.interval is None
    assert cfg.lora.rank == 128


def test_misspelled_key_names_the_intended_one():
    problems = _problems(_base(training={"learning_rte": 1e-4}))
    assert problems == ["training.learning_rte: unknown key (did you mean training.learning_rate?)"]


def test_unknown_top_level_section():
    (p,) = _problems(_base(valdation={"interval": 5}))
    assert p.startswith("valdation: unknown key") and "did you mean validation?" in p


def test_all_problems_reported_at_once():
    raw = _base(
        training={"steps": 0, "mixed_precision_mode": "fp32", "learning_rte": 1},
        lora={"rank": 0},
    )
    raw["dataset"]["resolution_buckets"] = [[500, 512, 50]]
    problems = _problems(raw)
    text = "\n".join(problems)
    assert len(problems) == 6, text
    assert "dataset.resolution_buckets[0]: width must be a positive multiple of 32, got 500 (use 480 or 512)" in text
    assert "dataset.resolution_buckets[0]: frames must be 8n+1 (1, 9, 17, 25, ...), got 50 (use 49 or 57)" in text
    assert "training.steps:" in text and "lora.rank:" in text and "training.mixed_precision_mode:" in text
    assert "training.learning_rte: unknown key" in text


@pytest.mark.parametrize(
    "bucket, needle",
    [
        ([768, 768], "expected [width, height, frames]"),
        ([768, 770, 97], "height must be a positive multiple of 32, got 770"),
        ([0, 768, 97], "width must be a positive multiple of 32, got 0"),
        ([768, 768, 96], "frames must be 8n+1"),
    ],
)
def test_bad_buckets(bucket, needle):
    raw = _base()
    raw["dataset"]["resolution_buckets"] = [bucket]
    assert any(needle in p for p in _problems(raw))


def test_validation_dims_checked_at_config_time():
    assert any(
        "validation.video_dims" in p and "frames must be 8n+1" in p
        for p in _problems(_base(validation={"video_dims": [256, 256, 24]}))
    )


def test_validation_on_without_prompts_is_rejected():
    (p,) = _problems(_base(validation={"interval": 10}))
    assert "validation.prompts" in p


def test_missing_data_folder():
    (p,) = _problems({"dataset": {}})
    assert p == "dataset.data_folder: required key is missing"


def test_overrides_are_read_as_yaml(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_base(validation={"interval": 5, "prompts": ["a"]})))
    cfg = load_config(
        path,
        [
            "training.steps=10",
            "lora.rank=8",
            "validation.interval=null",
            "lora.target_modules=[to_q,to_k,to_v,to_out.0]",
            "preprocessing.num_workers=3",  # short form of dataset.preprocessing.num_workers
            "training.learning_rate=1e-5",
        ],
    )
    assert cfg.training.steps == 10
    assert cfg.lora.rank == 8
    assert cfg.validation.interval is None
    assert cfg.lora.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert cfg.dataset.preprocessing.num_workers == 3
    assert cfg.training.learning_rate == 1e-5


def test_bad_overrides_are_validated_like_the_file(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_base()))
    with pytest.raises(ConfigError) as e:
        load_config(path, ["training.stpes=10", "lora.rank=-1"])
    text = str(e.value)
    assert "training.stpes: unknown key (did you mean training.steps?)" in text
    assert "lora.rank:" in text
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("training.steps")


def test_yaml_syntax_error_names_the_line(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("dataset:\n  data_folder: x\n  resolution_buckets: [[1, 2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML at line \d+"):
        load_config(path)


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_config_reference_matches_schema():
    doc = (REPO / "docs" / "CONFIG.md").read_text()
    start = doc.index("<!-- config-reference:start -->") + len("<!-- config-reference:start -->")
    end = doc.index("<!-- config-reference:end -->")
    assert doc[start:end].strip() == config_reference_markdown().strip(), (
        "docs/CONFIG.md config reference is stale: regenerate with `python scripts/update_config_reference.py`"
    )


def test_lora_targets_that_are_not_linear_are_rejected():
    (p,) = _problems(_base(lora={"target_modules": ["to_q", "norm_q", "time_embed"]}))
    assert p.startswith("lora.target_modules: norm_q, time_embed: not a Linear layer")
    assert validate_config(_base(lora={"target_modules": ["to_q", "ff.net.0.proj", "proj_in"]}))


def test_a_key_written_twice_is_an_error_not_last_one_wins(tmp_path: Path):
    path = tmp_path / "dup.yaml"
    path.write_text("dataset:\n  data_folder: x\ntraining:\n  steps: 2\n  steps: 5\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: .*line 5.*'steps' is written twice \(lines 4 and 5\)"):
        load_config(path)
    # YAML merge keys (`<<: *anchor`) may still be overridden by the keys after them.
    path.write_text("base: &b\n  steps: 2\ndataset:\n  data_folder: x\ntraining:\n  <<: *b\n  steps: 5\n")
    with pytest.raises(ConfigError, match="base: unknown key"):
        load_config(path)


def test_common_yaml_type_mistakes_get_the_fix():
    problems = _problems(
        {
            "dataset": {"data_folder": "x", "resolution_buckets": [512, 512, 49], "id_token": True},
            "model": [{"model_source": "tiny"}],
            "training": 5,
            "lora": {"target_modules": "to_q"},
        }
    )
    assert problems == [
        "dataset.resolution_buckets: expected a list of [width, height, frames] buckets, "
        "got the flat list [512, 512, 49] (write [[512, 512, 49]])",
        "dataset.id_token: expected text, got True (YAML read it as a bool: put it in quotes)",
        "model: is a section of `key: value` lines, got a list (remove the '- ' before its keys)",
        "lora.target_modules: expected a list, got 'to_q' (write [to_q])",
        "training: is a section of `key: value` lines, got 5 (set a key inside it, e.g. training.KEY=VALUE)",
    ], problems
    assert any(
        p.startswith("dataset.resolution_buckets[1]: ")
        for p in _problems(_base(dataset={"data_folder": "x", "resolution_buckets": [[128, 96, 17], [1, 2]]}))
    )


def test_unquoted_no_means_no_mixed_precision(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset:\n  data_folder: x\ntraining:\n  mixed_precision_mode: no\n")  # YAML 1.1: false
    assert load_config(path).training.mixed_precision_mode == "no"
    assert load_config(path, ["training.mixed_precision_mode=no"]).training.mixed_precision_mode == "no"


def test_tab_indentation_says_so(tmp_path: Path):
    path = tmp_path / "tabs.yaml"
    path.write_text("dataset:\n\tdata_folder: x\n")
    with pytest.raises(ConfigError, match=r"line 2, column 1: .*\(indent with spaces, not tabs\)"):
        load_config(path)
