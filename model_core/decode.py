"""The decode stage: reference encoding and streaming decode of any number of sessions, each with its chosen decoder.

    stage = DecodeStage(vae, fast=FastDecoder | None)
    cache = stage.open(decoder="full" | "fast")                 per session
    frames, seconds = stage.decode(cache, latents, num_frames)  or decode_batch(caches, latents, num_frames)

"full" is the VAE's own causal decoder, the reference; "fast" is the small decoder distilled from it
(`model_core.fastdecode`), same latent space and frame counts, several times cheaper. The reference image is always
encoded by the VAE's encoder. A batch may mix sessions of both decoders: each decoder decodes its own in one pass.
Nothing here knows about Ray, networks or the DiT.
"""

from __future__ import annotations

import time

import torch

from .config import ConfigError
from .fastdecode import FastDecodeCache, FastDecoder
from .vae import DecodeCache, StreamingVAE

DECODERS = ("full", "fast")


class DecodeStage:
    def __init__(self, vae: StreamingVAE, fast: FastDecoder | None = None, default: str = "full"):
        self.vae, self.fast = vae, fast
        check_decoder(default, fast is not None)
        self.default = default

    @torch.no_grad()
    def encode_reference(self, image: torch.Tensor) -> torch.Tensor:
        """image [3, H, W] in [-1, 1] -> normalised latent [1, 16, 1, H/8, W/8] (float32, CPU)."""
        # Host copy (a sync) once per session, outside the chunk loop: the latent travels to the score workers.
        return self.vae.encode_image(image[None].to(self.vae.device)).float().cpu()

    def open(self, decoder: str | None = None) -> DecodeCache | FastDecodeCache:
        """A new stream's decode state with `decoder` ("full", "fast"; None: the stage's default)."""
        decoder = decoder or self.default
        check_decoder(decoder, self.fast is not None)
        return self.fast.new_decode_cache() if decoder == "fast" else self.vae.new_decode_cache()

    @staticmethod
    def decoder_of(cache) -> str:
        return "fast" if isinstance(cache, FastDecodeCache) else "full"

    @torch.no_grad()
    def decode_batch(self, caches: list, latents: list[torch.Tensor],
                     num_frames: list[int]) -> tuple[list[torch.Tensor], float]:
        """`decode` for chunks of several sessions at once: each decoder's sessions in one pass
        (`decode_chunk_batch`). Returns each chunk's frames [n, 3, H, W] (float32, CPU) and the seconds it took."""
        started = time.perf_counter()
        decoded: list = [None] * len(caches)
        for name, decoder in (("full", self.vae), ("fast", self.fast)):
            rows = [row for row, cache in enumerate(caches) if self.decoder_of(cache) == name]
            if rows:
                for row, out in zip(rows, decoder.decode_chunk_batch([latents[row] for row in rows],
                                                                     [caches[row] for row in rows])):
                    decoded[row] = out[0]
        # Host sync, on purpose: the frames leave the device here (JPEG encoding and egress are host work), so the
        # copy below waits for the decode anyway; the explicit sync only makes `seconds` the decode's device time.
        if self.vae.device.type == "cuda":
            torch.cuda.synchronize(self.vae.device)
        frames = [out[0].transpose(0, 1)[:count].float().cpu() for out, count in zip(decoded, num_frames)]
        return frames, time.perf_counter() - started

    @torch.no_grad()
    def decode(self, cache, latents: torch.Tensor, num_frames: int) -> tuple[torch.Tensor, float]:
        """latents [1, 16, C, h, w] -> (frames [num_frames, 3, H, W] float32 CPU in [-1, 1], seconds)."""
        (frames,), seconds = self.decode_batch([cache], [latents], [num_frames])
        return frames, seconds


def check_decoder(decoder: str, fast_loaded: bool) -> None:
    if decoder not in DECODERS:
        raise ConfigError(f"decoder={decoder!r} is invalid; allowed: {', '.join(DECODERS)}")
    if decoder == "fast" and not fast_loaded:
        raise ConfigError("decoder='fast': no fast decoder is loaded for this preset (train one with `facecast train "
                          "fast-decoder`, or choose decoder='full')")
