"""Segmentation losses, per example so that they average exactly over devices.

Every loss here returns a (B,) vector: the step takes its mean, and the mean of
per-device means over equal shards is the global mean, so one step on 4
devices equals one step on 1 device with the same global batch.
All maps are (B, H, W) float32; `weight` is the field-of-view mask in {0, 1}
(pixels outside it do not count).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

_SOBEL_X = jnp.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0


def weighted_mean(per_px: jax.Array, weight: jax.Array) -> jax.Array:
  """sum(per_px * weight) / max(sum(weight), 1) per example: (B, H, W) maps -> (B,)."""
  return jnp.sum(per_px * weight, axis=(1, 2)) / jnp.maximum(jnp.sum(weight, axis=(1, 2)), 1.0)


def soft_dice_loss(prob: jax.Array, target: jax.Array, weight: jax.Array,
                   smooth: float = 1.0) -> jax.Array:
  """1 - soft Dice per example. prob, target, weight: (B, H, W). Returns (B,)."""
  inter = jnp.sum(prob * target * weight, axis=(1, 2))
  total = jnp.sum((prob + target) * weight, axis=(1, 2))
  return 1.0 - (2.0 * inter + smooth) / (total + smooth)


def bce_loss(logits: jax.Array, target: jax.Array, weight: jax.Array) -> jax.Array:
  """Mean binary cross-entropy inside `weight` per example. Returns (B,)."""
  per_px = optax.sigmoid_binary_cross_entropy(logits, target)
  return weighted_mean(per_px, weight)


def disagreement_bce(prob: jax.Array, target: jax.Array, coarse: jax.Array, weight: jax.Array,
                     eps: float = 1e-6) -> jax.Array:
  """Binary cross-entropy of `prob` where the coarse map is wrong, per example (B,).

  Each pixel counts with weight * |coarse - target|: a coarse map that is right
  at a pixel (0 there) takes it out, one that is fully wrong (1) counts it
  whole. The mean is over those weights (0 where the coarse map is right
  everywhere), so the term says how well `prob` repairs the coarse map's
  errors, whatever their number.

  Args:
    prob: (B, H, W) probabilities (clipped to [eps, 1 - eps] for the logs).
    target: (B, H, W) float32 in {0, 1}.
    coarse: (B, H, W) the coarse model's probabilities.
    weight: (B, H, W) field-of-view mask in {0, 1}.
  """
  p = jnp.clip(prob, eps, 1.0 - eps)
  per_px = -(target * jnp.log(p) + (1.0 - target) * jnp.log1p(-p))
  return weighted_mean(per_px, weight * jnp.abs(coarse - target))


def sobel_magnitude(x: jax.Array) -> jax.Array:
  """Sobel gradient magnitude of (B, H, W) maps (zero padding), (B, H, W)."""
  def corr(img, k):
    pad = jnp.pad(img, ((0, 0), (1, 1), (1, 1)))
    h, w = img.shape[1:]
    return sum(k[i, j] * pad[:, i:i + h, j:j + w] for i in range(3) for j in range(3))
  gx = corr(x, _SOBEL_X)
  gy = corr(x, _SOBEL_X.T)
  return jnp.sqrt(gx * gx + gy * gy + 1e-12)


def edge_loss(prob: jax.Array, target: jax.Array, weight: jax.Array) -> jax.Array:
  """Mean |Sobel(prob) - Sobel(target)| inside `weight` per example. Returns (B,).

  The edge regularisation of the paper: it penalises blurred or displaced
  vessel borders that Dice alone tolerates.
  """
  return weighted_mean(jnp.abs(sobel_magnitude(prob) - sobel_magnitude(target)), weight)


def segmentation_loss(logits: jax.Array, target: jax.Array, weight: jax.Array, *,
                      dice_weight: float, edge_weight: float, bce_weight: float) -> jax.Array:
  """dice_weight * Dice + edge_weight * Edge + bce_weight * BCE, per example (B,).

  Args:
    logits: (B, H, W) float32 logits.
    target: (B, H, W) float32 in {0, 1}.
    weight: (B, H, W) float32 field-of-view mask in {0, 1}.
  """
  prob = jax.nn.sigmoid(logits)
  loss = dice_weight * soft_dice_loss(prob, target, weight)
  if edge_weight:
    loss = loss + edge_weight * edge_loss(prob, target, weight)
  if bce_weight:
    loss = loss + bce_weight * bce_loss(logits, target, weight)
  return loss
