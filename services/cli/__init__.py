"""The `facecast` command line: one module per command, wired by `main`.

    main.py           the entry point (`facecast` = services.cli.main:main; also `python -m services.cli`)
    common.py         UserError, exit codes, argument helpers shared by the commands
    generate.py       facecast generate      image + speech -> MP4 through the in-process engine
    serve.py          facecast serve         the Serve cluster of a deploy config on this machine, until Ctrl-C
    call.py           facecast call          the reference gRPC client: a WAV in, an MP4 out
    bench.py          facecast bench engine | bench cluster
    bench_cluster.py  the cluster benchmark's harness (local Ray, three applications)
    presets.py        facecast presets

User mistakes (a non-image, empty or unreadable audio, an unknown preset, an impossible option) print one line naming
the problem and exit with status 2; no traceback.
"""
