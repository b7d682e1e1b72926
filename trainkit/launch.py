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
        ["--nnodes", "1", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), "--max_restarts", "0", "-m", "trainkit", *trainkit_args]
    )
    try:
        run(args)
    except Exception as error:  # ChildFailedError: a rank failed; its own error line is above
        from trainkit.errors import TrainkitError

        lines = str(error).strip().splitlines()
        raise TrainkitError(f"a DDP process failed: {lines[0] if lines else type(error).__name__}") from None
    return 0
