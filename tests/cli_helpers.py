"""What the CLI tests share: run `transfertune ARGV` in-process, and make any model load fail."""
from __future__ import annotations

from transfertune.cli.main import main


def cli(capsys, *argv) -> tuple[int, str]:
    """Exit status and stderr of `transfertune ARGV`, with argparse's own exits caught."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def no_model_loads(monkeypatch):
    """Make any model load fail loudly: the checks under test must come first."""
    import transfertune.io.loading as loading

    def refuse(*_, **__):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(loading, "load_causal_lm", refuse)
    monkeypatch.setattr(loading, "load_base", refuse)


def wait_until_serving(proc, port: int, seconds: float, output) -> None:
    """Poll a `transfertune serve` process's /health until it answers 200; `output()` is its log for the
    failure message."""
    import time

    import httpx

    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, output()
        assert time.monotonic() < deadline, "server did not come up"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
