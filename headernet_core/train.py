"""`python -m headernet_core.train ...`: the trainer's command line (library: `headernet_core.trainer`).

Only a `-m` entry point: nothing in the project imports it, because `headernet_core.train` is
the public *function* (`from headernet_core import train`), and importing a submodule of that
name would rebind the package attribute to the module.
"""
from headernet_core.trainer import main

if __name__ == "__main__":
    main()
