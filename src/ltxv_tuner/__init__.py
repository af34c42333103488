"""ltxv-tuner: one YAML, one command to fine-tune LTX-Video (LoRA or full) for ComfyUI."""

__version__ = "0.1.0"
PROJECT_NAME = "ltxv-tuner"
