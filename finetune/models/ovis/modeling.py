"""The Ovis network (AIDC-AI's `Ovis` class, `ovis/model/modeling_ovis.py`) rebuilt from transformers parts.

    llm               Gemma2ForCausalLM (Ovis1.6-Gemma2) or Qwen2ForCausalLM (Ovis2): the text model, as is.
    visual_tokenizer  backbone (SiglipVisionModel / Aimv2VisionModel) + head = Sequential(Linear(hidden·s², V−5,
                      bias=False), LayerNorm(V−5)); its output is a probability over V−5 "visual words", with 5 zero
                      columns appended for the indicator slots.
    vte               the visual embedding table (V × hidden): a crop's visual embeddings are probabilities @ vte —
                      soft tokens, not an argmax.

What the original computes, and how this module reproduces it (checked in tests/test_ovis.py):
- Backbone features are the LAST LAYER's output BEFORE the backbone's final norm: the original takes
  `hidden_states[-1]`, so SigLIP's `post_layernorm` (and its pooling head) and AIMv2's `post_trunk_norm` are loaded
  (the checkpoint holds them) but never applied. Here embeddings + encoder are called directly, which is the same
  tensor. transformers' own `Ovis2VisionModel` applies the final norm: it does not compute what Ovis2 computes.
- `hidden_stride` s merges s×s neighbouring patches after padding the patch grid at the bottom / right with zeros to
  a multiple of s (SigLIP-384: 27×27 → 28×28 → 14×14 tokens of 4·hidden).
- The original marks image positions with negative ids (−300 one crop, −301…−305 the indicators) and splices each
  crop's visual embeddings into the sequence. Here the processor writes real token ids (one image token per visual
  token, five indicator tokens), so input ids, labels and masks are as long as the LLM's sequence; the sequence the
  LLM sees is the same. Indicators take vte rows V−5…V−1, as in the original.
- Gemma2: transformers 4.46 multiplied all `inputs_embeds` by √hidden inside `Gemma2Model`; transformers 5 scales
  inside `embed_tokens`, so the visual and indicator embeddings spliced in here are scaled by the same factor (in the
  embeddings' dtype, as both versions do).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import CausalLMOutputWithPast

NUM_INDICATORS = 5  # −301…−305 in the original: image start, thumbnail end, column and row separators, image end


class OvisConfig(PreTrainedConfig):
    """The native model's config (built from an original or `-hf` config.json; never saved under this type)."""

    model_type = "ovis_native"
    sub_configs_defaults = {  # noqa: RUF012 (transformers' class attribute)
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="aimv2_vision_model"),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    visual_vocab_size: int = 65536
    hidden_stride: int = 1
    tokenize_function: str = "softmax"
    image_token_id: int = 0
    visual_indicator_token_ids: list[int] | tuple[int, ...] = ()
    tie_word_embeddings: bool = False  # the LLM ties its own head (Gemma2, small Qwen2) through its config

    def get_text_config(self, *args, **kwargs):
        return self.text_config


class VisualEmbedding(nn.Embedding):
    """The visual embedding table: ids look rows up, probabilities (float) mix them (`probabilities @ weight`)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.is_floating_point():
            return tokens @ self.weight
        return super().forward(tokens)


class VisualTokenizer(nn.Module):
    """Backbone → (stride merge) → head → softmax over V−5 visual words, 5 zero indicator columns appended."""

    def __init__(self, config: OvisConfig):
        super().__init__()
        self.hidden_stride = config.hidden_stride
        self.tokenize_function = config.tokenize_function
        self.backbone = AutoModel.from_config(config.vision_config)
        width = config.vision_config.hidden_size * config.hidden_stride**2
        self.head = nn.Sequential(
            nn.Linear(width, config.visual_vocab_size - NUM_INDICATORS, bias=False),
            nn.LayerNorm(config.visual_vocab_size - NUM_INDICATORS),
        )

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The last layer's output, before the backbone's final norm (SigLIP and AIMv2 both name the parts
        `embeddings` and `encoder`; SigLIP keeps them under `vision_model`)."""
        tower = getattr(self.backbone, "vision_model", self.backbone)
        hidden = tower.embeddings(pixel_values.to(next(self.head.parameters()).dtype))
        return tower.encoder(inputs_embeds=hidden).last_hidden_state

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [crops, 3, S, S] → [crops, tokens, V]
        features = self.features(pixel_values)
        s = self.hidden_stride
        if s > 1:
            n, length, d = features.shape
            side = int(length**0.5)
            if side * side != length:
                raise ValueError(f"{length} patches per crop do not form a square grid")
            pad = (s - side % s) % s
            features = F.pad(features.reshape(n, side, side, d), (0, 0, 0, pad, 0, pad))
            side += pad
            features = features.reshape(n, side // s, s, side // s, s, d).permute(0, 1, 3, 2, 4, 5)
            features = features.reshape(n, (side // s) ** 2, s * s * d)
        logits = self.head(features)
        if self.tokenize_function == "softmax":
            tokens = logits.softmax(dim=-1)
        else:  # "st_argmax", as the original writes it: the one-hot argmax forward, the logits' identity backward
            hard = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
            tokens = hard - logits.detach() + logits
        return F.pad(tokens, (0, NUM_INDICATORS))


class _LanguageBackbone:
    """The model without its LM head, as transformers 5's VLMs expose it (`model.base_model`): merged embeddings
    through the LLM's decoder, returning its last hidden states. TRL's SFT / DPO trainers compute the loss from these
    and the LM head in chunks (`add_fused_lm_head`). Not a module: it owns nothing, it only routes the call."""

    _tp_plan = _pp_plan = None

    def __init__(self, model: OvisForConditionalGeneration):
        self.model = model

    def __call__(self, input_ids=None, pixel_values=None, attention_mask=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.model.embed(input_ids, pixel_values)
        return self.model.llm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)


class OvisForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """Ovis with the original's parameter names at the top (`llm.*`, `visual_tokenizer.*`, `vte.weight`)."""

    config_class = OvisConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["SiglipEncoderLayer", "Aimv2EncoderLayer", "Gemma2DecoderLayer", "Qwen2DecoderLayer"]  # noqa: RUF012

    def __init__(self, config: OvisConfig):
        super().__init__(config)
        self.llm = AutoModelForCausalLM.from_config(config.text_config)
        self.visual_tokenizer = VisualTokenizer(config)
        self.vte = VisualEmbedding(config.visual_vocab_size, config.text_config.hidden_size)
        self.post_init()

    @property
    def base_model(self) -> _LanguageBackbone:
        return _LanguageBackbone(self)

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.llm.get_output_embeddings()

    def _init_weights(self, module):
        # Only for weights a checkpoint lacks (none, when loading: every tensor is checked): the original draws vte
        # from N(0, 1) (VisualEmbedding.reset_parameters); the sub-models initialise their own weights.
        if isinstance(module, VisualEmbedding):
            nn.init.normal_(module.weight)
        elif isinstance(module, (nn.Linear, nn.LayerNorm)) and any(module is m for m in self._head_modules()):
            module.reset_parameters()

    def _head_modules(self):
        tokenizer = getattr(self, "visual_tokenizer", None)
        return list(tokenizer.head) if tokenizer is not None else []

    # --- inputs ----------------------------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Text embeddings with every image token replaced by its crop's visual embedding (crops in the order their
        tokens appear) and every indicator token by its vte row."""
        config = self.config
        indicator_ids = torch.tensor(config.visual_indicator_token_ids, device=input_ids.device)
        is_image = input_ids == config.image_token_id
        is_indicator = torch.isin(input_ids, indicator_ids)
        wte = self.llm.get_input_embeddings()
        # Placeholder ids may lie beyond the text vocabulary (Gemma2's 256,000 rows are all taken): looked up as 0.
        embeds = wte(input_ids.masked_fill(is_image | is_indicator, 0))
        scale = getattr(wte, "embed_scale", None)  # Gemma2's √hidden (see the module docstring)

        def scaled(x: torch.Tensor) -> torch.Tensor:
            x = x.to(embeds.dtype)
            return x * scale.to(x.dtype) if scale is not None else x

        vocab = config.visual_vocab_size
        # Through the module (not its weight), so that PEFT's trainable copy of vte is the one used.
        indicators = scaled(self.vte(torch.arange(vocab - NUM_INDICATORS, vocab, device=input_ids.device)))
        if bool(is_indicator.any()):
            which = (input_ids.unsqueeze(-1) == indicator_ids).int().argmax(-1)[is_indicator]
            embeds = embeds.masked_scatter(is_indicator.unsqueeze(-1), indicators[which])
        if pixel_values is not None and pixel_values.numel():
            visual = scaled(self.vte(self.visual_tokenizer(pixel_values)))
            if int(is_image.sum()) != visual.shape[0] * visual.shape[1]:
                raise ValueError(
                    f"{int(is_image.sum())} image tokens in the text but {visual.shape[0]} crops × "
                    f"{visual.shape[1]} visual tokens in pixel_values"
                )
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), visual.reshape(-1, visual.shape[-1]))
        elif bool(is_image.any()):
            raise ValueError("image tokens in the text but no pixel_values")
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values)
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Greedy / sampled continuation like the original `Ovis.generate` (the LLM generates from the merged
        embeddings), returned after the prompt ids as transformers' decoder-only models return it."""
        inputs_embeds = self.embed(input_ids, pixel_values)
        new_tokens = self.llm.generate(inputs_embeds=inputs_embeds, **kwargs)
        return torch.cat([input_ids, new_tokens.to(input_ids.device)], dim=1)
