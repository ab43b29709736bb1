"""H2OVL original-layout checkpoints ↔ native InternVLForConditionalGeneration (tiny checkpoints, CPU, seconds)."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from finetune.errors import UserError
from finetune.models.mississippi import checkpoint as h2
from finetune.models.mississippi import config as h2c
from finetune.models.mississippi.tiny import build_tiny_h2ovl
from finetune.models.weights import compile_pattern

SHAPES = {"llama": {"llm": "llama", "use_msac": False}, "mistral": {"llm": "mistral", "use_msac": True}}
TOKENS_PER_TILE = 4  # (56 / 14)² · 0.5²


@pytest.fixture(scope="module", params=sorted(SHAPES))
def tiny(request, tmp_path_factory) -> Path:
    return build_tiny_h2ovl(tmp_path_factory.mktemp(f"h2ovl-{request.param}"), **SHAPES[request.param])


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def _prompt_ids(tokenizer_dir: Path, tiles: int) -> torch.Tensor:
    from transformers import AutoTokenizer, PreTrainedConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, config=PreTrainedConfig())
    text = "<|prompt|><img>" + "<IMG_CONTEXT>" * (TOKENS_PER_TILE * tiles) + "</img>\nRead it<|end|><|answer|>"
    return torch.tensor([tok(text)["input_ids"]])


# --- building and loading ------------------------------------------------------------------------------------------
def test_tiny_checkpoint_has_the_hub_layout(tiny):
    names = {p.name for p in tiny.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    cfg = json.loads((tiny / "config.json").read_text())
    mistral = cfg["llm_config"]["model_type"] == "mistral"
    assert cfg["architectures"] == ["H2OVLChatModel"] and cfg["model_type"] == "h2ovl_chat"
    assert cfg["auto_map"]["AutoConfig"] == "configuration_h2ovl_chat.H2OVLChatConfig"
    assert cfg["auto_map"]["AutoModel"].endswith("_h2ovl_chat.H2OVLChatModel")
    assert cfg["llm_config"]["architectures"] == (["MistralForCausalLM"] if mistral else ["LlamaForCausalLM"])
    assert cfg["vision_config"]["architectures"] == ["InternVisionModel"]
    assert cfg["use_msac"] is mistral
    assert (
        cfg["template"],
        cfg["force_image_size"],
        cfg["downsample_ratio"],
        cfg["ps_version"],
        cfg["select_layer"],
        cfg["use_thumbnail"],
        cfg["min_dynamic_patch"],
        cfg["max_dynamic_patch"],
    ) == ("h2ogpt2", 56, 0.5, "v2", -1, True, 1, 6)
    assert h2c.tokens_per_tile(cfg) == TOKENS_PER_TILE
    keys = set(load_file(tiny / "model.safetensors"))
    assert all(
        k.startswith(("vision_model.", "mlp1.", "language_model.model.", "language_model.lm_head.")) for k in keys
    )
    assert "vision_model.encoder.layers.1.attn.qkv.weight" in keys and "mlp1.3.bias" in keys
    tok_cfg = json.loads((tiny / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "chat_template" in tok_cfg


def test_load_accounts_for_every_weight_and_runs(tiny):
    cfg = h2c.read_original_config(tiny)
    model = h2.load_h2ovl(tiny)
    file_state = load_file(tiny / "model.safetensors")
    layers_v, layers_t = cfg["vision_config"]["num_hidden_layers"], cfg["llm_config"]["num_hidden_layers"]
    # original: embeddings 4 + 14 per ViT layer + mlp1 6 + LLM (embed, norm, 9 per layer) + lm_head
    assert len(file_state) == 4 + 14 * layers_v + 6 + 2 + 9 * layers_t + 1
    expected = h2.original_to_native(file_state)
    params = dict(model.named_parameters())
    assert len(params) == len(expected) == 4 + 18 * layers_v + 6 + 2 + 9 * layers_t + 1
    assert set(model.state_dict()) == set(params) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(params[name].detach(), tensor.float()), name

    config = model.config
    mistral = cfg["llm_config"]["model_type"] == "mistral"
    assert type(config.text_config).__name__ == ("MistralConfig" if mistral else "LlamaConfig")
    assert config.text_config.rope_parameters["rope_theta"] == (1e4 if mistral else 1e5)
    assert config.tie_word_embeddings is False and config.text_config.tie_word_embeddings is False
    assert not torch.equal(model.lm_head.weight, model.model.language_model.embed_tokens.weight)
    assert config.vision_feature_select_strategy == "default" and config.vision_feature_layer == -1
    assert config.image_seq_length == TOKENS_PER_TILE and config.projector_hidden_act == "gelu"
    assert config.vision_config.use_mean_pooling and not config.vision_config.use_qk_norm
    assert config.image_token_id == 8  # <IMG_CONTEXT>, the last special token
    assert model.generation_config.eos_token_id == [2, 5]  # </s>, <|end|>

    for tiles in (1, 3):
        ids = _prompt_ids(tiny, tiles)
        assert int((ids == config.image_token_id).sum()) == TOKENS_PER_TILE * tiles
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=torch.randn(tiles, 3, 56, 56)).logits
        assert logits.shape == (1, ids.shape[1], cfg["llm_config"]["vocab_size"])
        assert torch.isfinite(logits).all()


def _reference_logits(state: dict, cfg: dict, ids: torch.Tensor, pixels: torch.Tensor, image_token_id: int):
    """InternVL-chat's forward written from its definition, on original weight names (no native code)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    vc = cfg["vision_config"]
    c, heads, eps = vc["hidden_size"], vc["num_attention_heads"], vc["layer_norm_eps"]
    w = {k: v.float() for k, v in state.items()}
    x = F.conv2d(
        pixels,
        w["vision_model.embeddings.patch_embedding.weight"],
        w["vision_model.embeddings.patch_embedding.bias"],
        stride=vc["patch_size"],
    )
    b = x.shape[0]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([w["vision_model.embeddings.class_embedding"].expand(b, 1, c), x], dim=1)
    x = x + w["vision_model.embeddings.position_embedding"]
    n = x.shape[1]
    for i in range(vc["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        y = F.layer_norm(x, (c,), w[p + "norm1.weight"], w[p + "norm1.bias"], eps)
        qkv = F.linear(y, w[p + "attn.qkv.weight"], w[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(c // heads), dim=-1) @ v
        y = F.linear(att.transpose(1, 2).reshape(b, n, c), w[p + "attn.proj.weight"], w[p + "attn.proj.bias"])
        x = x + y * w[p + "ls1"]
        y = F.layer_norm(x, (c,), w[p + "norm2.weight"], w[p + "norm2.bias"], eps)
        y = F.linear(
            F.gelu(F.linear(y, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"])),
            w[p + "mlp.fc2.weight"],
            w[p + "mlp.fc2.bias"],
        )
        x = x + y * w[p + "ls2"]
    x = x[:, 1:]
    side, s = int((n - 1) ** 0.5), cfg["downsample_ratio"]
    x = x.reshape(b, side, side, c)  # pixel shuffle, ps_version v2
    x = x.reshape(b, side, int(side * s), int(c / s)).permute(0, 2, 1, 3)
    x = x.reshape(b, int(side * s), int(side * s), int(c / s / s)).permute(0, 2, 1, 3)
    x = x.reshape(b, -1, x.shape[-1])
    x = F.layer_norm(x, (x.shape[-1],), w["mlp1.0.weight"], w["mlp1.0.bias"], 1e-5)
    features = F.linear(F.gelu(F.linear(x, w["mlp1.1.weight"], w["mlp1.1.bias"])), w["mlp1.3.weight"], w["mlp1.3.bias"])

    llm_cfg = {k: v for k, v in cfg["llm_config"].items() if k != "torch_dtype"}
    config_class = MistralConfig if llm_cfg["model_type"] == "mistral" else LlamaConfig
    llm = AutoModelForCausalLM.from_config(config_class(**llm_cfg), dtype=torch.float32)
    llm.load_state_dict(
        {k.removeprefix("language_model."): v for k, v in w.items() if k.startswith("language_model.")}, strict=True
    )
    embeds = llm.get_input_embeddings()(ids).clone()
    embeds[ids == image_token_id] = features.reshape(-1, features.shape[-1])
    return llm(inputs_embeds=embeds).logits


def test_native_forward_matches_internvl_definition(tiny, tmp_path):
    """Every weight randomised (so swapped ls1/ls2, q/k/v order, norms... would show): native logits equal a
    from-the-definition InternVL-chat forward on the original weights."""
    folder = _copy(tiny, tmp_path / "random")
    generator = torch.Generator().manual_seed(1)

    def randomise(state):
        for key, tensor in state.items():
            state[key] = (torch.randn(tensor.shape, generator=generator) * 0.2).to(tensor.dtype)

    _edit_weights(folder, randomise)
    cfg = h2c.read_original_config(folder)
    model = h2.load_h2ovl(folder, attn_implementation="eager")
    ids, pixels = _prompt_ids(folder, 2), torch.randn(2, 3, 56, 56, generator=generator)
    with torch.no_grad():
        native = model(input_ids=ids, pixel_values=pixels).logits
        reference = _reference_logits(
            load_file(folder / "model.safetensors"), cfg, ids, pixels, model.config.image_token_id
        )
    torch.testing.assert_close(native, reference, rtol=2e-5, atol=2e-5)  # a q/k swap is ~5e-4


# --- round trip ----------------------------------------------------------------------------------------------------
def test_round_trip_is_bit_identical(tiny, tmp_path):
    model = h2.load_h2ovl(tiny)  # bfloat16 file → float32 model → bfloat16 file
    out = h2.save_original(model, tmp_path / "original", h2c.read_original_config(tiny))
    before, after = load_file(tiny / "model.safetensors"), load_file(out / "model.safetensors")
    assert list(before) == sorted(before) and set(after) == set(before)
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype and after[key].shape == tensor.shape, key
        assert torch.equal(after[key].view(torch.int16), tensor.view(torch.int16)), key
    assert json.loads((out / "config.json").read_text()) == json.loads((tiny / "config.json").read_text())
    # and the saved folder loads again, with the tokenizer files copied by the caller
    copied = h2.copy_tokenizer_files(tiny, out)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(copied)
    again = h2.load_h2ovl(out)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_mapping_functions_are_exact_inverses(tiny):
    state = load_file(tiny / "model.safetensors")
    native = h2.original_to_native(state)
    back = h2.native_to_original(native)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert "model.vision_tower.encoder.layer.0.attention.k_proj.bias" in native
    assert "model.vision_tower.embeddings.patch_embeddings.projection.weight" in native


def test_each_name_is_renamed_by_at_most_one_row_of_the_table(tiny):
    """Both directions come from NAME_TABLE: a row must carry the same placeholders on both sides, and no name may
    match two rows (the inverse would then depend on row order)."""
    for original, native in h2.NAME_TABLE:
        assert sorted(re.findall(r"\{(\w+)\}", original)) == sorted(re.findall(r"\{(\w+)\}", native))
    state = load_file(tiny / "model.safetensors")
    for names, side in ((state, 0), (h2.original_to_native(state), 1)):
        for name in names:
            rows = [row for row in h2.NAME_TABLE if compile_pattern(row[side]).fullmatch(name)]
            assert len(rows) <= 1, (name, rows)


def test_save_original_with_a_given_state_dict_and_dtype(tiny, tmp_path):
    model = h2.load_h2ovl(tiny)
    state = {k: v * 2 for k, v in model.state_dict().items()}
    out = h2.save_original(model, tmp_path / "o", h2c.read_original_config(tiny), state_dict=state, dtype=torch.float32)
    saved = load_file(out / "model.safetensors")
    assert saved["mlp1.1.weight"].dtype == torch.float32
    torch.testing.assert_close(saved["mlp1.1.weight"], 2 * model.model.multi_modal_projector.linear_1.weight)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_native_save_loads_through_load_h2ovl(tiny, tmp_path):
    model = h2.load_h2ovl(tiny)
    model.save_pretrained(tmp_path / "native")
    again = h2.load_h2ovl(tmp_path / "native")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_sharded_checkpoint_loads(tiny, tmp_path):
    folder = _copy(tiny, tmp_path / "sharded")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, folder / name, metadata={"format": "pt"})
    weight_map = {k: name for name, part in shards.items() for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = h2.load_h2ovl(folder)
    assert torch.equal(model.lm_head.weight, state["language_model.lm_head.weight"].float())


# --- broken checkpoints and configs --------------------------------------------------------------------------------
def test_missing_tensor_is_named(tiny, tmp_path):
    folder = _copy(tiny, tmp_path / "missing")
    _edit_weights(folder, lambda s: s.pop("vision_model.encoder.layers.1.attn.qkv.bias"))
    with pytest.raises(UserError) as e:
        h2.load_h2ovl(folder)
    message = _one_line_error(e)
    assert "missing vision_model.encoder.layers.1.attn.qkv.bias" in message and "unexpected" not in message


def test_renamed_tensor_is_named(tiny, tmp_path):
    folder = _copy(tiny, tmp_path / "renamed")
    _edit_weights(
        folder,
        lambda s: s.__setitem__(
            "vision_model.encoder.layers.0.norm_1.weight", s.pop("vision_model.encoder.layers.0.norm1.weight")
        ),
    )
    with pytest.raises(UserError) as e:
        h2.load_h2ovl(folder)
    message = _one_line_error(e)
    assert "missing vision_model.encoder.layers.0.norm1.weight" in message
    assert "unexpected vision_model.encoder.layers.0.norm_1.weight" in message


def test_wrong_shape_is_named(tiny, tmp_path):
    folder = _copy(tiny, tmp_path / "shape")
    _edit_weights(folder, lambda s: s.__setitem__("mlp1.1.weight", s["mlp1.1.weight"][:, :-1].contiguous()))
    with pytest.raises(UserError) as e:
        h2.load_h2ovl(folder)
    message = _one_line_error(e)
    assert "wrong shape mlp1.1.weight (64, 127) (expected (64, 128))" in message


def test_unmappable_keys_raise_in_the_mapping_functions():
    with pytest.raises(UserError, match=r"no place in the native .*vision_model\.head\.weight"):
        h2.original_to_native({"vision_model.head.weight": torch.zeros(2)})
    with pytest.raises(UserError, match=r"no place in the original .*model\.vision_tower\.layernorm\.weight"):
        h2.native_to_original({"model.vision_tower.layernorm.weight": torch.zeros(2)})
    with pytest.raises(UserError, match=r"missing model\.vision_tower\.encoder\.layer\.0\.attention\.v_proj\.weight"):
        h2.native_to_original(
            {f"model.vision_tower.encoder.layer.0.attention.{n}_proj.weight": torch.zeros(2, 2) for n in "qk"}
        )


def test_non_h2ovl_config_is_refused(tiny, tmp_path):
    folder = _copy(tiny, tmp_path / "internvl")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="internvl_chat", architectures=["InternVLChatModel"])
    (folder / "config.json").write_text(json.dumps(cfg))
    for call in (h2c.read_original_config, h2.load_h2ovl):
        with pytest.raises(UserError) as e:
            call(folder)
        message = _one_line_error(e)
        assert "not an H2OVL-Mississippi checkpoint" in message and "internvl_chat" in message


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda c: c["vision_config"].update(qk_normalization=True), "vision_config.qk_normalization"),
        (lambda c: c.update(ps_version="v1"), "ps_version"),
        (lambda c: c.update(select_layer=-7), "select_layer"),
        (lambda c: c["llm_config"].update(architectures=["Qwen2ForCausalLM"]), "llm_config.architectures"),
        (lambda c: c["llm_config"].update(tie_word_embeddings=True), "llm_config.tie_word_embeddings"),
        (lambda c: c.update(use_llm_lora=16), "use_llm_lora"),
    ],
)
def test_unsupported_settings_name_the_field(tiny, edit, field):
    cfg = h2c.read_original_config(tiny)
    edit(cfg)
    with pytest.raises(UserError) as e:
        h2c.native_config(cfg, image_token_id=8)
    assert _one_line_error(e).startswith(field + ":")


def test_select_layer_maps_to_vision_feature_layer(tiny):
    cfg = h2c.read_original_config(tiny)
    cfg["select_layer"] = -2
    assert h2c.native_config(cfg, image_token_id=8).vision_feature_layer == -2


def test_chat_template_is_h2ogpt2(tiny):
    from transformers import AutoTokenizer, PreTrainedConfig

    tok = AutoTokenizer.from_pretrained(tiny, config=PreTrainedConfig())
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read it"}]},
        {"role": "assistant", "content": '{"a": 1}'},
        {"role": "user", "content": "More"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == '<|prompt|><image>\nRead it<|end|><|answer|>{"a": 1}<|end|><|prompt|>More<|end|><|answer|>'
    ids = tok("<|prompt|>x<|end|>")["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|prompt|>")  # no BOS added
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<unk>", "<unk>")
