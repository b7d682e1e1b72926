"""`trainkit train --nproc N`: start N DDP processes through torch.distributed.run's own API."""

from __future__ import annotations

import socket


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_local(nproc: int, trainkit_args: list[str]) -> int:
    """Run `torchrun --nproc_per_node N -m trainkit ARGS…` with a rendezvous on 127.0.0.1."""
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        [
            "--nnodes",
            "1",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            "--max_restarts",
            "0",
            "-m",
            "trainkit",
            *trainkit_args,
        ]
    )
    from torch.distributed.elastic.multiprocessing.api import SignalException

    try:
        run(args)
    except SignalException as error:  # SIGTERM/SIGINT to this launcher: forwarded to the ranks,
        return 128 + int(error.sigval)  # which agreed on a step, saved and exited
    except Exception as error:  # ChildFailedError: a rank failed; its own error line is above
        from trainkit.errors import TrainkitError

        codes = sorted({f.exitcode for f in getattr(error, "failures", {}).values()})
        stopped = [code for code in codes if code in (130, 143)]
        if stopped:  # stopped by SIGINT/SIGTERM after saving: exit as a single process would
            return stopped[0]
        if hasattr(error, "get_first_failure"):
            rank, failure = error.get_first_failure()
            raise TrainkitError(
                f"DDP rank {rank} failed first (exit {failure.exitcode}); its error is above"
            ) from error
        raise TrainkitError(f"a DDP process failed: {error}") from error
    return 0
