"""Plain NumPy float64 reference of every loss in anemia_jax.losses, written from the definitions.

Deliberately naive (loops over examples and channels, direct probabilities instead of softplus forms, the Lovasz
extension evaluated from its set function) so that it shares no code and no algebraic shortcut with the library.
Inputs: logits/labels [B, H, W, C] NumPy arrays, weights broadcastable to them or None. Output: [B] float64.
"""

import numpy as np

EPS = 1e-8


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _w(weights, shape):
    return np.ones(shape) if weights is None else np.broadcast_to(np.asarray(weights, np.float64), shape)


def _pixel_mean(per_pixel, w):
    b = per_pixel.shape[0]
    out = np.zeros(b)
    for i in range(b):
        out[i] = np.sum(w[i] * per_pixel[i]) / max(np.sum(w[i]), EPS)
    return out


def sigmoid_cross_entropy(x, y, weights=None, pos_weight=1.0):
    p = _sigmoid(x)
    per_pixel = -(pos_weight * y * np.log(p) + (1 - y) * np.log(1 - p))
    return _pixel_mean(per_pixel, _w(weights, x.shape))


def softmax_cross_entropy(x, y, weights=None):
    w = _w(weights, x.shape)
    b = x.shape[0]
    out = np.zeros(b)
    for i in range(b):
        num = den = 0.0
        for pix in np.ndindex(x.shape[1:-1]):
            z = x[i][pix]
            p = np.exp(z - z.max()) / np.sum(np.exp(z - z.max()))
            lab, ww = y[i][pix], w[i][pix]
            num += -np.sum(ww * lab * np.log(p))
            den += np.sum(ww * lab)
        out[i] = num / max(den, EPS)
    return out


def focal_loss(x, y, weights=None, gamma=2.0, alpha=0.25):
    p = _sigmoid(x)
    a_pos, a_neg = (1.0, 1.0) if alpha is None else (alpha, 1 - alpha)
    per_pixel = -(a_pos * y * (1 - p) ** gamma * np.log(p) + a_neg * (1 - y) * p**gamma * np.log(1 - p))
    return _pixel_mean(per_pixel, _w(weights, x.shape))


def _region(x, y, weights, per_channel_loss):
    """Per (example, channel) loss from (p, y, w) vectors, mean over channels with any weight."""
    w = _w(weights, x.shape)
    b, c = x.shape[0], x.shape[-1]
    out = np.zeros(b)
    for i in range(b):
        values = []
        for k in range(c):
            wk = w[i, ..., k].ravel()
            if wk.sum() > 0:
                values.append(per_channel_loss(x[i, ..., k].ravel(), y[i, ..., k].ravel(), wk))
        out[i] = np.mean(values) if values else 0.0
    return out


def _tversky_index(x, y, w, alpha, beta, smooth):
    p = _sigmoid(x)
    tp, fp, fn = np.sum(w * p * y), np.sum(w * p * (1 - y)), np.sum(w * (1 - p) * y)
    den = tp + alpha * fp + beta * fn + smooth
    return 1.0 if den == 0 else (tp + smooth) / den


def dice_loss(x, y, weights=None, smooth=1.0):
    def loss(xx, yy, ww):
        p = _sigmoid(xx)
        tp, fp, fn = np.sum(ww * p * yy), np.sum(ww * p * (1 - yy)), np.sum(ww * (1 - p) * yy)
        den = 2 * tp + fp + fn + smooth
        return 0.0 if den == 0 else 1 - (2 * tp + smooth) / den

    return _region(x, y, weights, loss)


def jaccard_loss(x, y, weights=None, smooth=1.0):
    def loss(xx, yy, ww):
        p = _sigmoid(xx)
        inter = np.sum(ww * p * yy)
        union = np.sum(ww * (p + yy - p * yy))
        return 0.0 if union + smooth == 0 else 1 - (inter + smooth) / (union + smooth)

    return _region(x, y, weights, loss)


def tversky_loss(x, y, weights=None, alpha=0.3, beta=0.7, smooth=1.0):
    return _region(x, y, weights, lambda xx, yy, ww: 1 - _tversky_index(xx, yy, ww, alpha, beta, smooth))


def focal_tversky_loss(x, y, weights=None, alpha=0.3, beta=0.7, gamma=0.75, smooth=1.0):
    def loss(xx, yy, ww):
        return max(1 - _tversky_index(xx, yy, ww, alpha, beta, smooth), 0.0) ** gamma

    return _region(x, y, weights, loss)


def _weighted_jaccard_loss(mispredicted, yy, ww):
    """Jaccard loss of the prediction that gets exactly the pixels in `mispredicted` wrong."""
    pred = np.where(mispredicted, 1 - yy, yy)
    union = np.sum(ww * np.maximum(pred, yy))
    return 0.0 if union == 0 else 1 - np.sum(ww * pred * yy) / union


def lovasz_hinge_loss(x, y, weights=None):
    def loss(xx, yy, ww):
        errors = 1 - xx * (2 * yy - 1)
        order = np.argsort(-errors, kind="stable")
        total, previous = 0.0, 0.0
        mispredicted = np.zeros(len(xx), bool)
        for j in order:
            mispredicted[j] = True
            current = _weighted_jaccard_loss(mispredicted, yy, ww)
            total += max(errors[j], 0.0) * (current - previous)
            previous = current
        return total

    return _region(x, y, weights, loss)


def combo_loss(x, y, weights=None, ce_weight=0.5, dice_weight=0.5, pos_weight=1.0, smooth=1.0):
    return ce_weight * sigmoid_cross_entropy(x, y, weights, pos_weight) + dice_weight * dice_loss(
        x, y, weights, smooth
    )


REFERENCE = {
    "sigmoid_cross_entropy": sigmoid_cross_entropy,
    "softmax_cross_entropy": softmax_cross_entropy,
    "dice": dice_loss,
    "jaccard": jaccard_loss,
    "tversky": tversky_loss,
    "focal": focal_loss,
    "focal_tversky": focal_tversky_loss,
    "lovasz_hinge": lovasz_hinge_loss,
    "combo": combo_loss,
}
