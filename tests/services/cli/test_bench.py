"""`facecast bench engine` and `facecast bench cluster` (services/cli/bench.py): the engine report, and the argument
errors both refuse before any work starts."""

import json

import pytest

from services.cli.main import main


def test_bench_engine_json_report(capsys):
    assert main(["bench", "engine", "--preset", "tiny", "--chunks", "2", "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["preset"] == "tiny" and report["steps"] == 2
    assert set(report["stage_ms"]) == {"audio", "step_1", "step_2", "vae_decode"}
    assert report["fps"] > 0 and report["ttff_ms"] > 0 and report["step_tflops"] > 0
    assert report["real_time_factor"] > 0 and report["peak_memory_gib"] > 0


@pytest.mark.parametrize("argv,needle", [
    (["engine", "--device", "tpu"], "--device='tpu' is invalid: allowed: auto, cpu, cuda, cuda:N"),
    (["engine", "--device", "cpu", "--dtype", "int8"], "--dtype='int8' is invalid: allowed: float32, bfloat16"),
    (["engine", "--device", "cpu", "--preset", "huge"], "preset='huge' is unknown"),
    (["cluster", "--chunks", "1"], "--chunks 1 is too few"),
    (["cluster", "--max-sessions", "0"], "--max-sessions 0 is invalid; allowed: 1 to 64"),
    (["cluster", "--preset", "huge"], "preset='huge' is unknown"),
    (["soak", "--sessions", "0"], "--sessions 0 is invalid; allowed: 1 to 64"),
    (["soak", "--minutes", "0"], "--minutes 0 is invalid: must be > 0"),
    (["soak", "--kill", "VAEDecoder", "--kill-every", "0"], "--kill-every 0 is invalid"),
    (["soak", "--replicas", "ScoreWorkerGroup=x"], "--replicas 'ScoreWorkerGroup=x': the count must be a positive"),
    (["fuzz", "--examples", "0"], "--examples 0 is invalid: at least 1"),
])
def test_bad_arguments_exit_2_with_one_line(argv, needle, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("facecast bench: error: ") and needle in err and len(err.strip().splitlines()) == 1


def test_bench_decode_times_each_decoder_in_one_run(capsys):
    assert main(["bench", "decode", "--preset", "tiny", "--chunks", "1", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = [row["decoder"] for row in report["decoders"]]
    assert names == ["full, PyTorch's conv3d", "full"]          # tiny ships no fast decoder
    assert all(row["chunk_ms"] > 0 and row["frame_ms"] > 0 for row in report["decoders"])
    assert report["decoders"][0]["speedup"] == 1.0 and "cores" in report["device_name"]


@pytest.mark.parametrize("load, busy", [(0.3, False), (1.7, True)])
def test_a_report_says_how_busy_the_machine_was_when_its_run_began(monkeypatch, capsys, load, busy):
    """The load average is read before the run (its own work would raise it): a run begun on a busy machine is
    recorded and said on stderr, one begun on an idle one only recorded."""
    import os

    import services.cli.bench as bench

    readings = iter([(load, 0.0, 0.0)])
    monkeypatch.setattr(os, "getloadavg", lambda: next(readings))        # read once: at the start
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert main(["bench", "decode", "--preset", "tiny", "--chunks", "1", "--json", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["machine_load_at_start"] == {"load_1m": load, "cores": 2}
    assert ("the machine was busy when this run began (1-minute load 1.7 on 2 cores)" in err) == busy, err
    assert bench.busy_warning({"load_1m": None, "cores": 2}) is None


def test_bench_gpu_dry_run_on_tiny_shapes_writes_json_and_the_tables(tmp_path, capsys):
    out, table = tmp_path / "gpu.json", tmp_path / "gpu.md"
    assert main(["bench", "gpu", "--shapes", "tiny", "--device", "cpu", "--no-compile", "--chunks", "1", "--quiet",
                 "--out", str(out), "--table", str(table)]) == 0
    report = json.loads(out.read_text())
    assert [(row["preset"], row["resolution"]) for row in report["cases"]] == [("tiny", "64x64"), ("tiny", "96x64")]
    layouts = {row["layout"]: row for row in report["projections"]}
    one, four = layouts["1+1"], layouts["4+1"]
    case = {row["resolution"]: row for row in report["cases"]}
    # the projection's arithmetic, held to the formulas: 1+1 overlaps score and decode; 4+1 one step per GPU
    small, large = case["64x64"], case["96x64"]
    assert one["chunk_interval_ms"] == max(small["audio_ms"] + 2 * small["step_ms"], small["vae_decode_ms"])
    assert four["chunk_interval_ms"] == max(large["audio_ms"] + large["step_ms"], large["vae_decode_ms"])
    assert four["ttff_ms"] == large["audio_ms"] + 4 * large["step_ms"] + large["vae_decode_ms"]
    assert "| tiny | 4+1 | 4 | 96x64 |" in table.read_text() and "| preset | layout |" in capsys.readouterr().out


def test_bench_gpu_full_shapes_need_a_gpu(capsys):
    assert main(["bench", "gpu", "--device", "cpu"]) == 2
    assert "--shapes tiny" in capsys.readouterr().err


def test_the_soak_players_deadlines_and_stalls_against_hand_worked_timelines():
    """A player starts 0.2 s after the first chunk and plays 0.48 s chunks back to back; a late chunk freezes the
    picture until it arrives and pushes every later deadline back by as much (worked by hand, not by the code)."""
    from services.cli.bench_soak import SessionLog

    steady = SessionLog(0, arrivals=[1.0, 1.5, 1.9, 2.4], pts_s=[0.0, 0.48, 0.96, 1.44])
    assert steady.player(0.2) == (4, 0.0)           # deadlines 1.2, 1.68, 2.16, 2.64
    late = SessionLog(1, arrivals=[1.0, 1.5, 2.5, 2.9, 3.6], pts_s=[0.0, 0.48, 0.96, 1.44, 1.92])
    on_time, frozen = late.player(0.2)   # chunk 2: due 2.16, arrives 2.5 (0.34 s frozen); then due 2.98 (on time)
    assert on_time == 3 and frozen == pytest.approx(0.34 + 0.14)   # and 3.46, arriving 3.6 (0.14 s frozen)
    assert SessionLog(2).player(0.2) == (0, 0.0)


def test_the_soak_report_gives_the_time_to_first_frame_over_sessions_and_each():
    from services.cli.bench_soak import SessionLog, _report, format_soak_report

    logs = [SessionLog(0, arrivals=[1.2, 1.7], pts_s=[0.0, 0.48]), SessionLog(1, arrivals=[0.8], pts_s=[0.0]),
            SessionLog(2, arrivals=[2.5], pts_s=[0.0]), SessionLog(3, lost="INTERNAL")]
    report = _report("tiny", 4, 1.0, 0.2, logs, [], [], "serve.log")
    assert (report["ttff_p50_s"], report["ttff_max_s"]) == (1.2, 2.5)
    assert [session["ttff_s"] for session in report["per_session"]] == [1.2, 0.8, 2.5, None]
    assert report["sessions_lost"] == 1
    assert "time to first frame p50 1.2 s, max 2.5 s" in format_soak_report(report)


def test_the_soak_starts_serve_with_the_replicas_asked_for(tmp_path):
    from services.cli.bench_soak import serve_argv

    argv = serve_argv("tiny", None, 9100, 9101, tmp_path / "r", ["ScoreWorkerGroup=2", "VAEDecoder=2"])
    assert argv[argv.index("serve"):] == ["serve", "--preset", "tiny", "--port", "9100", "--http-port", "9101",
                                          "--ready-file", str(tmp_path / "r"), "--replicas", "ScoreWorkerGroup=2",
                                          "--replicas", "VAEDecoder=2"]
