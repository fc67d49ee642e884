"""`python -m headernet_core.evaluate ...`: evaluate a checkpoint (library: `headernet_core.evaluation`).

Only a `-m` entry point: nothing in the project imports it, because `headernet_core.evaluate`
is the public *function* (`from headernet_core import evaluate`).
"""
from headernet_core.evaluation import main

if __name__ == "__main__":
    main()
