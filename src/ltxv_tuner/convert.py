"""Stage 3: ComfyUI twins of a run's weight files, and the `ltxv-convert` CLI (both directions).

Four LTXV file forms are recognised from their keys alone:
  LoRA, diffusers:  transformer.<diffusers module>.lora_A.weight / .lora_B.weight, alpha in metadata
  LoRA, ComfyUI:    diffusion_model.<ComfyUI module>.lora_A.weight / .lora_B.weight (+ optional .alpha),
                    or kohya lora_unet_<module_with_underscores>.lora_down.weight / .lora_up.weight / .alpha
  full, diffusers:  <diffusers module>.weight (no prefix)
  full, ComfyUI:    model.diffusion_model.<original module>.weight (Lightricks' single-file naming)

Alpha: ComfyUI scales an LTXV LoRA by alpha/rank when a `.alpha` tensor is present (else by 1.0); diffusers reads
alpha from the file's metadata and rejects `.alpha` tensors. Each loader gets its own file: the diffusers-format file
(alpha in metadata) and the ComfyUI twin (`.alpha` tensors, ComfyUI names only: `patchify_proj`, `adaln_single`),
both carrying lora_A/lora_B exactly as saved, so neither loses precision to folding alpha into lora_B.

The same forms exist for every model family, each with its own module names (`models/<family>_keys.py`, picked from
the file's metadata or names: `models.keys_of_file`). LTX-2's twin is the official trainer's format: official module
names, alpha/rank folded into lora_B, no `.alpha` keys (ltx-core applies B @ A at the user's strength).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import export
from .checkpoints import (
    COMFY_SUFFIX,
    DIFFUSERS_SUFFIX,
    checkpoints_root,
    converted_back_files,
    convertible_files,
    twin_path,
)
from .errors import UserError
from .logs import quiet_libraries
from .models import keys_of_file
from .models import ltxv_keys as keys  # the default family's names; a file's own come from `keys_of_file`

log = logging.getLogger("ltxv_tuner.convert")
KOHYA_PREFIX = "lora_unet_"


def _kohya_tops(km) -> tuple[str, ...]:
    return tuple(sorted(n.replace(".", "_") for n in km.DIFFUSERS_TOP | km.ORIGINAL_TOP))


_LORA_SUFFIXES = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_down.weight", "A"),
    (".lora_up.weight", "B"),
    (".alpha", "alpha"),
)

LORA_DIFFUSERS, LORA_COMFY, LORA_KOHYA = "lora-diffusers", "lora-comfy", "lora-kohya"
FULL_DIFFUSERS, FULL_ORIGINAL = "full-diffusers", "full-original"
COMFY_FORMS = {LORA_COMFY, LORA_KOHYA, FULL_ORIGINAL}


class AlreadyConverted(UserError):
    """The file is already in the requested form; nothing was written."""


@dataclass
class LoraModule:
    down: torch.Tensor  # lora_A, [rank, in]
    up: torch.Tensor  # lora_B, [out, rank]
    alpha: float | None = None  # from a `.alpha` tensor (ComfyUI/kohya files)

    @property
    def rank(self) -> int:
        return self.down.shape[0]


# --------------------------------------------------------------------------------------------------
# Reading and recognising files


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if path.suffix != ".safetensors":
        raise UserError(f"{path}: only .safetensors files can be converted (pickled .ckpt/.pt/.bin files are not read)")
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors, metadata


def _split_lora_key(key: str) -> tuple[str, str] | None:
    for suffix, part in _LORA_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def _lora_form(modules: set[str], path, km) -> str:
    if all(m.startswith(km.DIFFUSERS_LORA_PREFIX) for m in modules):
        if {_top(m.removeprefix(km.DIFFUSERS_LORA_PREFIX)) for m in modules} <= km.DIFFUSERS_TOP:
            return LORA_DIFFUSERS
    elif all(m.startswith(km.COMFY_LORA_PREFIX) for m in modules):
        if {_top(m.removeprefix(km.COMFY_LORA_PREFIX)) for m in modules} <= km.ORIGINAL_TOP | km.DIFFUSERS_TOP:
            return LORA_COMFY
    elif all(m.startswith(KOHYA_PREFIX) for m in modules):
        # kohya flattens dots to underscores: lora_unet_transformer_blocks_0_attn1_to_q (not an SD UNet's
        # lora_unet_down_blocks_0_...)
        if all(m.removeprefix(KOHYA_PREFIX).startswith(_kohya_tops(km)) for m in modules):
            return LORA_KOHYA
    elif {_top(m) for m in modules} <= km.DIFFUSERS_TOP:
        return LORA_DIFFUSERS  # peft/diffusers `save_lora_adapter` without the "transformer." prefix
    prefixes = sorted({_top(m) + "." for m in modules})[:4]
    raise UserError(
        f"{path}: LoRA keys that are not LTXV transformer LoRA keys (prefixes {', '.join(prefixes)}); "
        "expected transformer.*, diffusion_model.* or lora_unet_transformer_blocks_* (kohya)"
    )


def detect_form(tensor_keys, path: Path | str = "file", km=None) -> str:
    """Which form a file's keys are in (one of the *_DIFFUSERS / *_COMFY / ... constants), or UserError.
    `km`: the family's keys module (default: the family the names belong to)."""
    names = [keys.strip_compile_prefix(k) for k in tensor_keys]
    if not names:
        raise UserError(f"{path}: holds no tensors, so it is neither an LTXV LoRA nor an LTXV transformer")
    km = km or keys_of_file(names)
    split = [_split_lora_key(k) for k in names]
    if all(split):
        return _lora_form({m for m, _ in split}, path, km)
    prefix = km.ORIGINAL_TRANSFORMER_PREFIX
    full_original = [
        k for k in names if k.startswith(prefix) and _top(k.removeprefix(prefix)) not in km.NOT_TRANSFORMER_TOP
    ]
    if full_original and _looks_like_transformer(full_original, prefix, True, km):
        return FULL_ORIGINAL
    if _looks_like_transformer(names, km.COMFY_LORA_PREFIX, True, km):
        return FULL_ORIGINAL
    if _looks_like_transformer(names, "", True, km):
        return FULL_ORIGINAL
    if _looks_like_transformer(names, "", False, km):
        return FULL_DIFFUSERS
    lora_like = sum(1 for s in split if s)
    what = f"{lora_like} of {len(names)} keys look like LoRA keys" if lora_like else f"e.g. {names[0]!r}"
    raise UserError(
        f"{path}: neither an LTXV LoRA nor an LTXV transformer ({what}); "
        "pass a LoRA or transformer .safetensors written by ltxv-tuner, diffusers or ComfyUI"
    )


def _looks_like_transformer(names: list[str], prefix: str, original: bool, km) -> bool:
    present = set(names)
    patchify = "patchify_proj" if original else "proj_in"
    needed = (f"{prefix}{patchify}.weight", f"{prefix}transformer_blocks.0.attn1.to_q.weight")
    if not all(n in present for n in needed):
        return False
    top = km.ORIGINAL_TOP if original else km.DIFFUSERS_TOP
    return all(n.startswith(prefix) and _top(n[len(prefix) :]) in top for n in names)


# --------------------------------------------------------------------------------------------------
# LoRA


def _lora_modules(tensors: dict[str, torch.Tensor], prefix: str, path) -> dict[str, LoraModule]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, part = _split_lora_key(keys.strip_compile_prefix(key))
        parts.setdefault(module.removeprefix(prefix), {})[part] = value
    out = {}
    for module, p in parts.items():
        if "A" not in p or "B" not in p:
            missing = "lora_A (down)" if "A" not in p else "lora_B (up)"
            raise UserError(f"{path}: LoRA module {prefix}{module} has no {missing} weight; the file is incomplete")
        alpha = float(p["alpha"].float().item()) if "alpha" in p else None
        out[module] = LoraModule(down=p["A"], up=p["B"], alpha=alpha)
    return out


def _pattern_value(module: str, patterns: dict, default):
    """peft's rank_pattern/alpha_pattern lookup: the first pattern that matches the end of the module name."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _diffusers_lora_scales(modules: dict[str, LoraModule], metadata: dict[str, str], path) -> dict[str, float]:
    """alpha/rank per module exactly as diffusers' load_lora_weights will apply it to this file."""
    raw = metadata.get(export.LORA_ADAPTER_METADATA_KEY)
    if not raw:  # diffusers assumes alpha == rank
        return {m: 1.0 for m in modules}
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError:
        raise UserError(f"{path}: metadata {export.LORA_ADAPTER_METADATA_KEY!r} is not valid JSON") from None
    cfg = {k.removeprefix(keys.DIFFUSERS_LORA_PREFIX): v for k, v in packed.items()}
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if r is None or alpha is None:
        raise UserError(f"{path}: metadata {export.LORA_ADAPTER_METADATA_KEY!r} lacks r or lora_alpha")
    scales = {}
    for m, mod in modules.items():
        r_m = _pattern_value(m, cfg.get("rank_pattern"), r)
        a_m = _pattern_value(m, cfg.get("alpha_pattern"), alpha)
        if r_m != mod.rank:
            raise UserError(f"{path}: {m} has rank {mod.rank} but the metadata says r={r_m}; the file is inconsistent")
        scales[m] = a_m / (r_m**0.5 if cfg.get("use_rslora") else r_m)
    return scales


def _kohya_name_table(modules: list[str], km) -> dict[str, str]:
    """kohya `lora_unet_transformer_blocks_0_attn1_to_q` -> original dotted name, from the real module tree."""
    blocks = [int(m) for name in modules for m in re.findall(r"^transformer_blocks_(\d+)_", name)]
    with torch.device("meta"):
        model = km.transformer_class()(num_layers=max(blocks, default=0) + 1)
    table = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            original = km.diffusers_to_original(name)
            table[original.replace(".", "_")] = original
    return table


def _comfy_lora_to_original_names(tensors, form, path, km) -> dict[str, LoraModule]:
    if form == LORA_KOHYA:
        modules = _lora_modules(tensors, KOHYA_PREFIX, path)
        table = _kohya_name_table(list(modules), km)
        unknown = [m for m in modules if m not in table]
        if unknown:
            raise UserError(f"{path}: kohya LoRA module {KOHYA_PREFIX}{unknown[0]} is not a Linear layer of LTXV")
        return {table[m]: mod for m, mod in modules.items()}
    return _lora_modules(tensors, km.COMFY_LORA_PREFIX, path)


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype or t.dtype).contiguous()


def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    return t if scale == 1.0 else (t.float() * scale).to(t.dtype)


def lora_to_comfy(tensors, metadata, path, dtype=None, km=keys) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The ComfyUI twin: every module under its ComfyUI/original name only (the keys ComfyUI's map consumes, so it
    logs no "lora key not loaded"). LTXV: lora_A/lora_B exactly as trained (cast only when `dtype` asks) and the
    strength in a float32 `.alpha` per module, which ComfyUI divides by the rank: no rounding beyond the file's own
    dtype. Families whose loaders take no alpha (`km.FOLD_LORA_ALPHA`, LTX-2): alpha/rank multiplied into lora_B (in
    float32, then the file's dtype) and no `.alpha` key."""
    modules = _lora_modules(tensors, km.DIFFUSERS_LORA_PREFIX, path)
    scales = _diffusers_lora_scales(modules, metadata, path)
    out = {}
    for m, mod in modules.items():
        key = f"{km.COMFY_LORA_PREFIX}{km.diffusers_to_original(m)}"
        out[f"{key}.lora_A.weight"] = _cast(mod.down, dtype)
        if km.FOLD_LORA_ALPHA:
            out[f"{key}.lora_B.weight"] = _cast(_scaled(mod.up, scales[m]), dtype)
        else:
            out[f"{key}.lora_B.weight"] = _cast(mod.up, dtype)
            out[f"{key}.alpha"] = torch.tensor(scales[m] * mod.rank, dtype=torch.float32)
    meta = {k: v for k, v in metadata.items() if k != export.LORA_ADAPTER_METADATA_KEY}
    if km.FOLD_LORA_ALPHA:
        meta[f"{export.META_PREFIX}alpha_folded_into_lora_B"] = "true"
    return out, meta


def lora_to_diffusers(
    tensors, metadata, form, path, dtype=None, km=keys
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    renamed: dict[str, LoraModule] = {}
    for m, mod in _comfy_lora_to_original_names(tensors, form, path, km).items():
        target = km.original_to_diffusers(m)
        prev = renamed.get(target)
        if prev is not None:  # a module under both names (older twins carried proj_in/time_embed twice): must agree
            if not (torch.equal(prev.down, mod.down) and torch.equal(prev.up, mod.up) and prev.alpha == mod.alpha):
                raise UserError(f"{path}: two different LoRA weights for the module {target}; the file is inconsistent")
            continue
        renamed[target] = mod
    modules = renamed
    ranks = {mod.rank for mod in modules.values()}
    # ComfyUI semantics: no .alpha tensor means scale 1.0, i.e. alpha == rank.
    alphas = {mod.alpha if mod.alpha is not None else float(mod.rank) for mod in modules.values()}
    uniform = len(ranks) == 1 and len(alphas) == 1
    out = {}
    for m, mod in modules.items():
        up = mod.up
        if not uniform and mod.alpha is not None and mod.alpha != mod.rank:
            up = (up.float() * (mod.alpha / mod.rank)).to(dtype or up.dtype)
        out[f"{km.DIFFUSERS_LORA_PREFIX}{m}.lora_A.weight"] = _cast(mod.down, dtype)
        out[f"{km.DIFFUSERS_LORA_PREFIX}{m}.lora_B.weight"] = _cast(up, dtype)
    meta = dict(metadata)
    if uniform:
        # Alpha goes into the metadata diffusers reads (as LTXPipeline.save_lora_weights writes it).
        from peft import LoraConfig

        (rank,), (alpha,) = ranks, alphas
        alpha_value = int(alpha) if float(alpha).is_integer() else alpha
        config = LoraConfig(r=rank, lora_alpha=alpha_value, target_modules=sorted(modules))
        meta[export.LORA_ADAPTER_METADATA_KEY] = export.lora_adapter_metadata(config)
    else:  # mixed ranks/alphas: folded into lora_B; without metadata diffusers infers each rank, alpha == rank
        meta[f"{export.META_PREFIX}alpha_folded_into_lora_B"] = "true"
    return out, meta


# --------------------------------------------------------------------------------------------------
# Full transformer


def full_to_comfy(tensors, dtype=None, km=keys) -> dict[str, torch.Tensor]:
    return {km.ORIGINAL_TRANSFORMER_PREFIX + km.diffusers_to_original(k): _cast(v, dtype) for k, v in tensors.items()}


def full_comfy_metadata(
    metadata: dict[str, str], base_metadata: dict[str, str] | None, path, km=keys
) -> dict[str, str]:
    """The twin's metadata: the base single file's (its Lightricks `config` included), then the source's; when no
    base `config` exists (tiny, diffusers folder, own fine-tune), one made from the transformer config the source
    carries, so ComfyUI's checkpoint loader sizes the model whatever its heads and width."""
    meta = {**(base_metadata or {}), **metadata}
    own = metadata.get(export.TRANSFORMER_CONFIG_KEY)
    if km.LIGHTRICKS_CONFIG_KEY not in meta and own:
        try:
            config = json.loads(own)
        except json.JSONDecodeError:
            config = None
        if not isinstance(config, dict):
            raise UserError(f"{path}: metadata {export.TRANSFORMER_CONFIG_KEY!r} is not a JSON config (damaged file)")
        meta[km.LIGHTRICKS_CONFIG_KEY] = km.lightricks_config(config)
    return meta


def full_to_diffusers(tensors, dtype=None, km=keys) -> dict[str, torch.Tensor]:
    for prefix in (km.ORIGINAL_TRANSFORMER_PREFIX, km.COMFY_LORA_PREFIX, ""):
        selected = {
            k.removeprefix(prefix): v
            for k, v in tensors.items()
            if k.startswith(prefix) and _top(k.removeprefix(prefix)) not in km.NOT_TRANSFORMER_TOP
        }
        if "patchify_proj.weight" in {keys.strip_compile_prefix(k) for k in selected}:
            break
    # Other parts of a whole single-file checkpoint (vae.*, text encoders, LTX-2's text connectors) are not the
    # transformer: left out.
    return {km.original_to_diffusers(keys.strip_compile_prefix(k)): _cast(v, dtype) for k, v in selected.items()}


# --------------------------------------------------------------------------------------------------
# Files and runs


def default_output(src: Path, to: str) -> Path:
    stem = src.stem.removesuffix(COMFY_SUFFIX).removesuffix(DIFFUSERS_SUFFIX)
    return src.with_name(f"{stem}{COMFY_SUFFIX if to == 'comfy' else DIFFUSERS_SUFFIX}.safetensors")


def convert_file(
    src: str | Path,
    dst: str | Path | None = None,
    to: str = "comfy",
    save_dtype: str | None = None,
    base_metadata: dict[str, str] | None = None,
) -> Path:
    """Convert one LoRA or full-transformer file to ComfyUI (`to="comfy"`) or diffusers form; returns dst.

    dst defaults to <stem>_comfy.safetensors / <stem>_diffusers.safetensors beside src (an existing default
    output is an error; an explicit dst is overwritten). save_dtype (fp32/bf16/fp16) defaults to the source
    dtype. base_metadata (e.g. the base single file's "config") is added to a full transformer's metadata.
    """
    if to not in ("comfy", "diffusers"):
        raise UserError(f"convert: to={to!r} is not a target (use 'comfy' or 'diffusers')")
    if save_dtype is not None and save_dtype not in export.SAVE_DTYPES:
        raise UserError(f"convert: save dtype {save_dtype!r} is unknown (use one of {', '.join(export.SAVE_DTYPES)})")
    src = Path(src)
    tensors, metadata = read_safetensors(src)
    km = keys_of_file(tensors, metadata)
    form = detect_form(tensors, src, km)
    if to == "comfy" and form in COMFY_FORMS:
        raise AlreadyConverted(f"{src}: already in ComfyUI form ({form}); nothing to convert")
    if to == "diffusers" and form not in COMFY_FORMS:
        raise AlreadyConverted(f"{src}: already in diffusers form ({form}); nothing to convert")
    if dst is None:
        dst = default_output(src, to)
        if dst.exists():
            raise UserError(f"{dst}: exists already; delete it or pass another output with -o")
    dst = Path(dst)
    if dst.is_dir():  # `-o some_folder/`: the standard name inside it
        dst = dst / default_output(src, to).name
    if dst.resolve() == src.resolve():
        raise UserError(f"{src}: the output would overwrite the input; pass another output with -o")
    dtype = export.SAVE_DTYPES[save_dtype] if save_dtype else None

    if form == LORA_DIFFUSERS:
        out, meta = lora_to_comfy(tensors, metadata, src, dtype, km)
    elif form in (LORA_COMFY, LORA_KOHYA):
        out, meta = lora_to_diffusers(tensors, metadata, form, src, dtype, km)
    elif form == FULL_DIFFUSERS:
        out, meta = full_to_comfy(tensors, dtype, km), full_comfy_metadata(metadata, base_metadata, src, km)
    else:
        out, meta = full_to_diffusers(tensors, dtype, km), dict(metadata)
    if not out:
        raise UserError(f"{src}: no key matched the {form} layout; nothing to write")
    meta = {k: v for k, v in meta.items() if isinstance(v, str)}
    meta["format"] = "pt"
    meta[f"{export.META_PREFIX}key_format"] = to
    meta[f"{export.META_PREFIX}converted_from"] = src.name
    meta["modelspec.implementation"] = km.IMPLEMENTATION_ORIGINAL if to == "comfy" else export.IMPLEMENTATION_DIFFUSERS
    return export.write_safetensors(dst, out, meta)


def is_up_to_date(src: Path, twin: Path) -> bool:
    return twin.is_file() and twin.stat().st_mtime >= src.stat().st_mtime


def _run_base_metadata(run_dir: Path) -> dict[str, str] | None:
    """The base single file's metadata ("config"), read through the run's resolved config.yaml."""
    from .config import load_config
    from .models import family

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        return None
    model_cfg = load_config(cfg_path).model
    return family(model_cfg).base_checkpoint_metadata(model_cfg)


@dataclass
class RunConversion:
    """What `convert_run` did to a run folder."""

    run_dir: Path
    written: list[Path] = field(default_factory=list)  # twins written now
    current: list[Path] = field(default_factory=list)  # twins already up to date, not rewritten
    comfy_sources: list[Path] = field(default_factory=list)  # files already in ComfyUI form: need no twin
    converted_back: list[Path] = field(default_factory=list)  # `*_diffusers` files: never a source

    def summary(self) -> str:
        parts = [f"{len(self.written)} ComfyUI twin(s) written", f"{len(self.current)} already up to date"]
        if self.comfy_sources:
            parts.append(f"{len(self.comfy_sources)} file(s) already in ComfyUI form left as they are")
        if self.converted_back:
            parts.append(f"{len(self.converted_back)} *{DIFFUSERS_SUFFIX} file(s) left alone (conversions, no source)")
        return f"convert: {self.run_dir}: {', '.join(parts)}"


def convert_run(run_dir: str | Path, save_dtype: str | None = None) -> RunConversion:
    """Write <stem>_comfy.safetensors beside every weight file of run_dir/checkpoints that lacks a fresh twin.

    Files under state/ are never read; `*_diffusers` files (converted back from a twin) are never sources.
    """
    result = RunConversion(Path(run_dir))
    checkpoints = checkpoints_root(result.run_dir)
    if not checkpoints.is_dir():
        raise UserError(f"{run_dir}: no checkpoints/ folder; pass a run folder (outputs/run_YYYYMMDD_HHMMSS)")
    sources = convertible_files(result.run_dir)
    if not sources:
        raise UserError(f"{checkpoints}: no .safetensors weight files to convert (outside state/)")
    result.converted_back = converted_back_files(result.run_dir)
    base_meta: dict[str, str] | None = None
    base_meta_read = False
    for src in sources:
        twin = twin_path(src)
        if is_up_to_date(src, twin):
            result.current.append(twin)
            continue
        tensors_form = _form_of_file(src)
        if tensors_form in COMFY_FORMS:
            result.comfy_sources.append(src)
            continue
        if tensors_form == FULL_DIFFUSERS and not base_meta_read:
            base_meta, base_meta_read = _run_base_metadata(result.run_dir), True
        result.written.append(convert_file(src, twin, "comfy", save_dtype=save_dtype, base_metadata=base_meta))
    return result


def _form_of_file(path: Path) -> str:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            return detect_form(names, path, keys_of_file(names, f.metadata()))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


# --------------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ltxv-convert",
        description="Convert LTXV LoRA / transformer .safetensors between diffusers and ComfyUI form. "
        "A run folder converts every checkpoint of the run to ComfyUI form.",
    )
    p.add_argument("file", help="a .safetensors file, or a run folder (with checkpoints/)")
    to = p.add_mutually_exclusive_group()
    to.add_argument("--to-comfy", dest="to", action="store_const", const="comfy", help="to ComfyUI form (default)")
    to.add_argument("--to-diffusers", dest="to", action="store_const", const="diffusers", help="to diffusers form")
    p.add_argument("-o", "--output", help="output file (default: <stem>_comfy / <stem>_diffusers beside the input)")
    p.add_argument("--save-dtype", choices=sorted(export.SAVE_DTYPES), help="dtype of the written weights")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet_libraries()
    to = args.to or "comfy"
    src = Path(args.file)
    try:
        if src.is_dir():
            if to != "comfy" or args.output:
                raise UserError(f"{src}: a run folder converts only to ComfyUI form, beside each file (no -o)")
            result = convert_run(src, save_dtype=args.save_dtype)
            for path in result.written:
                print(path)
            print(result.summary())
        else:
            print(convert_file(src, args.output, to, save_dtype=args.save_dtype))
    except AlreadyConverted as e:
        print(f"ltxv-convert: {e}", file=sys.stderr)
        return 1
    except UserError as e:
        print(f"ltxv-convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
