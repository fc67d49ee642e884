"""`python -m headernet_core.predict ...`: predict on unlabelled clips (library: `headernet_core.prediction`).

Only a `-m` entry point: nothing in the project imports it, because `headernet_core.predict`
is the public *function* (`from headernet_core import predict`).
"""
from headernet_core.prediction import main

if __name__ == "__main__":
    main()
