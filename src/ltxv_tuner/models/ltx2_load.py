"""Loading LTX-2 components from every source `model.model_source` can name (see `sources.py`).

Components: the transformer (`LTX2VideoTransformer3DModel`), the text connectors with the aggregate projection
(`LTX2TextConnectors`), the video VAE, the audio VAE, the vocoder, the Gemma text encoder + tokenizer, the
scheduler. Cheap facts (identities for cache keys, the transformer config, parameter counts) without weights.

Sources:
- `tiny-ltx2`: the small random LTX-2 of `ltx2_tiny.py`;
- a named version -> its Hugging Face file(s), downloaded once into the HF cache: 2.0/2.3 one file with every
  component, 2.5 one file per component (`versions.json` "files"); the Gemma 3 of 2.0/2.3 from its own HF repo;
- a local single file in the official layout (`ltx2_keys.py`): the config of each component is the first of the
  file's own diffusers configs (written by this tool), the one its `config` metadata describes, and the shipped
  configs of 2.0 / 2.3 / 2.5 whose weight names and shapes match the header exactly; only then are weights read;
- a local diffusers folder as `LTX2Pipeline.save_pretrained` writes it;
- `model.text_encoder`: a local Gemma folder (a transformers folder, or one with text_encoder/ + tokenizer/).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from . import hub, ltx2_keys, ltx2_tiny
from .ltx2_facts import GEMMA3_REPO, model_identity  # noqa: F401  (re-exported: the family's facts)
from .ltx2_facts import GEMMA_FIX as _GEMMA_FIX
from .ltx2_facts import gemma_repo as _gemma_repo
from .ltx2_facts import text_encoder_source as _text_encoder_source
from .single_file import (
    Header,
    build_from_state,
    is_aux_key,
    lora_like,
    match,
    not_base_model_error,
    read_header,
    read_tensors,
)
from .sources import (
    MODEL_CONFIGS,
    folder_scheduler,
    text_encoder_dirs,
    versions,
)

KEY = "model.model_source"
CONFIG_DIRS = ("ltx2-19b", "ltx2.3-22b", "ltx2.5-22b")  # shipped diffusers configs: 2.0, 2.3, 2.5
GEMMA3_WIDTH = 3840
GEMMA_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]
WHAT = {
    "transformer": "transformer",
    "connectors": "text connectors",
    "vae": "video VAE",
    "audio_vae": "audio VAE",
    "vocoder": "vocoder",
}
_TINY_BUILDERS = {
    "transformer": ltx2_tiny.build_transformer,
    "connectors": ltx2_tiny.build_connectors,
    "vae": ltx2_tiny.build_video_vae,
    "audio_vae": ltx2_tiny.build_audio_vae,
    "vocoder": ltx2_tiny.build_vocoder,
}


def _component_class(component: str, config: dict | None = None):
    import diffusers
    from diffusers.pipelines.ltx2 import connectors, vocoder

    if component == "vocoder":
        return getattr(vocoder, (config or {}).get("_class_name", "LTX2Vocoder"))
    if component == "connectors":
        return connectors.LTX2TextConnectors
    names = {"transformer": "LTX2VideoTransformer3DModel", "vae": "AutoencoderKLLTX2Video"}
    return getattr(diffusers, names.get(component, "AutoencoderKLLTX2Audio"))


def _shipped(config_dir: Path, component: str) -> dict:
    return json.loads((config_dir / component / "config.json").read_text(encoding="utf-8"))


def _public(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


# --------------------------------------------------------------------------------------------------
# Which files hold a component


def _component_paths(src, component: str) -> list[Path]:
    """The local file(s) of a component of a named version (downloaded once) or a single-file source."""
    if src.kind == "single_file":
        return [src.path]
    files = versions()[src.version].get("files")
    if not files:
        return [hub.hf_file(src.repo, src.filename)]
    names = [files[component]] + ([files["text_projection"]] if component == "connectors" else [])
    return [hub.hf_file(src.repo, name) for name in dict.fromkeys(names)]


def _official_keys(header: Header, component: str) -> dict[str, str]:
    """official key -> key in the file. A standalone VAE file (2.5's vae/ files) may lack the `vae.` prefix."""
    keys = [k for k in header.shapes if not is_aux_key(k)]
    if component == "vae" and not any(k.startswith("vae.") for k in keys):
        return {"vae." + k: k for k in keys if k.startswith(("encoder.", "decoder.", "per_channel_statistics."))}
    return {k: k for k in keys}


_GIVE_INSTEAD = (
    "an LTX-2 checkpoint such as ltx-2-19b-dev.safetensors, a diffusers LTX-2 folder, "
    "or a named version like LTX2_19B_DEV"
)


def _not_ltx2_error(path: Path, component: str, shapes: dict) -> UserError:
    return not_base_model_error(KEY, path, shapes, "LTX-2", WHAT[component], _GIVE_INSTEAD)


def _weight_names(headers: list[Header], component: str) -> dict[str, tuple[Header, str]]:
    """diffusers name -> (header, key in that file) for one component, over the files that hold it."""
    names: dict[str, tuple[Header, str]] = {}
    for header in headers:
        if lora_like(header.shapes):
            raise _not_ltx2_error(header.path, component, header.shapes)
        official = _official_keys(header, component)
        for name, key in ltx2_keys.to_diffusers(official)[component].items():
            names[name] = (header, official[key])
    if not names:
        raise _not_ltx2_error(headers[0].path, component, headers[0].shapes)
    return names


# --------------------------------------------------------------------------------------------------
# Which config fits a file


def _gemma_text_config(model_cfg) -> dict | None:
    """hidden_size / num_hidden_layers of a local Gemma (`model.text_encoder`), if one is given."""
    if not model_cfg.text_encoder:
        return None
    folder = Path(model_cfg.text_encoder).expanduser()
    for path in (folder / "text_encoder" / "config.json", folder / "config.json"):
        if path.is_file():
            config = json.loads(path.read_text(encoding="utf-8"))
            return config.get("text_config", config)
    return None


def _with_caption_dims(config: dict, found: dict, model_cfg) -> dict | None:
    """A connectors config sized from the weights (Gemma's width x (layers + 1) feeds the aggregate projection), or
    None where the width is unknown: 2.5's Gemma 4 width comes from `model.text_encoder`'s config."""
    if "text_proj_in_factor" in config and "caption_channels" in config:
        return config
    flat = found.get("video_text_proj_in.weight", found.get("text_proj_in.weight", (0, 0)))[1]
    gemma = _gemma_text_config(model_cfg) or {}
    width = gemma.get("hidden_size") or (GEMMA3_WIDTH if flat % GEMMA3_WIDTH == 0 else None)
    if not width or flat % width:
        return None
    return {**config, "caption_channels": width, "text_proj_in_factor": flat // width}


def _json_metadata(header: Header, key: str) -> dict | None:
    try:
        value = json.loads(header.metadata.get(key) or "null")
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _metadata_configs(headers: list[Header], component: str, found: dict) -> list[tuple[str, dict]]:
    """Configs a file describes: a full fine-tune's own transformer config, this tool's diffusers configs, then the
    official `config` metadata (transformer and connectors; its other sections use ltx-core's own terms, which the
    shipped configs cover)."""
    from ..export import TRANSFORMER_CONFIG_KEY

    out = []
    for header in headers:
        name = header.path.name
        exported = _json_metadata(header, TRANSFORMER_CONFIG_KEY) if component == "transformer" else None
        if exported:
            out.append((f"{name}: {TRANSFORMER_CONFIG_KEY}", exported))
        own = (_json_metadata(header, ltx2_keys.DIFFUSERS_CONFIGS_KEY) or {}).get(component)
        if isinstance(own, dict):
            out.append((f"{name}: {ltx2_keys.DIFFUSERS_CONFIGS_KEY}", own))
        section = header.config_section("transformer")
        if section and component == "transformer":
            out.append((f"{name}: config", ltx2_keys.diffusers_transformer_config(section)))
        projection = found.get("text_proj_in.weight", found.get("video_text_proj_in.weight"))
        if section and component == "connectors" and projection is not None:
            registers = found.get("video_connector.learnable_registers", (None,))[0]
            out.append((f"{name}: config", ltx2_keys.diffusers_connectors_config(section, projection, registers)))
    return out


def _shipped_variants(config_dir: Path, component: str) -> list[tuple[str, dict]]:
    """A shipped config and the variants real files differ by (a VAE decoder with timestep conditioning; a 2.5
    transformer with or without the 2.5.1 keyframe embedding)."""
    config = _shipped(config_dir, component)
    out = [(config_dir.name, config)]
    toggle = {"vae": "timestep_conditioning", "transformer": "use_keyframes_abs_pos_embedding"}.get(component)
    if toggle and (component == "vae" or config.get(toggle)):
        out.append(
            (f"{config_dir.name} ({toggle}={not config.get(toggle)})", {**config, toggle: not config.get(toggle)})
        )
    return out


def _candidates(model_cfg, component: str, headers: list[Header], found: dict) -> list[tuple[str, dict]]:
    src = model_cfg.source
    dirs = ([src.config_dir] if src.config_dir else []) + [MODEL_CONFIGS / d for d in CONFIG_DIRS]
    out = _metadata_configs(headers, component, found)
    for config_dir in dict.fromkeys(dirs):
        out += _shipped_variants(config_dir, component)
    if component == "connectors":
        out = [(label, _with_caption_dims(config, found, model_cfg)) for label, config in out]
    unique: list[tuple[str, dict]] = []
    for label, config in out:
        if config is not None and all(config != c for _, c in unique):
            unique.append((label, config))
    return unique


def _resolve_single_file(model_cfg, component: str):
    """(class, config, {diffusers name: (header, key)}) from file headers alone; no weights read."""
    headers = [read_header(p) for p in _component_paths(model_cfg.source, component)]
    names = _weight_names(headers, component)
    found = {name: header.shapes[key] for name, (header, key) in names.items()}
    first_problem = ""
    candidates = _candidates(model_cfg, component, headers, found)
    for class_name in dict.fromkeys(c.get("_class_name") for _, c in candidates):
        cls = _component_class(component, {"_class_name": class_name} if class_name else None)
        label, config = match(cls, [(lb, c) for lb, c in candidates if c.get("_class_name") == class_name], found)
        if label is not None:
            return cls, config, names
        first_problem = first_problem or config
    if component == "connectors" and not _gemma_text_config(model_cfg):
        first_problem += "; a 2.5 file needs model.text_encoder set to its local Gemma folder to size them"
    raise UserError(
        f"{KEY}: the LTX-2 {WHAT[component]} in {headers[0].path} matches no known architecture (2.0 19B, 2.3/2.5 "
        f"22B; closest {first_problem}); use a diffusers folder with its own {component}/config.json for other sizes"
    )


# --------------------------------------------------------------------------------------------------
# Component loaders


def _from_folder(folder: Path, component: str, dtype, device):
    path = folder / component / "config.json"
    if not path.is_file():
        raise UserError(
            f"{KEY}: {folder} has no {component}/config.json (a diffusers LTX-2 folder has transformer/, connectors/, "
            "vae/, audio_vae/, vocoder/ as LTX2Pipeline.save_pretrained writes them)"
        )
    cls = _component_class(component, json.loads(path.read_text(encoding="utf-8")))
    model = cls.from_pretrained(
        str(folder), subfolder=component, local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=True
    )
    return model.to(device).eval()


def load_component(model_cfg, component: str, dtype=torch.float32, device="cpu"):
    """One of transformer, connectors, vae, audio_vae, vocoder from any source, in `dtype` on `device`."""
    src = model_cfg.source
    if src.kind == "tiny":
        return _TINY_BUILDERS[component]().to(device=device, dtype=dtype)
    if src.kind == "diffusers":
        return _from_folder(src.path, component, dtype, device)
    cls, config, names = _resolve_single_file(model_cfg, component)
    by_header: dict[Path, tuple[Header, list[tuple[str, str]]]] = {}
    for name, (header, key) in names.items():
        by_header.setdefault(header.path, (header, []))[1].append((name, key))
    state = {}
    for header, pairs in by_header.values():
        tensors = read_tensors(header, [key for _, key in pairs], dtype, device)
        state |= {name: tensors[key] for name, key in pairs}
    return build_from_state(cls, config, state, dtype, device)


def load_transformer(model_cfg, dtype=torch.float32, device="cpu"):
    return load_component(model_cfg, "transformer", dtype, device)


def load_connectors(model_cfg, dtype=torch.float32, device="cpu"):
    return load_component(model_cfg, "connectors", dtype, device)


def load_vae(model_cfg, dtype=torch.float32, device="cpu"):
    return load_component(model_cfg, "vae", dtype, device)


def load_audio_vae(model_cfg, dtype=torch.float32, device="cpu"):
    return load_component(model_cfg, "audio_vae", dtype, device)


def load_vocoder(model_cfg, dtype=torch.float32, device="cpu"):
    return load_component(model_cfg, "vocoder", dtype, device)


# --------------------------------------------------------------------------------------------------
# Text encoder (Gemma) and scheduler


def _load_tokenizer(folder: Path, key: str):
    """Gemma's tokenizer, left padding. A word-level tokenizer.json (the tiny model's, saved) is read verbatim:
    transformers 5's GemmaTokenizer rebuilds a BPE pipeline from the vocabulary, which would change its ids."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        spec = {}
    cls = PreTrainedTokenizerFast if spec.get("model", {}).get("type") == "WordLevel" else AutoTokenizer
    try:
        tokenizer = cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, ImportError) as err:
        raise UserError(f"{key}: cannot load the Gemma tokenizer from {folder} ({err})".splitlines()[0]) from None
    tokenizer.padding_side = "left"
    return tokenizer


def load_text_encoder(model_cfg, dtype=torch.float32, device="cpu"):
    """(tokenizer, Gemma) - left padding; the Gemma returns all hidden states, the aggregate projection is in the
    connectors."""
    kind, folder = _text_encoder_source(model_cfg)
    if kind == "tiny":
        return ltx2_tiny.build_tokenizer(), ltx2_tiny.build_text_encoder().to(device=device, dtype=dtype)
    key = "model.text_encoder" if model_cfg.text_encoder or kind == "hf" else KEY
    if kind == "hf":
        repo = _gemma_repo(model_cfg)
        folder = hub.hf_folder(
            repo, GEMMA_PATTERNS, lambda f: (f / "config.json").is_file() and (f / "tokenizer_config.json").is_file(),
            f"the Gemma text encoder ({repo})", "model.text_encoder", fix=_GEMMA_FIX,
        )  # fmt: skip
    tok_dir, enc_dir = text_encoder_dirs(folder, key, "Gemma")
    from transformers import AutoModelForImageTextToText

    tokenizer = _load_tokenizer(tok_dir, key)
    encoder = AutoModelForImageTextToText.from_pretrained(str(enc_dir), local_files_only=True, dtype=dtype)
    return tokenizer, encoder.to(device).eval()


def load_scheduler(model_cfg):
    return folder_scheduler(model_cfg.source) or ltx2_tiny.build_scheduler()


# --------------------------------------------------------------------------------------------------
# Identities (cache keys), the transformer config, metadata


def architecture(model_cfg) -> dict:
    """The transformer config (diffusers names), without reading weights (a local file's header is matched here,
    so a wrong file fails before any download or encoding)."""
    return component_config(model_cfg, "transformer")


def component_config(model_cfg, component: str) -> dict:
    """A component's diffusers config (transformer, connectors, ...) without reading weights."""
    src = model_cfg.source
    if src.kind == "tiny":
        tiny = {"transformer": ltx2_tiny.TRANSFORMER_CONFIG, "connectors": ltx2_tiny.CONNECTORS_CONFIG}
        return dict(tiny[component])
    if src.kind == "named":
        return _public(_shipped(src.config_dir, component))
    if src.kind == "diffusers":
        return _public(json.loads((src.path / component / "config.json").read_text(encoding="utf-8")))
    return _public(_resolve_single_file(model_cfg, component)[1])


def count_params(tcfg: dict) -> int:
    """Transformer parameters from its config, built on the meta device (no memory)."""
    from diffusers import LTX2VideoTransformer3DModel

    with torch.device("meta"):
        model = LTX2VideoTransformer3DModel(**_public(tcfg))
    return sum(p.numel() for p in model.parameters())


def base_checkpoint_metadata(model_cfg) -> dict | None:
    """The safetensors metadata (the official `config` JSON) of a single-file base, for exports to carry over."""
    src = model_cfg.source
    if src.kind not in ("named", "single_file"):
        return None
    return dict(read_header(_component_paths(src, "transformer")[0]).metadata) or None
