"""Hugging Face parity: tiny random ViT, Swin and ViT-MAE models, converted, agree < 1e-4;
exported back, their state dicts are bitwise the originals."""

import dataclasses
import re

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.models.vit_mae import modeling_vit_mae  # noqa: E402

from seqlab import convert  # noqa: E402
from seqlab.convert import vision  # noqa: E402

TOL = 1e-4


def randomise(model: "torch.nn.Module", seed: int = 0) -> "torch.nn.Module":
  """Large random weights (HF's init is near zero), so a wrong mapping shows in the outputs."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=gen)
      if "norm" in name and name.endswith("weight"):
        param.copy_(1.0 + 0.2 * noise)
      elif "relative_position_bias_table" in name:
        param.copy_(noise)  # O(1) biases, so the shift mask and the index are exercised
      else:
        param.copy_(0.15 * noise)
  return model.eval()


def images_nchw(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randn(batch, 3, height, width).astype(np.float32)


def nhwc(x: np.ndarray) -> np.ndarray:
  return x.transpose(0, 2, 3, 1)


def run(model, params, x_nchw, *, with_features: bool = False, **batch):
  """Jitted forward on NHWC images; with_features also returns the final norm's output."""
  def forward(params, batch):
    if not with_features:
      return model.apply({"params": params}, batch)
    out, state = model.apply({"params": params}, batch, capture_intermediates=lambda m, _:
                             m.name == "norm", mutable=["intermediates"])
    return out, state["intermediates"]["norm"]["__call__"][0]
  return jax.jit(forward)(params, {"image": nhwc(x_nchw), **batch})


def assert_close(ours, ref, tol=TOL):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape
  assert np.std(ref) > 0.1, "reference outputs too small for a meaningful comparison"
  np.testing.assert_array_less(np.abs(ours - ref).max(), tol)


VIT_HF = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=64, layer_norm_eps=1e-6)


# ─── ViT ─────────────────────────────────────────────────────────────────────────────────────


def test_vit_classifier_logits_and_hidden_states_match_hf():
  hf_config = transformers.ViTConfig(num_labels=5, **VIT_HF)
  hf = randomise(transformers.ViTForImageClassification(hf_config))
  config = vision.vit_config_from_hf(hf_config)
  params = convert.vit_from_hf(hf.state_dict(), config)  # the package-level re-export
  x = images_nchw(2, 16, 16)
  with torch.no_grad():
    ref_logits = hf(torch.from_numpy(x)).logits.numpy()
    ref_hidden = hf.vit(torch.from_numpy(x)).last_hidden_state.numpy()
  logits, hidden = run(config.build(), params, x, with_features=True)
  assert_close(logits, ref_logits)
  assert_close(hidden, ref_hidden)
  # The same checkpoint into a scanned ViT: the layers stacked, the same logits.
  scanned = vision.vit_config_from_hf(hf_config, scan_layers=True)
  stacked = convert.vit_from_hf(hf.state_dict(), scanned)
  assert stacked["block"]["mlp"]["wi"]["kernel"].shape == (2, 32, 64)
  assert_close(run(scanned.build(), stacked, x), ref_logits)


def test_vit_new_resolution_matches_hf_interpolate_pos_encoding():
  """A 4x4-patch model run on a non-square 6x8 grid: bicubic resize of the learned table."""
  hf_config = transformers.ViTConfig(num_labels=5, **VIT_HF)
  hf = randomise(transformers.ViTForImageClassification(hf_config), seed=1)
  config = vision.vit_config_from_hf(hf_config)
  params = vision.vit_from_hf(hf.state_dict(), config)
  x = images_nchw(2, 24, 32, seed=1)
  with torch.no_grad():
    ref = hf(torch.from_numpy(x), interpolate_pos_encoding=True).logits.numpy()
  assert_close(run(config.build(), params, x), ref)


def test_vit_model_without_head_drops_only_the_pooler():
  hf_config = transformers.ViTConfig(**VIT_HF)
  hf = randomise(transformers.ViTModel(hf_config), seed=2)  # has a pooler seqlab does not use
  config = vision.vit_config_from_hf(hf_config, num_classes=0)
  params = vision.vit_from_hf(hf.state_dict(), config)
  assert "head" not in params
  x = images_nchw(1, 16, 16, seed=2)
  with torch.no_grad():
    ref = hf(torch.from_numpy(x)).last_hidden_state.numpy()
  assert_close(run(config.build(), params, x, with_features=True)[1], ref)


# ─── Swin ────────────────────────────────────────────────────────────────────────────────────


def test_swin_non_square_with_shifted_stages_matches_hf():
  # 32x64 image, 4x4 patches: stage 0 at 8x16 (> window 4: shifted windows on odd blocks),
  # stage 1 at 4x8 (min = window: shift off). Every size divides the window, where Hugging
  # Face (which pads) and seqlab agree.
  hf_config = transformers.SwinConfig(image_size=(32, 64), patch_size=4, embed_dim=16,
                                      depths=[2, 2], num_heads=[2, 4], window_size=4,
                                      num_labels=5)
  hf = randomise(transformers.SwinForImageClassification(hf_config), seed=3)
  config = vision.swin_config_from_hf(hf_config)
  params = convert.swin_from_hf(hf.state_dict(), config)
  model = config.build()
  bound = model.bind({"params": params})
  assert [[(b.window, b.shift) for b in stage] for stage in bound.stages] == [
      [(4, 0), (4, 2)], [(4, 0), (4, 0)]]
  x = images_nchw(2, 32, 64, seed=3)
  with torch.no_grad():
    ref_logits = hf(torch.from_numpy(x)).logits.numpy()
    ref_hidden = hf.swin(torch.from_numpy(x)).last_hidden_state.numpy()
  logits, features = run(model, params, x, with_features=True)
  assert_close(logits, ref_logits)
  assert_close(features.reshape(2, 4 * 8, -1), ref_hidden)


def test_swin_window_larger_than_resolution_follows_the_official_rule():
  """window_size=7 on a 4x4 grid runs as one 4x4 window without shift: equal to HF window 4."""
  hf_config = transformers.SwinConfig(image_size=16, patch_size=4, embed_dim=16, depths=[2],
                                      num_heads=[2], window_size=4, num_labels=3)
  hf = randomise(transformers.SwinForImageClassification(hf_config), seed=4)
  config = vision.swin_config_from_hf(hf_config, window_size=7)
  params = vision.swin_from_hf(hf.state_dict(), config)
  x = images_nchw(2, 16, 16, seed=4)
  with torch.no_grad():
    ref = hf(torch.from_numpy(x)).logits.numpy()
  assert_close(run(config.build(), params, x), ref)


def test_swin_padded_windows_match_hf_and_masking_them_differs():
  # 56x104 image, 4x4 patches: stage grids 14x26, 7x13, 4x7, none a multiple of window 4.
  # Stages 0 and 1 pad and shift (shift mask on the padded size); stage 2 (min = window)
  # pads without shift; the odd grids also exercise the padded patch merging.
  hf_config = transformers.SwinConfig(image_size=(56, 104), patch_size=4, embed_dim=16,
                                      depths=[2, 2, 2], num_heads=[2, 4, 8], window_size=4,
                                      num_labels=5)
  hf = randomise(transformers.SwinForImageClassification(hf_config), seed=7)
  config = vision.swin_config_from_hf(hf_config)
  assert not config.mask_padded_keys
  params = vision.swin_from_hf(hf.state_dict(), config)
  assert [[(b.window, b.shift) for b in stage]
          for stage in config.build().bind({"params": params}).stages] == [
      [(4, 0), (4, 2)], [(4, 0), (4, 2)], [(4, 0), (4, 0)]]
  x = images_nchw(2, 56, 104, seed=7)
  with torch.no_grad():
    ref = hf(torch.from_numpy(x)).logits.numpy()
  assert_close(run(config.build(), params, x), ref)
  # Masking the padded keys is another model: same parameters, other logits.
  masked = dataclasses.replace(config, mask_padded_keys=True)
  assert np.abs(np.asarray(run(masked.build(), params, x)) - ref).max() > 1e-2


# ─── MAE ─────────────────────────────────────────────────────────────────────────────────────


def test_mae_matches_hf_vit_mae_with_the_same_noise():
  hf_config = transformers.ViTMAEConfig(
      image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1,
      decoder_num_attention_heads=2, decoder_intermediate_size=32, norm_pix_loss=True,
      mask_ratio=0.6, layer_norm_eps=1e-6)
  hf = randomise(transformers.ViTMAEForPreTraining(hf_config), seed=5)
  with torch.no_grad():  # the fixed tables, as HF's own initialize_weights lays them out
    for table, dim in ((hf.vit.embeddings.position_embeddings, 32),
                       (hf.decoder.decoder_pos_embed, 16)):
      pe = modeling_vit_mae.build_2d_sinusoidal_position_embedding(4, 4, dim, cls_token=True)
      table.copy_(torch.cat([pe[..., dim // 2:], pe[..., :dim // 2]], dim=-1)[None])
  config = vision.mae_config_from_hf(hf_config)
  params = vision.mae_from_hf(hf.state_dict(), config)
  x = images_nchw(2, 16, 16, seed=5)
  noise = np.random.RandomState(6).rand(2, 16).astype(np.float32)
  with torch.no_grad():
    ref = hf(torch.from_numpy(x), noise=torch.from_numpy(noise))
  out = run(config.build(), params, x, ids_restore=ref.ids_restore.numpy())
  assert_close(out["pred"], ref.logits.numpy())
  np.testing.assert_array_equal(np.asarray(out["mask"]), ref.mask.numpy())
  np.testing.assert_allclose(float(out["loss"]), ref.loss.item(), rtol=1e-5)
  assert int(np.asarray(out["mask"]).sum()) == 2 * (16 - int(16 * (1 - 0.6)))
  scanned = vision.mae_config_from_hf(hf_config, scan_layers=True, remat="dots")
  stacked = vision.mae_from_hf(hf.state_dict(), scanned)
  assert stacked["decoder_block"]["mlp"]["wi"]["kernel"].shape == (1, 16, 32)
  out = run(scanned.build(), stacked, x, ids_restore=ref.ids_restore.numpy())
  assert_close(out["pred"], ref.logits.numpy())


def test_mae_rejects_a_checkpoint_with_other_position_tables():
  hf_config = transformers.ViTMAEConfig(
      image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
      intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1,
      decoder_num_attention_heads=2, decoder_intermediate_size=32)
  hf = transformers.ViTMAEForPreTraining(hf_config)
  state = {k: v.clone() for k, v in hf.state_dict().items()}
  state["vit.embeddings.position_embeddings"] = torch.ones_like(
      state["vit.embeddings.position_embeddings"])
  with pytest.raises(ValueError, match="position_embeddings"):
    vision.mae_from_hf(state, vision.mae_config_from_hf(hf_config))


# ─── Layouts and errors ──────────────────────────────────────────────────────────────────────

# transformers 4.x names (inverse of transformers' own conversion_mapping rules), hand-written.
_OLD_VIT = [(r"^vit\.layers\.(\d+)\.attention\.([qkv])_proj\.",
             lambda m: f"vit.encoder.layer.{m[1]}.attention.attention."
                       f"{dict(q='query', k='key', v='value')[m[2]]}."),
            (r"^vit\.layers\.(\d+)\.attention\.o_proj\.",
             r"vit.encoder.layer.\1.attention.output.dense."),
            (r"^vit\.layers\.(\d+)\.mlp\.fc1\.", r"vit.encoder.layer.\1.intermediate.dense."),
            (r"^vit\.layers\.(\d+)\.mlp\.fc2\.", r"vit.encoder.layer.\1.output.dense."),
            (r"^vit\.layers\.(\d+)\.", r"vit.encoder.layer.\1.")]
_OLD_SWIN = [(r"\.attention\.([qkv])_proj\.",
              lambda m: f".attention.self.{dict(q='query', k='key', v='value')[m[1]]}."),
             (r"\.attention\.relative_position_bias\.relative_position_bias_table$",
              ".attention.self.relative_position_bias_table"),
             (r"\.attention\.o_proj\.", ".attention.output.dense."),
             (r"\.mlp\.fc1\.", ".intermediate.dense."),
             (r"\.mlp\.fc2\.", ".output.dense.")]


def _rename(state: dict, rules) -> dict:
  out = {}
  for key, value in state.items():
    for pattern, replacement in rules:
      new = re.sub(pattern, replacement, key)
      if new != key:
        key = new
        break
    out[key] = value
  return out


def _same_tree(a, b):
  leaves_a, tree_a = jax.tree_util.tree_flatten(a)
  leaves_b, tree_b = jax.tree_util.tree_flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)


def test_older_hf_layouts_convert_to_the_same_parameters():
  vit_config = transformers.ViTConfig(num_labels=5, **VIT_HF)
  vit = transformers.ViTForImageClassification(vit_config)
  config = vision.vit_config_from_hf(vit_config)
  old = _rename(vit.state_dict(), _OLD_VIT)
  assert "vit.encoder.layer.1.attention.attention.query.weight" in old
  assert "vit.encoder.layer.0.output.dense.bias" in old
  _same_tree(vision.vit_from_hf(old, config), vision.vit_from_hf(vit.state_dict(), config))

  swin_config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2],
                                        num_heads=[2, 4], window_size=4, num_labels=3)
  swin = transformers.SwinForImageClassification(swin_config)
  config = vision.swin_config_from_hf(swin_config)
  old = _rename(swin.state_dict(), _OLD_SWIN)
  old["swin.encoder.layers.0.blocks.0.attention.self.relative_position_index"] = np.zeros(
      (16, 16), np.int64)  # a buffer old checkpoints carry; ignored
  assert "swin.encoder.layers.1.blocks.1.attention.self.relative_position_bias_table" in old
  _same_tree(vision.swin_from_hf(old, config), vision.swin_from_hf(swin.state_dict(), config))


def _assert_same_state_dict(exported: dict, original: dict) -> None:
  assert set(exported) == set(original)
  for name, value in original.items():
    torch.testing.assert_close(exported[name], value, rtol=0, atol=0)


def test_exports_round_trip_bitwise_and_load_strictly():
  """HF -> seqlab (scanned where the model can scan) -> HF: the same tensors, bit for bit."""
  vit_config = transformers.ViTConfig(num_labels=5, **VIT_HF)
  for hf, num_classes in ((transformers.ViTForImageClassification(vit_config), None),
                          (transformers.ViTModel(vit_config, add_pooling_layer=False), 0)):
    config = vision.vit_config_from_hf(vit_config, num_classes=num_classes, scan_layers=True)
    exported = convert.vit_to_hf(vision.vit_from_hf(hf.state_dict(), config), config)
    _assert_same_state_dict(exported, hf.state_dict())
    type(hf)(vit_config, **({} if num_classes is None else {"add_pooling_layer": False})
             ).load_state_dict(exported, strict=True)

  swin_config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2],
                                        num_heads=[2, 4], window_size=4, num_labels=3)
  for hf, num_classes in ((transformers.SwinForImageClassification(swin_config), None),
                          (transformers.SwinModel(swin_config), 0)):
    config = vision.swin_config_from_hf(swin_config, num_classes=num_classes)
    exported = convert.swin_to_hf(vision.swin_from_hf(hf.state_dict(), config), config)
    _assert_same_state_dict(exported, hf.state_dict())
    type(hf)(swin_config).load_state_dict(exported, strict=True)

  mae_config = transformers.ViTMAEConfig(
      image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1,
      decoder_num_attention_heads=2, decoder_intermediate_size=32)
  hf = randomise(transformers.ViTMAEForPreTraining(mae_config), seed=8)
  with torch.no_grad():  # a released checkpoint's fixed tables (see the MAE parity test)
    for table, dim in ((hf.vit.embeddings.position_embeddings, 32),
                       (hf.decoder.decoder_pos_embed, 16)):
      pe = modeling_vit_mae.build_2d_sinusoidal_position_embedding(4, 4, dim, cls_token=True)
      table.copy_(torch.cat([pe[..., dim // 2:], pe[..., :dim // 2]], dim=-1)[None])
  config = vision.mae_config_from_hf(mae_config, scan_layers=True)
  exported = convert.mae_to_hf(vision.mae_from_hf(hf.state_dict(), config), config)
  _assert_same_state_dict(exported, hf.state_dict())
  transformers.ViTMAEForPreTraining(mae_config).load_state_dict(exported, strict=True)
  as_numpy = vision.mae_to_hf(vision.mae_from_hf(hf.state_dict(), config), config,
                              return_tensors="np")
  np.testing.assert_array_equal(as_numpy["decoder.mask_token"],
                                hf.state_dict()["decoder.mask_token"].numpy())


def test_conversion_errors_name_the_keys():
  hf_config = transformers.ViTConfig(num_labels=5, **VIT_HF)
  state = transformers.ViTForImageClassification(hf_config).state_dict()
  config = vision.vit_config_from_hf(hf_config)
  missing = {k: v for k, v in state.items() if k != "vit.layers.1.mlp.fc2.bias"}
  with pytest.raises(ValueError, match=r"layers\.1\.mlp\.fc2\.bias"):
    vision.vit_from_hf(missing, config)
  with pytest.raises(ValueError, match=r"not used.*layers\.1\."):
    vision.vit_from_hf(state, vision.vit_config_from_hf(hf_config, num_layers=1))
  with pytest.raises(ValueError, match=r"head/(kernel|bias).*\(5,?.*\(7"):
    vision.vit_from_hf(state, vision.vit_config_from_hf(hf_config, num_classes=7))
  with pytest.raises(ValueError, match="class token"):
    vision.vit_from_hf(state, vision.vit_config_from_hf(hf_config, pool="mean"))
