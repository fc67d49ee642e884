"""`python -m headernet_core.predict ...`: predict on unlabelled clips (library: `headernet_core.prediction`).

Only a `-m` entry point: nothing in the project imports it, because `headernet_core.predict`
is the public *function* (`from headernet_core import predict`).
"""
from headernet_core.config import inference_parser
from headernet_core.errors import run_cli


def main() -> None:
    args = inference_parser("predict").parse_args()   # before torch: --help answers at once
    from headernet_core.prediction import cli

    cli(args)


if __name__ == "__main__":
    run_cli(main)
