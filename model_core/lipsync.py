"""The measure of lip sync: how well a video's mouth follows its speech, and whether it is still the same face.

    read_video(probe, frames, boxes) -> (opening [T], embeddings [T, 128])
    sync_scores(measured, truth, speaking) -> {sync_r, sync_lag_frames, silence_motion}
    mouth_change(frames, boxes, speaking) -> {listening_change, speaking_change}   what a viewer sees move there
    identity_score(embeddings, reference_embedding) -> mean cosine similarity
    pearson(a, b)                       0 when either side is constant (a frozen face has no correlation)
    psnr(a, b) / ssim(a, b)             float images in [0, 1], [H, W, 3]

Conventions (the JSON keys of `facecast eval`):
* `sync_r`: Pearson correlation, on speaking frames, of the probe's mouth opening against the true opening, at lag 0.
* `sync_lag_frames`: the lag k in [-max_lag, max_lag] maximising the correlation of measured[t] with true[t - k];
  a video that runs k frames late reports k.
* `silence_motion`: mean |frame-to-frame change| of the measured opening on listening frames divided by the same on
  speaking frames (0: still while listening; about 1: moves as much as when talking).
* `listening_change` / `speaking_change`: mean |frame-to-frame change| of the mouth box's pixels (0-255, the lower
  part of the face box) on listening / speaking frame pairs: everything a viewer sees move there, flicker included,
  which the probe's opening does not count (the browser call's check wants speaking > 2 x listening + 0.2).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 3 or a.std() < 1e-9 or b.std() < 1e-9:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def lagged_r(measured: np.ndarray, truth: np.ndarray, mask: np.ndarray, lag: int) -> float:
    """Correlation of measured[t] with truth[t - lag] over frames t where mask[t - lag] holds."""
    n = len(truth)
    if lag >= 0:
        m, t, k = measured[lag:], truth[:n - lag], mask[:n - lag]
    else:
        m, t, k = measured[:n + lag], truth[-lag:], mask[-lag:]
    return pearson(m[k], t[k])


def frame_pairs(speaking: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Over the frame pairs (t-1, t): where both frames listen, and where both speak."""
    return ~speaking[1:] & ~speaking[:-1], speaking[1:] & speaking[:-1]


def sync_scores(measured: np.ndarray, truth: np.ndarray, speaking: np.ndarray, max_lag: int = 8) -> dict:
    measured, truth, speaking = np.asarray(measured), np.asarray(truth), np.asarray(speaking, bool)
    lags = list(range(-max_lag, max_lag + 1))
    rs = [lagged_r(measured, truth, speaking, lag) for lag in lags]
    motion = np.abs(np.diff(measured))
    still, talking = frame_pairs(speaking)
    speaking_motion = float(motion[talking].mean()) if talking.any() else 0.0
    listening_motion = float(motion[still].mean()) if still.any() else 0.0
    return {"sync_r": lagged_r(measured, truth, speaking, 0),
            "sync_lag_frames": int(lags[int(np.argmax(rs))]) if max(rs) > 0 else None,
            "silence_motion": listening_motion / speaking_motion if speaking_motion > 1e-6 else None}


MOUTH_BOX = (0.2, 0.62, 0.8, 1.0)
"""The mouth box as fractions of the face box (x0, y0, x1, y1): the lower face between the cheeks."""


def mouth_change(frames: np.ndarray, boxes: np.ndarray, speaking: np.ndarray) -> dict:
    """frames uint8 [T, H, W, 3], face boxes [T, 4] (pixels), speaking [T] -> mean |change| of the mouth box's pixels
    from frame t-1 to t (the box at t) over pairs where both frames listen / both speak; None where there is none."""
    speaking = np.asarray(speaking, bool)
    height, width = frames.shape[1:3]
    changes = []
    for t in range(1, len(frames)):
        x0, y0, x1, y1 = boxes[t]
        fx0, fy0, fx1, fy1 = MOUTH_BOX
        left, right = int(np.clip(x0 + fx0 * (x1 - x0), 0, width - 1)), int(np.clip(x0 + fx1 * (x1 - x0), 1, width))
        top, bottom = int(np.clip(y0 + fy0 * (y1 - y0), 0, height - 1)), int(np.clip(y0 + fy1 * (y1 - y0), 1, height))
        now, before = frames[t, top:bottom, left:right], frames[t - 1, top:bottom, left:right]
        changes.append(float(np.abs(now.astype(np.float32) - before).mean()) if now.size else np.nan)
    changes = np.asarray(changes)
    still, talking = frame_pairs(speaking)

    def mean(mask):
        values = changes[mask & np.isfinite(changes)]
        return float(values.mean()) if len(values) else None

    return {"listening_change": mean(still), "speaking_change": mean(talking)}


def identity_score(embeddings: np.ndarray, reference_embedding: np.ndarray) -> float:
    """Mean cosine similarity of each frame's embedding to the reference's (embeddings are unit vectors)."""
    return float(np.mean(np.asarray(embeddings) @ np.asarray(reference_embedding).reshape(-1)))


def read_video(probe, frames: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The probe's mouth opening and identity embedding for each frame (uint8 [T, H, W, 3]) at face boxes [T, 4]."""
    from .training.probe_stage import crop_faces

    return probe.read(crop_faces(frames, boxes))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two float images in [0, 1] ([H, W, 3]): 7x7 uniform windows, sample covariance, the valid
    region only (scikit-image's `structural_similarity` defaults with data_range 1)."""
    x = torch.from_numpy(np.ascontiguousarray(a, np.float64)).permute(2, 0, 1)[None]
    y = torch.from_numpy(np.ascontiguousarray(b, np.float64)).permute(2, 0, 1)[None]

    def blur(t):
        return F.avg_pool2d(t, 7, stride=1)

    c1, c2, n = 0.01 ** 2, 0.03 ** 2, 49 / 48
    mx, my = blur(x), blur(y)
    vx, vy = (blur(x * x) - mx * mx) * n, (blur(y * y) - my * my) * n
    cov = (blur(x * y) - mx * my) * n
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


PSNR_CAP_DB = 100.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of float images in [0, 1]; identical images give PSNR_CAP_DB (JSON has no infinity)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_CAP_DB if mse <= 10 ** (-PSNR_CAP_DB / 10) else float(10 * np.log10(1.0 / mse))
