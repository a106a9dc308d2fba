"""The lip-sync probe: a small CNN on the face crop that reads the mouth opening and embeds the identity.

    LipSyncProbe                    the network: 64x64 face crop -> (mouth opening 0..1, 128-d unit identity embedding)
    crop_faces(frames, boxes)       face crops for the probe from frames and face boxes (the world's truth, or a
                                    reference's box for generated frames)
    ProbeStage                      the Stage that trains it on the world's train identities only
    save_probe / load_probe         fp16 safetensors with the probe's config in the metadata

The identity head is trained as a cosine-softmax classifier over the *training* identities; evaluation embeds
held-out identities, which the probe never saw, so `identity` scores measure a general face similarity, not
memorised classes. Crops are jittered (box position and scale), blurred and noised during training so the probe
reads decoded, imperfect frames as well as clean renders.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from .data import ClipPools

CROP = 64
EMBEDDING = 128


@dataclasses.dataclass(frozen=True)
class ProbeTrainConfig:
    batch_size: int = 32
    learning_rate: float = 1e-3
    identity_weight: float = 1.0
    identity_classes: int = 1200
    seed: int = 0


def _trunk(width: int) -> torch.nn.Sequential:
    """64x64 -> [4 width, 4, 4]: four stride-2 stages of two 3x3 convolutions."""
    channels = [3, width, width * 2, width * 4, width * 4]
    layers = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [torch.nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), torch.nn.GroupNorm(8, c_out),
                   torch.nn.SiLU(), torch.nn.Conv2d(c_out, c_out, 3, padding=1), torch.nn.SiLU()]
    return torch.nn.Sequential(*layers, torch.nn.Flatten())


class LipSyncProbe(torch.nn.Module):
    """Two small CNNs on the same crop: one reads the mouth, one embeds the face. (One shared trunk learned the
    mouth far slower: the 1,080-way identity loss dominated its gradients.)"""

    def __init__(self, identity_classes: int = 1200, width: int = 32):
        super().__init__()
        self.config = {"identity_classes": identity_classes, "width": width}
        self.mouth = torch.nn.Sequential(_trunk(width), torch.nn.Linear(width * 4 * 16, 128), torch.nn.SiLU(),
                                         torch.nn.Linear(128, 1))
        self.embed = torch.nn.Sequential(_trunk(width), torch.nn.Linear(width * 4 * 16, EMBEDDING))
        self.classes = torch.nn.Parameter(torch.randn(identity_classes, EMBEDDING) * 0.05)

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """crops [B, 3, 64, 64] in [-1, 1] -> opening [B] (0..1), embedding [B, 128] (unit length)."""
        return torch.sigmoid(self.mouth(crops)[:, 0]), F.normalize(self.embed(crops), dim=1)

    @torch.no_grad()
    def read(self, crops: torch.Tensor, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
        self.eval()
        openings, embeddings = [], []
        for start in range(0, len(crops), batch):
            opening, embedding = self(crops[start:start + batch])
            openings.append(opening)
            embeddings.append(embedding)
        return torch.cat(openings).numpy(), torch.cat(embeddings).numpy()


def crop_faces(frames: np.ndarray, boxes: np.ndarray, jitter: np.ndarray | None = None) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] and face boxes [T, 4] -> crops [T, 3, 64, 64] in [-1, 1].

    The crop is the box made square around its centre and enlarged by 10 %; `jitter` [T, 3] (dx, dy as a fraction
    of the side, log-scale) perturbs it. Done with one grid_sample, so any box works, even partly outside."""
    video = torch.from_numpy(np.array(frames)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    height, width = frames.shape[1:3]
    box = torch.from_numpy(np.asarray(boxes, np.float32))
    centre_x, centre_y = (box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2
    side = torch.maximum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]) * 1.1
    if jitter is not None:
        j = torch.from_numpy(np.asarray(jitter, np.float32))
        centre_x, centre_y, side = centre_x + j[:, 0] * side, centre_y + j[:, 1] * side, side * torch.exp(j[:, 2])
    ramp = (torch.arange(CROP, dtype=torch.float32) + 0.5) / CROP - 0.5
    xs = (centre_x[:, None] + ramp[None] * side[:, None]) / width * 2 - 1
    ys = (centre_y[:, None] + ramp[None] * side[:, None]) / height * 2 - 1
    grid = torch.stack([xs[:, None, :].expand(-1, CROP, -1), ys[:, :, None].expand(-1, -1, CROP)], dim=-1)
    return F.grid_sample(video, grid, mode="bilinear", padding_mode="border", align_corners=False)


class ProbeStage:
    name = "probe"

    def __init__(self, source, train: ProbeTrainConfig = ProbeTrainConfig(), *, wrap=None, device="cpu"):
        self.seed, self.train_config, self.device = train.seed, train, torch.device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(train.seed)
            self.probe = LipSyncProbe(train.identity_classes).to(self.device)
        self.model = wrap(self.probe) if wrap else self.probe
        self._optimizer = torch.optim.AdamW(self.probe.parameters(), lr=train.learning_rate, weight_decay=1e-4)
        self.source = source
        self.pools = ClipPools(source, train.seed, steps_per_pool=8)

    def modules(self):
        return {"probe": self.probe}

    def optimizer(self):
        return self._optimizer

    def batch(self, step: int, rank: int) -> dict:
        rng = np.random.default_rng([self.seed, step, rank])
        pool = [clip for clip in self.pools.pool_for(step, rank) if clip.truth is not None]
        if not pool:
            raise ValueError("the probe trains on clips with ground truth (world data), and this pool has none")
        frames, boxes, openings, identities = [], [], [], []
        for _ in range(self.train_config.batch_size):
            clip = pool[int(rng.integers(len(pool)))]
            t = int(rng.integers(clip.num_frames))
            slot = int(rng.integers(clip.truth.mouth_open.shape[1]))
            frames.append(clip.frames[t])
            boxes.append(clip.truth.face_box[t, slot])
            openings.append(clip.truth.mouth_open[t, slot])
            identities.append(clip.truth.identity[slot])
        jitter = np.concatenate([rng.normal(0, 0.04, (len(frames), 2)), rng.normal(0, 0.06, (len(frames), 1))], 1)
        crops = crop_faces(np.stack(frames), np.stack(boxes), jitter)
        blur = rng.random(len(crops)) < 0.4
        if blur.any():  # decoded frames are softer than renders
            soft = F.avg_pool2d(crops[blur], 3, stride=1, padding=1, count_include_pad=False)
            crops[blur] = soft
        crops = crops + torch.from_numpy(rng.normal(0, 0.03, crops.shape).astype(np.float32))
        return {"crops": crops.to(self.device), "opening": torch.tensor(np.array(openings), device=self.device),
                "identity": torch.tensor(np.array(identities), dtype=torch.long, device=self.device)}

    def loss(self, batch: dict):
        opening, embedding = self.model(batch["crops"])
        mouth = F.smooth_l1_loss(opening, batch["opening"], beta=0.05)
        logits = 16.0 * embedding @ F.normalize(self.probe.classes, dim=1).T
        identity = F.cross_entropy(logits, batch["identity"])
        loss = mouth + self.train_config.identity_weight * identity
        accuracy = (logits.argmax(1) == batch["identity"]).float().mean()
        mae = (opening.detach() - batch["opening"]).abs().mean()
        return loss, {"loss": float(loss.detach()), "mouth_mae": float(mae),
                      "identity_ce": float(identity.detach()), "identity_acc": float(accuracy)}

    def export(self, path: Path) -> None:
        save_probe(self.probe.cpu(), Path(path))


def save_probe(probe: LipSyncProbe, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().half().contiguous() for k, v in probe.state_dict().items() if k != "classes"}
    save_file(tensors, str(path), metadata={"facecast_probe": "1", "config": json.dumps(probe.config)})


def load_probe(path: str | Path) -> LipSyncProbe:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"probe {str(path)!r} does not exist; train one with `facecast train probe`")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("facecast_probe") != "1":
            raise ValueError(f"{path} is not a facecast lip-sync probe")
        state = {key: handle.get_tensor(key).float() for key in handle.keys()}
    probe = LipSyncProbe(**json.loads(metadata["config"]))
    state["classes"] = probe.classes.detach()
    probe.load_state_dict(state)
    return probe.eval()
