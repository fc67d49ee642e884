"""`python -m headernet_core.evaluate ...`: evaluate a checkpoint (library: `headernet_core.evaluation`).

Only a `-m` entry point: nothing in the project imports it, because `headernet_core.evaluate`
is the public *function* (`from headernet_core import evaluate`).
"""
from headernet_core.config import inference_parser
from headernet_core.errors import run_cli


def main() -> None:
    args = inference_parser("evaluate").parse_args()   # before torch: --help answers at once
    from headernet_core.evaluation import cli

    cli(args)


if __name__ == "__main__":
    run_cli(main)
