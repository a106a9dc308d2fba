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
