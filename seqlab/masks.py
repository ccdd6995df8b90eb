"""Pure attention-mask builders.

Every mask is boolean with `True` = "query may attend to this key", shaped to broadcast against
attention logits `[B, N, T, S]`: builders return `[B, 1, T, S]` (per-example masks) or
`[1, 1, T, S]` (the same for every example). `swin_shift` is the exception: it returns the
per-window mask `[nW, window², window²]` that Swin's window attention applies inside windows.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seqlab.validation import check_int

Array = Any  # jax.Array or numpy.ndarray


# ---------------------------------------------------------------------------------------------
# Input validation (public boundary: plain ValueError naming the argument and the value).
# ---------------------------------------------------------------------------------------------


def _as_2d(name: str, x: Array, kind: str) -> jnp.ndarray:
  """Checks a per-token feature `[B, T]`; kind is "bool" (bool or integer) or "int"."""
  x = jnp.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"{name} must have rank 2 [batch, length], got shape {tuple(x.shape)}")
  is_int = jnp.issubdtype(x.dtype, jnp.integer)
  if kind == "int" and not is_int:
    raise ValueError(f"{name} must have an integer dtype, got {x.dtype}")
  if kind == "bool" and not (is_int or x.dtype == jnp.bool_):
    raise ValueError(f"{name} must be boolean (or integer 0/1), got {x.dtype}")
  return x


def _check_batches(q_name: str, q: jnp.ndarray, kv_name: str, kv: jnp.ndarray) -> None:
  bq, bk = q.shape[0], kv.shape[0]
  if bq != bk and 1 not in (bq, bk):
    raise ValueError(f"{q_name} has batch {bq} but {kv_name} has batch {bk}; they must match "
                     "(or one be 1)")


def _outer(q_BT: jnp.ndarray, kv_BS: jnp.ndarray, fn) -> jnp.ndarray:
  """[B, T], [B, S] -> fn(q[:, None, :, None], kv[:, None, None, :]) of shape [B, 1, T, S]."""
  return fn(q_BT[:, None, :, None], kv_BS[:, None, None, :])


def _key_minus_query(q_len: int, kv_len: int, offset: Array) -> Array:
  """`[B or 1, 1, T, S]` key position minus absolute query position `i + offset`.

  NumPy when the offset is concrete (the mask is then a constant, no compilation), jnp when
  it is traced (a decode step's cache index under jit).
  """
  try:
    offset, xp = np.asarray(offset), np
  except jax.errors.TracerArrayConversionError:
    offset, xp = jnp.asarray(offset), jnp
  if offset.ndim > 1 or not np.issubdtype(offset.dtype, np.integer):
    raise ValueError(f"offset must be an integer scalar or [batch] vector, got shape "
                     f"{tuple(offset.shape)} and dtype {offset.dtype}")
  q_pos_BT = xp.arange(q_len)[None, :] + offset.reshape(-1, 1)
  return xp.arange(kv_len)[None, None, None, :] - q_pos_BT[:, None, :, None]


# ---------------------------------------------------------------------------------------------
# Elementary masks.
# ---------------------------------------------------------------------------------------------


def causal(q_len: int, kv_len: int | None = None, *, offset: Array = 0) -> jnp.ndarray:
  """Causal mask `[1, 1, T, S]` (or `[B, 1, T, S]` for a per-example offset `[B]`).

  Key j is visible to query i iff `j <= i + offset`: query i sits at absolute position
  `i + offset`, keys at `0..S-1`. `kv_len` defaults to `q_len`. With a KV cache holding `S`
  keys and the last `T` of them being the queries, `offset = S - T`. `offset` may be a traced
  scalar (or `[B]` vector) under jit. Example `causal(2, 4, offset=1)`::

      1 1 0 0
      1 1 1 0
  """
  q_len = check_int("q_len", q_len)
  kv_len = q_len if kv_len is None else check_int("kv_len", kv_len)
  return jnp.asarray(_key_minus_query(q_len, kv_len, offset) <= 0)


def padding(q_valid: Array, kv_valid: Array) -> jnp.ndarray:
  """Padding mask `[B, 1, T, S]` from `[B, T]` and `[B, S]` validity (True / nonzero = token).

  Query i may attend to key j iff both are real tokens, as t5x's
  `make_attention_mask(q > 0, kv > 0)`. Cross-attention example, queries `[1, 1, 0]`,
  keys `[1, 1, 1, 0]`::

      1 1 1 0
      1 1 1 0
      0 0 0 0
  """
  q_BT = _as_2d("q_valid", q_valid, "bool")
  kv_BS = _as_2d("kv_valid", kv_valid, "bool")
  _check_batches("q_valid", q_BT, "kv_valid", kv_BS)
  return _padding(q_BT, kv_BS)


@jax.jit
def _padding(q_BT: jnp.ndarray, kv_BS: jnp.ndarray) -> jnp.ndarray:
  return _outer(q_BT != 0, kv_BS != 0, jnp.logical_and)


def prefix_lm(causal_attention: Array) -> jnp.ndarray:
  """Prefix-LM mask `[B, 1, T, T]` from `[B, T]` (True / 1 on the bidirectional prefix).

  Key j is visible to query i iff `j <= i` or both i and j are in the prefix: t5x's
  `make_decoder_mask` rule `causal OR (ca[i] AND ca[j])`, with seqio's
  `decoder_causal_attention` (1 on the inputs plus the position that predicts the first target).
  Positions are not checked for contiguity, exactly as t5x; packing is handled by combining
  with `segments` (see `decoder_mask`). Example, `causal_attention = [1, 1, 1, 0, 0]`::

      1 1 1 0 0
      1 1 1 0 0
      1 1 1 0 0
      1 1 1 1 0
      1 1 1 1 1
  """
  return _prefix_lm(_as_2d("causal_attention", causal_attention, "bool"))


@jax.jit
def _prefix_lm(causal_attention_BT: jnp.ndarray) -> jnp.ndarray:
  ca_BT = causal_attention_BT != 0
  length = ca_BT.shape[1]
  pos = jnp.arange(length)
  causal_11TT = (pos[:, None] >= pos[None, :])[None, None]
  return jnp.logical_or(causal_11TT, _outer(ca_BT, ca_BT, jnp.logical_and))


def segments(q_segment_ids: Array, kv_segment_ids: Array) -> jnp.ndarray:
  """Packing mask `[B, 1, T, S]`: query and key in the same segment; id 0 (padding) sees nothing.

  Segment ids are integers `[B, T]` / `[B, S]`, 1, 2, ... for the packed sequences and 0 for
  padding. Example, ids `[1, 1, 2, 2, 0]` on both sides::

      1 1 0 0 0
      1 1 0 0 0
      0 0 1 1 0
      0 0 1 1 0
      0 0 0 0 0
  """
  q_BT = _as_2d("q_segment_ids", q_segment_ids, "int")
  kv_BS = _as_2d("kv_segment_ids", kv_segment_ids, "int")
  _check_batches("q_segment_ids", q_BT, "kv_segment_ids", kv_BS)
  return _segments(q_BT, kv_BS)


@jax.jit
def _segments(q_BT: jnp.ndarray, kv_BS: jnp.ndarray) -> jnp.ndarray:
  same = _outer(q_BT, kv_BS, jnp.equal)
  return same & _outer(q_BT != 0, kv_BS != 0, jnp.logical_and)


def _window_sizes(window: Any) -> tuple[int, int]:
  if isinstance(window, (int, np.integer)) and not isinstance(window, bool):
    left = right = int(window)
  elif isinstance(window, (tuple, list)) and len(window) == 2 and all(
      isinstance(w, (int, np.integer)) and not isinstance(w, bool) for w in window):
    left, right = (int(w) for w in window)
  else:
    raise ValueError(f"window={window!r} must be an int or a (left, right) pair of ints")
  if left < 0 or right < 0:
    raise ValueError(f"window={window!r} must have non-negative sizes, got left={left}, "
                     f"right={right}")
  return left, right


def local_window(q_len: int, kv_len: int | None, window: int | tuple[int, int], *,
                 offset: Array = 0) -> jnp.ndarray:
  """Sliding-window mask `[1, 1, T, S]`: key j visible to query i iff `i-left <= j <= i+right`.

  `window` is `(left, right)`, or an int w meaning `(w, w)`, as `jax.nn.dot_product_attention`'s
  `local_window_size`. Query i sits at absolute position `i + offset` (as in `causal`); combine
  with `causal` (or use `right=0`) for causal sliding-window attention. Example
  `local_window(4, 4, (1, 0))`::

      1 0 0 0
      1 1 0 0
      0 1 1 0
      0 0 1 1
  """
  left, right = _window_sizes(window)
  q_len = check_int("q_len", q_len)
  kv_len = q_len if kv_len is None else check_int("kv_len", kv_len)
  relative_B1TS = _key_minus_query(q_len, kv_len, offset)
  return jnp.asarray((relative_B1TS >= -left) & (relative_B1TS <= right))


def combine(*masks: Array | None) -> jnp.ndarray | None:
  """Logical AND of boolean masks with broadcasting; `None` entries are ignored.

  All masks must have the same rank (this project runs with rank promotion disabled) and
  broadcast-compatible shapes. Returns None when every argument is None.
  """
  present = [(i, jnp.asarray(m)) for i, m in enumerate(masks) if m is not None]
  if not present:
    return None
  for i, m in present:
    if m.dtype != jnp.bool_:
      raise ValueError(f"masks[{i}] must be boolean, got dtype {m.dtype}")
  ranks = {m.ndim for _, m in present}
  if len(ranks) != 1:
    shapes = [tuple(m.shape) for _, m in present]
    raise ValueError(f"masks must all have the same rank, got shapes {shapes}")
  try:
    np.broadcast_shapes(*(m.shape for _, m in present))
  except ValueError:
    shapes = [tuple(m.shape) for _, m in present]
    raise ValueError(f"masks have shapes {shapes} that do not broadcast") from None
  out = present[0][1]
  for _, m in present[1:]:
    out = jnp.logical_and(out, m)
  return out


# ---------------------------------------------------------------------------------------------
# Full masks from model features (the seqio feature contract).
# ---------------------------------------------------------------------------------------------


def decoder_mask(decoder_segment_ids: Array | None = None,
                 decoder_causal_attention: Array | None = None, *,
                 decoder_target_tokens: Array | None = None,
                 length: int | None = None) -> jnp.ndarray:
  """A decoder's self-attention mask `[B, 1, T, T]` (`[1, 1, T, T]` from `length` alone).

  `causal`, or `prefix_lm(decoder_causal_attention)` when that feature is given (a causal
  decoder simply does not pass it); AND `segments(ids, ids)` when packed (id 0 = padding);
  AND `padding(tokens > 0, tokens > 0)` when `decoder_target_tokens` is given — the same
  three masks as t5x's `make_decoder_mask`. The length comes from whichever feature is given,
  or from `length`. Packed prefix-LM example (t5x's)::

      decoder_target_tokens    = [[6, 7, 3, 4, 5, 0]]
      decoder_segment_ids      = [[1, 1, 1, 2, 2, 0]]
      decoder_causal_attention = [[1, 1, 0, 1, 0, 0]]
      mask = [[[[1, 1, 0, 0, 0, 0],
                [1, 1, 0, 0, 0, 0],
                [1, 1, 1, 0, 0, 0],
                [0, 0, 0, 1, 0, 0],
                [0, 0, 0, 1, 1, 0],
                [0, 0, 0, 0, 0, 0]]]]

  Position 1 (the last input of segment 1, which predicts the first target) sees position 0
  and is seen by position 0; position 3 would see the prefix of segment 1 but packing hides it.
  """
  features = {"decoder_segment_ids": (decoder_segment_ids, "int"),
              "decoder_causal_attention": (decoder_causal_attention, "bool"),
              "decoder_target_tokens": (decoder_target_tokens, "int")}
  given = {name: _as_2d(name, x, kind) for name, (x, kind) in features.items() if x is not None}
  lengths = {name: x.shape[1] for name, x in given.items()}
  if length is not None:
    lengths["length"] = check_int("length", length)
  if not lengths:
    raise ValueError("decoder_mask needs length= or at least one of decoder_segment_ids, "
                     "decoder_causal_attention, decoder_target_tokens")
  if len(set(lengths.values())) != 1:
    raise ValueError(f"decoder features disagree on the length: {lengths}")
  batches = {name: x.shape[0] for name, x in given.items()}
  if len(set(batches.values()) - {1}) > 1:
    raise ValueError(f"decoder features disagree on the batch size: {batches}")
  (total_length,) = set(lengths.values())

  if "decoder_causal_attention" in given:
    base = prefix_lm(given["decoder_causal_attention"])
  else:
    base = causal(total_length)
  packing = None
  if "decoder_segment_ids" in given:
    ids = given["decoder_segment_ids"]
    packing = segments(ids, ids)
  pad = None
  if "decoder_target_tokens" in given:
    valid = given["decoder_target_tokens"] > 0
    pad = padding(valid, valid)
  return combine(base, packing, pad)


def encoder_mask(encoder_segment_ids: Array | None = None, *,
                 encoder_input_tokens: Array | None = None) -> jnp.ndarray:
  """A (packed) encoder's bidirectional self-attention mask `[B, 1, S, S]`.

  `segments(ids, ids)` (same segment, id 0 = padding sees nothing) AND, when
  `encoder_input_tokens` is given, `padding(tokens > 0, tokens > 0)`. Example, ids
  `[1, 1, 1, 2, 2, 0]`::

      1 1 1 0 0 0
      1 1 1 0 0 0
      1 1 1 0 0 0
      0 0 0 1 1 0
      0 0 0 1 1 0
      0 0 0 0 0 0
  """
  if encoder_segment_ids is None and encoder_input_tokens is None:
    raise ValueError("encoder_mask needs encoder_segment_ids or encoder_input_tokens")
  masks = []
  if encoder_segment_ids is not None:
    ids = _as_2d("encoder_segment_ids", encoder_segment_ids, "int")
    masks.append(segments(ids, ids))
  if encoder_input_tokens is not None:
    tokens = _as_2d("encoder_input_tokens", encoder_input_tokens, "int")
    masks.append(padding(tokens > 0, tokens > 0))
  return _combine_features(masks, "encoder_segment_ids", "encoder_input_tokens")


def cross_mask(decoder_segment_ids: Array | None = None,
               encoder_segment_ids: Array | None = None, *,
               decoder_target_tokens: Array | None = None,
               encoder_input_tokens: Array | None = None) -> jnp.ndarray:
  """Encoder-decoder (cross) attention mask `[B, 1, T, S]` for packed or padded batches.

  Decoder position i may attend to encoder position j iff they belong to the same packed
  example (`segments(decoder_segment_ids, encoder_segment_ids)`, id 0 = padding) and, when
  tokens are given, neither is padding (t5x's `make_attention_mask(targets > 0, inputs > 0)`).
  Segment ids come in pairs: both or neither. Example, decoder ids `[1, 1, 2, 0]`, encoder ids
  `[1, 1, 1, 2, 2, 0]`::

      1 1 1 0 0 0
      1 1 1 0 0 0
      0 0 0 1 1 0
      0 0 0 0 0 0
  """
  if (decoder_segment_ids is None) != (encoder_segment_ids is None):
    raise ValueError("cross_mask needs both decoder_segment_ids and encoder_segment_ids, or "
                     "neither; got only "
                     + ("decoder_segment_ids" if encoder_segment_ids is None
                        else "encoder_segment_ids"))
  if (decoder_target_tokens is None) != (encoder_input_tokens is None):
    raise ValueError("cross_mask needs both decoder_target_tokens and encoder_input_tokens, "
                     "or neither")
  if decoder_segment_ids is None and decoder_target_tokens is None:
    raise ValueError("cross_mask needs segment ids or tokens for both sides")
  masks = []
  if decoder_segment_ids is not None:
    masks.append(segments(_as_2d("decoder_segment_ids", decoder_segment_ids, "int"),
                          _as_2d("encoder_segment_ids", encoder_segment_ids, "int")))
  if decoder_target_tokens is not None:
    dec = _as_2d("decoder_target_tokens", decoder_target_tokens, "int")
    enc = _as_2d("encoder_input_tokens", encoder_input_tokens, "int")
    masks.append(padding(dec > 0, enc > 0))
  return _combine_features(masks, "segment ids", "tokens")


def _combine_features(masks: list[jnp.ndarray], first: str, second: str) -> jnp.ndarray:
  if len(masks) == 2:
    try:
      np.broadcast_shapes(masks[0].shape, masks[1].shape)
    except ValueError:
      raise ValueError(f"{first} give a mask of shape {tuple(masks[0].shape)} but {second} "
                       f"give {tuple(masks[1].shape)}") from None
  return combine(*masks)


# ---------------------------------------------------------------------------------------------
# Swin shifted windows.
# ---------------------------------------------------------------------------------------------


def _check_window_and_shift(height: int, width: int, window: int, shift: int) -> None:
  for name, value in (("height", height), ("width", width), ("window", window)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name}={value!r} must be a positive integer")
  if not isinstance(shift, (int, np.integer)) or isinstance(shift, bool):
    raise ValueError(f"shift={shift!r} must be an integer")
  if not 0 <= shift < window:
    raise ValueError(f"shift={shift} must satisfy 0 <= shift < window={window}")


def _swin_region_labels(size: int, window: int, shift: int) -> np.ndarray:
  """Official Swin region id along one axis of the (padded, rolled) image: 0, 1 or 2."""
  # The official code labels slices (0, -window), (-window, -shift), (-shift, None).
  labels = np.zeros(size, np.int32)
  if shift > 0:
    labels[size - window:size - shift] = 1
    labels[size - shift:] = 2
  return labels


def swin_shift(height: int, width: int, window: int, shift: int, *,
               mask_padded_keys: bool = False) -> jnp.ndarray:
  """Shifted-window (SW-MSA) mask of Swin: bool `[nW, window², window²]`, True = may attend.

  The image (`height` x `width` tokens) is padded bottom/right to multiples of `window`
  (`Hp = ceil(height / window) * window`, likewise `Wp`) and cyclically shifted by `-shift`;
  windows are then numbered row-major over the `Hp/window x Wp/window` grid
  (`nW = Hp * Wp / window²`) and tokens row-major inside a window, as Swin's `window_partition`.
  After the shift, the last window row/column holds tokens that were not neighbours in the
  image; the official implementation labels regions of the padded image with the slices
  `(0, -window), (-window, -shift), (-shift, None)` along each axis (9 regions), and a token may
  attend to another only when both carry the same region label. For `window=4, shift=2` on 8x8
  the labels of the rolled image are (`|` separates the two window columns, `--` the rows)::

      0 0 0 0 | 1 1 2 2
      0 0 0 0 | 1 1 2 2
      0 0 0 0 | 1 1 2 2       window 3 (bottom right) holds four regions:
      0 0 0 0 | 1 1 2 2       4s attend only to 4s, 5s to 5s, 7s to 7s, 8s to 8s,
      -----------------       so it has 16² - 4·4² = 192 masked entries; windows 1
      3 3 3 3 | 4 4 5 5       and 2 hold two regions of 8 tokens (128 each):
      3 3 3 3 | 4 4 5 5       swin_shift(8, 8, 4, 2).size - .sum() == 448.
      6 6 6 6 | 7 7 8 8
      6 6 6 6 | 7 7 8 8

  Non-divisible sizes follow Hugging Face's and the official detection code's rule: labels are
  computed on the padded size. Padded tokens themselves stay visible unless
  `mask_padded_keys=True`, which also hides every key that is padding (a padded position is
  found by undoing the cyclic shift: rolled position p holds image row `(p + shift) % Hp`).
  `shift=0` gives the plain W-MSA mask: all True (apart from padded keys when requested).
  """
  _check_window_and_shift(height, width, window, shift)
  height_pad = -(-height // window) * window
  width_pad = -(-width // window) * window
  rows = _swin_region_labels(height_pad, window, shift)
  cols = _swin_region_labels(width_pad, window, shift)
  label_HW = rows[:, None] * 3 + cols[None, :]
  label_WinL = _partition_2d(label_HW, window)                   # [nW, window²]
  allowed = label_WinL[:, :, None] == label_WinL[:, None, :]     # [nW, window², window²]
  if mask_padded_keys:
    valid_rows = (np.arange(height_pad) + shift) % height_pad < height
    valid_cols = (np.arange(width_pad) + shift) % width_pad < width
    valid_WinL = _partition_2d(valid_rows[:, None] & valid_cols[None, :], window)
    allowed = allowed & valid_WinL[:, None, :]
  return jnp.asarray(allowed)


def _partition_2d(x_HW: np.ndarray, window: int) -> np.ndarray:
  """[H, W] -> [nW, window²]: row-major windows, row-major tokens inside (Swin's order)."""
  height, width = x_HW.shape
  x = x_HW.reshape(height // window, window, width // window, window)
  return x.transpose(0, 2, 1, 3).reshape(-1, window * window)
