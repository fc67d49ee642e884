"""`python -m headernet_core.train ...`: the trainer's command line (library: `headernet_core.trainer`).

Only a `-m` entry point: nothing in the project imports it, because `headernet_core.train` is
the public *function* (`from headernet_core import train`), and importing a submodule of that
name would rebind the package attribute to the module. The flags are read before the trainer
(torch, timm, scikit-learn: ~5 s) is imported, so `--help` and a bad flag answer at once.
"""
from headernet_core.config import config_for_cli
from headernet_core.errors import run_cli


def main() -> None:
    config = config_for_cli(None)
    from headernet_core.trainer import train

    train(config)


if __name__ == "__main__":
    run_cli(main)
