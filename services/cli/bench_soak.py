"""`facecast bench soak`: N sessions streaming speech in real time through `facecast serve` for M minutes.

    facecast bench soak [--preset tiny] [--sessions 3] [--minutes 10] [--kill ScoreWorkerGroup --kill-every 3]

Starts `facecast serve` (its own local Ray and redis-server) as a subprocess, as a user would, and runs one real gRPC
client per session, each streaming the bundled speech (assets/speech.wav, looped) paced in real time for the whole run
and re-attaching when its stream breaks. Reports per session and overall:
- sessions lost (a stream that could not be resumed),
- deadline attainment: the share of chunks that arrived before their playback deadline. A viewer's player starts when
  the first chunk arrives, plus a jitter buffer (`--buffer-ms`, 200), and plays each chunk at its presentation time;
  a chunk that is late freezes the picture until it arrives and the player's clock moves on from there,
- stall time: the seconds that player showed a frozen frame,
- time between chunks p50 / p99, time to first frame,
- the memory of the whole serve process tree (Ray's processes and Redis included), sampled every 5 s, with its
  least-squares slope in MiB per minute after the first minute (a leak shows as a slope),
- with `--kill`, the replica killed every `--kill-every` minutes (SIGKILL to its Ray worker process) and what each
  session saw.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model_core.bench import cpu_label
from services.cli.common import UserError
from services.net import free_port
from services.serving.settings import DEPLOYMENT_NAMES

ASSETS = Path(__file__).resolve().parents[2] / "assets"


@dataclass
class SessionLog:
    """What one client saw."""

    index: int
    arrivals: list[float] = field(default_factory=list)
    pts_s: list[float] = field(default_factory=list)
    started: float = 0.0
    reattaches: int = 0
    resumed: int = 0          # RESUMED events: a worker failed and the session went on on the same stream
    lost: str | None = None

    def player(self, buffer_s: float) -> tuple[int, float]:
        """(chunks on time, seconds frozen) for a player that starts `buffer_s` after the first chunk arrives and
        pauses its clock while the next chunk is late."""
        if not self.arrivals:
            return 0, 0.0
        shift, on_time, frozen = self.arrivals[0] + buffer_s - self.pts_s[0], 0, 0.0
        for arrival, pts in zip(self.arrivals, self.pts_s):
            deadline = pts + shift
            if arrival <= deadline:
                on_time += 1
            else:
                frozen += arrival - deadline
                shift += arrival - deadline
        return on_time, frozen


def _speech(minutes: float) -> np.ndarray:
    from services.media import load_audio

    audio, rate = load_audio(ASSETS / "speech.wav")
    if rate != 16000:
        from model_core.audio_resample import resample

        audio = resample(audio, rate, 16000)
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
    gap = np.zeros(8000, dtype=np.int16)    # half a second between repetitions, as between sentences
    unit = np.concatenate([pcm, gap])
    return np.tile(unit, int(np.ceil(minutes * 60 * 16000 / len(unit))))[: int(minutes * 60 * 16000)]


def _component(process) -> str:
    """A process's role in serve's tree: the Serve replica's deployment, a Ray core process, redis, serve itself."""
    try:
        line = " ".join(process.cmdline())
    except Exception:  # noqa: BLE001 - gone meanwhile
        return "other"
    for deployment in DEPLOYMENT_NAMES + ("ServeController", "ProxyActor"):
        if deployment in line:
            return deployment
    for core in ("gcs_server", "raylet", "redis-server", "dashboard", "log_monitor", "runtime_env"):
        if core in line:
            return core
    return "facecast serve" if "services.cli" in line else "other"


def _tree_rss_mib(pid: int) -> dict[str, float]:
    """RSS in MiB of serve's process tree by component (see `_component`)."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    totals: dict[str, float] = {}
    for process in processes:
        try:
            rss = process.memory_info().rss / 2**20
        except psutil.Error:
            continue
        name = _component(process)
        totals[name] = totals.get(name, 0.0) + rss
    return totals


def _kill_replica(pid: int, deployment: str) -> int | None:
    """SIGKILL the Ray worker process running a replica of `deployment` under the serve process; its pid or None."""
    import psutil

    for process in psutil.Process(pid).children(recursive=True):
        try:
            title = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if f"ServeReplica:facecast:{deployment}" in title:
            process.send_signal(signal.SIGKILL)
            return process.pid
    return None


def serve_argv(preset: str, config: str | None, port: int, http_port: int, ready: Path,
               replicas: list[str] | None = None) -> list[str]:
    """The `facecast serve` command line a bench starts."""
    return ([sys.executable, "-m", "services.cli", "serve", "--preset", preset, "--port", str(port), "--http-port",
             str(http_port), "--ready-file", str(ready)] + (["--config", config] if config else [])
            + [arg for entry in replicas or () for arg in ("--replicas", entry)])


def _start_serve(preset: str, config: str | None, log_path: Path,
                 replicas: list[str] | None = None) -> tuple[subprocess.Popen, int]:
    port, http_port = free_port(), free_port()
    ready = log_path.with_suffix(".ready")
    ready.unlink(missing_ok=True)
    argv = serve_argv(preset, config, port, http_port, ready, replicas)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=ASSETS.parent)
    deadline = time.monotonic() + 300
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise UserError(f"facecast serve did not become ready (see {log_path}):\n"
                            + log_path.read_text(errors="replace")[-2000:])
        time.sleep(0.5)
    return proc, port


def _stop_serve(proc: subprocess.Popen, progress: bool) -> None:
    """Stop the served cluster as a user does (SIGINT: drain, then shut down), killing it if it hangs."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
    if progress:
        print(file=sys.stderr)


def bench_soak(preset: str = "tiny", sessions: int = 3, minutes: float = 10.0, kill: str | None = None,
               kill_every_min: float = 3.0, buffer_ms: float = 200.0, config: str | None = None,
               log_dir: str = "out", progress: bool = True, replicas: list[str] | None = None) -> dict:
    from services.api import pb
    from services.api.client import AvatarClient

    Path(log_dir).mkdir(parents=True, exist_ok=True)
    log_path = Path(log_dir) / "soak-serve.log"
    pcm, image = _speech(minutes), (ASSETS / "reference.png").read_bytes()
    proc, port = _start_serve(preset, config, log_path, replicas)
    logs, memory, kills = [SessionLog(i) for i in range(sessions)], [], []
    stop = threading.Event()
    began = time.monotonic()

    def client(log: SessionLog) -> None:
        connection = AvatarClient(f"127.0.0.1:{port}")
        try:
            session = connection.create_session(image, timeout_s=120)
            log.started = time.monotonic()

            def on_chunk(chunk) -> None:
                log.arrivals.append(time.monotonic() - log.started)
                log.pts_s.append(chunk.pts_ms / 1000)

            result = connection.stream(session, pcm, 16000, realtime=True, on_chunk=on_chunk,
                                       timeout_s=minutes * 60 + 600, max_reattaches=64)
            log.reattaches = result.reattaches
            log.resumed = sum(event.type == pb.Event.RESUMED for event in result.events)
            connection.close_session(session.session_id, session.session_token)
        except Exception as error:  # noqa: BLE001 - a lost session is a result, not a crash of the bench
            log.lost = f"{type(error).__name__}: {str(error)[:300]}"
        finally:
            connection.close()

    def sampler() -> None:
        next_kill = kill_every_min * 60 if kill else None
        while not stop.wait(5.0):
            elapsed = time.monotonic() - began
            memory.append((elapsed, _tree_rss_mib(proc.pid)))
            if next_kill is not None and elapsed >= next_kill:
                kills.append({"at_s": round(elapsed, 1), "deployment": kill, "pid": _kill_replica(proc.pid, kill)})
                next_kill += kill_every_min * 60
            if progress:
                chunks = sum(len(log.arrivals) for log in logs)
                print(f"\rsoak: {elapsed / 60:5.1f}/{minutes:g} min, {chunks} chunks, "
                      f"{sum(memory[-1][1].values()):.0f} MiB", end="", file=sys.stderr, flush=True)

    threads = [threading.Thread(target=client, args=(log,), daemon=True) for log in logs]
    watcher = threading.Thread(target=sampler, daemon=True)
    try:
        watcher.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        stop.set()
        watcher.join(timeout=10)
        _stop_serve(proc, progress)
    report = _report(preset, sessions, minutes, buffer_ms / 1000, logs, memory, kills, str(log_path))
    report["replicas"] = list(replicas or [])
    return report


def _percentile(values, q):
    return round(float(np.percentile(values, q)) * 1000, 1) if len(values) else None


def _report(preset, sessions, minutes, buffer_s, logs, memory, kills, log_path) -> dict:
    per_session, all_intervals, chunks, on_time, frozen = [], [], 0, 0, 0.0
    for log in logs:
        timely, stalled = log.player(buffer_s)
        intervals = list(np.diff(log.arrivals)) if len(log.arrivals) > 1 else []
        all_intervals += intervals
        chunks, on_time, frozen = chunks + len(log.arrivals), on_time + timely, frozen + stalled
        per_session.append({"session": log.index, "chunks": len(log.arrivals), "lost": log.lost,
                            "reattaches": log.reattaches, "resumed": log.resumed,
                            "ttff_s": round(log.arrivals[0], 3) if log.arrivals else None,
                            "deadline_attainment": round(timely / len(log.arrivals), 4) if log.arrivals else None,
                            "stall_s": round(stalled, 2), "between_chunks_p50_ms": _percentile(intervals, 50),
                            "between_chunks_p99_ms": _percentile(intervals, 99)})
    def slope_of(samples):
        steady = [(t, m) for t, m in samples if t >= 60]
        if len(steady) < 3:
            return None
        return float(np.polyfit([t / 60 for t, _ in steady], [m for _, m in steady], 1)[0])

    firsts = [log.arrivals[0] for log in logs if log.arrivals]
    totals = [(t, sum(parts.values())) for t, parts in memory if parts]
    slope = slope_of(totals)
    names = sorted({name for _, parts in memory for name in parts})
    by_component = {name: {"last_mib": round(memory[-1][1].get(name, 0.0), 1) if memory else None,
                           "slope_mib_per_min": (lambda v: round(v, 3) if v is not None else None)(
                               slope_of([(t, parts.get(name, 0.0)) for t, parts in memory if parts]))}
                    for name in names}
    return {"machine": cpu_label(), "preset": preset, "sessions": sessions, "minutes": minutes,
            "buffer_ms": buffer_s * 1000, "sessions_lost": sum(log.lost is not None for log in logs),
            "chunks": chunks, "deadline_attainment": round(on_time / chunks, 4) if chunks else None,
            "stall_s": round(frozen, 2), "ttff_p50_s": round(float(np.median(firsts)), 3) if firsts else None,
            "ttff_max_s": round(max(firsts), 3) if firsts else None,
            "between_chunks_p50_ms": _percentile(all_intervals, 50),
            "between_chunks_p99_ms": _percentile(all_intervals, 99),
            "memory_mib_first": round(totals[0][1], 1) if totals else None,
            "memory_mib_last": round(totals[-1][1], 1) if totals else None,
            "memory_slope_mib_per_min": round(slope, 3) if slope is not None else None,
            "memory_by_component": by_component,
            "memory_samples": [(round(t, 1), round(m, 1)) for t, m in totals], "kills": kills,
            "per_session": per_session, "serve_log": log_path}


def format_soak_report(report: dict) -> str:
    attainment = report["deadline_attainment"]
    lines = [f"facecast bench soak — preset {report['preset']}, {report['sessions']} sessions x {report['minutes']:g} "
             f"min, real-time speech through `facecast serve`"
             + (f" --replicas {' '.join(report['replicas'])}" if report.get("replicas") else "")
             + f" on {report['machine']}",
             f"  sessions lost {report['sessions_lost']}, chunks {report['chunks']}, deadline attainment "
             + (f"{attainment * 100:.2f} %" if attainment is not None else "n/a")
             + f" (player buffer {report['buffer_ms']:.0f} ms), stall {report['stall_s']:.1f} s",
             f"  between chunks p50 {report['between_chunks_p50_ms']} ms, p99 {report['between_chunks_p99_ms']} ms; "
             f"time to first frame p50 {report.get('ttff_p50_s')} s, max {report.get('ttff_max_s')} s",
             f"  memory (serve's process tree) {report['memory_mib_first']} -> {report['memory_mib_last']} MiB, "
             f"slope after the first minute {report['memory_slope_mib_per_min']} MiB/min",
             "  by component, MiB (slope MiB/min): " + ", ".join(
                 f"{name} {part['last_mib']} ({part['slope_mib_per_min']})"
                 for name, part in sorted(report.get("memory_by_component", {}).items(),
                                          key=lambda item: -(item[1]["slope_mib_per_min"] or 0)))]
    for kill in report["kills"]:
        lines.append(f"  killed {kill['deployment']} (pid {kill['pid']}) at {kill['at_s']} s")
    for session in report["per_session"]:
        lines.append(f"    session {session['session']}: {session['chunks']} chunks, TTFF {session['ttff_s']} s, "
                     f"on time {session['deadline_attainment']}, stall {session['stall_s']} s, p50/p99 "
                     f"{session['between_chunks_p50_ms']}/{session['between_chunks_p99_ms']} ms, re-attaches "
                     f"{session['reattaches']}, resumed {session.get('resumed', 0)}"
                     + (f", LOST: {session['lost']}" if session["lost"] else ""))
    return "\n".join(lines)


def bench_fuzz(preset: str = "tiny", examples: int = 3000, *, seed: int = 0, log_dir: str = "out",
               progress: bool = True) -> dict:
    """The hostile-input property test (`services.api.fuzz`) for `examples` calls against `facecast serve`, while
    healthy sessions stream speech in real time one after another; any undocumented status stops it (reported with
    the call, shrunk by hypothesis)."""
    try:
        from hypothesis import HealthCheck, given, settings
        from hypothesis import seed as hypothesis_seed
    except ImportError:
        raise UserError("bench fuzz needs hypothesis: pip install -e '.[test]'") from None
    from services.api.client import AvatarClient
    from services.api.fuzz import Hostile, HostileFailure, hostile_calls

    Path(log_dir).mkdir(parents=True, exist_ok=True)
    log_path = Path(log_dir) / "fuzz-serve.log"
    image, speech = (ASSETS / "reference.png").read_bytes(), _speech(20 / 60)
    proc, port = _start_serve(preset, None, log_path)
    client = AvatarClient(f"127.0.0.1:{port}")
    stop, healthy = threading.Event(), {"completed": 0, "chunks": 0, "errors": []}

    def stream_healthy() -> None:
        while not stop.is_set():
            try:
                session = client.create_session(image, timeout_s=120)
                result = client.stream(session, speech, 16000, realtime=True, max_reattaches=0)
                indices = [chunk.chunk_index for chunk in result.chunks]
                if indices != list(range(len(indices))) or not result.chunks[-1].final:
                    healthy["errors"].append(f"chunks {indices[:5]}... final={result.chunks[-1].final}")
                healthy["completed"] += 1
                healthy["chunks"] += len(indices)
                client.close_session(session.session_id, session.session_token)
            except Exception as error:  # noqa: BLE001 - reported
                healthy["errors"].append(f"{type(error).__name__}: {str(error)[:200]}")
                time.sleep(1)

    victims = [client.create_session(image, timeout_s=120) for _ in range(2)]
    harness = Hostile(client.channel, client.metadata, victims, renew=lambda: client.create_session(image))
    failure, began = None, time.monotonic()

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(hostile_calls(len(victims)))
    def run(call):
        harness.send(call)
        if progress and sum(harness.statuses.values()) % 50 == 0:
            print(f"\rfuzz: {sum(harness.statuses.values())}/{examples} calls, {harness.messages_sent} messages",
                  end="", file=sys.stderr, flush=True)

    streamer = threading.Thread(target=stream_healthy, daemon=True)
    streamer.start()
    try:
        run()
    except HostileFailure as error:
        failure = str(error)
    finally:
        stop.set()
        streamer.join(timeout=60)
        client.close()
        _stop_serve(proc, progress)
    return {"machine": cpu_label(), "preset": preset, "examples": examples, "seed": seed,
            "calls": sum(harness.statuses.values()), "messages": harness.messages_sent,
            "statuses": dict(harness.statuses), "failure": failure, "seconds": round(time.monotonic() - began, 1),
            "healthy_sessions_completed": healthy["completed"], "healthy_chunks": healthy["chunks"],
            "healthy_errors": healthy["errors"], "serve_log": str(log_path)}


def format_fuzz_report(report: dict) -> str:
    lines = [f"facecast bench fuzz — {report['calls']} hostile calls ({report['messages']} messages, seed "
             f"{report['seed']}) against `facecast serve` (preset {report['preset']}) in {report['seconds']} s on "
             f"{report['machine']}",
             "  statuses: " + ", ".join(f"{name} {count}" for name, count in sorted(report["statuses"].items())),
             "  undocumented status: " + (report["failure"] or "none"),
             f"  healthy sessions meanwhile: {report['healthy_sessions_completed']} completed, "
             f"{report['healthy_chunks']} chunks, errors: {report['healthy_errors'] or 'none'}"]
    return "\n".join(lines)
