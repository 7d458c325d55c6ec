"""FreqMedCLIP model (Sections 3.1-3.8): shapes at every stage, gradients, variants, text encoder, init.

The ``mini`` preset runs on the stand-in backbone loaded by the production loader (conftest.py); the ``full``
preset (BERT-base, ViT-B/16, ConvNeXt-Tiny) is built once with random weights for a single no-grad forward.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from _tolerances import FP32_LOGIT_REL

from freqmedclip.modeling.config import VARIANTS, FreqMedCLIPConfig
from freqmedclip.modeling.decoder import FiLM, FusionHead
from freqmedclip.modeling.frequency import FrequencyEncoder, UNetEncoder
from freqmedclip.modeling.fusion import ConcatFusion, CrossStreamFusion, SingleStreamBottleneck, TextGate
from freqmedclip.modeling.model import FreqMedCLIP, SegOutput, build_model, parameter_report
from freqmedclip.modeling.semantic import FiLMTokenAdapter, SemanticEncoder, TextConditionedAdapter
from freqmedclip.modeling.text import PromptError, TextEncoder

OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)   # BiomedCLIP preprocess_cfg
OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
PROMPTS = ["left lung nodule", "brain tumour"]       # 3 + 2 whole words in the mini vocabulary -> 5 and 4 tokens

# Layers initialised to zero so that an untrained adapter / FiLM / gate is the identity and the fusion head
# is the branch average; and the layers directly upstream of them, whose gradient is therefore zero at init.
ZERO_INIT = re.compile(r"(adapters\.\d+\.(out|ffn\.3|mlp\.2)|film\.mlp\.2|gate\.mlp\.2|^head\.out)\.")
UPSTREAM_OF_ZERO_INIT = re.compile(
    r"(adapters\.\d+\.(norm|query|key|value|ffn\.0|ffn\.1|mlp\.0)|film\.mlp\.0|gate\.mlp\.0|^head\.mix)\.")


def mini_config(variant: str = "full", **overrides) -> FreqMedCLIPConfig:
    return FreqMedCLIPConfig.from_preset("mini", variant, frequency_weights="none", **overrides)


def make_image(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def build_mini(backbone, variant: str = "full", seed: int = 0) -> FreqMedCLIP:
    torch.manual_seed(seed)
    return build_model(mini_config(variant), backbone)


def perturb_zero_init(model: nn.Module, std: float = 0.05, seed: int = 0) -> list[str]:
    """Give every zero-initialised layer small random weights (as after some training)."""
    generator = torch.Generator().manual_seed(seed)
    names = []
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ZERO_INIT.search(name):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
                names.append(name)
    return names


def clip_parameters(model: FreqMedCLIP) -> list[nn.Parameter]:
    towers = [model.text.clip_text] + ([model.semantic.trunk] if model.semantic is not None else [])
    return [p for tower in towers for p in tower.parameters()]


class Recorder:
    """Forward hooks that keep each named module's output."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.outputs: dict[str, object] = {}
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name):
        def hook(module, args, output):
            self.outputs[name] = output
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def record_stages(model: FreqMedCLIP) -> Recorder:
    modules = {"text": model.text, "semantic": model.semantic, "frequency": model.frequency, "fusion": model.fusion}
    for branch in ("semantic_decoder", "frequency_decoder"):
        decoder = getattr(model, branch)
        if decoder is not None:
            modules.update({f"{branch}.{i}": stage for i, stage in enumerate(decoder.stages)})
    return Recorder({k: v for k, v in modules.items() if v is not None})


# ---------------------------------------------------------------------------------------------------------
# Shapes at every stage


@pytest.fixture(scope="module")
def mini_model(mini_backbone) -> FreqMedCLIP:
    return build_mini(mini_backbone).eval()


def test_mini_shapes_at_every_stage(mini_model):
    config = mini_model.config
    recorder = record_stages(mini_model)
    with torch.no_grad():  # one image twice (a real copy: an expanded batch shares its frequency features)
        out = mini_model(make_image(1).repeat(2, 1, 1, 1), PROMPTS, return_attention=True)
    recorder.remove()
    stages = recorder.outputs
    c1, c2, c3, c4 = config.fpn_channels
    assert (c1, c2, c3, c4) == (128, 64, 32, 16)
    assert [tuple(s.shape) for s in stages["semantic"]] == [(2, c1, 14, 14), (2, c2, 28, 28), (2, c3, 56, 56),
                                                           (2, c4, 112, 112)]
    # the mini preset's ConvNeXt-Atto resized to dims 24, 48, 96, 192 (timm's own: 40, 80, 160, 320)
    assert [tuple(f.shape) for f in stages["frequency"]] == [(2, 24, 112, 112), (2, 48, 56, 56), (2, 96, 28, 28),
                                                            (2, 192, 14, 14)]
    text = stages["text"]
    assert text.tokens.shape == (2, 5, 256)                  # L = the longest real prompt, not 256 pads
    assert text.padding.tolist() == [[False] * 5, [False] * 4 + [True]]
    assert torch.count_nonzero(text.tokens[1, 4]) == 0      # padding rows are zeros
    assert text.pooled.shape == (2, 256)                     # t-bar, d_t
    assert text.embedding.shape == (2, 256)                  # CLIP joint space of the mini preset
    d_s, d_f, attention_s, attention_f = stages["fusion"]
    assert d_s.shape == d_f.shape == (2, config.fusion_width, 28, 28)
    assert attention_s.shape == attention_f.shape == (2, 196, 196)
    assert torch.allclose(attention_s.sum(-1), torch.ones(2, 196), atol=1e-5)
    for branch in ("semantic_decoder", "frequency_decoder"):
        shapes = [tuple(stages[f"{branch}.{i}"].shape) for i in range(3)]
        assert shapes == [(2, 64, 28, 28), (2, 32, 56, 56), (2, 16, 112, 112)], branch     # each before its Up2
        decoder = getattr(mini_model, branch)   # the head runs before the last Up2: Eq. 15-16's order gives the same
        last = stages[f"{branch}.2"]
        in_paper_order = decoder.head(F.interpolate(last, scale_factor=2, mode="bilinear", align_corners=False))
        assert torch.allclose(getattr(out, branch.replace("_decoder", "_logits")), in_paper_order, atol=1e-5)
    assert isinstance(out, SegOutput)
    for logits in (out.logits, out.semantic_logits, out.frequency_logits):
        assert logits.shape == (2, 1, 224, 224)
        assert torch.isfinite(logits).all()
    assert out.semantic_attention is attention_s and out.frequency_attention is attention_f
    # the untrained fusion head is exactly the branch average (Section 3.8, zero-initialised residual)
    assert torch.allclose(out.logits, (out.semantic_logits + out.frequency_logits) / 2, atol=1e-6)
    # with every text pathway at its identity init (TCA, gate, FiLM) the prompt has no effect at all
    assert (out.logits[0] - out.logits[1]).abs().max() < 1e-5


def test_full_preset_shapes_random_backbone():
    torch.manual_seed(0)
    config = FreqMedCLIPConfig.from_preset("full", frequency_weights="none")
    model = build_model(config, random_backbone=True).eval()
    assert model.backbone_source == "random:full"
    assert model.frequency_init == "random"
    trunk = model.semantic.trunk
    assert (trunk.embed_dim, len(trunk.blocks), tuple(trunk.patch_embed.grid_size)) == (768, 12, (14, 14))
    assert model.text.clip_text.config.num_hidden_layers == 12
    recorder = record_stages(model)
    with torch.no_grad():
        out = model(make_image(1), ["left lung nodule"])
    recorder.remove()
    stages = recorder.outputs
    c1, c2, c3, c4 = config.fpn_channels
    assert (c1, c2, c3, c4) == (256, 128, 64, 32)
    assert [tuple(s.shape) for s in stages["semantic"]] == [(1, c1, 14, 14), (1, c2, 28, 28), (1, c3, 56, 56),
                                                           (1, c4, 112, 112)]
    # ConvNeXt-Tiny dims: 96, 192, 384, 768
    assert [tuple(f.shape) for f in stages["frequency"]] == [(1, 96, 112, 112), (1, 192, 56, 56), (1, 384, 28, 28),
                                                            (1, 768, 14, 14)]
    assert stages["text"].tokens.shape == (1, 5, 768)       # BERT-base d_t = 768, L = 5 real tokens
    assert stages["text"].pooled.shape == (1, 768)
    assert stages["text"].embedding.shape == (1, 512)       # BiomedCLIP joint space
    assert stages["fusion"].semantic.shape == (1, 256, 28, 28)
    assert tuple(stages["semantic_decoder.2"].shape) == (1, 32, 112, 112)                 # before the last Up2
    for logits in (out.logits, out.semantic_logits, out.frequency_logits):
        assert logits.shape == (1, 1, 224, 224) and torch.isfinite(logits).all()
    rows = parameter_report(model)
    assert rows[-1]["total"] == sum(p.numel() for p in model.parameters())
    assert rows[-1]["frozen"] == sum(p.numel() for p in clip_parameters(model))
    # Section 3.9: the TCA adapters add fewer than 2% of the trainable parameters
    tca = next(r["trainable"] for r in rows if r["module"] == "TCA adapters")
    assert 0 < tca < 0.02 * rows[-1]["trainable"]


# ---------------------------------------------------------------------------------------------------------
# Every variant builds, runs forward and backward, and is what its name says

# variant: (semantic stream, adapter type or None, frequency encoder type or None, bottleneck type,
#           decoders present (semantic, frequency), fusion head, FiLM in the decoders, branch outputs (L_s, L_f))
EXPECTED = {
    "full": (True, TextConditionedAdapter, FrequencyEncoder, CrossStreamFusion, (True, True), True, True, (1, 1)),
    "no_freq": (True, TextConditionedAdapter, None, SingleStreamBottleneck, (True, False), False, True, (1, 0)),
    "no_ffbi": (True, TextConditionedAdapter, FrequencyEncoder, ConcatFusion, (True, True), True, True, (1, 1)),
    "no_lffi": (True, TextConditionedAdapter, FrequencyEncoder, CrossStreamFusion, (True, True), True, False, (1, 1)),
    "no_dual_decoder": (True, TextConditionedAdapter, FrequencyEncoder, CrossStreamFusion, (True, False), False,
                        True, (0, 0)),
    "no_tca": (True, None, FrequencyEncoder, CrossStreamFusion, (True, True), True, True, (1, 1)),
    "tca_film": (True, FiLMTokenAdapter, FrequencyEncoder, CrossStreamFusion, (True, True), True, True, (1, 1)),
    "semantic_only": (True, None, None, SingleStreamBottleneck, (True, False), False, True, (1, 0)),
    "frequency_only": (False, None, FrequencyEncoder, SingleStreamBottleneck, (False, True), False, True, (0, 1)),
    "unet_clip": (False, None, UNetEncoder, SingleStreamBottleneck, (False, True), False, True, (0, 1)),
}


def test_expected_table_covers_every_variant():
    assert sorted(EXPECTED) == sorted(VARIANTS)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_structure_forward_backward(mini_backbone, variant):
    semantic, adapter, frequency, bottleneck, decoders, head, film, branches = EXPECTED[variant]
    model = build_mini(mini_backbone, variant)
    assert model.config.variant == variant

    # --- structure
    assert (model.semantic is not None) == semantic
    adapters = list(model.semantic.adapters) if semantic else []
    assert len(adapters) == (4 if adapter else 0)
    assert all(type(a) is adapter for a in adapters)
    assert (type(model.frequency) if model.frequency is not None else None) is frequency
    assert type(model.fusion) is bottleneck
    assert (model.semantic_decoder is not None, model.frequency_decoder is not None) == decoders
    assert isinstance(model.head, FusionHead) if head else model.head is None
    films = [m for m in model.modules() if isinstance(m, FiLM)]
    decoder_count = sum(decoders)
    assert len(films) == (3 * decoder_count if film else 0)
    assert sum(isinstance(m, TextGate) for m in model.modules()) == 1               # Eq. 12, text_gate=True
    if variant == "no_dual_decoder":                                               # one decoder on both streams
        assert model.semantic_decoder.stages[0].block[0][0].in_channels == 2 * model.config.fusion_width + 64 + 96
    if variant == "unet_clip":                                                     # conditioned on the CLIP embedding
        assert model.config.text_condition == "clip"

    # --- frozen towers stay in eval mode inside a training model
    model.train()
    assert not model.text.clip_text.training
    if semantic:
        assert not model.semantic.trunk.training and model.semantic.fpn.training

    # --- forward
    out = model(make_image(1), ["left lung nodule"])
    assert out.logits.shape == (1, 1, 224, 224) and torch.isfinite(out.logits).all()
    for field, present in zip((out.semantic_logits, out.frequency_logits), branches):
        assert (field is not None) == bool(present)
        if present:
            assert field.shape == (1, 1, 224, 224)
    if sum(branches) == 1:                                                         # single branch: L is that branch
        assert (out.semantic_logits if branches[0] else out.frequency_logits) is out.logits

    # --- backward: trainable parameters get gradients, the frozen CLIP backbone none
    out.logits.square().mean().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert len(trainable) > 10
    assert [n for n, p in trainable.items() if p.grad is None] == []
    zero_grad = {n for n, p in trainable.items() if torch.count_nonzero(p.grad) == 0}
    zero_init = [n for n in trainable if ZERO_INIT.search(n)]
    assert all(torch.count_nonzero(trainable[n]) == 0 for n in zero_init)          # really zero at init
    assert zero_grad.isdisjoint(zero_init)                                          # ...but they do learn
    assert zero_grad == {n for n in trainable if UPSTREAM_OF_ZERO_INIT.search(n)}
    assert all(p.grad is None for p in frozen)
    assert {id(p) for p in frozen} == {id(p) for p in clip_parameters(model)}

    # --- parameter report
    rows = parameter_report(model)
    assert rows[-1]["module"] == "all"
    assert sum(r["total"] for r in rows[:-1]) == rows[-1]["total"] == sum(p.numel() for p in model.parameters())
    assert rows[-1]["trainable"] == sum(p.numel() for p in trainable.values())
    assert rows[-1]["frozen"] == sum(p.numel() for p in clip_parameters(model))
    assert ("TCA adapters" in {r["module"] for r in rows}) == bool(adapter)


def test_variants_really_differ():
    # each variant's model is checked against its row above, so distinct rows mean distinct models
    assert len(set(EXPECTED.values())) == len(EXPECTED)
    configs = {v: mini_config(v).to_dict() for v in VARIANTS}
    for v, values in configs.items():
        differs = {k for k in values if values[k] != configs["full"][k]} - {"variant"}
        assert bool(differs) == (v != "full"), (v, differs)


# ---------------------------------------------------------------------------------------------------------
# Zero-initialisation and prompt sensitivity


def _fpn_taps(model: FreqMedCLIP, image: torch.Tensor, prompts) -> list[torch.Tensor]:
    """The ViT features the FPN receives for a normalised image (semantic stream only)."""
    taps = []
    handle = model.semantic.fpn.register_forward_pre_hook(lambda module, args: taps.extend(args[0]))
    with torch.no_grad():
        model.semantic(image, model.encode_text(prompts))
    handle.remove()
    return taps


@pytest.mark.parametrize("variant", ["full", "tca_film"])
def test_untrained_adapters_leave_the_vit_unchanged(mini_backbone, variant):
    model = build_mini(mini_backbone, variant).eval()
    # the model normalises with BiomedCLIP's preprocess_cfg (OpenAI CLIP statistics)
    assert torch.allclose(model.pixel_mean, OPENAI_MEAN) and torch.allclose(model.pixel_std, OPENAI_STD)
    image = (make_image(1, seed=3) - OPENAI_MEAN) / OPENAI_STD
    taps = _fpn_taps(model, image, ["left lung nodule"])
    with torch.no_grad():  # independent reference: timm's own taps after blocks 3, 6, 9, 12 (0-based 2, 5, 8, 11)
        reference = mini_backbone.visual.trunk.forward_intermediates(
            image, indices=[2, 5, 8, 11], output_fmt="NCHW", intermediates_only=True, norm=False)
    assert len(taps) == len(reference) == 4
    for ours, theirs in zip(taps, reference):
        assert ours.shape == theirs.shape == (1, 192, 14, 14)
        assert torch.equal(ours, theirs)
    # an adapter after block 3 is inline: once trained it changes block 3's tap and every deeper one
    with torch.no_grad():
        for name, parameter in model.semantic.adapters[0].named_parameters():
            if ZERO_INIT.search(f"adapters.0.{name}"):
                parameter.normal_(0, 0.05)
    changed = _fpn_taps(model, image, ["left lung nodule"])
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(changed, reference))


def test_semantic_layers_choose_the_tapped_blocks(mini_backbone):
    config = mini_config("full", semantic_layers=(2, 5, 8, 11))
    encoder = SemanticEncoder(mini_backbone.visual.trunk, 256, config.semantic_layers, config.tca, config.tca_width,
                              config.tca_heads, config.fpn_channels).eval()
    runs = []
    for i, adapter in enumerate(encoder.adapters):
        adapter.register_forward_hook(lambda module, args, output, i=i: runs.append(i))
    taps = []
    encoder.fpn.register_forward_pre_hook(lambda module, args: taps.extend(args[0]))
    image = make_image(1, seed=6)
    with torch.no_grad():
        encoder(image, TextEncoder(mini_backbone.text, mini_backbone.tokenizer)(["left lung nodule"]))
        reference = mini_backbone.visual.trunk.forward_intermediates(
            image, indices=[1, 4, 7, 10], output_fmt="NCHW", intermediates_only=True, norm=False)
    assert runs == [0, 1, 2, 3]
    assert all(torch.equal(a, b) for a, b in zip(taps, reference))


@pytest.mark.parametrize("layers", [(12, 9, 6, 3), (3, 3, 9, 12), (0, 3, 6, 9), (3, 6, 9)])
def test_semantic_layers_must_be_increasing(layers):
    # the paper lists the taps deep-to-shallow; that order used to silently skip three of the four adapters
    with pytest.raises(ValueError, match="semantic_layers"):
        mini_config("full", semantic_layers=layers)


def test_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown variant 'no_such'"):
        FreqMedCLIPConfig.from_preset("mini", "no_such")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        FreqMedCLIPConfig.from_preset("huge")
    with pytest.raises(ValueError, match="config.tca='attention'"):
        mini_config("full", tca="attention")
    with pytest.raises(ValueError, match=r"unknown config keys \['extra'\]"):
        FreqMedCLIPConfig.from_dict({**mini_config().to_dict(), "extra": 1})
    assert FreqMedCLIPConfig.from_dict(mini_config("no_tca").to_dict()) == mini_config("no_tca")


def test_prompt_sensitivity(mini_backbone):
    """Untrained, the prompt has no effect (test_mini_shapes_at_every_stage); trained, it must have one."""
    model = build_mini(mini_backbone).eval()
    image = make_image(1, seed=4).expand(2, -1, -1, -1)
    perturbed = perturb_zero_init(model)
    assert len(perturbed) == 2 * 4 * 2 + 2 * 3 * 2 + 2 + 2     # TCA out/ffn, 6 FiLMs, gate, head.out (w + b)
    frequency_batches = []
    handle = model.frequency.register_forward_hook(lambda module, args, output: frequency_batches.append(len(args[0])))
    with torch.no_grad():
        out = model(image, PROMPTS)
    handle.remove()
    assert frequency_batches == [1]          # the expanded image: the prompt-free frequency stream runs once
    assert (out.logits[0] - out.logits[1]).abs().max() > 1e-3
    assert (out.semantic_logits[0] - out.semantic_logits[1]).abs().max() > 1e-3
    assert (out.frequency_logits[0] - out.frequency_logits[1]).abs().max() > 1e-3
    # padding is masked: "brain tumour" (4 tokens) gives the same logits alone as next to a 5-token prompt
    # (and the shared frequency features give what an unshared batch of one gives)
    with torch.no_grad():
        alone = model(image[:1], PROMPTS[1:]).logits
    # batched vs single-row fp32 kernels differ by round-off only, relative to the logit scale (tests/_tolerances.py)
    assert (alone[0] - out.logits[1]).abs().max() <= FP32_LOGIT_REL * out.logits.abs().max()


@pytest.mark.parametrize("variant, shared_blocks", [("full", 3), ("no_tca", 12)])
def test_an_image_shared_by_several_prompts_runs_the_prompt_free_vit_blocks_once(mini_backbone, variant,
                                                                                 shared_blocks):
    """Blocks up to the first adapter (block 3; all 12 without TCA) run once for an expanded image."""
    model = build_mini(mini_backbone, variant).eval()
    perturb_zero_init(model)
    image = make_image(1, seed=4)
    batches = []
    handles = [block.register_forward_hook(lambda module, args, output: batches.append(len(args[0])))
               for block in model.semantic.trunk.blocks]
    with torch.no_grad():
        shared = model(image.expand(2, -1, -1, -1), PROMPTS).logits
    for handle in handles:
        handle.remove()
    assert batches == [1] * shared_blocks + [2] * (12 - shared_blocks)
    with torch.no_grad():
        copies = model(image.repeat(2, 1, 1, 1), PROMPTS).logits     # real copies: every block on both rows
    assert (shared - copies).abs().max() <= FP32_LOGIT_REL * copies.abs().max()   # round-off only (different kernels)


@pytest.mark.parametrize("variant, used, ignored", [("unet_clip", "embedding", "pooled"),
                                                    ("semantic_only", "pooled", "embedding")])
def test_text_condition_selects_the_conditioning_vector(mini_backbone, variant, used, ignored):
    model = build_mini(mini_backbone, variant).eval()
    perturb_zero_init(model)
    image = make_image(1, seed=5)
    base, other = model.encode_text(["left lung nodule"]), model.encode_text(["brain tumour"])
    with torch.no_grad():
        reference = model(image, base).logits
        swapped_used = model(image, base._replace(**{used: getattr(other, used)})).logits
        swapped_ignored = model(image, base._replace(**{ignored: getattr(other, ignored)})).logits
    assert (swapped_used - reference).abs().max() > 1e-3
    assert torch.equal(swapped_ignored, reference)


@pytest.mark.parametrize("fusion_cls", [CrossStreamFusion, ConcatFusion])
def test_bottleneck_fusion_is_bidirectional(fusion_cls):
    """Eq. 11: each stream reads the other one (and is not just its own projection)."""
    torch.manual_seed(0)
    extra = (4,) if fusion_cls is CrossStreamFusion else ()
    fusion = fusion_cls(8, 12, 16, *extra, None).eval()
    s1, f3 = torch.randn(2, 8, 14, 14), torch.randn(2, 12, 14, 14)
    s1_other, f3_other = s1.clone(), f3.clone()
    s1_other[1], f3_other[1] = torch.randn(8, 14, 14), torch.randn(12, 14, 14)
    condition = torch.zeros(2, 1)
    with torch.no_grad():
        base = fusion(s1, f3, condition)
        new_s = fusion(s1_other, f3, condition)           # only the semantic input of sample 1 changed
        new_f = fusion(s1, f3_other, condition)           # only the frequency input of sample 1 changed
    assert base.semantic.shape == base.frequency.shape == (2, 16, 28, 28)
    assert torch.equal(new_s.frequency[0], base.frequency[0])           # samples do not mix
    assert (new_s.frequency[1] - base.frequency[1]).abs().max() > 1e-3  # frequency stream reads semantics
    assert (new_f.semantic[1] - base.semantic[1]).abs().max() > 1e-3    # semantic stream reads frequency


def test_batch_and_prompt_count_must_match(mini_model):
    with pytest.raises(ValueError, match="got 2 images but 1 prompts"):
        mini_model(make_image(2), ["left lung nodule"])


# ---------------------------------------------------------------------------------------------------------
# Text encoder


class CallCounter:
    """Counts a module's forward calls and records the shape of the ``input_ids`` it was given."""

    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        self.shapes: list[tuple[int, ...]] = []
        self.handle = module.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, output) -> None:
        self.calls += 1
        self.shapes.append(tuple((args[0] if args else kwargs["input_ids"]).shape))


@pytest.fixture
def text_encoder(mini_backbone) -> TextEncoder:
    return TextEncoder(mini_backbone.text, mini_backbone.tokenizer, context_length=77)


def test_text_features_match_open_clip_encoder(text_encoder, mini_backbone):
    features = text_encoder(PROMPTS)
    # independent reference: open_clip's own HFTextEncoder forward on 256-padded ids (what open_clip does)
    ids = mini_backbone.tokenizer(PROMPTS, padding="max_length", max_length=256, truncation=True,
                                  return_tensors="pt")["input_ids"]
    with torch.no_grad():
        embedding = mini_backbone.text(ids)
        hidden = mini_backbone.text.transformer(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    assert torch.allclose(features.embedding, embedding, atol=1e-5)
    assert torch.allclose(features.pooled, hidden[:, 0], atol=1e-5)                # [CLS] last hidden state
    assert torch.allclose(features.tokens[0], hidden[0, :5], atol=1e-5)
    assert torch.allclose(features.tokens[1, :4], hidden[1, :4], atol=1e-5)
    assert features.tokens.dtype == torch.float32 and not features.tokens.requires_grad


def test_text_cache_reuses_features_without_running_bert(text_encoder, mini_backbone):
    counter = CallCounter(mini_backbone.text.transformer)
    try:
        first = text_encoder(PROMPTS)
        assert counter.calls == 2                                   # one unpadded BERT call per new prompt,
        assert counter.shapes == [(1, 5), (1, 4)]                   # on the real length, not 77 or 256 pads
        second = text_encoder(list(reversed(PROMPTS)))
        again = text_encoder(["left  lung\tnodule", "left lung nodule"])   # whitespace-normalised, duplicated
        assert counter.calls == 2
        new = text_encoder(["brain tumour", "right lung nodule"])
        assert counter.calls == 3
    finally:
        counter.handle.remove()
    for field in ("tokens", "pooled", "embedding"):
        a, b = getattr(first, field), getattr(second, field)
        assert torch.equal(a[0], b[1]) and torch.equal(a[1, : b.shape[1]], b[0])
        assert torch.equal(getattr(again, field)[0], getattr(again, field)[1])
    assert torch.equal(new.pooled[0], first.pooled[1])
    assert not torch.equal(new.pooled[1], first.pooled[0])


def test_text_cache_is_bounded(mini_backbone):
    encoder = TextEncoder(mini_backbone.text, mini_backbone.tokenizer, cache_size=2)
    encoder(["lesion"]), encoder(["mass"]), encoder(["nodule"])
    assert list(encoder._cache) == ["mass", "nodule"]


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t ", None, 3])
def test_empty_or_non_string_prompt_is_rejected(text_encoder, prompt):
    with pytest.raises(PromptError, match="empty|must be a string"):
        text_encoder(["left lung nodule", prompt])


def test_long_prompt_is_truncated_with_a_warning(text_encoder):
    long_prompt = "lesion " * 100                                   # [CLS] + 100 words + [SEP] = 102 tokens
    with pytest.warns(UserWarning, match="has 102 tokens; truncated to 77"):
        features = text_encoder([long_prompt, "brain tumour"])
    assert features.tokens.shape == (2, 77, 256)
    assert not features.padding[0].any() and features.padding[1].sum() == 77 - 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")                              # 75 words + [CLS] + [SEP] = 77: no warning
        exact = text_encoder(["lesion " * 75])
    assert torch.allclose(features.tokens[0], exact.tokens[0], atol=1e-5)   # truncation keeps [SEP] at the end
    assert torch.allclose(features.embedding[0], exact.embedding[0], atol=1e-5)


def test_text_encoder_stays_frozen_in_train_mode(text_encoder):
    text_encoder.train()
    assert text_encoder.training and not text_encoder.clip_text.training
    assert not any(p.requires_grad for p in text_encoder.parameters())
