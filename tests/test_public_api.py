"""The README's Python API: its snippet runs as written, and the public names are the functions,
whatever the project itself imports (the -m entry points are modules named like them)."""
from __future__ import annotations

import importlib
import re
import runpy
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from conftest import write_clips

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FUNCTIONS = ("train", "evaluate", "predict", "load_backbone")
CLI_MODULES = ("headernet_core.train", "headernet_core.evaluate", "headernet_core.predict")


def readme_api_snippet() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_project_never_imports_its_cli_modules():
    """Importing `headernet_core.train` would replace the function on the package."""
    pattern = re.compile(r"(from\s+headernet_core\.(train|evaluate|predict)\s+import|"
                         r"import\s+headernet_core\.(train|evaluate|predict)\b|"
                         r"from\s+\.(train|evaluate|predict)\s+import)")
    offenders = [str(path.relative_to(REPO)) for folder in ("headernet_core", "tuning", "tests", "bench")
                 for path in (REPO / folder).rglob("*.py")
                 if path.name not in ("train.py", "evaluate.py", "predict.py")
                 and pattern.search(path.read_text())]
    assert offenders == []


def test_public_names_are_functions_after_the_project_ran_its_clis(capsys, monkeypatch):
    import headernet_core
    for module in ("headernet_core.trainer", "headernet_core.evaluation", "headernet_core.prediction",
                   "tuning.search", "tuning.trial", "tuning.retrain"):
        importlib.import_module(module)
    for module in CLI_MODULES:   # what `python -m` does, in this process
        with pytest.raises(SystemExit) as exc:
            monkeypatch.setattr(sys, "argv", [module, "--help"])
            runpy.run_module(module, run_name="__main__")
        assert exc.value.code == 0
    capsys.readouterr()
    for name in FUNCTIONS:
        value = getattr(headernet_core, name)
        assert isinstance(value, types.FunctionType) and value.__name__ == name, (name, value)
    from headernet_core import evaluate, predict, train
    assert callable(train) and callable(evaluate) and callable(predict)


@pytest.mark.parametrize("module", (*CLI_MODULES, "headernet_core.split_dataset", "tuning.search",
                                    "tuning.retrain"))
def test_the_cli_entry_points_still_run(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: python -m " + module in result.stdout, result.stderr
    description = " ".join(result.stdout.split("\n\n")[1].split())
    assert description.endswith("."), description   # whole sentences, not a docstring's first line


def test_the_readme_snippet_runs_as_written(tmp_path, monkeypatch):
    """In a folder laid out like the README's demo (small clips, so it takes seconds)."""
    splits, clips = tmp_path / "demo_data" / "splits", tmp_path / "demo_data" / "raw" / "clips"
    for name, n, seed in (("train", 18, 1), ("val", 9, 2), ("test", 9, 3)):
        frame = write_clips(clips, n, seed=seed, prefix=name)
        frame["path"] = [f"../raw/{p}" for p in frame["path"]]
        splits.mkdir(parents=True, exist_ok=True)
        frame.to_csv(splits / f"{name}.csv", index=False)
    shutil.copytree(REPO / "tests" / "data" / "vmae_tiny", tmp_path / "checkpoints" / "VideoMAEv2-Base")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_api_snippet(), "README.md", "exec"), namespace)
    assert namespace["result"].best_checkpoint.is_file()
    assert {"f1", "threshold", "val_auc"} <= set(namespace["metrics"])
    assert len(namespace["scores"]) == 36 and set(namespace["scores"]["pred_label"]) <= {0, 1}
    assert namespace["backbone"].num_features == 32
