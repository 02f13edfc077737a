"""What a lab case needs to start the repository's launchers
(``tools/dist_train.sh``) as child processes, one after another."""
import os
import socket
import sys
from typing import Dict


def free_port() -> int:
    """A TCP port free on this host now, for torchrun's rendezvous (other jobs
    may hold its default, 29500)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def launch_env(**variables: str) -> Dict[str, str]:
    """This process's environment for a launcher: a free ``PORT``, this
    interpreter as ``PYTHON`` (the launchers' own default is the repository's
    .venv), and ``variables`` (data roots) on top."""
    return dict(os.environ, PORT=str(free_port()), PYTHON=sys.executable, **variables)
