"""`facecast serve` and `facecast call` as a user runs them: serve in a subprocess on a free port (real local Ray,
logical GPUs, its own redis-server), call it from another process, read the MP4 back, check a refused call's exit
status and message, and stop the server with SIGTERM mid-stream (drained, clean exit, port closed, Redis gone).
What each command refuses without a cluster is in test_serve.py and test_call.py."""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from services.net import free_port
from services.video import probe_video

from tests.model_core.helpers import speech

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
READY_TIMEOUT_S = 120
AUDIO_S = 1.2


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("REDIS_URL", None)  # serve must start (and stop) its own redis-server
    env.pop("FACECAST_API_KEYS", None)
    return env


def cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *argv], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _health_probe(target: str, timeout_s: float = 10.0) -> tuple[str, float]:
    """(outcome, seconds the call took) of a health check: SERVING / NOT_SERVING, or the status code's name."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    began = time.monotonic()
    with grpc.insecure_channel(target) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), metadata=[("application", "facecast")], timeout=timeout_s)
            outcome = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        except grpc.RpcError as error:
            outcome = error.code().name
    return outcome, time.monotonic() - began


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path, ready: Path):
        self.proc, self.port, self.log, self.ready = proc, port, log, ready

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    port, ready, log = free_port(), tmp / "ready", tmp / "serve.log"
    http_port = free_port()
    while http_port == port:
        http_port = free_port()
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "--port", str(port),
                                 "--http-port", str(http_port), "--preset", "tiny", "--ready-file", str(ready)],
                                cwd=REPO, env=_env(), stdout=sink,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    started = Server(proc, port, log, ready)
    started.http_port = http_port
    started.probes = []
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.exists():
            if proc.poll() is not None:
                pytest.fail(f"facecast serve exited with {proc.returncode} before it was ready:\n{started.output()}")
            if time.monotonic() > deadline:
                print(started.output())
                pytest.fail(f"facecast serve was not ready within {READY_TIMEOUT_S} s:\n{started.output()}")
            started.probes.append(_health_probe(started.target))   # a caller trying while it starts
            time.sleep(0.25)
        assert ready.read_text() == "ready\n"
        yield started
    finally:
        if proc.poll() is None:  # a test failed before the SIGTERM test stopped it
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from PIL import Image

    tmp = tmp_path_factory.mktemp("inputs")
    image = tmp / "face.png"
    Image.fromarray((np.random.default_rng(5).random((96, 80, 3)) * 255).astype(np.uint8)).save(image)
    audio = tmp / "speech.wav"
    with wave.open(str(audio), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(16000)
        handle.writeframes((np.clip(speech(AUDIO_S, seed=7), -1, 1) * 32767).astype("<i2").tobytes())
    not_an_image = tmp / "notes.txt"
    not_an_image.write_text("this is not an image\n")
    return image, audio, not_an_image, tmp


def test_call_streams_the_audio_and_writes_the_mp4(server, inputs):
    image, audio, _, tmp = inputs
    out = tmp / "out.mp4"
    result = cli("call", "--target", server.target, "--image", str(image), "--audio", str(audio), "--out", str(out),
                 "--width", "64", "--height", "64", "--no-realtime", "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr + server.output()
    info = probe_video(out)
    assert info.num_frames == math.ceil(AUDIO_S * 25)
    assert info.fps == pytest.approx(25)
    assert (info.width, info.height) == (64, 64)
    assert info.has_audio and info.audio_duration_s == pytest.approx(AUDIO_S, abs=0.05)
    assert re.search(r"TTFF \d+ ms", result.stdout), result.stdout
    assert re.search(r"between chunks: mean \d+ / p50 \d+ / p95 \d+ / max \d+ ms", result.stdout), result.stdout
    assert f"frames {info.num_frames}" in result.stdout and "FPS delivered" in result.stdout


def test_serve_also_serves_the_browser_call_page_over_http(server):
    """The ingress answers gRPC (the tests around this one) and, through Serve's HTTP proxy, the call page."""
    import json
    import urllib.request

    base = f"http://127.0.0.1:{server.http_port}"
    with urllib.request.urlopen(base + "/", timeout=30) as response:
        page = response.read().decode()
    assert response.status == 200 and "<title>facecast" in page and "RTCPeerConnection" in page
    with urllib.request.urlopen(base + "/call/config", timeout=30) as response:
        config = json.loads(response.read())
    assert "reference" in config["faces"] and config["needs_key"] is False and isinstance(config["modes"], list)
    assert f"call page: {base}/" in server.output()


def test_call_with_a_non_image_exits_2_naming_the_field(server, inputs):
    _, audio, not_an_image, tmp = inputs
    result = cli("call", "--target", server.target, "--image", str(not_an_image), "--audio", str(audio),
                 "--out", str(tmp / "bad.mp4"), "--quiet")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "INVALID_ARGUMENT" in result.stderr and "reference_image" in result.stderr
    assert result.stderr.startswith("facecast call: error:") and "Traceback" not in result.stderr


def test_while_serve_starts_every_call_is_answered_at_once_never_left_to_hang(server):
    """Health checks every 0.25 s from the moment `facecast serve` was launched until it said ready: each one refused
    (the port closed: UNAVAILABLE) or answered, in well under its 10 s deadline."""
    assert len(server.probes) >= 4, server.probes
    slow = [(outcome, round(took, 2)) for outcome, took in server.probes if took > 3.0]
    assert not slow, f"calls left hanging while serve started: {slow}"
    assert {outcome for outcome, _ in server.probes} <= {"UNAVAILABLE", "NOT_SERVING", "SERVING"}, server.probes
    assert server.probes[0][0] == "UNAVAILABLE"


def test_serve_listens_on_loopback_only_and_its_serve_port_refuses_calls_that_bypass_it(server):
    """The gRPC port listens where the server says (127.0.0.1, not every interface); Serve's own proxy port, which
    Ray binds on every interface, answers only calls the front door forwarded."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    out = server.output()
    assert f"on grpc 127.0.0.1:{server.port} " in out and "transport: plaintext, for use on this machine" in out
    with socket.socket() as probe:
        probe.settimeout(2)
        assert probe.connect_ex(("127.0.0.2", server.port)) != 0, "the gRPC port listens beyond 127.0.0.1"
    internal = int(re.search(r"Serve's own gRPC proxy: port (\d+), internal", out).group(1))
    request, metadata = health_pb2.HealthCheckRequest(service=""), [("application", "facecast")]
    with grpc.insecure_channel(server.target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(request, metadata=metadata, timeout=30)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(f"127.0.0.1:{internal}") as channel:
        with pytest.raises(grpc.RpcError) as caught:
            health_pb2_grpc.HealthStub(channel).Check(request, metadata=metadata + [("x-facecast-internal", "guess")],
                                                      timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED and "internal port" in caught.value.details()


def test_sigterm_drains_a_live_stream_and_stops_serve_cleanly_in_seconds(server, inputs):
    """SIGTERM while a session streams in real time: the client gets the chunks in flight, a DRAINING event naming
    the next chunk and UNAVAILABLE (so it would re-attach elsewhere); serve exits 0 within seconds, its port closed
    and its redis-server gone."""
    import threading

    import grpc

    from services.api import pb
    from services.api.client import AvatarClient

    match = re.search(r"local redis-server pid (\d+)", server.output())
    assert match, server.output()
    redis_pid = int(match.group(1))
    assert alive(redis_pid) and port_open(server.port)
    image, _, _, _ = inputs
    client = AvatarClient(server.target)
    session = client.create_session(image.read_bytes(), options={"width": 64, "height": 64})
    pcm = (np.clip(speech(8.0, seed=9), -1, 1) * 32767).astype("<i2")

    def requests():
        yield pb.SessionInput(attach=pb.Attach(session_id=session.session_id, session_token=session.session_token))
        for start in range(0, len(pcm), 640):
            time.sleep(0.04)
            yield pb.SessionInput(audio=pb.AudioInput(pcm_s16le=pcm[start:start + 640].tobytes(),
                                                      sample_rate_hz=16000, channels=1))

    chunks, events, sent = [], [], {}
    try:
        for output in client.stub.StreamSession(requests(), metadata=client.metadata, timeout=120):
            if output.WhichOneof("output") == "event":
                events.append(output.event)
            else:
                chunks.append(output.video_chunk.chunk_index)
                if len(chunks) == 2:
                    sent["at"] = time.monotonic()
                    threading.Thread(target=server.proc.send_signal, args=(signal.SIGTERM,)).start()
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code, details = error.code(), error.details()
    finally:
        client.close()
    try:
        exit_code = server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"facecast serve did not stop within 30 s of SIGTERM:\n{server.output()}")
    took = time.monotonic() - sent["at"]
    assert code == grpc.StatusCode.UNAVAILABLE and "re-attach" in details, (code, server.output())
    draining = [event for event in events if event.type == pb.Event.DRAINING]
    assert len(draining) == 1 and draining[0].next_chunk_index == len(chunks), (events, chunks)
    assert chunks == list(range(len(chunks)))
    assert exit_code == 0, server.output()
    assert took < 20, f"stopping took {took:.1f} s"
    out = server.output()
    assert "SIGTERM: stopping" in out and "drained and shut down in" in out and "Traceback" not in out
    assert not port_open(server.port)
    assert not alive(redis_pid), "serve left its redis-server running"
    assert not server.ready.exists()
