"""The builder: the only code that touches open_clip, timm and the HuggingFace hub.

BiomedCLIP (and our offline ``mini`` stand-in, written in the same directory layout) is loaded from
``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`` or ``local-dir:PATH``. A directory in
the hub's layout holds ``open_clip_config.json``, the weights (``open_clip_model.safetensors`` or
``open_clip_pytorch_model.bin``), the tokenizer files and, for a self-contained directory, the text
model's ``config.json``. Missing weights are an error, never a silent random init: random backbones exist
only through :func:`random_clip_backbone`, which says so in its name and in every checkpoint it touches.

Notable choices:
* open_clip's ``HFTextEncoder`` always reads the BERT ``config.json`` through ``AutoConfig``. When a local
  directory carries that file we point ``hf_model_name`` at the directory itself, so no hub look-up happens;
  otherwise (a plain hub snapshot) the config must be in the HuggingFace cache.
* The tokenizer is used directly (``padding="longest"``) so BERT runs on the real prompt length instead of
  open_clip's 256 pads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from freqmedclip.modeling.config import BIOMEDCLIP_HUB, MINI_BACKBONE_DIR

REPO_ROOT = Path(__file__).resolve().parents[2]
HF_PREFIX = "hf-hub:"
LOCAL_PREFIX = "local-dir:"
WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
)
FETCH_COMMAND = (
    "hf download microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 open_clip_config.json "
    "open_clip_pytorch_model.bin && hf download microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract "
    "config.json vocab.txt tokenizer_config.json"
)

# Vision towers of the two presets, as BiomedCLIP names them in open_clip_config.json.
VISION_MODELS = {"mini": "vit_tiny_patch16_224", "full": "vit_base_patch16_224"}
TEXT_CONFIGS = {
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "full": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 vocab_size=30522),  # BiomedBERT's vocabulary size, so random "full" builds count like the real one
}
EMBED_DIMS = {"mini": 256, "full": 512}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Words the mini tokenizer keeps whole; anything else falls back to sub-words down to single characters.
MEDICAL_WORDS = """
the a an of in on with without and or no not any is are this that there image scan slice view
brain mri ct lung breast mammogram mammography chest head axial coronal sagittal flair t1 t1ce t2 contrast
tumour tumor tumours tumors glioma glioblastoma lesion lesions mass masses nodule nodules cancer carcinoma
core necrotic necrosis enhancing enhancement rim oedema edema peritumoral whole region area abnormal
abnormality finding malignant benign solid part subsolid ground glass opacity spiculated lobulated round
oval margin margins dense density tissue calcification calcifications vessel vessels bronchus bronchial
airway wall skull ventricle ventricles sulci cortex parenchyma left right upper lower small large segment
segmentation normal healthy cyst infiltrative irregular circumscribed suspicious pulmonary cerebral
""".split()


@dataclass
class ClipBackbone:
    """A loaded CLIP model split into what the streams need. All parameters are frozen.

    ``visual`` is open_clip's ``TimmModel`` (``.trunk`` a timm ViT, ``.head`` the projection);
    ``text`` is open_clip's ``HFTextEncoder`` (``.transformer``, ``.pooler``, ``.proj``, ``.config``).
    """

    visual: nn.Module
    text: nn.Module
    tokenizer: Any
    logit_scale: torch.Tensor
    source: str
    weights_sha256: str
    preprocess: dict[str, Any]


class BackboneNotFoundError(FileNotFoundError):
    """The requested CLIP backbone (config or weights) is not available on this machine."""


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def _split(model: nn.Module, source: str, weights_sha256: str, preprocess: dict[str, Any], tokenizer: Any) -> ClipBackbone:
    return ClipBackbone(
        visual=_freeze(model.visual),
        text=_freeze(model.text),
        tokenizer=tokenizer,
        logit_scale=model.logit_scale.detach().clone(),
        source=source,
        weights_sha256=weights_sha256,
        preprocess=preprocess,
    )


def _hub_file(repo_id: str, filename: str) -> str | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return hf_hub_download(repo_id, filename)
    except (EntryNotFoundError, LocalEntryNotFoundError, OSError):
        return None


def resolve_local_dir(path: str) -> Path:
    """A ``local-dir:`` path; a relative one that does not exist here is taken relative to the repository, so
    the default ``assets/...`` backbone works from any working directory."""
    directory = Path(path).expanduser()
    return directory if directory.is_absolute() or directory.exists() else REPO_ROOT / directory


def resolve_backbone_files(source: str) -> tuple[Path, Path, dict[str, Any]]:
    """Find ``(config_path, weights_path, config)`` for a ``hf-hub:`` or ``local-dir:`` source.

    Raises:
        BackboneNotFoundError: with the command that fetches the files, when config or weights are missing.
    """
    if source.startswith(LOCAL_PREFIX):
        directory = resolve_local_dir(source[len(LOCAL_PREFIX):])
        config_path = directory / "open_clip_config.json"
        if not config_path.is_file():
            hint = (f" The offline mini backbone is made by the pretraining step of `bash train/recipes/public.sh` "
                    f"(the real public data and the phantoms, then copied to {MINI_BACKBONE_DIR})."
                    if directory == (REPO_ROOT / MINI_BACKBONE_DIR) else "")
            raise BackboneNotFoundError(
                f"{source}: no open_clip_config.json in {directory.resolve()}. A backbone directory needs "
                f"BiomedCLIP's layout (open_clip_config.json, weights, tokenizer files).{hint}"
            )
        weights = next((directory / name for name in WEIGHT_FILES if (directory / name).is_file()), None)
    elif source.startswith(HF_PREFIX):
        repo_id = source[len(HF_PREFIX):]
        found = _hub_file(repo_id, "open_clip_config.json")
        if found is None:
            raise BackboneNotFoundError(
                f"{source}: open_clip_config.json is neither in the HuggingFace cache nor downloadable. "
                f"On a machine with internet run: {FETCH_COMMAND}"
            )
        config_path = Path(found)
        weights = next((Path(p) for p in map(lambda n: _hub_file(repo_id, n), WEIGHT_FILES[:3]) if p), None)
    else:
        raise ValueError(f"backbone source must start with {HF_PREFIX!r} or {LOCAL_PREFIX!r}, got {source!r}")
    if weights is None:
        raise BackboneNotFoundError(
            f"{source}: no weights found (looked for {', '.join(WEIGHT_FILES)}). Refusing to continue with a "
            f"randomly initialised backbone. Fetch BiomedCLIP with: {FETCH_COMMAND}"
        )
    config = json.loads(config_path.read_text())
    if "model_cfg" not in config:
        raise BackboneNotFoundError(f"{config_path} has no 'model_cfg': not an open_clip hub config")
    return config_path, weights, config


def load_clip_backbone(source: str = BIOMEDCLIP_HUB, device: str | torch.device = "cpu") -> ClipBackbone:
    """Load a frozen CLIP backbone from ``hf-hub:ID`` or ``local-dir:PATH`` (offline from the HF cache)."""
    config_path, weights, config = resolve_backbone_files(source)
    text_cfg = dict(config["model_cfg"]["text_cfg"])
    for legacy, key in (("proj", "hf_proj_type"), ("pooler_type", "hf_pooler_type")):
        if legacy in text_cfg:  # open_clip renamed these keys in 2023; older BiomedCLIP copies still use them
            text_cfg.setdefault(key, text_cfg.pop(legacy))
    if (config_path.parent / "config.json").is_file():
        # A self-contained directory: read BERT's config and tokenizer from it, never from the hub.
        text_cfg.update(hf_model_name=str(config_path.parent.resolve()),
                        hf_tokenizer_name=str(config_path.parent.resolve()))
    text_cfg["hf_model_pretrained"] = False
    model = _build_clip(config_path.parent, text_cfg)
    state = _read_weights(weights)
    if "text.transformer.embeddings.position_ids" not in model.state_dict():
        state.pop("text.transformer.embeddings.position_ids", None)  # non-persistent since transformers 4.31
    model.load_state_dict(state, strict=True)
    tokenizer = _load_tokenizer(text_cfg["hf_tokenizer_name"])
    backbone = _split(model, source, sha256_file(weights), config.get("preprocess_cfg", {}), tokenizer)
    backbone.visual.to(device)
    backbone.text.to(device)
    return backbone


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # The official BiomedCLIP release is a torch pickle; weights_only refuses anything but tensors.
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_tokenizer(name_or_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_dir)


def mini_vocabulary() -> list[str]:
    """WordPiece vocabulary of the mini text tower: every word splits, down to single characters if needed."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    characters = list(string.ascii_lowercase + string.digits + string.punctuation)
    pieces = [f"##{c}" for c in string.ascii_lowercase + string.digits]
    words = [w for w in dict.fromkeys(MEDICAL_WORDS) if w not in characters]
    return specials + characters + pieces + words


def write_text_side(directory: Path, preset: str, vocabulary: list[str]) -> None:
    """Write BERT's ``config.json`` and the tokenizer files (``vocab.txt`` etc.) into ``directory``."""
    from transformers import BertConfig

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(vocabulary) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 256}, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
         "mask_token": "[MASK]"}, indent=2))
    settings = {"vocab_size": len(vocabulary), "max_position_embeddings": 512, "pad_token_id": 0,
                **TEXT_CONFIGS[preset]}
    BertConfig(**settings).save_pretrained(directory)


def clip_model_config(preset: str, directory: Path) -> dict[str, Any]:
    """open_clip_config.json of a preset, in BiomedCLIP's exact schema."""
    return {
        "model_cfg": {
            "embed_dim": EMBED_DIMS[preset],
            "vision_cfg": {
                "timm_model_name": VISION_MODELS[preset],
                "timm_model_pretrained": False,
                "timm_pool": "",
                "timm_proj": "linear",
                "image_size": 224,
            },
            "text_cfg": {
                "hf_model_name": str(directory.resolve()),
                "hf_tokenizer_name": str(directory.resolve()),
                "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler",
                "context_length": 256,
            },
        },
        "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
    }


def create_clip_model(preset: str, directory: Path) -> nn.Module:
    """A randomly initialised open_clip ``CustomTextCLIP`` of a preset, with its text side in ``directory``."""
    write_text_side(directory, preset, mini_vocabulary())
    config = clip_model_config(preset, directory)
    (directory / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    return _build_clip(directory, dict(config["model_cfg"]["text_cfg"], hf_model_pretrained=False))


def _build_clip(directory: Path, text_cfg: dict[str, Any]) -> nn.Module:
    """The architecture described by ``directory/open_clip_config.json``, weights not loaded."""
    import open_clip

    # open_clip logs "initialized randomly" here because we load (and verify) the weights ourselves.
    logging.disable(logging.WARNING)
    try:
        return open_clip.create_model(f"local-dir:{directory}", load_weights=False, pretrained_text=False,
                                      text_cfg=text_cfg)
    finally:
        logging.disable(logging.NOTSET)


def save_clip_dir(model: nn.Module, directory: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``model``'s weights as ``open_clip_model.safetensors`` (atomically) next to its config.

    Floating-point tensors are stored as ``dtype`` (the shipped mini backbone uses float16 to halve its size;
    loading casts back to the model's float32 parameters).
    """
    from safetensors.torch import save_file

    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    target = directory / "open_clip_model.safetensors"
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as handle:
        tmp = Path(handle.name)
    try:
        save_file(state, str(tmp))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def random_clip_backbone(preset: str = "mini", device: str | torch.device = "cpu") -> ClipBackbone:
    """A frozen backbone of a preset with RANDOM weights: for tests and speed benchmarks only."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        model = create_clip_model(preset, directory)
        tokenizer = _load_tokenizer(str(directory))
    backbone = _split(model, f"random:{preset}", "random", {"mean": CLIP_MEAN, "std": CLIP_STD}, tokenizer)
    backbone.visual.to(device)
    backbone.text.to(device)
    return backbone


def plain_vit_b16() -> nn.Module:
    """A plain timm ViT-B/16 at 224 with random weights and no head: the speed yardstick of the benchmarks
    (BiomedCLIP's image tower without its projection; random weights time the same as trained ones)."""
    import timm

    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)


def create_frequency_backbone(name: str, in_chans: int, weights: str = "auto",
                              depths: tuple[int, ...] | None = None,
                              dims: tuple[int, ...] | None = None) -> tuple[nn.Module, str]:
    """A timm ConvNeXt whose 1x1 stride-1 stem takes the Haar sub-bands (Section 3.5).

    With ``patch_size=1`` on the 112x112 sub-band grid the stages run at 112, 56, 28 and 14, exactly the
    paper's F_stem, F1, F2, F3. ImageNet weights are used when available (``weights`` a file, or "auto":
    the HuggingFace cache, no network); the 4x4 patch stem is mapped onto the sub-bands by
    :func:`haar_stem_weights`. ``depths`` / ``dims`` resize the stages (the mini preset's smaller encoder);
    ImageNet weights of ``name`` then no longer fit, so "auto" starts from random weights and a file is refused.
    Returns ``(model, init)`` where ``init`` records the weights' origin.
    """
    import timm

    resized = {key: tuple(value) for key, value in (("depths", depths), ("dims", dims)) if value is not None}
    model = timm.create_model(name, pretrained=False, in_chans=in_chans, patch_size=1, num_classes=0, **resized)
    model.head = nn.Identity()  # the stages' feature maps are all we use
    path: str | None = None
    if weights not in ("none", "auto"):
        if resized:
            raise ValueError(f"{weights}: ImageNet weights of {name} do not fit its stages resized to {resized}")
        path = weights
    elif weights == "auto" and not resized:
        from huggingface_hub import try_to_load_from_cache

        hub_id = model.pretrained_cfg.get("hf_hub_id")
        cached = try_to_load_from_cache(hub_id, "model.safetensors") if hub_id else None
        path = cached if isinstance(cached, str) else None
    if path is None:
        return model, "random"
    from safetensors.torch import load_file

    state = load_file(path) if path.endswith(".safetensors") else torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    state["stem.0.weight"] = haar_stem_weights(state["stem.0.weight"], in_chans // 4)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise ValueError(f"{path}: not a {name} checkpoint (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model, f"imagenet:{Path(path).name}"


def haar_stem_weights(patch_weight: torch.Tensor, image_channels: int) -> torch.Tensor:
    """Map a 4x4/stride-4 patch stem onto 1x1 convs over the Haar sub-bands of a 2x2 grid.

    The 4x4 kernel is averaged to the 2x2 footprint one sub-band coefficient covers; since the orthonormal
    Haar basis h_b spans 2x2 patches, <k, patch> = sum_b <k, h_b> <h_b, patch>, so band b gets weight
    <k, h_b> (x2 for LL, which our frequency stream halves). Output: (C_out, 4 * image_channels, 1, 1),
    band-major like the encoder's input.
    """
    from freqmedclip.modeling.frequency import HAAR_KERNELS

    out_channels, in_channels = patch_weight.shape[:2]
    kernel = torch.nn.functional.avg_pool2d(patch_weight.float(), 2) * 4            # (C_out, C_in, 2, 2)
    if in_channels != image_channels:
        kernel = kernel.mean(1, keepdim=True).expand(-1, image_channels, -1, -1) * in_channels / image_channels
    coefficients = torch.einsum("oihw,bhw->obi", kernel, HAAR_KERNELS.double().float())  # (C_out, 4, C_in)
    coefficients[:, 0] *= 2.0
    return coefficients.reshape(out_channels, 4 * image_channels, 1, 1).to(patch_weight.dtype)
